import DuetCore
import DuetModels

/// `--strategy gpu-only`: GPUMixtral behind the LanguageModel interface, for one sequence at
/// a time. The KVCache handed out only counts positions; the keys and values live on the GPU.
public final class GPULanguageModel: LanguageModel {
    public let cpuModel: MixtralModel
    public let gpuModel: GPUMixtral
    private weak var activeCache: KVCache?
    /// Most tokens one GPU forward runs (longer prompts go in chunks).
    public var prefillChunk = 2048

    /// `experts: false` uploads everything but the experts (Fiddler's layout; set
    /// `gpuModel.expertExecutor`); `maxPositions` bounds the GPU's KV cache.
    public init(_ model: MixtralModel, gpu: GPU, maxPositions: Int? = nil, experts: Bool = true) throws(CUDAError) {
        cpuModel = model
        gpuModel = try GPUMixtral(model, gpu: gpu, maxPositions: maxPositions, experts: experts)
    }

    public var vocabSize: Int { cpuModel.vocabSize }
    public var maxPositions: Int { gpuModel.maxPositions }
    public var eosTokenIds: [Int] { cpuModel.eosTokenIds }
    public var bosTokenId: Int? { cpuModel.bosTokenId }
    public var summary: ModelSummary { cpuModel.summary }
    public var maxBatchItems: Int? { 1 }
    /// The executor reports into the CPU model's counters.
    public var expertUsage: ExpertUsage { gpuModel.expertExecutor == nil ? gpuModel.expertUsage : cpuModel.expertUsage }
    public func makeCache() -> KVCache { cpuModel.makeCache() }
    public func makeCachePool(memoryLimit: Int?, blockSize: Int) -> KVBlockPool { cpuModel.makeCachePool(memoryLimit: memoryLimit, blockSize: blockSize) }

    public func forward(_ tokens: [Int32], cache: KVCache, allLogits: Bool) throws(ModelError) -> [Float] {
        guard !allLogits else { throw .cacheFull("the GPU model returns the last token's logits only") }
        guard !tokens.isEmpty else { throw .emptyInput }
        if let bad = tokens.first(where: { $0 < 0 || Int($0) >= vocabSize }) { throw .tokenOutOfRange(id: bad, vocabSize: vocabSize) }
        // One sequence on the GPU: a new cache starts it over; the active cache rewound
        // (chat turns reuse a prefix) rewinds the GPU's positions with it.
        if activeCache !== cache {
            guard cache.length == 0 else { throw .cacheFull("the GPU model holds one sequence; this cache is not it") }
            gpuModel.reset()
            activeCache = cache
        } else if cache.length < gpuModel.length {
            gpuModel.truncate(cache.length)
        }
        guard cache.length == gpuModel.length else { throw .cacheFull("the GPU cache and the sequence disagree on its length") }
        do {
            // Long prompts in chunks: the causal cache makes it the same computation, and the
            // workspace stays what one chunk needs.
            var logits: [Float] = []
            for start in stride(from: 0, to: tokens.count, by: prefillChunk) {
                logits = try gpuModel.forward(Array(tokens[start..<min(tokens.count, start + prefillChunk)]))
            }
            cache.advance(tokens.count)
            return logits
        } catch {
            throw .cacheFull(error.description)
        }
    }

    public func forwardBatch(_ items: [BatchItem], allLogits: Bool) throws(ModelError) -> [[Float]] {
        guard items.count == 1 else { throw .cacheFull("--strategy gpu-only runs one sequence at a time for now") }
        return [try forward(items[0].tokens, cache: items[0].cache, allLogits: allLogits)]
    }
}
