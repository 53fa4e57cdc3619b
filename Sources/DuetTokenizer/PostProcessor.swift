/// tokenizer.json `post_processor`: adds special tokens around an encoded sequence when
/// `addSpecialTokens` is set (BOS for Llama/Mistral). ByteLevel's only changes offsets,
/// which Duet does not track, so it leaves ids as they are.
enum PostProcessor: Sendable {
    /// TemplateProcessing's `single` template: special-token ids and the sequence slot.
    case template([TemplateItem])
    case byteLevel
    case sequence([PostProcessor])

    enum TemplateItem: Sendable, Equatable {
        case special([Int32])
        case sequence
    }

    static func parse(_ json: JSONValue, file: String) throws(TokenizerError) -> PostProcessor? {
        if json.isNull { return nil }
        let type = json.type ?? "?"
        let r = ComponentReader(file: file, component: "post_processor \(type)", value: json)
        switch type {
        case "TemplateProcessing":
            guard case .object(let specials)? = json["special_tokens"] else {
                throw .malformed(file: file, reason: "post_processor TemplateProcessing: 'special_tokens' should be an object")
            }
            var items: [TemplateItem] = []
            for piece in try r.array("single") {
                if let name = piece["SpecialToken"]?["id"]?.string {
                    guard let ids = specials[name]?["ids"]?.array?.compactMap(\.int), !ids.isEmpty else {
                        throw .malformed(file: file, reason: "post_processor TemplateProcessing: special token '\(name)' has no ids")
                    }
                    items.append(.special(ids.map { Int32($0) }))
                } else if piece["Sequence"] != nil {
                    items.append(.sequence)
                } else {
                    throw .malformed(file: file, reason: "post_processor TemplateProcessing: unknown template piece")
                }
            }
            return .template(items)
        case "ByteLevel":
            return .byteLevel
        case "Sequence":
            var parts: [PostProcessor] = []
            for p in try r.array("processors") { if let q = try parse(p, file: file) { parts.append(q) } }
            return .sequence(parts)
        default:
            throw .unsupported(file: file, component: "post_processor", detail: "'\(type)' (supported: TemplateProcessing, ByteLevel, Sequence)")
        }
    }

    func apply(_ ids: [Int32]) -> [Int32] {
        switch self {
        case .template(let items):
            return items.flatMap { item -> [Int32] in
                if case .special(let s) = item { return s }
                return ids
            }
        case .byteLevel:
            return ids
        case .sequence(let parts):
            return parts.reduce(ids) { $1.apply($0) }
        }
    }
}
