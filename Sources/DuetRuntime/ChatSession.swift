import DuetCore
import DuetModels

/// A conversation whose KV cache outlives each turn: the next prompt (the whole
/// conversation rendered again) is prefilled only from where it stops matching the ids
/// already in the cache, so each turn costs its new tokens, not the whole history.
public final class ChatSession {
    public let model: any LanguageModel
    private let cache: KVCache
    /// The ids whose keys and values are in `cache`, in order.
    public private(set) var cachedIds: [Int32] = []

    public init(model: any LanguageModel) {
        self.model = model
        cache = model.makeCache()
    }

    /// Forgets the conversation.
    public func reset() {
        cache.truncate(0)
        cachedIds = []
    }

    /// Answers `prompt` (the full conversation's ids, ending with the generation prompt).
    public func respond(to prompt: [Int32], options: GenerationOptions, sampler: inout Sampler,
                        onToken: (Int32) -> Void = { _ in }) throws(ModelError) -> GenerationResult {
        guard !prompt.isEmpty else { throw .emptyInput }
        // Reuse the longest common prefix, but always feed at least one token to get logits.
        var reuse = zip(cachedIds, prompt).prefix { $0 == $1 }.count
        reuse = min(reuse, prompt.count - 1)
        cache.truncate(reuse)
        cachedIds.removeLast(cachedIds.count - reuse)
        let prefillStart = ContinuousClock.now
        let fresh = Array(prompt[reuse...])
        let logits = try model.forward(fresh, cache: cache, allLogits: false)
        cachedIds += fresh
        let prefillSeconds = secondsSince(prefillStart)
        var result = try decode(model: model, cache: cache, logits: logits, options: options, sampler: &sampler) { id in
            onToken(id)
        }
        cachedIds += result.ids.dropLast()  // the last sampled id was not fed
        result.timings.promptTokens = fresh.count
        result.timings.prefillSeconds = prefillSeconds
        return result
    }
}
