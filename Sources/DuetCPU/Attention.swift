#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DuetCore

/// Keys or values of one layer, position by position: contiguous, or in cache blocks.
public struct KVRows: @unchecked Sendable {
    let blocks: [UnsafePointer<Float>]
    let blockSize: Int
    let rowWidth: Int

    /// One contiguous `[positions, rowWidth]` array.
    public init(contiguous p: UnsafePointer<Float>, rowWidth: Int) {
        blocks = [p]
        blockSize = Int.max
        self.rowWidth = rowWidth
    }

    /// Blocks of `blockSize` positions each, in order.
    public init(blocks: [UnsafePointer<Float>], blockSize: Int, rowWidth: Int) {
        self.blocks = blocks
        self.blockSize = blockSize
        self.rowWidth = rowWidth
    }

    /// Position `j`'s row.
    @inline(__always)
    func row(_ j: Int) -> UnsafePointer<Float> {
        blockSize == Int.max ? blocks[0] + j * rowWidth : blocks[j / blockSize] + (j % blockSize) * rowWidth
    }
}

/// Grouped-query causal attention of T new queries over a layer's KV cache.
///
/// Query t sits at position `start + t` and attends to cache positions
/// `max(0, p - window + 1) ... p` (HF's sliding window keeps `window` keys including its
/// own; nil = full causal). Query head h reads KV head `h / (heads / kvHeads)`.
/// Shapes: q `[T, heads, headDim]`, keys/values `[positions, kvHeads, headDim]`, out `[T, heads, headDim]`.
public func attention(
    queries q: UnsafePointer<Float>, keys: KVRows, values: KVRows,
    out: UnsafeMutablePointer<Float>, tokens T: Int, start: Int,
    heads: Int, kvHeads: Int, headDim: Int, window: Int?, pool: ThreadPool
) {
    let group = heads / kvHeads
    let scale = 1 / Float(headDim).squareRoot()
    let pq = Unchecked(q), po = Unchecked(out)
    let body: (Int) -> Void = { job in
        let t = job / heads, h = job % heads
        let p = start + t
        let first = window.map { max(0, p - $0 + 1) } ?? 0
        let kvh = h / group
        let query = pq.value.advanced(by: (t * heads + h) * headDim)
        var scores = [Float](repeating: 0, count: p - first + 1)
        var maxScore = -Float.infinity
        for j in first...p {
            let s = dot(query, keys.row(j) + kvh * headDim, headDim) * scale
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
            let v = values.row(j) + kvh * headDim
            for d in 0..<headDim { o[d] += w * v[d] }
        }
    }
    pool.parallelFor(T * heads, body)
}
