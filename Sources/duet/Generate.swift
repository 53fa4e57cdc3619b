import ArgumentParser
import DuetModels
import DuetRuntime

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate tokens from a prompt, streaming them as they are produced.")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, help: "Prompt as comma-separated token ids, e.g. 1,2,3.")
    var promptIds: String

    @Option(name: .long, help: "Most tokens to generate.")
    var maxTokens = 32

    @Option(name: .long, help: "Sampling temperature; 0 = greedy.")
    var temperature: Float = 0

    @Option(name: .long, help: "Sample only among the k most likely tokens (0 = all).")
    var topK = 0

    @Option(name: .long, help: "Nucleus sampling: keep tokens up to this cumulative probability.")
    var topP: Float = 1

    @Option(name: .long, help: "Seed of the sampler: the same seed gives the same output.")
    var seed: UInt64 = 0

    @Flag(name: .long, help: "Print one JSON object instead of streaming.")
    var json = false

    func validate() throws {
        guard maxTokens > 0 else { throw ValidationError("--max-tokens must be positive") }
        guard temperature >= 0, temperature.isFinite else { throw ValidationError("--temperature must be >= 0") }
        guard topK >= 0 else { throw ValidationError("--top-k must be >= 0") }
        guard topP > 0, topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]") }
        _ = try parsePromptIds()
    }

    func parsePromptIds() throws -> [Int32] {
        let parts = promptIds.split(separator: ",", omittingEmptySubsequences: false)
        let ids = parts.map { Int32(String($0.filter { !$0.isWhitespace })) }
        guard !parts.isEmpty, ids.allSatisfy({ $0 != nil && $0! >= 0 }) else {
            throw ValidationError("--prompt-ids must be comma-separated non-negative token ids, got '\(promptIds)'")
        }
        return ids.map { $0! }
    }

    func run() throws {
        let prompt = try parsePromptIds()
        let (model, loadSeconds) = try engine.load()
        let options = GenerationOptions(
            maxTokens: maxTokens,
            sampling: SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed))
        let result = try generate(model: model, prompt: prompt, options: options) { id in
            if !json { Console.out("\(id) ") }
        }
        let t = result.timings
        if json {
            try Console.json(GenerateOutput(
                sequences: [.init(ids: result.ids, score: result.logProbability, finishReason: result.finishReason.rawValue)],
                timings: .init(loadSeconds: loadSeconds, promptTokens: t.promptTokens, prefillSeconds: t.prefillSeconds,
                               prefillTokensPerSecond: t.prefillTokensPerSecond, decodeTokens: t.decodeSteps,
                               decodeSeconds: t.decodeSeconds, decodeTokensPerSecond: t.decodeTokensPerSecond)))
        } else {
            Console.out("\n")
            Console.err("load \(fixed(loadSeconds, 3)) s | prefill \(t.promptTokens) tok in \(fixed(t.prefillSeconds, 3)) s "
                + "(\(fixed(t.prefillTokensPerSecond, 1)) tok/s) | decode \(t.decodeSteps) tok in \(fixed(t.decodeSeconds, 3)) s "
                + "(\(fixed(t.decodeTokensPerSecond, 1)) tok/s) | \(result.finishReason.rawValue)\n")
        }
    }
}

/// `duet generate --json`: the one output shape of docs/USAGE.md.
struct GenerateOutput: Encodable {
    struct Sequence: Encodable {
        var ids: [Int32]
        var score: Double
        var finishReason: String
        enum CodingKeys: String, CodingKey { case ids, score, finishReason = "finish_reason" }
    }
    struct Timings: Encodable {
        var loadSeconds: Double
        var promptTokens: Int
        var prefillSeconds: Double
        var prefillTokensPerSecond: Double
        var decodeTokens: Int
        var decodeSeconds: Double
        var decodeTokensPerSecond: Double
        enum CodingKeys: String, CodingKey {
            case loadSeconds = "load_s", promptTokens = "prompt_tokens", prefillSeconds = "prefill_s"
            case prefillTokensPerSecond = "prefill_tok_s", decodeTokens = "decode_tokens"
            case decodeSeconds = "decode_s", decodeTokensPerSecond = "decode_tok_s"
        }
    }
    var sequences: [Sequence]
    var timings: Timings
}
