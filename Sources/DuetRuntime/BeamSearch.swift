#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DuetCore
import DuetCPU
import DuetModels

/// When beam search may stop before `maxNewTokens` (HF's `early_stopping`).
public enum EarlyStopping: String, Sendable, CaseIterable {
    /// Stop once `width` hypotheses are finished.
    case always = "true"
    /// Stop when the best running beam, at its current length, cannot beat the worst finished one (HF's default).
    case heuristic = "false"
    /// Stop only when no running beam can beat the worst finished one even at full length.
    case never
}

public struct BeamSearchOptions: Sendable {
    public var width: Int
    public var numReturnSequences: Int
    public var maxNewTokens: Int
    public var lengthPenalty: Double
    public var earlyStopping: EarlyStopping
    /// Ids that finish a hypothesis (nil: the model's EOS ids).
    public var stopTokenIds: [Int]?
    /// Bound on the KV cache of all beams together (nil: none).
    public var cacheMemoryLimit: Int?

    public init(width: Int, numReturnSequences: Int? = nil, maxNewTokens: Int, lengthPenalty: Double = 1,
                earlyStopping: EarlyStopping = .heuristic, stopTokenIds: [Int]? = nil, cacheMemoryLimit: Int? = nil) {
        self.width = width
        self.numReturnSequences = numReturnSequences ?? width
        self.maxNewTokens = maxNewTokens
        self.lengthPenalty = lengthPenalty
        self.earlyStopping = earlyStopping
        self.stopTokenIds = stopTokenIds
        self.cacheMemoryLimit = cacheMemoryLimit
    }
}

/// A finished hypothesis: generated ids (ending with the stop id if it stopped) and its
/// score, the summed log-probability divided by length^lengthPenalty (HF's `sequences_scores`).
public struct BeamHypothesis: Sendable, Equatable {
    public var ids: [Int32]
    public var score: Double
}

/// Beam search with HF transformers' semantics (`generate(num_beams=W, do_sample=False)`):
/// each step takes the best `max(2, 1 + stop ids) * W` continuations of all beams by summed
/// log-probability; those among the top W that end (stop id, or the last step) become
/// finished hypotheses, scored by length-normalised log-probability; the best W that do not
/// end continue. A continuing beam's KV cache is a copy-on-write fork of its parent's, and
/// all beams advance in one batched forward step.
public func beamSearch(model: any LanguageModel, prompt: [Int32], options o: BeamSearchOptions) throws(ModelError) -> [BeamHypothesis] {
    guard o.width >= 1, o.maxNewTokens >= 1 else { return [] }
    let W = o.width
    let stops = Set(o.stopTokenIds ?? model.eosTokenIds)
    let keep = max(2, 1 + stops.count) * W
    let pool = model.makeCachePool(memoryLimit: o.cacheMemoryLimit, blockSize: 16)
    let base = KVCache(pool: pool)
    let first = try model.forward(prompt, cache: base, allLogits: false)

    struct Beam {
        var ids: [Int32]
        var score: Double  // summed log-probability (-1e9 marks a beam that must not continue)
        var cache: KVCache
        var logits: [Float]
    }
    // Only the first beam is live at the start; the others carry -1e9, as in HF.
    var running = (0..<W).map { i in Beam(ids: [], score: i == 0 ? 0 : -1e9, cache: base, logits: first) }
    var finished: [BeamHypothesis] = []
    var improvementPossible = true
    var generated = 0

    while true {
        let candidates = topContinuations(running.map { ($0.score, $0.logits) }, count: keep)
        let isLast = generated + 1 >= o.maxNewTokens
        let ends = candidates.map { isLast || stops.contains(Int($0.token)) }

        // Finished: candidates among the top W that end, length-normalised.
        let full = finished.count == W && o.earlyStopping == .always
        if improvementPossible && !full {
            for (c, candidate) in candidates.prefix(W).enumerated() where ends[c] {
                let score = candidate.score / pow(Double(generated + 1), o.lengthPenalty)
                let hypothesis = BeamHypothesis(ids: running[candidate.beam].ids + [candidate.token], score: score)
                if finished.count < W {
                    finished.append(hypothesis)
                } else if let worst = finished.indices.min(by: { finished[$0].score < finished[$1].score }), score > finished[worst].score {
                    finished[worst] = hypothesis
                }
            }
            finished.sort { $0.score > $1.score }
        }
        if isLast { break }

        // Running: the best W continuations that do not end.
        let next = candidates.indices
            .map { (candidates[$0], candidates[$0].score - (ends[$0] ? 1e9 : 0)) }
            .sorted { $0.1 > $1.1 }
            .prefix(W)
        running = next.map { c, score in
            Beam(ids: running[c.beam].ids + [c.token], score: score, cache: running[c.beam].cache.fork(), logits: [])
        }
        generated += 1

        // Stop when no running beam can improve the finished set.
        let length = o.earlyStopping == .never && o.lengthPenalty > 0 ? o.maxNewTokens : generated
        let bestPossible = running[0].score / pow(Double(length), o.lengthPenalty)
        let worstFinished = finished.count == W ? finished.map(\.score).min()! : -1e9
        improvementPossible = improvementPossible && bestPossible > worstFinished
        let openBeam = !(finished.count == W && o.earlyStopping == .always)
        if !(improvementPossible && openBeam && running[0].score > -1e9) { break }

        let logits = try model.forwardBatch(running.map { BatchItem(tokens: [$0.ids.last!], cache: $0.cache) }, allLogits: false)
        for i in running.indices { running[i].logits = logits[i] }
    }
    return Array(finished.prefix(o.numReturnSequences))
}

/// The `count` best (beam, token) continuations by summed log-probability, best first.
private func topContinuations(_ beams: [(score: Double, logits: [Float])], count: Int) -> [(beam: Int, token: Int32, score: Double)] {
    var all: [(beam: Int, token: Int32, score: Double)] = []
    for (b, beam) in beams.enumerated() {
        let logits = beam.logits
        let logZ = logits.withUnsafeBufferPointer(logSumExp)
        // This beam's own best `count` tokens are enough for the overall best `count`.
        for v in topIndices(logits, count) { all.append((b, Int32(v), beam.score + Double(logits[v]) - logZ)) }
    }
    all.sort { $0.score != $1.score ? $0.score > $1.score : ($0.beam, $0.token) < ($1.beam, $1.token) }
    return Array(all.prefix(count))
}

/// Indices of the `k` largest values, largest first (lower index first on ties), in one
/// pass with a small sorted buffer: O(V log k), not a sort of the whole vocabulary.
func topIndices(_ x: [Float], _ k: Int) -> [Int] {
    var best: [Int] = []
    best.reserveCapacity(k + 1)
    for i in x.indices {
        if best.count == k, let last = best.last, x[i] <= x[last] { continue }
        var lo = 0, hi = best.count  // first position whose value is smaller than x[i]
        while lo < hi {
            let mid = (lo + hi) / 2
            if x[best[mid]] >= x[i] { lo = mid + 1 } else { hi = mid }
        }
        best.insert(i, at: lo)
        if best.count > k { best.removeLast() }
    }
    return best
}
