/// Which of a device's sequence slots holds each sequence's keys and values, for a model that
/// keeps them on the device (the KV cache objects then only count positions). A sequence
/// keeps its slot while its cache lives; a fork takes over its parent's slot when the parent
/// is gone (a beam search step replaces every beam by forks), and otherwise gets a free slot
/// with the parent's rows copied in first.
public struct SequenceSlots {
    public let count: Int
    private final class Holder { weak var cache: KVCache?; init(_ c: KVCache) { cache = c } }
    /// Per slot: the id of the cache whose rows it holds, and that cache while it lives.
    private var owners: [UInt64?]
    private var holders: [Holder?]

    /// Rows `0..<rows` of slot `from` to copy into slot `to` before the step.
    public struct Copy: Equatable, Sendable {
        public var from, to, rows: Int
        public init(from: Int, to: Int, rows: Int) { (self.from, self.to, self.rows) = (from, to, rows) }
    }

    public enum SlotError: Error, Equatable, CustomStringConvertible {
        case full(Int)
        case unknown(length: Int)
        public var description: String {
            switch self {
            case .full(let n): "all \(n) device sequence slots are in use"
            case .unknown(let length): "a \(length)-position sequence whose keys and values are not on the device"
            }
        }
    }

    public init(count: Int) {
        self.count = count
        owners = Array(repeating: nil, count: count)
        holders = Array(repeating: nil, count: count)
    }

    private func slot(of id: UInt64) -> Int? { owners.firstIndex(of: id) }
    private func isFree(_ s: Int) -> Bool { holders[s]?.cache == nil }
    private mutating func give(_ s: Int, to c: KVCache) { owners[s] = c.id; holders[s] = Holder(c) }

    /// Slots for one step's sequences (distinct caches), and the copies to make first. With no
    /// free slot left, `evicting` takes one from a live sequence not in this step (its next
    /// step then fails with `.unknown`): a one-slot model serves whichever sequence came last.
    public mutating func assign(_ caches: [KVCache], evicting: Bool = false) throws(SlotError) -> (slots: [Int], copies: [Copy]) {
        var result = [Int?](repeating: nil, count: caches.count)
        var claimed = Set<Int>()
        for (i, c) in caches.enumerated() {
            if let s = slot(of: c.id) { result[i] = s; claimed.insert(s) }
        }
        // Each new sequence's parent slot, looked up before any slot changes hands.
        let parents = caches.map { c in c.forkedFrom.flatMap(slot(of:)) }
        // Forks of a parent that is gone take its slot over (the first one of them).
        for (i, c) in caches.enumerated() where result[i] == nil {
            if let s = parents[i], !claimed.contains(s), isFree(s) {
                result[i] = s
                claimed.insert(s)
                give(s, to: c)
            }
        }
        // The rest: free slots that no fork of this step reads from, filled by copies.
        let sources = Set(caches.indices.filter { result[$0] == nil }.compactMap { parents[$0] })
        var copies: [Copy] = []
        for (i, c) in caches.enumerated() where result[i] == nil {
            var source: Int? = nil
            if c.length > 0 {
                guard let s = parents[i] else { throw .unknown(length: c.length) }
                source = s
            }
            let open = (0..<count).filter { !claimed.contains($0) && !sources.contains($0) }
            guard let free = open.first(where: isFree) ?? (evicting ? open.first : nil) else { throw .full(count) }
            result[i] = free
            claimed.insert(free)
            give(free, to: c)
            if let source { copies.append(Copy(from: source, to: free, rows: c.length)) }
        }
        return (result.map { $0! }, copies)
    }
}
