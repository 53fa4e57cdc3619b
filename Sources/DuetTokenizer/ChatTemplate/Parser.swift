/// Expressions of the Jinja subset chat templates use.
indirect enum Expr {
    case literal(TemplateValue)
    case name(String)
    case list([Expr])
    case dict([(Expr, Expr)])
    case attribute(Expr, String)
    case index(Expr, Expr)
    case slice(Expr, Expr?, Expr?, Expr?)
    case call(Expr, [Expr], [(String, Expr)])
    case filter(Expr, String, [Expr], [(String, Expr)])
    case test(Expr, String, [Expr], negated: Bool)
    case not(Expr)
    case negate(Expr)
    case binary(String, Expr, Expr)
    case and(Expr, Expr)
    case or(Expr, Expr)
    case ternary(Expr, then: Expr, otherwise: Expr?)
}

/// Template statements.
indirect enum Node {
    case text(String)
    case output(Expr, line: Int)
    case ifBlock([(Expr, [Node])], otherwise: [Node], line: Int)
    case forBlock(targets: [String], iterable: Expr, filter: Expr?, body: [Node], otherwise: [Node], line: Int)
    case set(target: [String], value: Expr, line: Int)      // ["x"] or ["ns", "attr"]
    case setTuple(names: [String], value: Expr, line: Int)
    case breakLoop
    case continueLoop
}

/// Recursive-descent parser over one expression's tokens, precedence as in Jinja2:
/// ternary < or < and < not < comparisons/in < + - < ~ < * / // % < unary < postfix,
/// with filters (`|`) and tests (`is`) binding to the postfix expression.
struct ExpressionParser {
    var tokens: [Token]
    var pos = 0
    let line: Int

    init(_ tokens: [Token], line: Int) {
        self.tokens = tokens
        self.line = line
    }

    var peek: Token { tokens[pos] }
    mutating func next() -> Token { defer { pos += 1 }; return tokens[pos] }
    func isOp(_ o: String) -> Bool { peek == .op(o) }
    func isName(_ n: String) -> Bool { peek == .name(n) }
    mutating func expect(_ o: String) throws(TemplateError) {
        guard isOp(o) else { throw .syntax("expected '\(o)', found \(describe(peek))", line: line) }
        pos += 1
    }
    func describe(_ t: Token) -> String {
        switch t {
        case .name(let n): "'\(n)'"
        case .string(let s): "string '\(s)'"
        case .int(let i): "\(i)"
        case .double(let d): "\(d)"
        case .op(let o): "'\(o)'"
        case .end: "end of tag"
        }
    }

    mutating func parseExpression() throws(TemplateError) -> Expr {
        let value = try parseOr()
        if isName("if") {
            pos += 1
            let condition = try parseOr()
            var otherwise: Expr? = nil
            if isName("else") {
                pos += 1
                otherwise = try parseExpression()
            }
            return .ternary(condition, then: value, otherwise: otherwise)
        }
        return value
    }

    mutating func parseOr() throws(TemplateError) -> Expr {
        var left = try parseAnd()
        while isName("or") { pos += 1; left = .or(left, try parseAnd()) }
        return left
    }

    mutating func parseAnd() throws(TemplateError) -> Expr {
        var left = try parseNot()
        while isName("and") { pos += 1; left = .and(left, try parseNot()) }
        return left
    }

    mutating func parseNot() throws(TemplateError) -> Expr {
        if isName("not") { pos += 1; return .not(try parseNot()) }
        return try parseCompare()
    }

    mutating func parseCompare() throws(TemplateError) -> Expr {
        var left = try parseAdd()
        while true {
            if case .op(let o) = peek, ["==", "!=", "<", "<=", ">", ">="].contains(o) {
                pos += 1
                left = .binary(o, left, try parseAdd())
            } else if isName("in") {
                pos += 1
                left = .binary("in", left, try parseAdd())
            } else if isName("not"), tokens[pos + 1] == .name("in") {
                pos += 2
                left = .not(.binary("in", left, try parseAdd()))
            } else {
                return left
            }
        }
    }

    mutating func parseAdd() throws(TemplateError) -> Expr {
        var left = try parseConcat()
        while isOp("+") || isOp("-") {
            let o = isOp("+") ? "+" : "-"
            pos += 1
            left = .binary(o, left, try parseConcat())
        }
        return left
    }

    mutating func parseConcat() throws(TemplateError) -> Expr {
        var left = try parseMul()
        while isOp("~") { pos += 1; left = .binary("~", left, try parseMul()) }
        return left
    }

    mutating func parseMul() throws(TemplateError) -> Expr {
        var left = try parseUnary()
        while case .op(let o) = peek, ["*", "/", "//", "%"].contains(o) {
            pos += 1
            left = .binary(o, left, try parseUnary())
        }
        return left
    }

    mutating func parseUnary() throws(TemplateError) -> Expr {
        if isOp("-") { pos += 1; return .negate(try parseUnary()) }
        if isOp("+") { pos += 1; return try parseUnary() }
        return try parseFilters(try parsePostfix(try parsePrimary()))
    }

    mutating func parsePrimary() throws(TemplateError) -> Expr {
        switch next() {
        case .string(var s):
            while case .string(let more) = peek { s += more; pos += 1 }  // adjacent literals concatenate
            return .literal(.string(s))
        case .int(let i): return .literal(.int(i))
        case .double(let d): return .literal(.double(d))
        case .name(let n):
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case .op("("):
            let e = try parseExpression()
            if isOp(",") {  // a tuple: treated as a list
                var items = [e]
                while isOp(",") { pos += 1; if isOp(")") { break }; items.append(try parseExpression()) }
                try expect(")")
                return .list(items)
            }
            try expect(")")
            return e
        case .op("["):
            var items: [Expr] = []
            while !isOp("]") {
                items.append(try parseExpression())
                if !isOp("]") { try expect(",") }
            }
            pos += 1
            return .list(items)
        case .op("{"):
            var pairs: [(Expr, Expr)] = []
            while !isOp("}") {
                let k = try parseExpression()
                try expect(":")
                pairs.append((k, try parseExpression()))
                if !isOp("}") { try expect(",") }
            }
            pos += 1
            return .dict(pairs)
        case let t:
            throw .syntax("unexpected \(describe(t))", line: line)
        }
    }

    mutating func parsePostfix(_ base: Expr) throws(TemplateError) -> Expr {
        var e = base
        while true {
            if isOp(".") {
                pos += 1
                guard case .name(let n) = next() else { throw .syntax("expected an attribute name after '.'", line: line) }
                e = .attribute(e, n)
            } else if isOp("[") {
                pos += 1
                e = try parseSubscript(e)
            } else if isOp("(") {
                pos += 1
                let (args, kwargs) = try parseArguments()
                e = .call(e, args, kwargs)
            } else {
                return e
            }
        }
    }

    mutating func parseSubscript(_ e: Expr) throws(TemplateError) -> Expr {
        var parts: [Expr?] = [nil]
        var sawColon = false
        while !isOp("]") {
            if isOp(":") { pos += 1; sawColon = true; parts.append(nil); continue }
            parts[parts.count - 1] = try parseExpression()
        }
        pos += 1
        if !sawColon {
            guard let index = parts[0] else { throw .syntax("empty subscript", line: line) }
            return .index(e, index)
        }
        guard parts.count <= 3 else { throw .syntax("too many ':' in a slice", line: line) }
        return .slice(e, parts[0], parts.count > 1 ? parts[1] : nil, parts.count > 2 ? parts[2] : nil)
    }

    /// After '(': positional and keyword arguments up to ')'.
    mutating func parseArguments() throws(TemplateError) -> ([Expr], [(String, Expr)]) {
        var args: [Expr] = [], kwargs: [(String, Expr)] = []
        while !isOp(")") {
            if case .name(let n) = peek, tokens[pos + 1] == .op("=") {
                pos += 2
                kwargs.append((n, try parseExpression()))
            } else {
                args.append(try parseExpression())
            }
            if !isOp(")") { try expect(",") }
        }
        pos += 1
        return (args, kwargs)
    }

    mutating func parseFilters(_ base: Expr) throws(TemplateError) -> Expr {
        var e = base
        while true {
            if isOp("|") {
                pos += 1
                guard case .name(let n) = next() else { throw .syntax("expected a filter name after '|'", line: line) }
                var args: [Expr] = [], kwargs: [(String, Expr)] = []
                if isOp("(") { pos += 1; (args, kwargs) = try parseArguments() }
                e = .filter(e, n, args, kwargs)
            } else if isName("is") {
                pos += 1
                var negated = false
                if isName("not") { pos += 1; negated = true }
                guard case .name(let n) = next() else { throw .syntax("expected a test name after 'is'", line: line) }
                var args: [Expr] = []
                if isOp("(") { pos += 1; args = try parseArguments().0 }
                else if case .string = peek { args = [try parsePrimary()] }
                else if case .int = peek { args = [try parsePrimary()] }
                e = .test(e, n, args, negated: negated)
            } else {
                return e
            }
        }
    }
}

/// Segments -> statement tree.
struct TemplateParser {
    let segments: [TemplateSegment]
    var pos = 0

    init(_ segments: [TemplateSegment]) { self.segments = segments }

    /// Parses until one of `terminators` (returned, with its tag's tokens) or the end.
    mutating func parseBody(until terminators: Set<String>, opener: String = "", line openerLine: Int = 0) throws(TemplateError) -> ([Node], String?, [Token], Int) {
        var nodes: [Node] = []
        while pos < segments.count {
            let seg = segments[pos]
            pos += 1
            switch seg {
            case .text(let t):
                nodes.append(.text(t))
            case .expression(let body, let line):
                var p = ExpressionParser(try tokenize(body, line: line), line: line)
                let e = try p.parseExpression()
                guard p.peek == .end else { throw .syntax("unexpected \(p.describe(p.peek)) in '{{ \(body) }}'", line: line) }
                nodes.append(.output(e, line: line))
            case .statement(let body, let line):
                let tokens = try tokenize(body, line: line)
                guard case .name(let keyword) = tokens[0] else { throw .syntax("empty or malformed tag '{% \(body) %}'", line: line) }
                if terminators.contains(keyword) { return (nodes, keyword, tokens, line) }
                nodes.append(try parseStatement(keyword, tokens, line: line))
            }
        }
        if !terminators.isEmpty {
            throw .syntax("'{% \(opener) %}' is never closed (no {% \(terminators.sorted().joined(separator: " / ")) %})", line: openerLine)
        }
        return (nodes, nil, [], 0)
    }

    mutating func parseStatement(_ keyword: String, _ tokens: [Token], line: Int) throws(TemplateError) -> Node {
        var p = ExpressionParser(tokens, line: line)
        p.pos = 1
        switch keyword {
        case "if":
            var branches: [(Expr, [Node])] = []
            var condition = try p.parseExpression()
            try checkEnd(p, "if")
            while true {
                let (body, term, termTokens, termLine) = try parseBody(until: ["elif", "else", "endif"], opener: "if", line: line)
                branches.append((condition, body))
                if term == "elif" {
                    var q = ExpressionParser(termTokens, line: termLine)
                    q.pos = 1
                    condition = try q.parseExpression()
                    try checkEnd(q, "elif")
                } else if term == "else" {
                    let (otherwise, _, _, _) = try parseBody(until: ["endif"], opener: "if", line: line)
                    return .ifBlock(branches, otherwise: otherwise, line: line)
                } else {
                    return .ifBlock(branches, otherwise: [], line: line)
                }
            }
        case "for":
            var targets: [String] = []
            repeat {
                if p.isOp(",") { p.pos += 1 }
                guard case .name(let n) = p.next() else { throw .syntax("expected a loop variable", line: line) }
                targets.append(n)
            } while p.isOp(",")
            guard p.isName("in") else { throw .syntax("expected 'in' in for loop", line: line) }
            p.pos += 1
            let iterable = try p.parseOr()
            var filter: Expr? = nil
            if p.isName("if") { p.pos += 1; filter = try p.parseOr() }
            if p.isName("recursive") { throw .unsupported("recursive for loops", line: line) }
            try checkEnd(p, "for")
            let (body, term, _, _) = try parseBody(until: ["else", "endfor"], opener: "for", line: line)
            var otherwise: [Node] = []
            if term == "else" { (otherwise, _, _, _) = try parseBody(until: ["endfor"], opener: "for", line: line) }
            return .forBlock(targets: targets, iterable: iterable, filter: filter, body: body, otherwise: otherwise, line: line)
        case "set":
            guard case .name(let first) = p.next() else { throw .syntax("expected a name after 'set'", line: line) }
            var target = [first]
            if p.isOp(".") {
                p.pos += 1
                guard case .name(let attr) = p.next() else { throw .syntax("expected an attribute after '.'", line: line) }
                target.append(attr)
            }
            if p.isOp(",") {
                var names = [first]
                while p.isOp(",") {
                    p.pos += 1
                    guard case .name(let n) = p.next() else { throw .syntax("expected a name", line: line) }
                    names.append(n)
                }
                try p.expect("=")
                let value = try p.parseExpression()
                try checkEnd(p, "set")
                return .setTuple(names: names, value: value, line: line)
            }
            guard p.isOp("=") else { throw .unsupported("block set ('{% set x %}...{% endset %}')", line: line) }
            p.pos += 1
            let value = try p.parseExpression()
            try checkEnd(p, "set")
            return .set(target: target, value: value, line: line)
        case "break": return .breakLoop
        case "continue": return .continueLoop
        case "generation":
            // transformers' AssistantTracker block: renders its body.
            let (body, _, _, _) = try parseBody(until: ["endgeneration"], opener: "generation", line: line)
            return .ifBlock([(.literal(.bool(true)), body)], otherwise: [], line: line)
        default:
            throw .unsupported("'{% \(keyword) %}'", line: line)
        }
    }

    private func checkEnd(_ p: ExpressionParser, _ what: String) throws(TemplateError) {
        guard p.peek == .end else { throw .syntax("unexpected \(p.describe(p.peek)) in '\(what)'", line: p.line) }
    }
}
