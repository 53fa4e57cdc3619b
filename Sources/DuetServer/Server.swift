import Hummingbird
import Logging
import ServiceLifecycle

/// `duet serve`: where to listen and how to stop.
public struct ServerOptions: Sendable {
    public var host: String
    public var port: Int
    public init(host: String = "127.0.0.1", port: Int = 8080) {
        self.host = host
        self.port = port
    }
}

/// Runs the server until SIGINT or SIGTERM. On either it stops accepting connections, lets
/// the requests in flight finish (their streams included), then stops the engine and
/// returns. `onListening` gets the bound port (useful with port 0).
public func runServer(_ context: ServerContext, options: ServerOptions,
                      onListening: @escaping @Sendable (Int) -> Void = { _ in }) async throws {
    var logger = Logger(label: "duet.serve")
    logger.logLevel = .warning
    let app = Application(
        router: makeRouter(context),
        configuration: .init(address: .hostname(options.host, port: options.port), serverName: "duet"),
        onServerRunning: { channel in onListening(channel.localAddress?.port ?? options.port) },
        logger: logger)
    let group = ServiceGroup(configuration: .init(
        services: [.init(service: EngineService(engine: context.engine)), .init(service: app)],
        gracefulShutdownSignals: [.sigterm, .sigint],
        logger: logger))
    try await group.run()
}

/// Keeps the engine alive while the server runs and shuts it down after the server has
/// drained (services stop in reverse order, so the HTTP server stops first).
struct EngineService: Service {
    let engine: InferenceEngine
    func run() async throws {
        try? await gracefulShutdown()
        engine.shutdown()
    }
}
