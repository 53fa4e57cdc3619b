/// One token's choice of experts: ids and the weights its output is scaled by.
public struct ExpertChoice: Sendable, Equatable {
    public var experts: [Int]
    public var weights: [Float]
}

/// Mixtral's router: softmax over all experts' logits, keep the top k, renormalise the
/// kept probabilities to sum to 1 (as HF's `MixtralSparseMoeBlock`). Ties go to the lower
/// expert id. Shape: logits `[T, E]`.
public func routeTopK(_ logits: UnsafePointer<Float>, tokens T: Int, experts E: Int, k: Int) -> [ExpertChoice] {
    var probs = [Float](repeating: 0, count: E)
    return (0..<T).map { t in
        for e in 0..<E { probs[e] = logits[t * E + e] }
        probs.withUnsafeMutableBufferPointer { softmax($0.baseAddress!, count: E) }
        let top = (0..<E).sorted { probs[$0] != probs[$1] ? probs[$0] > probs[$1] : $0 < $1 }.prefix(k)
        let total = top.reduce(Float(0)) { $0 + probs[$1] }
        return ExpertChoice(experts: Array(top), weights: top.map { probs[$0] / total })
    }
}
