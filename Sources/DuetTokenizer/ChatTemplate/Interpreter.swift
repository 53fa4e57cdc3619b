/// Runs a parsed template. Scoping as in Jinja: a for loop's body is its own scope (what
/// `set` does inside stays inside; `namespace()` carries values out), `if` is not.
final class Interpreter {
    private var scopes: [[String: TemplateValue]]
    private var output = ""
    private enum LoopSignal: Error { case breakLoop, continueLoop }

    init(globals: [String: TemplateValue]) {
        scopes = [Self.builtins.merging(globals) { $1 }]
    }

    func render(_ nodes: [Node]) throws(TemplateError) -> String {
        do { try run(nodes) } catch let e as TemplateError { throw e } catch {
            throw .syntax("'break' or 'continue' outside a loop", line: 0)
        }
        return output
    }

    // MARK: statements

    private func run(_ nodes: [Node]) throws {
        for node in nodes { try run(node) }
    }

    private func run(_ node: Node) throws {
        switch node {
        case .text(let t):
            output += t
        case .output(let e, let line):
            output += try eval(e, line).printed
        case .ifBlock(let branches, let otherwise, let line):
            for (condition, body) in branches {
                if try eval(condition, line).isTruthy {
                    try run(body)
                    return
                }
            }
            try run(otherwise)
        case .forBlock(let targets, let iterable, let filter, let body, let otherwise, let line):
            try runFor(targets, iterable, filter, body, otherwise, line)
        case .set(let target, let value, let line):
            let v = try eval(value, line)
            if target.count == 1 {
                scopes[scopes.count - 1][target[0]] = v
            } else {
                guard case .namespace(let ns) = lookup(target[0]) else {
                    throw TemplateError.runtime("'\(target[0])' is not a namespace; only namespace attributes can be set", line: line)
                }
                ns.attributes[target[1]] = v
            }
        case .setTuple(let names, let value, let line):
            let items = try iterate(try eval(value, line), line)
            guard items.count == names.count else { throw TemplateError.runtime("cannot unpack \(items.count) values into \(names.count) names", line: line) }
            for (n, v) in zip(names, items) { scopes[scopes.count - 1][n] = v }
        case .breakLoop: throw LoopSignal.breakLoop
        case .continueLoop: throw LoopSignal.continueLoop
        }
    }

    private func runFor(_ targets: [String], _ iterable: Expr, _ filter: Expr?, _ body: [Node], _ otherwise: [Node], _ line: Int) throws {
        var items = try iterate(try eval(iterable, line), line)
        if let filter {
            items = try items.filter { item in
                scopes.append(try bind(targets, item, line))
                defer { scopes.removeLast() }
                return try eval(filter, line).isTruthy
            }
        }
        if items.isEmpty { try run(otherwise); return }
        for (i, item) in items.enumerated() {
            var scope = try bind(targets, item, line)
            scope["loop"] = .loop(.init(index0: i, length: items.count))
            scopes.append(scope)
            defer { scopes.removeLast() }
            do { try run(body) } catch LoopSignal.continueLoop { continue } catch LoopSignal.breakLoop { break }
        }
    }

    private func bind(_ targets: [String], _ item: TemplateValue, _ line: Int) throws(TemplateError) -> [String: TemplateValue] {
        if targets.count == 1 { return [targets[0]: item] }
        let parts = try iterate(item, line)
        guard parts.count == targets.count else { throw .runtime("cannot unpack \(parts.count) values into \(targets.count) loop variables", line: line) }
        return Dictionary(uniqueKeysWithValues: zip(targets, parts))
    }

    private func lookup(_ name: String) -> TemplateValue {
        for scope in scopes.reversed() { if let v = scope[name] { return v } }
        return .undefined(name)
    }

    // MARK: expressions

    func eval(_ e: Expr, _ line: Int) throws(TemplateError) -> TemplateValue {
        do {
            return try evaluate(e, line)
        } catch {
            throw error.at(line)
        }
    }

    private func evaluate(_ e: Expr, _ line: Int) throws(TemplateError) -> TemplateValue {
        switch e {
        case .literal(let v): return v
        case .name(let n): return lookup(n)
        case .list(let items): return .list(try items.map { (x) throws(TemplateError) in try evaluate(x, line) })
        case .dict(let pairs):
            var d = TemplateValue.OrderedDict()
            for (k, v) in pairs {
                guard case .string(let key) = try evaluate(k, line) else { throw .runtime("dict keys must be strings", line: line) }
                d[key] = try evaluate(v, line)
            }
            return .dict(d)
        case .attribute(let base, let name): return try attribute(try evaluate(base, line), name, line)
        case .index(let base, let index): return try subscriptValue(try evaluate(base, line), try evaluate(index, line), line)
        case .slice(let base, let a, let b, let c):
            return try slice(try evaluate(base, line), a.map { (x) throws(TemplateError) in try evaluate(x, line) },
                             b.map { (x) throws(TemplateError) in try evaluate(x, line) }, c.map { (x) throws(TemplateError) in try evaluate(x, line) }, line)
        case .call(let callee, let args, let kwargs):
            let f = try evaluate(callee, line)
            guard case .function(_, let body) = f else {
                if case .undefined(let n) = f { throw .runtime("'\(n)' is undefined and cannot be called", line: line) }
                throw .runtime("a \(f.typeName) is not callable", line: line)
            }
            return try body(try args.map { (x) throws(TemplateError) in try evaluate(x, line) },
                            try kwargs.map { (k, v) throws(TemplateError) in (k, try evaluate(v, line)) })
        case .filter(let base, let name, let args, let kwargs):
            return try applyFilter(name, try evaluate(base, line), try args.map { (x) throws(TemplateError) in try evaluate(x, line) },
                                   try kwargs.map { (k, v) throws(TemplateError) in (k, try evaluate(v, line)) }, line)
        case .test(let base, let name, let args, let negated):
            let r = try applyTest(name, try evaluate(base, line), try args.map { (x) throws(TemplateError) in try evaluate(x, line) }, line)
            return .bool(r != negated)
        case .not(let x): return .bool(!(try evaluate(x, line)).isTruthy)
        case .negate(let x):
            switch try evaluate(x, line) {
            case .int(let i): return .int(-i)
            case .double(let d): return .double(-d)
            case let v: throw .runtime("cannot negate a \(v.typeName)", line: line)
            }
        case .and(let a, let b):
            let l = try evaluate(a, line)
            return l.isTruthy ? try evaluate(b, line) : l
        case .or(let a, let b):
            let l = try evaluate(a, line)
            return l.isTruthy ? l : try evaluate(b, line)
        case .ternary(let condition, let then, let otherwise):
            if try evaluate(condition, line).isTruthy { return try evaluate(then, line) }
            return try otherwise.map { (x) throws(TemplateError) in try evaluate(x, line) } ?? .undefined("")
        case .binary(let op, let a, let b):
            return try binary(op, try evaluate(a, line), try evaluate(b, line), line)
        }
    }

    func iterate(_ v: TemplateValue, _ line: Int) throws(TemplateError) -> [TemplateValue] {
        switch v {
        case .list(let l): return l
        case .dict(let d): return d.keys.map { .string($0) }
        case .string(let s): return s.map { .string(String($0)) }
        case .undefined(let n): throw .runtime("'\(n)' is undefined and cannot be iterated", line: line)
        default: throw .runtime("a \(v.typeName) is not iterable", line: line)
        }
    }

    private func binary(_ op: String, _ a: TemplateValue, _ b: TemplateValue, _ line: Int) throws(TemplateError) -> TemplateValue {
        switch op {
        case "~": return .string(a.printed + b.printed)
        case "==": return .bool(a == b)
        case "!=": return .bool(a != b)
        case "in":
            switch b {
            case .string(let s):
                guard case .string(let sub) = a else { throw .runtime("'in <string>' needs a string on the left, got \(a.typeName)", line: line) }
                return .bool(sub.isEmpty || s.contains(sub))
            case .list(let l): return .bool(l.contains(a))
            case .dict(let d): if case .string(let k) = a { return .bool(d.values[k] != nil) }; return .bool(false)
            case .undefined(let n): throw .runtime("'\(n)' is undefined", line: line)
            default: throw .runtime("'in' needs a string, list or dict on the right, got \(b.typeName)", line: line)
            }
        case "<", "<=", ">", ">=":
            let order: Int
            switch (a, b) {
            case (.string(let x), .string(let y)): order = x < y ? -1 : x == y ? 0 : 1
            default:
                guard let x = number(a), let y = number(b) else { throw .runtime("cannot compare \(a.typeName) and \(b.typeName)", line: line) }
                order = x < y ? -1 : x == y ? 0 : 1
            }
            switch op {
            case "<": return .bool(order < 0)
            case "<=": return .bool(order <= 0)
            case ">": return .bool(order > 0)
            default: return .bool(order >= 0)
            }
        case "+":
            switch (a, b) {
            case (.string(let x), .string(let y)): return .string(x + y)
            case (.list(let x), .list(let y)): return .list(x + y)
            case (.int(let x), .int(let y)): return .int(x + y)
            default:
                if let x = number(a), let y = number(b) { return .double(x + y) }
                throw .runtime("cannot add \(a.typeName) and \(b.typeName) (use '~' to join as text)", line: line)
            }
        case "-", "*", "/", "//", "%":
            if op == "*", case .string(let s) = a, case .int(let n) = b { return .string(String(repeating: s, count: max(0, n))) }
            if case .int(let x) = a, case .int(let y) = b, op != "/" {
                switch op {
                case "-": return .int(x - y)
                case "*": return .int(x * y)
                default:
                    guard y != 0 else { throw .runtime("division by zero", line: line) }
                    let q = Int((Double(x) / Double(y)).rounded(.down))
                    return .int(op == "//" ? q : x - q * y)
                }
            }
            guard let x = number(a), let y = number(b) else { throw .runtime("cannot apply '\(op)' to \(a.typeName) and \(b.typeName)", line: line) }
            switch op {
            case "-": return .double(x - y)
            case "*": return .double(x * y)
            case "/": guard y != 0 else { throw .runtime("division by zero", line: line) }; return .double(x / y)
            case "//": return .double((x / y).rounded(.down))
            default: return .double(x - (x / y).rounded(.down) * y)
            }
        default:
            throw .unsupported("operator '\(op)'", line: line)
        }
    }

    private func number(_ v: TemplateValue) -> Double? {
        switch v {
        case .int(let i): Double(i)
        case .double(let d): d
        case .bool(let b): b ? 1 : 0
        default: nil
        }
    }

    private func subscriptValue(_ base: TemplateValue, _ index: TemplateValue, _ line: Int) throws(TemplateError) -> TemplateValue {
        switch (base, index) {
        case (.list(let l), .int(let i)):
            let j = i < 0 ? l.count + i : i
            return j >= 0 && j < l.count ? l[j] : .undefined("[\(i)]")
        case (.string(let s), .int(let i)):
            let chars = Array(s)
            let j = i < 0 ? chars.count + i : i
            return j >= 0 && j < chars.count ? .string(String(chars[j])) : .undefined("[\(i)]")
        case (.dict, .string(let k)), (.namespace, .string(let k)), (.loop, .string(let k)):
            return try attribute(base, k, line)
        case (.undefined(let n), _):
            throw .runtime("'\(n)' is undefined", line: line)
        default:
            throw .runtime("cannot index a \(base.typeName) with a \(index.typeName)", line: line)
        }
    }

    private func slice(_ base: TemplateValue, _ a: TemplateValue?, _ b: TemplateValue?, _ c: TemplateValue?, _ line: Int) throws(TemplateError) -> TemplateValue {
        func int(_ v: TemplateValue?) throws(TemplateError) -> Int? {
            guard let v, v != .none else { return nil }
            guard case .int(let i) = v else { throw .runtime("slice bounds must be integers", line: line) }
            return i
        }
        let step = try int(c) ?? 1
        guard step != 0 else { throw .runtime("slice step cannot be zero", line: line) }
        func indices(_ n: Int) throws(TemplateError) -> [Int] {
            func clamp(_ i: Int?, _ d: Int) -> Int {
                guard var i else { return d }
                if i < 0 { i += n }
                return step > 0 ? min(max(i, 0), n) : min(max(i, -1), n - 1)
            }
            let start = clamp(try int(a), step > 0 ? 0 : n - 1), stop = clamp(try int(b), step > 0 ? n : -1)
            return Array(stride(from: start, to: stop, by: step))
        }
        switch base {
        case .list(let l): return .list(try indices(l.count).map { l[$0] })
        case .string(let s):
            let chars = Array(s)
            return .string(String(try indices(chars.count).map { chars[$0] }))
        default: throw .runtime("cannot slice a \(base.typeName)", line: line)
        }
    }

    private func attribute(_ base: TemplateValue, _ name: String, _ line: Int) throws(TemplateError) -> TemplateValue {
        switch base {
        case .dict(let d):
            if let v = d.values[name] { return v }
            if let m = dictMethod(d, name) { return m }
            return .undefined(name)
        case .namespace(let ns): return ns.attributes[name] ?? .undefined(name)
        case .loop(let l):
            switch name {
            case "index0": return .int(l.index0)
            case "index": return .int(l.index0 + 1)
            case "first": return .bool(l.index0 == 0)
            case "last": return .bool(l.index0 == l.length - 1)
            case "length": return .int(l.length)
            case "revindex": return .int(l.length - l.index0)
            case "revindex0": return .int(l.length - l.index0 - 1)
            default: throw .unsupported("loop.\(name)", line: line)
            }
        case .string(let s):
            if let m = stringMethod(s, name, line) { return m }
            return .undefined(name)
        case .undefined(let n):
            throw .runtime("'\(n.isEmpty ? "value" : n)' is undefined (reading .\(name))", line: line)
        default:
            return .undefined(name)
        }
    }
}
