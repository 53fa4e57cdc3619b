/// A template that cannot be parsed or rendered: the construct and the template line.
public enum TemplateError: Error, Equatable, CustomStringConvertible {
    case syntax(String, line: Int)
    case unsupported(String, line: Int)
    case runtime(String, line: Int)
    /// The template's own `raise_exception(message)`.
    case raised(String, line: Int)

    public var description: String {
        switch self {
        case .syntax(let m, let line): "chat template line \(line): syntax error: \(m)"
        case .unsupported(let m, let line): "chat template line \(line): unsupported: \(m)"
        case .runtime(let m, let line): "chat template line \(line): \(m)"
        case .raised(let m, let line): "chat template line \(line) raised: \(m)"
        }
    }

    /// The same error at `line` (expression errors learn their line from the statement).
    func at(_ line: Int) -> TemplateError {
        switch self {
        case .syntax(let m, 0): .syntax(m, line: line)
        case .unsupported(let m, 0): .unsupported(m, line: line)
        case .runtime(let m, 0): .runtime(m, line: line)
        case .raised(let m, 0): .raised(m, line: line)
        default: self
        }
    }
}
