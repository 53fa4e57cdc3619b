/// A parsed JSON value, for the small, dynamically typed parts of tokenizer.json
/// (normalizer, pre-tokenizer, post-processor, decoder).
public indirect enum JSONValue: Decodable, Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var int: Int? { if case .number(let n) = self { return Int(exactly: n) }; return nil }
    public var array: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    public var isNull: Bool { self == .null }
    /// The component's `"type"`.
    public var type: String? { self["type"]?.string }
}

/// Reads fields of one tokenizer.json component, turning absence or a wrong type into a
/// `TokenizerError` that names the component and field.
struct ComponentReader {
    let file: String
    let component: String  // e.g. "normalizer Replace"
    let value: JSONValue

    func string(_ key: String) throws(TokenizerError) -> String {
        guard let s = value[key]?.string else { throw missing(key, "a string") }
        return s
    }
    func bool(_ key: String, default d: Bool) throws(TokenizerError) -> Bool {
        guard let v = value[key], !v.isNull else { return d }
        guard let b = v.bool else { throw missing(key, "true or false") }
        return b
    }
    func int(_ key: String) throws(TokenizerError) -> Int {
        guard let n = value[key]?.int else { throw missing(key, "an integer") }
        return n
    }
    func array(_ key: String) throws(TokenizerError) -> [JSONValue] {
        guard let a = value[key]?.array else { throw missing(key, "a list") }
        return a
    }
    /// `{"String": s}` or `{"Regex": r}` patterns of Replace and Split.
    func pattern(_ key: String) throws(TokenizerError) -> Pattern {
        guard let p = value[key] else { throw missing(key, "a pattern") }
        if let s = p["String"]?.string { return .literal(s) }
        if let r = p["Regex"]?.string { return .regex(r) }
        throw missing(key, "{\"String\": ...} or {\"Regex\": ...}")
    }
    private func missing(_ key: String, _ what: String) -> TokenizerError {
        .malformed(file: file, reason: "\(component): '\(key)' should be \(what)")
    }
}

/// A Replace/Split pattern.
enum Pattern: Equatable, Sendable {
    case literal(String)
    case regex(String)
}
