import DuetCore
import DuetModels

/// `--strategy gpu-only` (and the dense-on-GPU offload layout): GPUMixtral behind the
/// LanguageModel interface. The KVCache objects handed out only count positions; the keys and
/// values live on the GPU, one region (slot) per sequence: one sequence by default, several
/// for beam search and batches (`sequences`). Forks of a cache take over or copy their
/// parent's slot (`SequenceSlots`).
public final class GPULanguageModel: LanguageModel {
    public let cpuModel: MixtralModel
    public let gpuModel: GPUMixtral
    private var slots: SequenceSlots
    /// Most tokens one GPU forward runs (longer prompts go in chunks).
    public var prefillChunk = GPULanguageModel.defaultPrefillChunk
    public static let defaultPrefillChunk = 2048

    /// `experts: false` uploads everything but the experts (Fiddler's layout; set
    /// `gpuModel.expertExecutor`); `maxPositions` bounds each sequence's GPU KV cache;
    /// `sequences`: how many sequences the GPU holds at once.
    public init(_ model: MixtralModel, gpu: GPU, maxPositions: Int? = nil, sequences: Int = 1, experts: Bool = true) throws(CUDAError) {
        cpuModel = model
        gpuModel = try GPUMixtral(model, gpu: gpu, maxPositions: maxPositions, sequences: sequences, experts: experts)
        slots = SequenceSlots(count: gpuModel.sequences)
    }

    public var vocabSize: Int { cpuModel.vocabSize }
    public var maxPositions: Int { gpuModel.maxPositions }
    public var eosTokenIds: [Int] { cpuModel.eosTokenIds }
    public var bosTokenId: Int? { cpuModel.bosTokenId }
    public var summary: ModelSummary { cpuModel.summary }
    /// One slot stays for a sequence the batch's ones are forked from (beam search's prompt).
    public var maxBatchItems: Int? { max(1, gpuModel.sequences - 1) }
    /// The executor reports into the CPU model's counters.
    public var expertUsage: ExpertUsage { gpuModel.expertExecutor == nil ? gpuModel.expertUsage : cpuModel.expertUsage }
    public func makeCache() -> KVCache { cpuModel.makeCache() }
    public func makeCachePool(memoryLimit: Int?, blockSize: Int) -> KVBlockPool { cpuModel.makeCachePool(memoryLimit: memoryLimit, blockSize: blockSize) }

    /// The slots of one step's sequences, their forks' rows copied in first.
    private func place(_ caches: [KVCache]) throws(ModelError) -> [Int] {
        do {
            let (assigned, copies) = try slots.assign(caches, evicting: true)
            for c in copies { try gpuModel.copySequence(from: c.from, to: c.to, rows: c.rows) }
            return assigned
        } catch let error as SequenceSlots.SlotError {
            throw .cacheFull("GPU KV cache: \(error)")
        } catch {
            throw .cacheFull("\(error)")
        }
    }

    /// Every id must be in the vocabulary.
    private func checkIds(_ tokens: [Int32]) throws(ModelError) {
        if let bad = tokens.first(where: { $0 < 0 || Int($0) >= vocabSize }) { throw .tokenOutOfRange(id: bad, vocabSize: vocabSize) }
    }

    public func forward(_ tokens: [Int32], cache: KVCache, allLogits: Bool) throws(ModelError) -> [Float] {
        guard !allLogits else { throw .cacheFull("the GPU model returns the last token's logits only") }
        guard !tokens.isEmpty else { throw .emptyInput }
        try checkIds(tokens)
        let slot = try place([cache])[0]
        do {
            // Long prompts in chunks: the causal cache makes it the same computation, and the
            // workspace stays what one chunk needs.
            var logits: [Float] = []
            for start in stride(from: 0, to: tokens.count, by: prefillChunk) {
                let chunk = Array(tokens[start..<min(tokens.count, start + prefillChunk)])
                logits = try gpuModel.forward(chunk, slot: slot, start: cache.length + start)
            }
            cache.advance(tokens.count)
            return logits
        } catch {
            throw .cacheFull(error.description)
        }
    }

    /// One token per sequence runs as one batched step (beams, decode batches); anything
    /// else item by item.
    public func forwardBatch(_ items: [BatchItem], allLogits: Bool) throws(ModelError) -> [[Float]] {
        guard !allLogits, items.count > 1, items.allSatisfy({ $0.tokens.count == 1 }),
              Set(items.map { ObjectIdentifier($0.cache) }).count == items.count else {
            var out: [[Float]] = []
            for item in items { out.append(try forward(item.tokens, cache: item.cache, allLogits: allLogits)) }
            return out
        }
        let tokens = items.map { $0.tokens[0] }
        try checkIds(tokens)
        let assigned = try place(items.map(\.cache))
        do {
            let logits = try gpuModel.forwardBatch(tokens, at: zip(assigned, items).map { ($0, $1.cache.length) })
            for item in items { item.cache.advance(1) }
            return logits
        } catch {
            throw .cacheFull(error.description)
        }
    }
}
