import DuetCPU
import DuetCore
import DuetModels

/// What to generate.
public struct GenerationOptions: Sendable {
    public var maxTokens: Int
    public var sampling: SamplingOptions
    /// Ids that end the sequence (included in the output, as HF does). nil: the model's EOS ids.
    public var stopTokenIds: [Int]?

    public init(maxTokens: Int, sampling: SamplingOptions = .init(), stopTokenIds: [Int]? = nil) {
        self.maxTokens = maxTokens
        self.sampling = sampling
        self.stopTokenIds = stopTokenIds
    }
}

/// Why generation ended.
public enum FinishReason: String, Sendable, Codable {
    case stop      // a stop id was produced
    case length    // max tokens reached
    case context   // the model's positions are used up
}

/// Wall-clock time of each phase.
public struct GenerationTimings: Sendable, Codable {
    public var promptTokens: Int
    public var prefillSeconds: Double
    /// Forward passes after the prefill (the first token comes from the prefill's logits).
    public var decodeSteps: Int
    public var decodeSeconds: Double

    public var prefillTokensPerSecond: Double { prefillSeconds > 0 ? Double(promptTokens) / prefillSeconds : 0 }
    public var decodeTokensPerSecond: Double { decodeSeconds > 0 ? Double(decodeSteps) / decodeSeconds : 0 }
}

/// One finished sequence.
public struct GenerationResult: Sendable {
    /// Generated ids (not the prompt).
    public var ids: [Int32]
    /// Sum of the model's log-probabilities (temperature 1) of the generated ids.
    public var logProbability: Double
    public var finishReason: FinishReason
    public var timings: GenerationTimings
}

/// Prefill the prompt in one pass, then decode token by token with the KV cache.
/// `onToken` sees each id as soon as it is chosen (for streaming).
public func generate(
    model: any LanguageModel, prompt: [Int32], options: GenerationOptions,
    onToken: (Int32) -> Void = { _ in }
) throws(ModelError) -> GenerationResult {
    let cache = model.makeCache()
    let prefillStart = ContinuousClock.now
    let logits = try model.forward(prompt, cache: cache, allLogits: false)  // [V]
    let prefillSeconds = secondsSince(prefillStart)
    var sampler = Sampler(options.sampling)
    var result = try decode(model: model, cache: cache, logits: logits, options: options, sampler: &sampler, onToken: onToken)
    result.timings.promptTokens = prompt.count
    result.timings.prefillSeconds = prefillSeconds
    return result
}

/// The decode loop from the logits of the last token in `cache`: sample, stream, feed back,
/// until a stop id, `maxTokens` or the model's last position. The last sampled token is not
/// fed (its KV is not in the cache).
public func decode(
    model: any LanguageModel, cache: KVCache, logits first: [Float], options: GenerationOptions,
    sampler: inout Sampler, onToken: (Int32) -> Void
) throws(ModelError) -> GenerationResult {
    let stops = Set(options.stopTokenIds ?? model.eosTokenIds)
    var timings = GenerationTimings(promptTokens: 0, prefillSeconds: 0, decodeSteps: 0, decodeSeconds: 0)
    var logits = first
    var ids: [Int32] = []
    var logProbability = 0.0
    var reason = FinishReason.length
    let decodeStart = ContinuousClock.now
    while ids.count < options.maxTokens {
        let next = sampler.sample(logits)
        logProbability += logits.withUnsafeBufferPointer { logSoftmax($0, at: Int(next)) }
        ids.append(next)
        onToken(next)
        if stops.contains(Int(next)) { reason = .stop; break }
        if ids.count == options.maxTokens { break }
        if cache.length >= model.maxPositions { reason = .context; break }
        logits = try model.forward([next], cache: cache, allLogits: false)
        timings.decodeSteps += 1
    }
    timings.decodeSeconds = secondsSince(decodeStart)
    return GenerationResult(ids: ids, logProbability: logProbability, finishReason: reason, timings: timings)
}
