/// Keys and values of every layer for one sequence, fp32, growing as tokens arrive.
///
/// Layout per layer: `keys[pos, kvHead, headDim]`, `values[pos, kvHead, headDim]`.
/// (The paged, block-table cache for batched decoding builds on this interface.)
public final class KVCache {
    public let layers: Int
    public let kvHeads: Int
    public let headDim: Int
    /// Positions filled so far (the next token's position).
    public private(set) var length = 0
    public private(set) var keys: [[Float]]    // (layer) [capacity, kvHeads, headDim]
    public private(set) var values: [[Float]]  // (layer) [capacity, kvHeads, headDim]
    private var capacity = 0

    public init(layers: Int, kvHeads: Int, headDim: Int) {
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        keys = Array(repeating: [], count: layers)
        values = Array(repeating: [], count: layers)
    }

    /// Floats per position in one layer.
    public var rowWidth: Int { kvHeads * headDim }

    /// Makes room for positions up to `length + count` (amortised doubling).
    public func reserve(_ count: Int) {
        let needed = length + count
        guard needed > capacity else { return }
        let newCapacity = max(needed, capacity * 2, 16)
        for l in 0..<layers {
            keys[l].append(contentsOf: repeatElement(0, count: (newCapacity - capacity) * rowWidth))
            values[l].append(contentsOf: repeatElement(0, count: (newCapacity - capacity) * rowWidth))
        }
        capacity = newCapacity
    }

    /// Writes `k`, `v` (`[count, kvHeads, headDim]`) for layer `layer` at positions
    /// `length ..< length + count`. Call `reserve` first; `advance` after the last layer.
    public func store(layer: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, count: Int) {
        let offset = length * rowWidth
        keys[layer].withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: offset).update(from: k, count: count * rowWidth) }
        values[layer].withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: offset).update(from: v, count: count * rowWidth) }
    }

    /// Marks `count` more positions as filled.
    public func advance(_ count: Int) { length += count }

    /// Forgets every position from `newLength` on (rewinds a speculative or failed step).
    public func truncate(_ newLength: Int) { length = min(length, max(0, newLength)) }
}
