#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DuetCPU
import DuetCore
import DuetFormats
import DuetModels
import DuetTokenizer

/// `duet bench perplexity`: what quantizing the experts costs in quality. The text is cut
/// into windows; every format runs every window (the stored weights first), and each
/// row reports perplexity and how far its logits are from the stored weights' logits.
struct BenchPerplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "perplexity",
        abstract: "Perplexity of a text with the stored expert weights and quantized ones (q8, q4), and their logit error.")

    @OptionGroup var engine: EngineOptions
    @Option(name: .long, help: "The text (UTF-8), tokenized with the model's tokenizer.")
    var text: String
    @Option(name: .long, help: "Tokens per window (each window starts with BOS and is scored on its own).")
    var window = 256
    @Option(name: .long, help: "Score at most this many tokens (default: the whole text).")
    var maxTokens: Int?
    @Option(name: .long, parsing: .upToNextOption, help: "Formats to compare: stored, q8, q4.")
    var formats: [String] = ["stored", "q8", "q4"]
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    func validate() throws {
        if engine.synthetic != nil { throw ValidationError("perplexity needs a checkpoint with a tokenizer (--model)") }
        if engine.expertDtype != .stored { throw ValidationError("give the formats to compare with --formats, not --expert-dtype") }
        guard window >= 2 else { throw ValidationError("--window must be at least 2") }
        for f in formats where f != "stored" && QuantFormat(rawValue: f) == nil { throw ValidationError("--formats takes stored, q8 and q4, got '\(f)'") }
    }

    func run() throws {
        let directory = try engine.modelDirectory()
        let tokenizer = try Tokenizer(path: joinPath(directory, "tokenizer.json"))
        let (loaded, _, _) = try engine.load(directory: directory)
        guard let model = loaded as? MixtralModel else { throw CLIError("perplexity compares expert formats of Mixtral-family models on the CPU") }
        let bytes: [UInt8]
        do { bytes = try readSmallFile(text) } catch { throw CLIError(error.description) }
        var ids = try tokenizer.encode(String(decoding: bytes, as: UTF8.self), addSpecialTokens: false)
        if let maxTokens { ids = Array(ids.prefix(maxTokens)) }
        let bos = model.bosTokenId.map(Int32.init)
        let span = min(window, model.maxPositions) - (bos == nil ? 0 : 1)
        let windows = stride(from: 0, to: ids.count, by: span).map { Array(ids[$0..<min(ids.count, $0 + span)]) }.filter { $0.count >= 2 || bos != nil }
        guard !windows.isEmpty else { throw CLIError("\(text) holds too little text to score") }

        // Every format's experts, prepared once.
        var sets: [(name: String, experts: [[QuantizedExpert]]?)] = []
        for f in formats {
            guard let format = QuantFormat(rawValue: f) else { sets.append((f, nil)); continue }
            sets.append((f, try model.quantizedExperts(format, cacheDirectory: engine.quantCacheDirectory).0))
        }
        var nll = [Double](repeating: 0, count: sets.count), scored = 0
        var errors = [Double](repeating: 0, count: sets.count)
        let start = ContinuousClock.now
        for w in windows {
            let input = (bos.map { [$0] } ?? []) + w
            var storedLogits: [Float]? = nil
            for (i, set) in sets.enumerated() {
                model.useExperts(set.experts)
                let logits = try model.forward(input, cache: model.makeCache(), allLogits: true)  // [T, V]
                nll[i] += windowNLL(logits, input, vocab: model.vocabSize)
                if set.experts == nil && storedLogits == nil { storedLogits = logits }
                if let storedLogits { errors[i] += relativeL2(logits, storedLogits) * Double(input.count - 1) }
            }
            scored += input.count - 1
        }
        model.useExperts(nil)
        let storedPPL = sets.firstIndex { $0.experts == nil }.map { exp(nll[$0] / Double(scored)) }
        if !json { Console.out("\(scored) tokens in \(windows.count) windows of \(window), \(fixed(secondsSince(start), 1)) s\nformat  perplexity  change   logit rel. L2 vs stored\n") }
        for (i, set) in sets.enumerated() {
            let ppl = exp(nll[i] / Double(scored))
            let row = Row(format: set.name, tokens: scored, perplexity: ppl, nllPerToken: nll[i] / Double(scored),
                          changeVsStored: storedPPL.map { ppl / $0 - 1 }, logitError: storedPPL == nil ? nil : errors[i] / Double(scored))
            try Console.json(row)
            if !json {
                Console.out("\(set.name.padding(7)) \(fixed(ppl, 3).padding(11)) \((row.changeVsStored.map { fixed($0 * 100, 2) + "%" } ?? "-").padding(8)) \(row.logitError.map { fixed($0, 5) } ?? "-")\n")
            }
        }
    }

    /// Sum of -log p(next token) over a window. logits `[T, V]`.
    private func windowNLL(_ logits: [Float], _ ids: [Int32], vocab V: Int) -> Double {
        logits.withUnsafeBufferPointer { all in
            (0..<(ids.count - 1)).reduce(0.0) { total, t in
                total - logSoftmax(UnsafeBufferPointer(rebasing: all[(t * V)..<((t + 1) * V)]), at: Int(ids[t + 1]))
            }
        }
    }

    private func relativeL2(_ a: [Float], _ b: [Float]) -> Double {
        var num = 0.0, den = 0.0
        for i in a.indices { num += Double(a[i] - b[i]) * Double(a[i] - b[i]); den += Double(b[i]) * Double(b[i]) }
        return den > 0 ? (num / den).squareRoot() : 0
    }

    struct Row: Encodable {
        var bench = "perplexity"
        var format: String
        var tokens: Int
        var perplexity: Double
        var nllPerToken: Double
        var changeVsStored: Double?
        var logitError: Double?
        enum CodingKeys: String, CodingKey {
            case bench, format, tokens, perplexity, nllPerToken = "nll_per_token", changeVsStored = "change_vs_stored", logitError = "logit_rel_l2_vs_stored"
        }
    }
}
