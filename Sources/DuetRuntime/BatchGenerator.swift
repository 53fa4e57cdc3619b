import DuetCore
import DuetCPU
import DuetModels

/// One prompt of a batch run.
public struct BatchRequest: Sendable {
    public var id: String
    public var prompt: [Int32]
    public var options: GenerationOptions
    public init(id: String, prompt: [Int32], options: GenerationOptions) {
        self.id = id
        self.prompt = prompt
        self.options = options
    }
}

/// Runs many prompts together, continuously: up to `maxSequences` advance in each batched
/// forward step (a new prompt's prefill rides in the same step as the others' decode
/// tokens), and a finished sequence's slot is refilled from the queue at once. Sequences
/// share one bounded KV block pool; a prompt is admitted only when the blocks its prompt
/// plus `maxTokens` could need are free of other sequences' reservations (so a running
/// sequence never finds the pool full), and waits in the queue otherwise.
public final class BatchGenerator {
    public let model: any LanguageModel
    public let maxSequences: Int
    public let pool: KVBlockPool

    private struct Active {
        var request: BatchRequest
        var cache: KVCache
        var sampler: Sampler
        var ids: [Int32] = []
        var logProbability = 0.0
        var pending: [Int32]       // tokens to feed in the next step (the prompt, then one id)
        var started: ContinuousClock.Instant
    }

    public init(model: any LanguageModel, maxSequences: Int, cacheMemoryLimit: Int?) {
        self.model = model
        self.maxSequences = max(1, maxSequences)
        pool = model.makeCachePool(memoryLimit: cacheMemoryLimit, blockSize: 16)
    }

    /// Runs every request; `onFinish` gets each result as soon as its sequence ends (not in input order).
    public func run(_ requests: [BatchRequest], onFinish: (BatchRequest, GenerationResult) throws -> Void) throws {
        var queue = requests[...]
        var active: [Active] = []
        while !queue.isEmpty || !active.isEmpty {
            // Admit while there is a slot and the pool can hold the prompt.
            while active.count < maxSequences, let next = queue.first {
                if let limit = pool.maxBlocks {
                    let reserved = active.reduce(0) { $0 + blocks(for: $1.request) }
                    if reserved + blocks(for: next) > limit {
                        if active.isEmpty {
                            throw ModelError.cacheFull("prompt '\(next.id)' (\(next.prompt.count) tokens + \(next.options.maxTokens) to generate) does not fit the KV cache on its own")
                        }
                        break
                    }
                }
                queue = queue.dropFirst()
                active.append(Active(request: next, cache: KVCache(pool: pool), sampler: Sampler(next.options.sampling),
                                     pending: next.prompt, started: .now))
            }
            let logits = try model.forwardBatch(active.map { BatchItem(tokens: $0.pending, cache: $0.cache) }, allLogits: false)
            var still: [Active] = []
            for (i, var a) in active.enumerated() {
                let next = a.sampler.sample(logits[i])
                a.logProbability += logits[i].withUnsafeBufferPointer { logSoftmax($0, at: Int(next)) }
                a.ids.append(next)
                let stops = Set(a.request.options.stopTokenIds ?? model.eosTokenIds)
                var reason: FinishReason? = nil
                if stops.contains(Int(next)) { reason = .stop }
                else if a.ids.count >= a.request.options.maxTokens { reason = .length }
                else if a.cache.length >= model.maxPositions { reason = .context }
                if let reason {
                    let timings = GenerationTimings(promptTokens: a.request.prompt.count, prefillSeconds: 0,
                                                    decodeSteps: a.ids.count - 1, decodeSeconds: secondsSince(a.started))
                    try onFinish(a.request, GenerationResult(ids: a.ids, logProbability: a.logProbability, finishReason: reason, timings: timings))
                } else {
                    a.pending = [next]
                    still.append(a)
                }
            }
            active = still
        }
    }

    /// Blocks a request may fill: its prompt and every token it may generate.
    private func blocks(for r: BatchRequest) -> Int {
        (r.prompt.count + r.options.maxTokens + pool.blockSize - 1) / pool.blockSize
    }
}
