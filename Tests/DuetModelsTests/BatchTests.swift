import DuetCore
import DuetCPU
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

@Suite(.serialized) struct BatchTests {
    /// Sequences of different lengths and positions in one batched step give exactly the
    /// logits each gives alone (reference path), whatever the batch composition.
    @Test func batchedStepEqualsSeparateSteps() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let prompts: [[Int32]] = [[1, 9, 99, 199, 299, 399, 499, 599, 42, 43, 44, 45, 46], [1, 600, 2, 33], [1, 5]]
        let pool = model.makeCachePool(memoryLimit: nil, blockSize: 4)
        let caches = prompts.map { _ in KVCache(pool: pool) }
        let batched = try model.forwardBatch(zip(prompts, caches).map { BatchItem(tokens: $0, cache: $1) }, allLogits: false)
        for (p, logits) in zip(prompts, batched) {
            #expect(logits == (try model.forward(p, cache: model.makeCache(), allLogits: false)))
        }
        // A decode step for two of them plus a new prefill, batched.
        let fresh: [Int32] = [1, 77, 78, 79]
        let step = try model.forwardBatch([BatchItem(tokens: [7], cache: caches[0]), BatchItem(tokens: fresh, cache: KVCache(pool: pool)),
                                           BatchItem(tokens: [8], cache: caches[2])], allLogits: false)
        #expect(step[0] == (try model.forward(prompts[0] + [7], cache: model.makeCache(), allLogits: false)))
        #expect(step[1] == (try model.forward(fresh, cache: model.makeCache(), allLogits: false)))
        #expect(step[2] == (try model.forward(prompts[2] + [8], cache: model.makeCache(), allLogits: false)))
    }

    /// Forked caches share blocks until one side writes; the other side never sees it.
    @Test func forkIsCopyOnWrite() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let pool = model.makeCachePool(memoryLimit: nil, blockSize: 4)
        let base = KVCache(pool: pool)
        _ = try model.forward([1, 9, 99, 199, 299, 399], cache: base, allLogits: false)  // 6 positions: 2 blocks
        #expect(pool.blocksInUse == 2)
        let a = base.fork(), b = base.fork()
        #expect(pool.blocksInUse == 2)
        let la = try model.forward([5], cache: a, allLogits: false)  // writes into the shared second block
        #expect(pool.blocksInUse == 3)
        let lb = try model.forward([6], cache: b, allLogits: false)
        #expect(la == (try model.forward([1, 9, 99, 199, 299, 399, 5], cache: model.makeCache(), allLogits: false)))
        #expect(lb == (try model.forward([1, 9, 99, 199, 299, 399, 6], cache: model.makeCache(), allLogits: false)))
        b.truncate(0)
        #expect(pool.blocksInUse == 3)  // base still holds 2, a holds its private copy
    }

    @Test func aFullCacheIsAClearError() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let pool = model.makeCachePool(memoryLimit: 2 * 3 * 2 * 4 * 2 * 32 * 4, blockSize: 4)  // exactly 2 blocks
        let cache = KVCache(pool: pool)
        _ = try model.forward([1, 2, 3, 4, 5, 6, 7, 8], cache: cache, allLogits: false)
        #expect(throws: ModelError.self) { _ = try model.forward([9], cache: cache, allLogits: false) }
        do { _ = try model.forward([9], cache: cache, allLogits: false) } catch {
            #expect("\(error)".contains("the KV cache is full (2 blocks"))
        }
    }
}

@Suite(.serialized) struct BatchGeneratorTests {
    /// Every prompt's greedy output equals running it alone, whatever the batch size and
    /// however the (small) cache limit makes prompts wait in the queue.
    @Test(arguments: [1, 2, 3, 8])
    func batchedOutputsEqualSingleRuns(maxSequences: Int) throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let prompts: [[Int32]] = [[1, 600, 2, 33], [1, 9, 99, 199, 299, 399, 499, 599, 42, 43, 44, 45, 46], [1, 5], [1, 7, 7, 7, 7, 7, 7]]
        let requests = prompts.enumerated().map { i, p in
            BatchRequest(id: "p\(i)", prompt: p, options: GenerationOptions(maxTokens: 5 + i * 3, stopTokenIds: []))
        }
        let perBlock = 3 * 2 * 16 * 2 * 32 * 4  // layers x (K, V) x 16 positions x kv heads x head dim x fp32
        let generator = BatchGenerator(model: model, maxSequences: maxSequences, cacheMemoryLimit: 3 * perBlock)
        var results: [String: [Int32]] = [:]
        try generator.run(requests) { r, result in results[r.id] = result.ids }
        for r in requests {
            #expect(results[r.id] == (try generate(model: model, prompt: r.prompt, options: r.options)).ids, "\(r.id) B=\(maxSequences)")
        }
        #expect(generator.pool.blocksInUse == 0)
    }

    @Test func aPromptTooLongForTheCacheIsAClearError() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let generator = BatchGenerator(model: model, maxSequences: 2, cacheMemoryLimit: 3 * 2 * 16 * 2 * 32 * 4)  // one block
        let request = BatchRequest(id: "long", prompt: [Int32](repeating: 3, count: 20), options: GenerationOptions(maxTokens: 4))
        #expect(throws: ModelError.self) { try generator.run([request]) { _, _ in } }
    }
}

/// Batched decoding on the default (fast) path against HF's greedy goldens: each prompt's
/// tokens equal HF's up to the first step whose top-2 margin is within the path's error.
@Suite(.serialized) struct BatchFastPathTests {
    @Test(arguments: ["mixtral-tiny-a", "mixtral-tiny-b"])
    func batchedFastPathFollowsTheGoldens(name: String) throws {
        let golden = try HFGolden.load(name)
        let kernels = try CPUKernels(.auto, pool: ThreadPool(threads: 2))
        let model = try MixtralModel(directory: fixture(name), kernels: kernels)
        let threshold: Float = kernels.features.amx ? 0.1 : 2e-3
        let requests = golden.cases.enumerated().map { i, c in
            BatchRequest(id: "\(i)", prompt: c.prompt, options: GenerationOptions(maxTokens: c.greedy.count, stopTokenIds: []))
        }
        var results: [String: [Int32]] = [:]
        try BatchGenerator(model: model, maxSequences: 2, cacheMemoryLimit: nil).run(requests) { r, result in results[r.id] = result.ids }
        var compared = 0
        for (i, c) in golden.cases.enumerated() {
            let ids = try #require(results["\(i)"])
            let trusted = c.margins.firstIndex { $0 <= threshold } ?? c.greedy.count  // steps before the first near-tie
            #expect(Array(ids.prefix(trusted)) == Array(c.greedy.prefix(trusted)), "\(name) prompt \(i)")
            compared += trusted
        }
        #expect(compared >= 20)
    }
}

@Suite(.serialized) struct ContinuousBatcherTests {
    let model: MixtralModel
    init() throws { model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference()) }

    /// A cancelled sequence gives its KV blocks back before the next step, and the others
    /// go on to the outputs they have alone.
    @Test func cancellingFreesBlocksAndLeavesOthersAlone() throws {
        let batcher = ContinuousBatcher(model: model, maxSequences: 4, cacheMemoryLimit: nil)
        let keep = BatchRequest(id: "keep", prompt: [1, 600, 2, 33], options: GenerationOptions(maxTokens: 10, stopTokenIds: []))
        let drop = BatchRequest(id: "drop", prompt: [Int32](repeating: 9, count: 40), options: GenerationOptions(maxTokens: 50, stopTokenIds: []))
        batcher.enqueue(keep)
        batcher.enqueue(drop)
        var tokens: [String: [Int32]] = [:]
        var finished: [String] = []
        func step() throws {
            try batcher.step { r, e in
                if case .token(let id, _) = e { tokens[r.id, default: []].append(id) }
                if case .finished = e { finished.append(r.id) }
            }
        }
        try step()
        try step()
        let inUse = batcher.pool.blocksInUse
        batcher.cancel(id: "drop")
        #expect(batcher.pool.blocksInUse == inUse - 3)  // 40 + 2 positions = 3 blocks of 16
        #expect(batcher.activeCount == 1)
        while !batcher.isIdle { try step() }
        #expect(finished == ["keep"])
        #expect(tokens["drop"]?.count == 2)
        #expect(tokens["keep"] == (try generate(model: model, prompt: keep.prompt, options: keep.options)).ids)
        #expect(batcher.pool.blocksInUse == 0)
    }

    /// A request that can never fit the cache fails alone; the queue behind it runs.
    @Test func aRequestThatCannotFitFailsWithoutBlockingTheQueue() throws {
        let batcher = ContinuousBatcher(model: model, maxSequences: 2, cacheMemoryLimit: 2 * (3 * 2 * 16 * 2 * 32 * 4))  // two blocks
        batcher.enqueue(BatchRequest(id: "huge", prompt: [Int32](repeating: 3, count: 40), options: GenerationOptions(maxTokens: 4)))
        batcher.enqueue(BatchRequest(id: "small", prompt: [1, 5], options: GenerationOptions(maxTokens: 3, stopTokenIds: [])))
        var events: [String] = []
        while !batcher.isIdle {
            try batcher.step { r, e in
                switch e {
                case .failed(let error): events.append("\(r.id) failed: \(error)")
                case .finished(let result): events.append("\(r.id) finished \(result.ids.count)")
                case .token: break
                }
            }
        }
        #expect(events.count == 2)
        #expect(events.first?.hasPrefix("huge failed: prompt 'huge' (40 tokens + 4 to generate) does not fit") == true)
        #expect(events.last == "small finished 3")
    }

    /// Reported log-probabilities are the model's: the top alternatives in order, the
    /// sampled (greedy) token first, each equal to log-softmax of the logits.
    @Test func logprobsAreLogSoftmaxOfTheLogits() throws {
        let prompt: [Int32] = [1, 600, 2, 33]
        let logits = try model.forward(prompt, cache: model.makeCache(), allLogits: false)
        let batcher = ContinuousBatcher(model: model, maxSequences: 1, cacheMemoryLimit: nil)
        batcher.enqueue(BatchRequest(id: "a", prompt: prompt, options: GenerationOptions(maxTokens: 1, stopTokenIds: []), topLogprobs: 4))
        var reported: TokenLogprob?
        try batcher.step { _, e in if case .token(_, let lp) = e { reported = lp } }
        let lp = try #require(reported)
        let order = logits.indices.sorted { logits[$0] > logits[$1] }.prefix(4).map(Int32.init)
        #expect(lp.top.map(\.id) == order)
        for alt in lp.top {
            let expected = logits.withUnsafeBufferPointer { logSoftmax($0, at: Int(alt.id)) }
            #expect(abs(alt.logprob - expected) < 1e-9)
        }
        #expect(lp.logprob == lp.top[0].logprob)
    }
}
