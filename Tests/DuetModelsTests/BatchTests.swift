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
