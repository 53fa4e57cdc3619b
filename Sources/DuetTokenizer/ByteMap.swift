/// An immutable open-addressing hash map from byte strings to token ids, looked up
/// straight from a buffer slice (no String or Array is built per lookup).
struct ByteMap: Sendable {
    private var arena: [UInt8] = []
    private var starts: [Int32] = []    // (entry) offset in arena
    private var lengths: [Int32] = []   // (entry)
    private var values: [Int32] = []    // (entry)
    private var slots: [Int32] = []     // (slot) entry index, -1 = empty
    private var mask = 0

    init(_ pairs: [(key: [UInt8], value: Int32)]) {
        var capacity = 16
        while capacity < pairs.count * 2 { capacity <<= 1 }
        mask = capacity - 1
        slots = [Int32](repeating: -1, count: capacity)
        for (key, value) in pairs {
            insert(key, value)
        }
    }

    private mutating func insert(_ key: [UInt8], _ value: Int32) {
        let h = key.withUnsafeBufferPointer { Self.hash($0.baseAddress!, $0.count) }
        var slot = h & mask
        while slots[slot] >= 0 {
            let e = Int(slots[slot])
            if equal(e, key) {  // later duplicates win, as a dictionary assignment
                values[e] = value
                return
            }
            slot = (slot + 1) & mask
        }
        slots[slot] = Int32(starts.count)
        starts.append(Int32(arena.count))
        lengths.append(Int32(key.count))
        values.append(value)
        arena.append(contentsOf: key)
    }

    private func equal(_ e: Int, _ key: [UInt8]) -> Bool {
        Int(lengths[e]) == key.count && arena[Int(starts[e])..<(Int(starts[e]) + key.count)].elementsEqual(key)
    }

    @inline(__always)
    static func hash(_ p: UnsafePointer<UInt8>, _ n: Int) -> Int {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325 ^ UInt64(n)
        for i in 0..<n { h = (h ^ UInt64(p[i])) &* 0x0000_0100_0000_01B3 }
        return Int(truncatingIfNeeded: h ^ (h >> 29))
    }

    /// The id stored for bytes `p[0..<n]`.
    @inline(__always)
    func lookup(_ p: UnsafePointer<UInt8>, _ n: Int) -> Int32? {
        var slot = Self.hash(p, n) & mask
        return arena.withUnsafeBufferPointer { a in
            while true {
                let e = Int(slots[slot])
                if e < 0 { return nil }
                if Int(lengths[e]) == n && memcmpEqual(a.baseAddress! + Int(starts[e]), p, n) { return values[e] }
                slot = (slot + 1) & mask
            }
        }
    }

    func lookup(_ bytes: [UInt8]) -> Int32? {
        bytes.withUnsafeBufferPointer { lookup($0.baseAddress ?? UnsafePointer(bitPattern: 1)!, $0.count) }
    }
}

@inline(__always)
private func memcmpEqual(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ n: Int) -> Bool {
    for i in 0..<n where a[i] != b[i] { return false }
    return true
}
