import ArgumentParser
import DuetFormats
import DuetModels
import DuetRuntime
import DuetCore
import DuetTokenizer

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate tokens from a prompt, streaming them as they are produced.")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, help: "Prompt text (tokenized with the model's tokenizer.json).")
    var prompt: String?

    @Option(name: .long, help: "Prompt as comma-separated token ids, e.g. 1,2,3.")
    var promptIds: String?

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

    @Option(name: .long, help: "Run every prompt of a JSONL file ({\"id\", \"prompt\" | \"messages\", max_tokens, temperature, top_p, seed}) in batches.")
    var prompts: String?

    @Option(name: .long, help: "With --prompts: where the results go (one JSON line per prompt, in finishing order).")
    var output: String?

    @Option(name: .long, help: "With --prompts: most sequences advancing together.")
    var batchSize = 8

    @Option(name: .long, help: "With --prompts or --beam-width: KV cache limit in MiB (default: none).")
    var cacheMemoryMib: Int?

    @Option(name: .long, help: "Beam search with this many beams (HF semantics; 1 = off).")
    var beamWidth = 1

    @Option(name: .long, help: "With --beam-width: hypotheses to print, best first (default: the width).")
    var numReturnSequences: Int?

    @Option(name: .long, help: "With --beam-width: scores are log-probability / length^L.")
    var lengthPenalty: Double = 1

    @Option(name: .long, help: "With --beam-width: true (stop once W hypotheses end), false (HF's default heuristic) or never.")
    var earlyStopping: String = "false"

    func validate() throws {
        guard maxTokens > 0 else { throw ValidationError("--max-tokens must be positive") }
        guard temperature >= 0, temperature.isFinite else { throw ValidationError("--temperature must be >= 0") }
        guard topK >= 0 else { throw ValidationError("--top-k must be >= 0") }
        guard topP > 0, topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard [prompt != nil, promptIds != nil, prompts != nil].filter({ $0 }).count == 1 else {
            throw ValidationError("give exactly one of --prompt, --prompt-ids and --prompts")
        }
        if prompts != nil && output == nil { throw ValidationError("--prompts needs --output") }
        if prompts != nil && beamWidth > 1 { throw ValidationError("--beam-width does not combine with --prompts yet; run beams one prompt at a time") }
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard beamWidth >= 1 else { throw ValidationError("--beam-width must be at least 1") }
        if let n = numReturnSequences, n < 1 || n > beamWidth { throw ValidationError("--num-return-sequences must be between 1 and --beam-width") }
        guard EarlyStopping(rawValue: earlyStopping) != nil else { throw ValidationError("--early-stopping must be true, false or never") }
        if beamWidth > 1 && temperature != 0 { throw ValidationError("beam search here is deterministic: leave --temperature at 0") }
        if let promptIds { _ = try parseIds(promptIds, option: "--prompt-ids") }
    }

    func run() throws {
        // Beams on a GPU model need a KV region each, plus the prompt's.
        var engine = self.engine
        if beamWidth > 1 { engine.gpuSequences = max(engine.gpuSequences, beamWidth + 1) }
        let (model, directory, loadSeconds) = try engine.load(singleSequence: prompts == nil && beamWidth == 1)
        if let prompts {
            let defaults = GenerationOptions(maxTokens: maxTokens, sampling: SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed))
            return try BatchFileRun(model: model, directory: directory, defaults: defaults, batchSize: batchSize,
                                    cacheMemory: cacheMemoryMib.map { $0 << 20 }).run(input: prompts, output: output!)
        }
        // Text in and out needs the model's tokenizer; ids alone do not.
        let tokenizerPath = directory.map { joinPath($0, "tokenizer.json") }
        let tokenizer: Tokenizer? = try tokenizerPath.flatMap { fileExists($0) ? try Tokenizer(path: $0) : nil }
        let promptTokens: [Int32]
        if let prompt {
            guard let tokenizer else {
                throw CLIError("--prompt needs a tokenizer, and \(tokenizerPath ?? "a synthetic model") has none; use --prompt-ids")
            }
            promptTokens = try tokenizer.encode(prompt)
        } else {
            promptTokens = try parseIds(promptIds!, option: "--prompt-ids")
        }
        if beamWidth > 1 {
            return try runBeams(model: model, prompt: promptTokens, tokenizer: tokenizer, loadSeconds: loadSeconds)
        }
        // Text streams as the continuation of the prompt (the prompt is echoed first).
        var stream = try tokenizer.map { try StreamingDecoder(tokenizer: $0, skipSpecialTokens: true, context: promptTokens) }
        if !json, stream != nil, let prompt { Console.out(prompt) }
        let options = GenerationOptions(
            maxTokens: maxTokens,
            sampling: SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed))
        var streamError: (any Error)?
        let result = try generate(model: model, prompt: promptTokens, options: options) { id in
            guard !json else { return }
            if stream == nil { return Console.out("\(id) ") }
            do { if let text = try stream?.step(id) { Console.out(text) } } catch { streamError = error }
        }
        if let streamError { throw streamError }
        if !json, let rest = try stream?.finish() { Console.out(rest) }
        let t = result.timings
        if json {
            try Console.json(GenerateOutput(
                sequences: [.init(ids: result.ids, text: try tokenizer.map { try continuation($0, prompt: promptTokens, ids: result.ids) },
                                  score: result.logProbability, finishReason: result.finishReason.rawValue)],
                timings: .init(loadSeconds: loadSeconds, promptTokens: t.promptTokens, prefillSeconds: t.prefillSeconds,
                               prefillTokensPerSecond: t.prefillTokensPerSecond, decodeTokens: t.decodeSteps,
                               decodeSeconds: t.decodeSeconds, decodeTokensPerSecond: t.decodeTokensPerSecond)))
        } else {
            Console.out("\n")
            Console.err("load \(fixed(loadSeconds, 3)) s | prefill \(t.promptTokens) tok in \(fixed(t.prefillSeconds, 3)) s "
                + "(\(fixed(t.prefillTokensPerSecond, 1)) tok/s) | decode \(t.decodeSteps) tok in \(fixed(t.decodeSeconds, 3)) s "
                + "(\(fixed(t.decodeTokensPerSecond, 1)) tok/s) | \(result.finishReason.rawValue)\n")
        }
        reportOffload(model)
    }
}

/// With an offload strategy: where the expert time went and the hit rate (stderr).
func reportOffload(_ model: any LanguageModel) {
    guard let executor = offloadExecutor(of: model) else { return }
    Console.err(executor.stats.summary + "\n")
    for w in executor.takeWarnings() { Console.err("warning: \(w)\n") }
}

extension Generate {
    /// `--beam-width W`: the hypotheses best first, each with its score.
    func runBeams(model: any LanguageModel, prompt: [Int32], tokenizer: Tokenizer?, loadSeconds: Double) throws {
        let options = BeamSearchOptions(width: beamWidth, numReturnSequences: numReturnSequences, maxNewTokens: maxTokens,
                                        lengthPenalty: lengthPenalty, earlyStopping: EarlyStopping(rawValue: earlyStopping)!,
                                        cacheMemoryLimit: cacheMemoryMib.map { $0 << 20 })
        let start = ContinuousClock.now
        let beams = try beamSearch(model: model, prompt: prompt, options: options)
        let seconds = secondsSince(start)
        let texts = try beams.map { b in try tokenizer.map { try continuation($0, prompt: prompt, ids: b.ids) } }
        if json {
            try Console.json(BeamOutput(
                sequences: zip(beams, texts).map { .init(ids: $0.ids, text: $1, score: $0.score) },
                timings: .init(loadSeconds: loadSeconds, promptTokens: prompt.count, seconds: seconds, beamWidth: beamWidth)))
            return
        }
        for (i, (b, text)) in zip(beams, texts).enumerated() {
            Console.out("[\(i + 1)] score \(fixed(b.score, 4)): " + (text ?? b.ids.map(String.init).joined(separator: " ")) + "\n")
        }
        Console.err("load \(fixed(loadSeconds, 3)) s | beam search W=\(beamWidth), \(prompt.count) prompt tokens, \(fixed(seconds, 3)) s\n")
        reportOffload(model)
    }
}

struct BeamOutput: Encodable {
    struct Sequence: Encodable { var ids: [Int32]; var text: String?; var score: Double }
    struct Timings: Encodable {
        var loadSeconds: Double; var promptTokens: Int; var seconds: Double; var beamWidth: Int
        enum CodingKeys: String, CodingKey { case loadSeconds = "load_s", promptTokens = "prompt_tokens", seconds = "search_s", beamWidth = "beam_width" }
    }
    var sequences: [Sequence]
    var timings: Timings
}

/// What `ids` add to the prompt's text: decode(prompt + ids) minus decode(prompt), so the
/// text appends to the prompt as it stands (with its leading space).
func continuation(_ tokenizer: Tokenizer, prompt: [Int32], ids: [Int32]) throws -> String {
    let before = try tokenizer.decode(prompt, skipSpecialTokens: true)
    let all = try tokenizer.decode(prompt + ids, skipSpecialTokens: true)
    return all.utf8.starts(with: before.utf8) ? String(decoding: all.utf8.dropFirst(before.utf8.count), as: UTF8.self)
        : try tokenizer.decode(ids, skipSpecialTokens: true)
}

/// `duet generate --json`: the one output shape of docs/USAGE.md.
struct GenerateOutput: Encodable {
    struct Sequence: Encodable {
        var ids: [Int32]
        var text: String?
        var score: Double
        var finishReason: String
        enum CodingKeys: String, CodingKey { case ids, text, score, finishReason = "finish_reason" }
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
