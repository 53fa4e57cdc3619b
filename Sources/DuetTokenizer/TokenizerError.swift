/// What can be wrong with a tokenizer file or an id to decode.
public enum TokenizerError: Error, Equatable, CustomStringConvertible {
    case fileNotFound(path: String)
    case malformed(file: String, reason: String)
    /// A tokenizer.json component Duet does not implement: never silently wrong ids.
    case unsupported(file: String, component: String, detail: String)
    case unknownTokenId(Int32)

    public var description: String {
        switch self {
        case .fileNotFound(let path):
            "tokenizer file not found: \(path)"
        case .malformed(let file, let reason):
            "\(file): malformed tokenizer: \(reason)"
        case .unsupported(let file, let component, let detail):
            "\(file): unsupported \(component): \(detail)"
        case .unknownTokenId(let id):
            "token id \(id) is not in the vocabulary"
        }
    }
}
