import DuetModels
import DuetTokenizer
import Hummingbird
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the routes need: the engine, the tokenizer and chat template of the model, its name.
public struct ServerContext: Sendable {
    public var engine: InferenceEngine
    public var tokenizer: Tokenizer
    public var template: ChatTemplate
    /// The id `/v1/models` lists and requests must name.
    public var modelID: String
    public var eosTokenIds: [Int]
    /// nil: no authentication.
    public var apiKey: String?
    /// GPU memory by category, for /metrics (nil without a GPU).
    public var gpuMemory: (@Sendable () -> [String: Int])?
    public var created: Int

    public init(engine: InferenceEngine, tokenizer: Tokenizer, template: ChatTemplate, modelID: String,
                eosTokenIds: [Int], apiKey: String?, gpuMemory: (@Sendable () -> [String: Int])? = nil) {
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.modelID = modelID
        self.eosTokenIds = eosTokenIds
        self.apiKey = apiKey
        self.gpuMemory = gpuMemory
        created = Int(Date().timeIntervalSince1970)
    }
}

extension APIError: HTTPResponseError {
    public func response(from request: Request, context: some RequestContext) throws -> Response { response() }
}

/// Builds the router: the OpenAI routes under /v1 (behind the API key when one is set),
/// /health and /metrics.
public func makeRouter(_ server: ServerContext) -> Router<BasicRequestContext> {
    let metrics = ServerMetrics(engine: server.engine, gpuMemory: server.gpuMemory)
    let router = Router(context: BasicRequestContext.self)
    router.add(middleware: APIMiddleware(apiKey: server.apiKey, metrics: metrics))
    let handlers = Handlers(server: server)
    router.post("/v1/chat/completions") { request, context in try await handlers.chat(request, context) }
    router.post("/v1/completions") { request, context in try await handlers.complete(request, context) }
    router.get("/v1/models") { _, _ in
        try jsonResponse(ModelList(data: [.init(id: server.modelID, created: server.created)]))
    }
    router.get("/health") { _, _ in
        let load = server.engine.load
        return try jsonResponse(Health(status: "ok", model: server.modelID, queued: load.queued, active: load.active))
    }
    router.get("/metrics") { _, _ in
        Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                 body: .init(byteBuffer: ByteBuffer(string: metrics.render())))
    }
    return router
}

struct Health: Encodable { var status: String; var model: String; var queued: Int; var active: Int }

/// Keys sorted, slashes left alone: the same bytes for the same answer.
func makeEncoder() -> JSONEncoder {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return encoder
}

func jsonResponse(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
    let data = try makeEncoder().encode(value)
    return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
}

/// The API key check, OpenAI-shaped errors for every failure (a missing route, a body too
/// large), and the request counter.
struct APIMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let apiKey: String?
    let metrics: ServerMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let route = request.uri.path
        let response: Response
        do {
            if let apiKey, route.hasPrefix("/v1/"), request.headers[.authorization] != "Bearer \(apiKey)" {
                throw APIError.unauthorized
            }
            response = try await next(request, context)
        } catch let error as APIError {
            response = error.response()
        } catch let error as HTTPError {
            response = (error.status == .notFound ? APIError.notFound(route)
                : APIError(status: error.status, error.body ?? "\(error.status.reasonPhrase)")).response()
        }
        metrics.countRequest(route: knownRoutes.contains(route) ? route : "other", status: response.status.code)
        return response
    }

    private var knownRoutes: Set<String> { ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"] }
}
