import Hummingbird
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// An error a request gets back, in OpenAI's shape:
/// `{"error": {"message", "type", "param", "code"}}`, with `param` naming the field at fault.
public struct APIError: Error, Sendable, Equatable, CustomStringConvertible {
    public var status: HTTPResponse.Status
    public var message: String
    public var type: String
    public var param: String?
    public var code: String?

    public init(status: HTTPResponse.Status = .badRequest, _ message: String, param: String? = nil,
                type: String = "invalid_request_error", code: String? = nil) {
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
    }

    public var description: String { "\(status.code) \(message)" }

    static func invalid(_ param: String, _ message: String) -> APIError {
        APIError(message, param: param)
    }

    static let unauthorized = APIError(status: .unauthorized, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.",
                                       code: "invalid_api_key")

    static func notFound(_ path: String) -> APIError {
        APIError(status: .notFound, "No route \(path); Duet serves /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.")
    }

    /// A failure inside the engine, not the request's fault.
    static func server(_ message: String) -> APIError {
        APIError(status: .internalServerError, message, type: "server_error")
    }

    struct Body: Encodable {
        struct Detail: Encodable {
            var message: String
            var type: String
            var param: String?
            var code: String?
            func encode(to encoder: any Encoder) throws {
                var c = encoder.container(keyedBy: CodingKeys.self)
                try c.encode(message, forKey: .message)
                try c.encode(type, forKey: .type)
                try c.encode(param, forKey: .param)
                try c.encode(code, forKey: .code)
            }
            enum CodingKeys: String, CodingKey { case message, type, param, code }
        }
        var error: Detail
    }

    var body: Body { Body(error: .init(message: message, type: type, param: param, code: code)) }

    /// The error as an HTTP response.
    func response() -> Response {
        let json = (try? makeEncoder().encode(body)) ?? Data(#"{"error":{"message":"error"}}"#.utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: json)))
    }

    /// A JSON decoding failure, described with the field's dotted path (`messages.0.role`).
    static func decoding(_ error: any Error) -> APIError {
        guard let error = error as? DecodingError else {
            return APIError("We could not parse the JSON body of your request: \(error)")
        }
        func path(_ keys: [any CodingKey]) -> String {
            keys.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context):
            let field = path(context.codingPath + [key])
            return .invalid(field, "Missing required parameter: '\(field)'.")
        case .typeMismatch(let type, let context):
            let field = path(context.codingPath)
            if field.isEmpty { return APIError("The request body must be a JSON object.") }
            return .invalid(field, "Invalid type for '\(field)': expected \(describe(type, context.debugDescription)).")
        case .valueNotFound(let type, let context):
            let field = path(context.codingPath)
            return .invalid(field, "Invalid value for '\(field)': expected \(describe(type, context.debugDescription)), got null.")
        case .dataCorrupted(let context):
            let field = path(context.codingPath)
            if field.isEmpty { return APIError("We could not parse the JSON body of your request: it is not valid JSON.") }
            return .invalid(field, "Invalid value for '\(field)': \(context.debugDescription)")
        @unknown default:
            return APIError("We could not parse the JSON body of your request.")
        }
    }

    private static func describe(_ type: Any.Type, _ debug: String) -> String {
        if debug.hasPrefix("expected ") { return String(debug.dropFirst("expected ".count)) }
        let name = String(describing: type)
        switch name {
        case "String": return "a string"
        case "Bool": return "a boolean"
        case "Int", "Int32", "Int64", "UInt64": return "an integer"
        case "Double", "Float": return "a number"
        default: return name.hasPrefix("Array") || name.hasPrefix("[") ? "an array" : "an object"
        }
    }
}
