/// An entry of tokenizer.json's `added_tokens`.
public struct AddedToken: Sendable, Equatable {
    public let id: Int32
    public let content: String
    public let special: Bool
    /// Matched in the normalized text (else in the raw text, before normalization).
    public let normalized: Bool
    /// Only matched as a whole word (no word character on either side).
    public let singleWord: Bool
    /// Swallows the whitespace on its left / right.
    public let lstrip: Bool
    public let rstrip: Bool
}

/// A piece of input: text still to tokenize, or an added token already resolved.
enum Segment {
    case text([UInt8], atStart: Bool)
    case token(Int32)
}

/// Finds added tokens in text before the model sees it: leftmost match first, the longest
/// at a position (HF's Aho-Corasick `LeftmostLongest`), flags applied as HF's
/// `AddedVocabulary` does. Special tokens are never split by BPE.
struct AddedTokenMatcher: Sendable {
    /// First byte -> candidates, longest content first.
    private let byFirstByte: [[AddedToken]]
    let isEmpty: Bool

    init(_ tokens: [AddedToken]) {
        var table = [[AddedToken]](repeating: [], count: 256)
        for t in tokens where !t.content.isEmpty { table[Int(t.content.utf8.first!)].append(t) }
        byFirstByte = table.map { $0.sorted { $0.content.utf8.count > $1.content.utf8.count } }
        isEmpty = tokens.isEmpty
    }

    /// Splits `bytes` into text and token segments.
    func split(_ bytes: [UInt8], atStart: Bool) -> [Segment] {
        if isEmpty { return [.text(bytes, atStart: atStart)] }
        var out: [Segment] = []
        var textStart = 0  // start of the pending text
        var i = 0
        bytes.withUnsafeBufferPointer { p in
            while i < p.count {
                guard let t = longestMatch(p, at: i) else {
                    i += 1
                    continue
                }
                var start = i, end = i + t.content.utf8.count
                if t.singleWord && (isWordBefore(p, start) || isWordAt(p, end)) {
                    i = end  // rejected matches are skipped whole, as Aho-Corasick's iterator does
                    continue
                }
                if t.lstrip { while start > textStart, let w = whitespaceBefore(p, start) { start -= w } }
                if t.rstrip { while end < p.count, let w = whitespaceAt(p, end) { end += w } }
                if start > textStart { out.append(.text(Array(p[textStart..<start]), atStart: atStart && textStart == 0)) }
                out.append(.token(t.id))
                textStart = end
                i = end
            }
        }
        if textStart < bytes.count { out.append(.text(Array(bytes[textStart...]), atStart: atStart && textStart == 0)) }
        return out
    }

    private func longestMatch(_ p: UnsafeBufferPointer<UInt8>, at i: Int) -> AddedToken? {
        for t in byFirstByte[Int(p[i])] {
            let c = t.content.utf8
            if i + c.count <= p.count && c.elementsEqual(p[i..<(i + c.count)]) { return t }
        }
        return nil
    }

    private func scalarBefore(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> (UInt32, Int)? {
        guard i > 0 else { return nil }
        var j = i - 1
        while j > 0 && p[j] & 0xC0 == 0x80 { j -= 1 }
        return (decodeScalar(p, j).0, i - j)
    }

    /// `c.is_alphanumeric() || c == '_'`, as HF's single-word check.
    private func isWord(_ v: UInt32) -> Bool {
        let c = ScalarClass.of(v)
        return v == 0x5F || c.contains(.number) || c.contains(.letter) || (Unicode.Scalar(v)?.properties.isAlphabetic ?? false)
    }
    private func isWordBefore(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Bool {
        scalarBefore(p, i).map { isWord($0.0) } ?? false
    }
    private func isWordAt(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Bool {
        i < p.count && isWord(decodeScalar(p, i).0)
    }
    private func whitespaceBefore(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int? {
        guard let (v, n) = scalarBefore(p, i), ScalarClass.of(v).contains(.whitespace) else { return nil }
        return n
    }
    private func whitespaceAt(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int? {
        let (v, n) = decodeScalar(p, i)
        return ScalarClass.of(v).contains(.whitespace) ? n : nil
    }
}
