/// A JSON reader that keeps object keys in file order (Foundation's decoder does not), so
/// `tojson` prints messages and tools exactly as Python's json module would.
struct OrderedJSONReader {
    private let s: [UInt8]
    private var i = 0

    init(_ bytes: [UInt8]) { s = bytes }

    static func parse(_ bytes: [UInt8]) throws(TemplateError) -> TemplateValue {
        var r = OrderedJSONReader(bytes)
        let v = try r.value()
        r.skipSpace()
        guard r.i == r.s.count else { throw r.fail("unexpected text after the JSON value") }
        return v
    }

    private func fail(_ m: String) -> TemplateError { .syntax("JSON at byte \(i): \(m)", line: 0) }

    private mutating func skipSpace() {
        while i < s.count, s[i] == 0x20 || s[i] == 0x0A || s[i] == 0x0D || s[i] == 0x09 { i += 1 }
    }

    private mutating func value() throws(TemplateError) -> TemplateValue {
        skipSpace()
        guard i < s.count else { throw fail("unexpected end") }
        switch s[i] {
        case UInt8(ascii: "{"):
            i += 1
            var d = TemplateValue.OrderedDict()
            skipSpace()
            if i < s.count && s[i] == UInt8(ascii: "}") { i += 1; return .dict(d) }
            while true {
                skipSpace()
                guard i < s.count, s[i] == UInt8(ascii: "\"") else { throw fail("expected a key") }
                let key = try string()
                skipSpace()
                guard i < s.count, s[i] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                i += 1
                d[key] = try value()
                skipSpace()
                guard i < s.count else { throw fail("unexpected end") }
                if s[i] == UInt8(ascii: ",") { i += 1; continue }
                guard s[i] == UInt8(ascii: "}") else { throw fail("expected ',' or '}'") }
                i += 1
                return .dict(d)
            }
        case UInt8(ascii: "["):
            i += 1
            var items: [TemplateValue] = []
            skipSpace()
            if i < s.count && s[i] == UInt8(ascii: "]") { i += 1; return .list(items) }
            while true {
                items.append(try value())
                skipSpace()
                guard i < s.count else { throw fail("unexpected end") }
                if s[i] == UInt8(ascii: ",") { i += 1; continue }
                guard s[i] == UInt8(ascii: "]") else { throw fail("expected ',' or ']'") }
                i += 1
                return .list(items)
            }
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .none
        default: return try number()
        }
    }

    private mutating func literal(_ word: String) throws(TemplateError) {
        let w = Array(word.utf8)
        guard i + w.count <= s.count, Array(s[i..<(i + w.count)]) == w else { throw fail("expected \(word)") }
        i += w.count
    }

    private mutating func number() throws(TemplateError) -> TemplateValue {
        let start = i
        while i < s.count, "+-0123456789.eE".utf8.contains(s[i]) { i += 1 }
        let text = String(decoding: s[start..<i], as: UTF8.self)
        if let n = Int(text) { return .int(n) }
        if let d = Double(text) { return .double(d) }
        throw fail("expected a value")
    }

    private mutating func string() throws(TemplateError) -> String {
        i += 1  // opening quote
        var out: [UInt8] = []
        while i < s.count {
            let c = s[i]
            if c == UInt8(ascii: "\"") { i += 1; return String(decoding: out, as: UTF8.self) }
            if c == UInt8(ascii: "\\") {
                guard i + 1 < s.count else { break }
                let e = s[i + 1]
                i += 2
                switch e {
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "u"):
                    var code = try hex4()
                    if (0xD800..<0xDC00).contains(code), i + 1 < s.count, s[i] == UInt8(ascii: "\\"), s[i + 1] == UInt8(ascii: "u") {
                        i += 2
                        let low = try hex4()
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    out += Array(String(Unicode.Scalar(code).map(Character.init) ?? "\u{FFFD}").utf8)
                default: out.append(e)
                }
                continue
            }
            out.append(c)
            i += 1
        }
        throw fail("unterminated string")
    }

    private mutating func hex4() throws(TemplateError) -> UInt32 {
        guard i + 4 <= s.count, let v = UInt32(String(decoding: s[i..<(i + 4)], as: UTF8.self), radix: 16) else {
            throw fail("bad \\u escape")
        }
        i += 4
        return v
    }
}

extension ChatTemplate {
    /// Renders a conversation given as JSON text (an array of message objects), keeping
    /// every object's keys in file order, as Python would for `tojson`. `tools`: a JSON array.
    public func render(messagesJSON: [UInt8], addGenerationPrompt: Bool, toolsJSON: [UInt8]? = nil) throws(TemplateError) -> String {
        guard case .list(let messages) = try OrderedJSONReader.parse(messagesJSON) else {
            throw .syntax("the conversation must be a JSON array of messages", line: 0)
        }
        for (n, m) in messages.enumerated() {
            guard case .dict(let d) = m, case .string? = d["role"], d["content"] != nil else {
                throw .syntax("message \(n) needs a string \"role\" and a \"content\"", line: 0)
            }
        }
        let tools = try toolsJSON.map { (t) throws(TemplateError) in try OrderedJSONReader.parse(t) }
        return try render(values: messages, addGenerationPrompt: addGenerationPrompt, tools: tools)
    }
}
