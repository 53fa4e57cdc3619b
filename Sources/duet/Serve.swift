import ArgumentParser
import DuetCUDA
import DuetFormats
import DuetModels
import DuetServer
import DuetTokenizer

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the model over an OpenAI-compatible HTTP API (chat and completions, streamed or not).")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, help: "Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).")
    var host = "127.0.0.1"

    @Option(name: .long, help: "Port to listen on (0: any free port, printed at start).")
    var port = 8080

    @Option(name: .long, help: "Require 'Authorization: Bearer KEY' on /v1 routes. Default: $DUET_API_KEY, else none.")
    var apiKey: String?

    @Option(name: .long, help: "Most sequences generated together (continuous batching); more wait in a queue.")
    var maxConcurrency = 8

    @Option(name: .long, help: "KV cache limit in MiB shared by all sequences (default: none).")
    var cacheMemoryMib: Int?

    @Option(name: .long, help: "The model id clients name (default: the model directory's name).")
    var modelName: String?

    func validate() throws {
        if engine.synthetic != nil { throw ValidationError("serve needs a checkpoint with a tokenizer (--model), not --synthetic") }
        guard (0...65535).contains(port) else { throw ValidationError("--port must be between 0 and 65535") }
        guard maxConcurrency >= 1 else { throw ValidationError("--max-concurrency must be at least 1") }
        if let m = cacheMemoryMib, m < 1 { throw ValidationError("--cache-memory-mib must be at least 1") }
        if let apiKey, apiKey.isEmpty { throw ValidationError("--api-key must not be empty") }
    }

    func run() async throws {
        let directory = try engine.modelDirectory()
        let tokenizer = try Tokenizer(path: joinPath(directory, "tokenizer.json"))
        let template = try ChatTemplate.load(directory: directory, modelType: try ConfigFile.modelType(directory: directory))
        let (model, _, loadSeconds) = try engine.load(directory: directory)
        let name = modelName ?? String(directory.split(separator: "/").last ?? "duet")
        let gpuMemory: (@Sendable () -> [String: Int])? = (model as? GPULanguageModel).map { gpuModel in
            let budget = gpuModel.gpuModel.device.budget
            return { budget.used }
        }
        let inference = InferenceEngine(model: model, maxConcurrency: maxConcurrency, cacheMemoryLimit: cacheMemoryMib.map { $0 << 20 })
        let key = apiKey ?? environmentVariable("DUET_API_KEY")
        let context = ServerContext(engine: inference, tokenizer: tokenizer, template: template, modelID: name,
                                    eosTokenIds: model.eosTokenIds, apiKey: key, gpuMemory: gpuMemory)
        Console.err("loaded \(name) in \(fixed(loadSeconds, 3)) s; chat template: \(template.origin); "
            + "up to \(inference.maxConcurrency) sequences at once\(key == nil ? "" : ", API key required")\n")
        let host = host
        try await runServer(context, options: ServerOptions(host: host, port: port)) { bound in
            Console.err("listening on http://\(host):\(bound)\n")
        }
        Console.err("server stopped\n")
    }
}
