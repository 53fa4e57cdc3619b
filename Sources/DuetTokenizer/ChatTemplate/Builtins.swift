/// Globals, filters, tests and methods of the interpreter — the set real chat templates use.
/// Anything else is an error naming it.
extension Interpreter {
    static var builtins: [String: TemplateValue] { [
        "raise_exception": .function("raise_exception") { args, _ throws(TemplateError) in
            throw .raised(args.first?.printed ?? "raise_exception called", line: 0)
        },
        "namespace": .function("namespace") { _, kwargs in
            let ns = TemplateValue.Namespace()
            for (k, v) in kwargs { ns.attributes[k] = v }
            return .namespace(ns)
        },
        "range": .function("range") { args, _ throws(TemplateError) in
            let ints = args.compactMap { v -> Int? in if case .int(let i) = v { return i }; return nil }
            guard ints.count == args.count, (1...3).contains(ints.count) else { throw .runtime("range() takes 1 to 3 integers", line: 0) }
            let (start, stop, step) = ints.count == 1 ? (0, ints[0], 1) : (ints[0], ints[1], ints.count == 3 ? ints[2] : 1)
            guard step != 0 else { throw .runtime("range() step cannot be zero", line: 0) }
            return .list(stride(from: start, to: stop, by: step).map { .int($0) })
        },
    ] }

    func applyFilter(_ name: String, _ v: TemplateValue, _ args: [TemplateValue], _ kwargs: [(String, TemplateValue)], _ line: Int) throws(TemplateError) -> TemplateValue {
        func kw(_ k: String) -> TemplateValue? { kwargs.first { $0.0 == k }?.1 }
        switch name {
        case "trim":
            return .string(v.printed.trimmingPythonWhitespace())
        case "length", "count":
            switch v {
            case .string(let s): return .int(s.count)
            case .list(let l): return .int(l.count)
            case .dict(let d): return .int(d.keys.count)
            default: throw .runtime("\(v.typeName) has no length", line: line)
            }
        case "tojson":
            var indent: Int? = nil
            if case .int(let i)? = args.first ?? kw("indent") { indent = i }
            return .string(try toJSON(v, indent: indent, level: 0, line))
        case "default", "d":
            let boolean = (args.count > 1 ? args[1] : kw("boolean"))?.isTruthy ?? false
            if !v.isDefined || (boolean && !v.isTruthy) { return args.first ?? kw("default_value") ?? .string("") }
            return v
        case "join":
            let sep = (args.first ?? kw("d")).map(\.printed) ?? ""
            var items = try iterate(v, line)
            if let attr = kw("attribute")?.printed { items = try items.map { (x) throws(TemplateError) in try attributeOf(x, attr, line) } }
            return .string(items.map(\.printed).joined(separator: sep))
        case "upper": return .string(v.printed.uppercased())
        case "lower": return .string(v.printed.lowercased())
        case "capitalize":
            let s = v.printed
            return .string(s.prefix(1).uppercased() + s.dropFirst().lowercased())
        case "title": return .string(pythonTitle(v.printed))
        case "string": return .string(v.printed)
        case "int":
            switch v {
            case .int: return v
            case .double(let d): return .int(Int(d))
            case .string(let s): return .int(Int(s.trimmingPythonWhitespace()) ?? 0)
            case .bool(let b): return .int(b ? 1 : 0)
            default: return .int(0)
            }
        case "float":
            switch v {
            case .int(let i): return .double(Double(i))
            case .double: return v
            case .string(let s): return .double(Double(s.trimmingPythonWhitespace()) ?? 0)
            default: return .double(0)
            }
        case "abs":
            if case .int(let i) = v { return .int(abs(i)) }
            if case .double(let d) = v { return .double(abs(d)) }
            throw .runtime("abs of a \(v.typeName)", line: line)
        case "first": return try iterate(v, line).first ?? .undefined("first")
        case "last": return try iterate(v, line).last ?? .undefined("last")
        case "list": return .list(try iterate(v, line))
        case "reverse":
            if case .string(let s) = v { return .string(String(s.reversed())) }
            return .list(try iterate(v, line).reversed())
        case "items":
            guard case .dict(let d) = v else { throw .runtime("items of a \(v.typeName)", line: line) }
            return .list(d.keys.map { .list([.string($0), d.values[$0]!]) })
        case "replace":
            guard args.count >= 2 else { throw .runtime("replace needs two arguments", line: line) }
            return .string(v.printed.replacing(args[0].printed, with: args[1].printed))
        case "safe": return v
        case "map":
            guard let attr = kw("attribute")?.printed else { throw .unsupported("map without attribute=", line: line) }
            return .list(try iterate(v, line).map { (x) throws(TemplateError) in try attributeOf(x, attr, line) })
        case "selectattr", "rejectattr":
            guard let attr = args.first?.printed else { throw .runtime("\(name) needs an attribute name", line: line) }
            let keep = name == "selectattr"
            var kept: [TemplateValue] = []
            for x in try iterate(v, line) {
                let a = try attributeOf(x, attr, line)
                let ok = args.count > 1 ? try applyTest(args[1].printed, a, Array(args.dropFirst(2)), line) : a.isTruthy
                if ok == keep { kept.append(x) }
            }
            return .list(kept)
        default:
            throw .unsupported("filter '\(name)'", line: line)
        }
    }

    private func attributeOf(_ v: TemplateValue, _ name: String, _ line: Int) throws(TemplateError) -> TemplateValue {
        if case .dict(let d) = v { return d.values[name] ?? .undefined(name) }
        throw .runtime("cannot read '\(name)' of a \(v.typeName)", line: line)
    }

    func applyTest(_ name: String, _ v: TemplateValue, _ args: [TemplateValue], _ line: Int) throws(TemplateError) -> Bool {
        switch name {
        case "defined": return v.isDefined
        case "undefined": return !v.isDefined
        case "none": return v == .none
        case "string": if case .string = v { return true }; return false
        case "number": switch v { case .int, .double: return true; default: return false }
        case "integer": if case .int = v { return true }; return false
        case "float": if case .double = v { return true }; return false
        case "boolean": if case .bool = v { return true }; return false
        case "true": return v == .bool(true)
        case "false": return v == .bool(false)
        case "mapping": if case .dict = v { return true }; return false
        case "sequence", "iterable": switch v { case .list, .string, .dict: return true; default: return false }
        case "callable": if case .function = v { return true }; return false
        case "even", "odd":
            guard case .int(let i) = v else { throw .runtime("'\(name)' needs an integer", line: line) }
            return (i % 2 == 0) == (name == "even")
        case "divisibleby":
            guard case .int(let i) = v, case .int(let n)? = args.first, n != 0 else { throw .runtime("'divisibleby' needs integers", line: line) }
            return i % n == 0
        case "eq", "equalto", "==", "sameas": return args.first.map { v == $0 } ?? false
        case "ne", "!=": return args.first.map { v != $0 } ?? false
        case "in": return args.first.map { (try? iterate($0, line))?.contains(v) ?? false } ?? false
        default: throw .unsupported("test '\(name)'", line: line)
        }
    }

    func dictMethod(_ d: TemplateValue.OrderedDict, _ name: String) -> TemplateValue? {
        switch name {
        case "items": return .function("items") { _, _ in .list(d.keys.map { .list([.string($0), d.values[$0]!]) }) }
        case "keys": return .function("keys") { _, _ in .list(d.keys.map { .string($0) }) }
        case "values": return .function("values") { _, _ in .list(d.keys.map { d.values[$0]! }) }
        case "get": return .function("get") { args, _ in
            guard case .string(let k)? = args.first else { return args.count > 1 ? args[1] : .none }
            return d.values[k] ?? (args.count > 1 ? args[1] : .none)
        }
        default: return nil
        }
    }

    func stringMethod(_ s: String, _ name: String, _ line: Int) -> TemplateValue? {
        func chars(_ args: [TemplateValue]) -> Set<Character>? {
            if case .string(let c)? = args.first { return Set(c) }
            return nil
        }
        switch name {
        case "strip": return .function(name) { args, _ in .string(chars(args).map { s.trimming($0, leading: true, trailing: true) } ?? s.trimmingPythonWhitespace()) }
        case "lstrip": return .function(name) { args, _ in .string(chars(args).map { s.trimming($0, leading: true, trailing: false) } ?? s.trimmingPythonWhitespace(trailing: false)) }
        case "rstrip": return .function(name) { args, _ in .string(chars(args).map { s.trimming($0, leading: false, trailing: true) } ?? s.trimmingPythonWhitespace(leading: false)) }
        case "upper": return .function(name) { _, _ in .string(s.uppercased()) }
        case "lower": return .function(name) { _, _ in .string(s.lowercased()) }
        case "title": return .function(name) { _, _ in .string(pythonTitle(s)) }
        case "capitalize": return .function(name) { _, _ in .string(s.prefix(1).uppercased() + s.dropFirst().lowercased()) }
        case "startswith", "endswith":
            return .function(name) { args, _ throws(TemplateError) in
                let options: [TemplateValue]
                if case .list(let l)? = args.first { options = l } else { options = Array(args.prefix(1)) }
                return .bool(options.contains { o in
                    guard case .string(let p) = o else { return false }
                    return name == "startswith" ? s.hasPrefix(p) : s.hasSuffix(p)
                })
            }
        case "split":
            return .function(name) { args, _ in
                if case .string(let sep)? = args.first, !sep.isEmpty {
                    return .list(s.split(separator: sep, omittingEmptySubsequences: false).map { .string(String($0)) })
                }
                return .list(s.split(whereSeparator: { $0.isWhitespace }).map { .string(String($0)) })
            }
        case "replace":
            return .function(name) { args, _ throws(TemplateError) in
                guard args.count >= 2 else { throw .runtime("replace needs two arguments", line: line) }
                return .string(s.replacing(args[0].printed, with: args[1].printed))
            }
        case "join":
            return .function(name) { args, _ throws(TemplateError) in
                guard case .list(let l)? = args.first else { throw .runtime("join needs a list", line: line) }
                return .string(l.map(\.printed).joined(separator: s))
            }
        default: return nil
        }
    }

    /// Python's json.dumps(ensure_ascii=False, indent=indent), as transformers' tojson filter.
    func toJSON(_ v: TemplateValue, indent: Int?, level: Int, _ line: Int) throws(TemplateError) -> String {
        let pad = indent.map { "\n" + String(repeating: " ", count: $0 * (level + 1)) } ?? ""
        let closePad = indent.map { "\n" + String(repeating: " ", count: $0 * level) } ?? ""
        let sep = indent == nil ? ", " : ","
        switch v {
        case .none, .undefined: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d): return d.isFinite ? pythonFloat(d) : (d.isNaN ? "NaN" : d > 0 ? "Infinity" : "-Infinity")
        case .string(let s): return jsonQuote(s)
        case .list(let l):
            if l.isEmpty { return "[]" }
            return "[" + pad + (try l.map { (x) throws(TemplateError) in try toJSON(x, indent: indent, level: level + 1, line) }).joined(separator: sep + pad) + closePad + "]"
        case .dict(let d):
            if d.keys.isEmpty { return "{}" }
            return "{" + pad + (try d.keys.map { (k) throws(TemplateError) in jsonQuote(k) + ": " + (try toJSON(d.values[k]!, indent: indent, level: level + 1, line)) }).joined(separator: sep + pad) + closePad + "}"
        default: throw .runtime("a \(v.typeName) cannot be written as JSON", line: line)
        }
    }
}

/// A JSON string literal with Python's escapes (non-ASCII kept, as ensure_ascii=False).
func jsonQuote(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case "\u{08}": out += "\\b"
        case "\u{0C}": out += "\\f"
        case _ where u.value < 0x20:
            let h = String(u.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
        default: out.unicodeScalars.append(u)
        }
    }
    return out + "\""
}

/// Python's str.title(): a letter after a non-letter is upper-cased, the others lowered.
func pythonTitle(_ s: String) -> String {
    var out = "", previousIsLetter = false
    for c in s {
        out += previousIsLetter ? c.lowercased() : c.uppercased()
        previousIsLetter = c.isLetter
    }
    return out
}

extension String {
    /// Python's str.strip() with no argument (Unicode whitespace).
    public func trimmingPythonWhitespace(leading: Bool = true, trailing: Bool = true) -> String {
        var scalars = Substring(self).unicodeScalars[...]
        if leading { while let f = scalars.first, f.properties.isWhitespace { scalars = scalars.dropFirst() } }
        if trailing { while let l = scalars.last, l.properties.isWhitespace { scalars = scalars.dropLast() } }
        return String(String.UnicodeScalarView(scalars))
    }

    func trimming(_ set: Set<Character>, leading: Bool, trailing: Bool) -> String {
        var sub = Substring(self)
        if leading { while let f = sub.first, set.contains(f) { sub = sub.dropFirst() } }
        if trailing { while let l = sub.last, set.contains(l) { sub = sub.dropLast() } }
        return String(sub)
    }
}
