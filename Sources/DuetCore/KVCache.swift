import Synchronization
/// Fixed-size blocks of keys and values shared by many sequences (batched decoding, beam
/// search). A block holds `blockSize` positions of every layer; blocks are reference
/// counted, so forking a sequence shares its blocks and a shared block is copied only when
/// one of its owners writes to it (copy-on-write). Bounded by `maxBlocks`.
///
/// Block layout: (layer) [2 (keys, values)][blockSize][kvHeads * headDim] fp32.
public final class KVBlockPool: @unchecked Sendable {
    public let layers: Int
    public let kvHeads: Int
    public let headDim: Int
    public let blockSize: Int
    /// Most blocks this pool hands out (nil: no limit).
    public let maxBlocks: Int?
    private var blocks: [UnsafeMutablePointer<Float>] = []
    private var refcounts: [Int] = []
    private var free: [Int] = []

    public init(layers: Int, kvHeads: Int, headDim: Int, blockSize: Int = 16, maxBlocks: Int? = nil) {
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.blockSize = blockSize
        self.maxBlocks = maxBlocks
    }

    /// A pool that holds at most `bytes` of keys and values.
    public convenience init(layers: Int, kvHeads: Int, headDim: Int, blockSize: Int = 16, memoryLimit bytes: Int) {
        let perBlock = layers * 2 * blockSize * kvHeads * headDim * 4
        self.init(layers: layers, kvHeads: kvHeads, headDim: headDim, blockSize: blockSize, maxBlocks: max(1, bytes / perBlock))
    }

    deinit { for b in blocks { b.deallocate() } }

    public var rowWidth: Int { kvHeads * headDim }
    var floatsPerBlock: Int { layers * 2 * blockSize * rowWidth }
    public var blocksInUse: Int { blocks.count - free.count }
    public var bytesPerBlock: Int { floatsPerBlock * 4 }

    func allocate() throws(KVCacheError) -> Int {
        if let b = free.popLast() {
            refcounts[b] = 1
            return b
        }
        if let maxBlocks, blocks.count >= maxBlocks { throw .full(blocks: maxBlocks, bytes: maxBlocks * bytesPerBlock) }
        blocks.append(.allocate(capacity: floatsPerBlock))
        refcounts.append(1)
        return blocks.count - 1
    }

    func retain(_ b: Int) { refcounts[b] += 1 }

    func release(_ b: Int) {
        refcounts[b] -= 1
        if refcounts[b] == 0 { free.append(b) }
    }

    func isShared(_ b: Int) -> Bool { refcounts[b] > 1 }

    /// A private copy of block `b` (the caller's reference moves to the copy).
    func copyOnWrite(_ b: Int) throws(KVCacheError) -> Int {
        let c = try allocate()
        blocks[c].update(from: blocks[b], count: floatsPerBlock)
        release(b)
        return c
    }

    /// Keys (or values) of `layer` in block `b`: [blockSize, rowWidth].
    public func rows(_ b: Int, layer: Int, values: Bool) -> UnsafeMutablePointer<Float> {
        blocks[b] + (layer * 2 + (values ? 1 : 0)) * blockSize * rowWidth
    }
}

public enum KVCacheError: Error, Equatable, CustomStringConvertible {
    case full(blocks: Int, bytes: Int)
    public var description: String {
        switch self {
        case .full(let blocks, let bytes):
            "the KV cache is full (\(blocks) blocks, \(bytes / 1_048_576) MiB); raise the cache memory limit or run fewer sequences"
        }
    }
}

/// One sequence's keys and values: a block table into a pool. Layout per position:
/// `[kvHeads, headDim]` fp32 per layer, keys and values.
public final class KVCache {
    public let pool: KVBlockPool
    /// Unique among the caches of this process; `forkedFrom`: the id of the cache this one was
    /// forked from (a device that keeps sequences' keys elsewhere copies or takes them over).
    public let id = KVCache.nextId()
    public private(set) var forkedFrom: UInt64?
    private static let counter = Mutex<UInt64>(0)
    private static func nextId() -> UInt64 { counter.withLock { $0 += 1; return $0 } }
    /// Positions filled so far (the next token's position).
    public private(set) var length = 0
    /// Block ids, one per `blockSize` positions.
    public private(set) var blockTable: [Int] = []

    public var layers: Int { pool.layers }
    public var kvHeads: Int { pool.kvHeads }
    public var headDim: Int { pool.headDim }
    public var rowWidth: Int { pool.rowWidth }

    public init(pool: KVBlockPool) { self.pool = pool }

    /// A cache with a private, unbounded pool.
    public convenience init(layers: Int, kvHeads: Int, headDim: Int) {
        self.init(pool: KVBlockPool(layers: layers, kvHeads: kvHeads, headDim: headDim))
    }

    deinit { for b in blockTable { pool.release(b) } }

    /// A second sequence with the same contents, sharing every block until one side writes.
    public func fork() -> KVCache {
        let c = KVCache(pool: pool)
        c.forkedFrom = id
        c.length = length
        c.blockTable = blockTable
        for b in blockTable { pool.retain(b) }
        return c
    }

    /// Makes room for positions up to `length + count`, private to this sequence.
    public func reserve(_ count: Int) throws(KVCacheError) {
        let bs = pool.blockSize
        let needed = (length + count + bs - 1) / bs
        while blockTable.count < needed { blockTable.append(try pool.allocate()) }
        // The blocks about to be written must not be shared.
        let first = length / bs
        for i in first..<min(needed, blockTable.count) where pool.isShared(blockTable[i]) {
            blockTable[i] = try pool.copyOnWrite(blockTable[i])
        }
    }

    /// Writes `k`, `v` (`[count, kvHeads, headDim]`) of layer `layer` at positions
    /// `length ..< length + count`. Call `reserve` first and `advance` after the last layer.
    public func store(layer: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, count: Int) {
        let bs = pool.blockSize, w = rowWidth
        for t in 0..<count {
            let p = length + t
            let b = blockTable[p / bs], r = p % bs
            (pool.rows(b, layer: layer, values: false) + r * w).update(from: k + t * w, count: w)
            (pool.rows(b, layer: layer, values: true) + r * w).update(from: v + t * w, count: w)
        }
    }

    /// Marks `count` more positions as filled.
    public func advance(_ count: Int) { length += count }

    /// Forgets every position from `newLength` on and gives back the blocks no longer used.
    public func truncate(_ newLength: Int) {
        length = min(length, max(0, newLength))
        let keep = (length + pool.blockSize - 1) / pool.blockSize
        while blockTable.count > keep { pool.release(blockTable.removeLast()) }
    }

    /// Key and value block pointers of `layer`, in position order (for attention).
    public func blockRows(layer: Int) -> (keys: [UnsafePointer<Float>], values: [UnsafePointer<Float>]) {
        (blockTable.map { UnsafePointer(pool.rows($0, layer: layer, values: false)) },
         blockTable.map { UnsafePointer(pool.rows($0, layer: layer, values: true)) })
    }
}
