/// The BPE model of tokenizer.json (`"type": "BPE"`), as HF tokenizers runs it.
///
/// A word starts as one symbol per character (per byte for byte-level vocabularies);
/// unknown characters become `<0xXX>` byte tokens with `byte_fallback`, else the unk token
/// (consecutive unks fused with `fuse_unk`). Merges are applied lowest rank first, ties to
/// the leftmost pair, through a priority queue — so a long word with no pre-tokenizer split
/// (Mixtral's whole paragraphs) costs O(n log n), not O(n^2). With `ignore_merges`, a word
/// that is itself in the vocabulary is one token.
struct BPEModel: Sendable {
    /// Token id -> its string in tokenizer.json.
    let tokens: [String]
    /// Token bytes -> id. Byte-level vocabularies are keyed by the raw bytes a token
    /// stands for (the GPT-2 alphabet undone), so words are never mapped to that alphabet.
    let vocab: ByteMap
    /// (left id << 32 | right id) -> rank << 32 | merged id.
    let merges: PairTable
    let byteLevel: Bool
    let byteFallback: Bool
    let fuseUnk: Bool
    let ignoreMerges: Bool
    let unkId: Int32?
    /// The id of `<0xXX>` (byte fallback) or of byte b's character (byte-level); -1 if absent.
    let byteIds: [Int32]

    init(_ model: BPEModelFile, byteLevel: Bool, file: String) throws(TokenizerError) {
        for (key, value) in [("continuing_subword_prefix", model.continuing_subword_prefix),
                             ("end_of_word_suffix", model.end_of_word_suffix)] where !(value ?? "").isEmpty {
            throw .unsupported(file: file, component: "model BPE", detail: "\(key) is not supported")
        }
        if let d = model.dropout, d != 0 {
            throw .unsupported(file: file, component: "model BPE", detail: "dropout is not supported at inference")
        }
        var tokens = [String](repeating: "", count: model.vocab.count)
        var ids: [String: Int32] = [:]
        ids.reserveCapacity(model.vocab.count)
        for (token, id) in model.vocab {
            guard id >= 0, id < Int32.max else {
                throw .malformed(file: file, reason: "model BPE: vocab entry '\(token)' has id \(id)")
            }
            if id >= tokens.count { tokens.append(contentsOf: repeatElement("", count: id - tokens.count + 1)) }
            tokens[id] = token
            ids[token] = Int32(id)
        }
        self.tokens = tokens
        self.byteLevel = byteLevel
        vocab = try Self.makeVocab(ids, byteLevel: byteLevel, file: file)
        merges = try Self.parseMerges(model.merges.pairs, ids: ids, file: file)
        byteFallback = model.byte_fallback ?? false
        fuseUnk = model.fuse_unk ?? false
        ignoreMerges = model.ignore_merges ?? false
        if let unk = model.unk_token {
            guard let id = ids[unk] else {
                throw .malformed(file: file, reason: "model BPE: unk_token '\(unk)' is not in the vocabulary")
            }
            unkId = id
        } else {
            unkId = nil
        }
        byteIds = (0..<256).map { b in
            let token = byteLevel ? String(ByteLevelAlphabet.byteToScalar[b]) : "<0x\(hex2(UInt8(b)))>"
            return ids[token] ?? -1
        }
    }

    private static func makeVocab(_ ids: [String: Int32], byteLevel: Bool, file: String) throws(TokenizerError) -> ByteMap {
        var pairs: [(key: [UInt8], value: Int32)] = []
        pairs.reserveCapacity(ids.count)
        for (token, id) in ids {
            if byteLevel {
                guard let raw = ByteLevelAlphabet.bytes(of: token) else {
                    throw .malformed(file: file, reason: "model BPE: token '\(token)' is outside the byte-level alphabet")
                }
                pairs.append((raw, id))
            } else {
                pairs.append((Array(token.utf8), id))
            }
        }
        // Deterministic on duplicate byte keys: the lower id wins (insert it last).
        pairs.sort { $0.value > $1.value }
        return ByteMap(pairs)
    }

    /// Merge rank = position in the list; the merged token must be in the vocabulary.
    private static func parseMerges(_ list: [(String, String)], ids: [String: Int32], file: String) throws(TokenizerError) -> PairTable {
        var merges: [UInt64: UInt64] = [:]
        merges.reserveCapacity(list.count)
        for (rank, (left, right)) in list.enumerated() {
            guard let l = ids[left], let r = ids[right], let m = ids[left + right] else {
                throw .malformed(file: file, reason: "merge \(rank) ('\(left)', '\(right)') uses a token not in the vocabulary")
            }
            let key = UInt64(UInt32(l)) << 32 | UInt64(UInt32(r))
            if merges[key] == nil { merges[key] = UInt64(rank) << 32 | UInt64(UInt32(m)) }
        }
        return PairTable(merges)
    }

    // MARK: tokenize

    /// Appends the ids of one pre-tokenized word (`p[0..<n]`, UTF-8 or raw bytes) to `out`.
    func tokenize(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int32]) throws(TokenizerError) {
        if n == 0 { return }
        if ignoreMerges, let id = vocab.lookup(p, n) {
            out.append(id)
            return
        }
        var symbols = try initialSymbols(p, n)
        if symbols.count > 1 { mergeAll(&symbols) }
        var i = 0
        while i >= 0 && i < symbols.count {
            out.append(symbols[i].id)
            i = Int(symbols[i].next)
        }
    }

    struct Symbol {
        var id: Int32
        var prev: Int32
        var next: Int32
        var alive: Bool
    }

    private func initialSymbols(_ p: UnsafePointer<UInt8>, _ n: Int) throws(TokenizerError) -> [Symbol] {
        var ids: [Int32] = []
        ids.reserveCapacity(n)
        var lastWasUnk = false
        var i = 0
        while i < n {
            let len = byteLevel ? 1 : min(scalarLength(p[i]), n - i)
            if let id = byteLevel ? (byteIds[Int(p[i])] >= 0 ? byteIds[Int(p[i])] : nil) : vocab.lookup(p + i, len) {
                ids.append(id)
                lastWasUnk = false
            } else if byteFallback, (0..<len).allSatisfy({ byteIds[Int(p[i + $0])] >= 0 }) {
                for k in 0..<len { ids.append(byteIds[Int(p[i + k])]) }
                lastWasUnk = false
            } else if let unk = unkId {
                if !(fuseUnk && lastWasUnk) { ids.append(unk) }
                lastWasUnk = true
            } else {
                throw .malformed(file: "tokenizer.json", reason: "character '\(String(decoding: UnsafeBufferPointer(start: p + i, count: len), as: UTF8.self))' is not in the vocabulary and there is no unk_token")
            }
            i += len
        }
        return ids.enumerated().map { k, id in
            Symbol(id: id, prev: Int32(k - 1), next: k + 1 < ids.count ? Int32(k + 1) : -1, alive: true)
        }
    }

    @inline(__always)
    private func merge(_ a: Int32, _ b: Int32) -> UInt64? {
        merges.lookup(UInt64(UInt32(a)) << 32 | UInt64(UInt32(b)))
    }

    /// Applies merges lowest rank first, leftmost first among equal ranks (HF's `Word::merge_all`).
    private func mergeAll(_ symbols: inout [Symbol]) {
        var heap = MinHeap(capacity: symbols.count)  // rank << 32 | position
        symbols.withUnsafeMutableBufferPointer { s in
            for i in 0..<(s.count - 1) {
                if let m = merge(s[i].id, s[i + 1].id) { heap.push(m & ~0xFFFF_FFFF | UInt64(i)) }
            }
            while let top = heap.pop() {
                let pos = Int(top & 0xFFFF_FFFF), rank = top >> 32
                guard s[pos].alive, s[pos].next >= 0 else { continue }
                let right = Int(s[pos].next)
                guard let m = merge(s[pos].id, s[right].id), m >> 32 == rank else { continue }  // stale entry
                s[pos].id = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
                s[pos].next = s[right].next
                s[right].alive = false
                if s[pos].next >= 0 { s[Int(s[pos].next)].prev = Int32(pos) }
                if s[pos].prev >= 0, let m = merge(s[Int(s[pos].prev)].id, s[pos].id) {
                    heap.push(m & ~0xFFFF_FFFF | UInt64(s[pos].prev))
                }
                if s[pos].next >= 0, let m = merge(s[pos].id, s[Int(s[pos].next)].id) {
                    heap.push(m & ~0xFFFF_FFFF | UInt64(pos))
                }
            }
        }
    }
}

/// A binary min-heap of packed UInt64 keys.
struct MinHeap {
    private var a: [UInt64] = []

    init(capacity: Int) { a.reserveCapacity(capacity) }

    mutating func push(_ x: UInt64) {
        a.append(x)
        a.withUnsafeMutableBufferPointer { h in
            var i = h.count - 1
            while i > 0 {
                let parent = (i - 1) / 2
                if h[parent] <= x { break }
                h[i] = h[parent]
                i = parent
            }
            h[i] = x
        }
    }

    mutating func pop() -> UInt64? {
        guard let top = a.first else { return nil }
        let last = a.removeLast()
        if a.isEmpty { return top }
        a.withUnsafeMutableBufferPointer { h in
            var i = 0
            let n = h.count
            while true {
                let l = 2 * i + 1
                if l >= n { break }
                let r = l + 1
                let c = r < n && h[r] < h[l] ? r : l
                if h[c] >= last { break }
                h[i] = h[c]
                i = c
            }
            h[i] = last
        }
        return top
    }
}

func hex2(_ b: UInt8) -> String {
    let digits = Array("0123456789ABCDEF")
    return String([digits[Int(b >> 4)], digits[Int(b & 15)]])
}

/// tokenizer.json's `model` when its type is BPE.
struct BPEModelFile: Decodable {
    /// Merges in the string form ("a b") or the pair form (["a", "b"]).
    struct Merges: Decodable {
        var pairs: [(String, String)]
        init(from decoder: any Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let strings = try? c.decode([String].self) {
                pairs = try strings.enumerated().map { i, s in
                    let parts = s.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
                    guard parts.count == 2 else {
                        throw DecodingError.dataCorruptedError(in: c, debugDescription: "merge \(i) '\(s)' is not 'a b'")
                    }
                    return (String(parts[0]), String(parts[1]))
                }
            } else {
                pairs = try c.decode([[String]].self).enumerated().map { i, p in
                    guard p.count == 2 else {
                        throw DecodingError.dataCorruptedError(in: c, debugDescription: "merge \(i) is not a pair")
                    }
                    return (p[0], p[1])
                }
            }
        }
    }
    let vocab: [String: Int]
    let merges: Merges
    let unk_token: String?
    let byte_fallback: Bool?
    let fuse_unk: Bool?
    let ignore_merges: Bool?
    let continuing_subword_prefix: String?
    let end_of_word_suffix: String?
    let dropout: Double?
}

/// An immutable open-addressing hash table UInt64 -> UInt64 for the merge ranks: one
/// multiply-shift hash and a linear probe per lookup (Swift's Dictionary spends most of a
/// long word's merge loop hashing with SipHash).
struct PairTable: Sendable {
    private var keys: [UInt64]
    private var values: [UInt64]
    private let shift: UInt64
    private static let empty = UInt64.max

    init(_ pairs: [UInt64: UInt64]) {
        var bits = 4
        while (1 << bits) < pairs.count * 2 { bits += 1 }
        keys = [UInt64](repeating: Self.empty, count: 1 << bits)
        values = [UInt64](repeating: 0, count: 1 << bits)
        shift = UInt64(64 - bits)
        let mask = (1 << bits) - 1
        for (k, v) in pairs {
            var slot = Int(truncatingIfNeeded: (k &* 0x9E37_79B9_7F4A_7C15) >> shift)
            while keys[slot] != Self.empty { slot = (slot + 1) & mask }
            keys[slot] = k
            values[slot] = v
        }
    }

    @inline(__always)
    func lookup(_ k: UInt64) -> UInt64? {
        let mask = keys.count - 1
        var slot = Int(truncatingIfNeeded: (k &* 0x9E37_79B9_7F4A_7C15) >> shift)
        while true {
            let key = keys[slot]
            if key == k { return values[slot] }
            if key == Self.empty { return nil }
            slot = (slot + 1) & mask
        }
    }
}
