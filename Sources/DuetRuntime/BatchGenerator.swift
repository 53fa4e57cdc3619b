import DuetCore
import DuetCPU
import DuetModels

/// One prompt of a batch run.
public struct BatchRequest: Sendable {
    public var id: String
    public var prompt: [Int32]
    public var options: GenerationOptions
    /// Report each sampled token's log-probability with this many alternatives (nil: none).
    public var topLogprobs: Int?
    public init(id: String, prompt: [Int32], options: GenerationOptions, topLogprobs: Int? = nil) {
        self.id = id
        self.prompt = prompt
        self.options = options
        self.topLogprobs = topLogprobs
    }
}

/// A sampled token's log-probability (temperature 1, before any filtering) and the most
/// likely alternatives at that position, best first.
public struct TokenLogprob: Sendable, Equatable {
    public var logprob: Double
    public var top: [(id: Int32, logprob: Double)]
    public static func == (a: TokenLogprob, b: TokenLogprob) -> Bool {
        a.logprob == b.logprob && a.top.map(\.id) == b.top.map(\.id) && a.top.map(\.logprob) == b.top.map(\.logprob)
    }
}

/// What happens to one sequence of a continuous batch, in order: tokens, then one end.
public enum SequenceEvent: Sendable {
    case token(Int32, TokenLogprob?)
    case finished(GenerationResult)
    /// The sequence could not run (it can never fit the KV cache, or its forward step failed).
    case failed(ModelError)
}

/// Runs many sequences together, continuously: up to `maxSequences` advance in each batched
/// forward step (a new prompt's prefill rides in the same step as the others' decode
/// tokens), and a finished or cancelled sequence's slot is refilled from the queue at once.
/// Sequences share one bounded KV block pool; a prompt is admitted only when the blocks its
/// prompt plus `maxTokens` could need are free of other sequences' reservations (so a
/// running sequence never finds the pool full), and waits in the queue otherwise.
///
/// Not thread-safe: one thread drives it (`BatchGenerator` for files, the server's engine thread).
public final class ContinuousBatcher {
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
        var prefillSeconds: Double?
    }

    private var queue: [BatchRequest] = []
    private var queueHead = 0
    private var active: [Active] = []

    /// `maxSequences` is capped by what the model can batch (`LanguageModel.maxBatchItems`).
    public init(model: any LanguageModel, maxSequences: Int, cacheMemoryLimit: Int?) {
        self.model = model
        self.maxSequences = max(1, min(maxSequences, model.maxBatchItems ?? Int.max))
        pool = model.makeCachePool(memoryLimit: cacheMemoryLimit, blockSize: 16)
    }

    public var queuedCount: Int { queue.count - queueHead }
    public var activeCount: Int { active.count }
    public var isIdle: Bool { queuedCount == 0 && active.isEmpty }

    public func enqueue(_ request: BatchRequest) {
        queue.append(request)
    }

    /// Drops a sequence, queued or running; a running one's KV blocks go back to the pool
    /// at once. Unknown ids (already finished) are ignored.
    public func cancel(id: String) {
        if let i = active.firstIndex(where: { $0.request.id == id }) {
            active[i].cache.truncate(0)
            active.remove(at: i)
        } else if let i = queue[queueHead...].firstIndex(where: { $0.id == id }) {
            queue.remove(at: i)
        }
    }

    /// Positions one sequence alone can fill in the pool (nil: unbounded): a request is
    /// admitted only if its prompt plus `maxTokens` fit this.
    public var cacheCapacityTokens: Int? { pool.maxBlocks.map { $0 * pool.blockSize } }

    /// Admits what fits, runs one batched forward step and reports what it produced
    /// through `onEvent` (tokens, then ends). Does nothing when idle.
    public func step(onEvent: (BatchRequest, SequenceEvent) throws -> Void) throws {
        try admit(onEvent: onEvent)
        guard !active.isEmpty else { return }
        let stepStart = ContinuousClock.now
        let logits: [[Float]]
        do {
            logits = try model.forwardBatch(active.map { BatchItem(tokens: $0.pending, cache: $0.cache) }, allLogits: false)
        } catch {
            // A failed step fails the sequences in it (no partial results), never the caller.
            let failed = active
            active = []
            for a in failed {
                a.cache.truncate(0)
                try onEvent(a.request, .failed(error))
            }
            return
        }
        let stepSeconds = secondsSince(stepStart)
        var still: [Active] = []
        for (i, var a) in active.enumerated() {
            if a.prefillSeconds == nil { a.prefillSeconds = stepSeconds }
            let next = a.sampler.sample(logits[i])
            let lp = logits[i].withUnsafeBufferPointer { logSoftmax($0, at: Int(next)) }
            a.logProbability += lp
            a.ids.append(next)
            let reported = a.request.topLogprobs.map { TokenLogprob(logprob: lp, top: topLogprobs(logits[i], count: $0)) }
            try onEvent(a.request, .token(next, reported))
            let stops = Set(a.request.options.stopTokenIds ?? model.eosTokenIds)
            var reason: FinishReason? = nil
            if stops.contains(Int(next)) { reason = .stop }
            else if a.ids.count >= a.request.options.maxTokens { reason = .length }
            else if a.cache.length >= model.maxPositions { reason = .context }
            if let reason {
                let prefill = a.prefillSeconds ?? 0
                let timings = GenerationTimings(promptTokens: a.request.prompt.count, prefillSeconds: prefill,
                                                decodeSteps: a.ids.count - 1, decodeSeconds: secondsSince(a.started) - prefill)
                a.cache.truncate(0)
                try onEvent(a.request, .finished(GenerationResult(ids: a.ids, logProbability: a.logProbability, finishReason: reason, timings: timings)))
            } else {
                a.pending = [next]
                still.append(a)
            }
        }
        active = still
    }

    /// Moves queued requests into free slots while the pool can hold them; a request that
    /// could never fit fails at once instead of blocking the queue.
    private func admit(onEvent: (BatchRequest, SequenceEvent) throws -> Void) throws {
        while active.count < maxSequences, queueHead < queue.count {
            let next = queue[queueHead]
            if let limit = pool.maxBlocks {
                let need = blocks(next.prompt.count + next.options.maxTokens)
                if need > limit {
                    queueHead += 1
                    try onEvent(next, .failed(.cacheFull(
                        "prompt '\(next.id)' (\(next.prompt.count) tokens + \(next.options.maxTokens) to generate) does not fit the KV cache on its own")))
                    continue
                }
                let reserved = active.reduce(0) { $0 + blocks($1.request.prompt.count + $1.request.options.maxTokens) }
                if reserved + need > limit { break }
            }
            queueHead += 1
            active.append(Active(request: next, cache: KVCache(pool: pool), sampler: Sampler(next.options.sampling),
                                 pending: next.prompt, started: .now))
        }
        if queueHead > 64 && queueHead * 2 > queue.count {
            queue.removeFirst(queueHead)
            queueHead = 0
        }
    }

    /// Blocks a sequence of `tokens` positions may fill.
    private func blocks(_ tokens: Int) -> Int {
        (tokens + pool.blockSize - 1) / pool.blockSize
    }
}

/// The `count` most likely ids and their log-probabilities, best first (lowest id on ties).
public func topLogprobs(_ logits: [Float], count: Int) -> [(id: Int32, logprob: Double)] {
    guard count > 0 else { return [] }
    var best: [(id: Int32, logit: Float)] = []
    for (i, v) in logits.enumerated() where best.count < count || v > best[best.count - 1].logit {
        let at = best.firstIndex { v > $0.logit } ?? best.count
        best.insert((Int32(i), v), at: at)
        if best.count > count { best.removeLast() }
    }
    let normalizer = logits.withUnsafeBufferPointer(logSumExp)
    return best.map { ($0.id, Double($0.logit) - normalizer) }
}

/// Runs a fixed list of prompts through a `ContinuousBatcher` until all are done.
public final class BatchGenerator {
    public let batcher: ContinuousBatcher
    public var pool: KVBlockPool { batcher.pool }

    public init(model: any LanguageModel, maxSequences: Int, cacheMemoryLimit: Int?) {
        batcher = ContinuousBatcher(model: model, maxSequences: maxSequences, cacheMemoryLimit: cacheMemoryLimit)
    }

    /// Runs every request; `onFinish` gets each result as soon as its sequence ends (not in
    /// input order). A request that cannot run ends the whole run with its error.
    public func run(_ requests: [BatchRequest], onFinish: (BatchRequest, GenerationResult) throws -> Void) throws {
        for r in requests { batcher.enqueue(r) }
        while !batcher.isIdle {
            try batcher.step { request, event in
                switch event {
                case .token: break
                case .finished(let result): try onFinish(request, result)
                case .failed(let error): throw error
                }
            }
        }
    }
}
