#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DuetCore

/// Grouped-query causal attention of T new queries over a layer's KV cache.
///
/// Query t sits at position `start + t` and attends to cache positions
/// `max(0, p - window + 1) ... p` (HF's sliding window keeps `window` keys including its
/// own; nil = full causal). Query head h reads KV head `h / (heads / kvHeads)`.
/// Shapes: q `[T, heads, headDim]`, keys/values `[positions, kvHeads, headDim]`, out `[T, heads, headDim]`.
public func attention(
    queries q: UnsafePointer<Float>, keys: UnsafePointer<Float>, values: UnsafePointer<Float>,
    out: UnsafeMutablePointer<Float>, tokens T: Int, start: Int,
    heads: Int, kvHeads: Int, headDim: Int, window: Int?, pool: ThreadPool
) {
    let group = heads / kvHeads
    let scale = 1 / Float(headDim).squareRoot()
    let kvStride = kvHeads * headDim
    let pq = Unchecked(q), pk = Unchecked(keys), pv = Unchecked(values), po = Unchecked(out)
    let body: (Int) -> Void = { job in
        let t = job / heads, h = job % heads
        let p = start + t
        let first = window.map { max(0, p - $0 + 1) } ?? 0
        let kvh = h / group
        let query = pq.value.advanced(by: (t * heads + h) * headDim)
        var scores = [Float](repeating: 0, count: p - first + 1)
        var maxScore = -Float.infinity
        for j in first...p {
            let s = dot(query, pk.value.advanced(by: j * kvStride + kvh * headDim), headDim) * scale
            scores[j - first] = s
            maxScore = max(maxScore, s)
        }
        var total: Float = 0
        for j in scores.indices {
            scores[j] = expf(scores[j] - maxScore)
            total += scores[j]
        }
        let o = po.value.advanced(by: (t * heads + h) * headDim)
        o.update(repeating: 0, count: headDim)
        for j in first...p {
            let w = scores[j - first] / total
            let v = pv.value.advanced(by: j * kvStride + kvh * headDim)
            for d in 0..<headDim { o[d] += w * v[d] }
        }
    }
    pool.parallelFor(T * heads, body)
}
