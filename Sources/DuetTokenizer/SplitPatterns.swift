/// The split regexes of byte-level BPE tokenizers. The patterns real tokenizers use are run
/// by hand-written scanners (Swift's `Regex` is far too slow for them); any other pattern
/// falls back to `Regex` with Unicode-scalar semantics.
struct RegexPattern: @unchecked Sendable {  // Regex holds no mutable state once compiled
    enum Engine {
        case scanner(PatternScanner)
        case general(Regex<AnyRegexOutput>)
    }
    let source: String
    let engine: Engine

    /// GPT-2's pattern (also ByteLevel's `use_regex`).
    static let gpt2 = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    /// Qwen2's pattern.
    static let qwen2 = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    /// cl100k / Llama 3: Qwen2's with up to three digits per piece.
    static let cl100k = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    init(_ source: String, file: String, component: String) throws(TokenizerError) {
        self.source = source
        switch source {
        case Self.gpt2: engine = .scanner(PatternScanner(style: .gpt2))
        case Self.qwen2: engine = .scanner(PatternScanner(style: .qwen(maxDigits: 1)))
        case Self.cl100k: engine = .scanner(PatternScanner(style: .qwen(maxDigits: 3)))
        default:
            do {
                engine = .general(try Regex(source).matchingSemantics(.unicodeScalar))
            } catch {
                throw .unsupported(file: file, component: component, detail: "regex '\(source)' does not compile: \(error)")
            }
        }
    }

    /// Byte ranges of the non-overlapping matches in `p`, left to right.
    func matches(_ p: UnsafeBufferPointer<UInt8>) -> [Range<Int>] {
        switch engine {
        case .scanner(let s):
            return s.matches(p)
        case .general(let re):
            let s = String(decoding: p, as: UTF8.self)
            return s.matches(of: re).compactMap { m in
                let a = s.utf8.distance(from: s.startIndex, to: m.range.lowerBound)
                let b = s.utf8.distance(from: s.startIndex, to: m.range.upperBound)
                return a < b ? a..<b : nil
            }
        }
    }

    func replaceAll(_ s: String, with replacement: String) -> String {
        var out = [UInt8]()
        var last = 0
        let bytes = Array(s.utf8)
        bytes.withUnsafeBufferPointer { p in
            for r in matches(p) {
                out += p[last..<r.lowerBound]
                out += replacement.utf8
                last = r.upperBound
            }
        }
        out += bytes[last...]
        return String(decoding: out, as: UTF8.self)
    }
}

/// A hand-written matcher for the GPT-2 and Qwen2/cl100k split patterns: at each
/// position it tries the alternatives in the regex's order, with the regex's greedy and
/// backtracking semantics worked out by hand (see each case).
struct PatternScanner: Sendable {
    enum Style: Sendable {
        case gpt2
        case qwen(maxDigits: Int)
    }
    let style: Style

    func matches(_ p: UnsafeBufferPointer<UInt8>) -> [Range<Int>] {
        var out: [Range<Int>] = []
        out.reserveCapacity(p.count / 3)
        var i = 0
        while i < p.count {
            let end = matchAt(p, i) ?? (i + scalarLength(p[i]))  // (never nil for these patterns)
            out.append(i..<end)
            i = end
        }
        return out
    }

    @inline(__always)
    private func scalar(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> (cls: ScalarClass, value: UInt32, len: Int) {
        let (v, n) = decodeScalar(p, i)
        return (ScalarClass.of(v), v, n)
    }

    /// End of the run of scalars from `i` whose class satisfies `ok`, at most `limit` scalars.
    @inline(__always)
    private func run(_ p: UnsafeBufferPointer<UInt8>, _ i: Int, limit: Int = .max, _ ok: (ScalarClass) -> Bool) -> Int {
        var j = i, count = 0
        while j < p.count && count < limit {
            let s = scalar(p, j)
            guard ok(s.cls) else { break }
            j += s.len
            count += 1
        }
        return j
    }

    private static func isOther(_ c: ScalarClass) -> Bool {
        !c.contains(.whitespace) && !c.contains(.letter) && !c.contains(.number)
    }

    private func matchAt(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int? {
        let c0 = scalar(p, i)
        if c0.value == 0x27, let end = contraction(p, i + 1) { return end }
        switch style {
        case .gpt2:
            // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`
            let lead = c0.value == 0x20 && i + 1 < p.count ? i + 1 : i
            let first = scalar(p, lead).cls
            if first.contains(.letter) { return run(p, lead) { $0.contains(.letter) } }
            if first.contains(.number) { return run(p, lead) { $0.contains(.number) } }
            if Self.isOther(first) { return run(p, lead, Self.isOther) }
        case .qwen(let maxDigits):
            // `[^\r\n\p{L}\p{N}]?\p{L}+`: the optional scalar is taken only if letters follow.
            if c0.cls.contains(.letter) { return run(p, i) { $0.contains(.letter) } }
            if !c0.cls.contains(.newline) && !c0.cls.contains(.number), i + c0.len < p.count,
               scalar(p, i + c0.len).cls.contains(.letter) {
                return run(p, i + c0.len) { $0.contains(.letter) }
            }
            // `\p{N}` or `\p{N}{1,3}`
            if c0.cls.contains(.number) { return run(p, i, limit: maxDigits) { $0.contains(.number) } }
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            let lead = c0.value == 0x20 && i + 1 < p.count ? i + 1 : i
            if Self.isOther(scalar(p, lead).cls) {
                let end = run(p, lead, Self.isOther)
                return run(p, end) { $0.contains(.newline) }
            }
            // `\s*[\r\n]+`: backtracking leaves the match ending after the run's last newline.
            if c0.cls.contains(.whitespace) {
                var j = i, lastNewlineEnd = -1
                while j < p.count {
                    let s = scalar(p, j)
                    guard s.cls.contains(.whitespace) else { break }
                    j += s.len
                    if s.cls.contains(.newline) { lastNewlineEnd = j }
                }
                if lastNewlineEnd > 0 { return lastNewlineEnd }
            }
        }
        guard c0.cls.contains(.whitespace) else { return nil }
        // `\s+(?!\S)`: the whole run at the end of input, else the run less its last scalar.
        let end = run(p, i) { $0.contains(.whitespace) }
        if end == p.count { return end }
        var last = end - 1
        while p[last] & 0xC0 == 0x80 { last -= 1 }
        if last > i { return last }
        // `\s+`
        return end
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` after the apostrophe at `i - 1` (case-insensitive in the
    /// Qwen/cl100k patterns, where ſ (U+017F) folds to s as in Oniguruma).
    private func contraction(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int? {
        guard i < p.count else { return nil }
        let insensitive: Bool
        if case .qwen = style { insensitive = true } else { insensitive = false }
        func letter(_ j: Int) -> (UInt32, Int)? {
            guard j < p.count else { return nil }
            var (v, n) = decodeScalar(p, j)
            if insensitive {
                if v >= 0x41 && v <= 0x5A { v += 0x20 }
                if v == 0x17F { v = 0x73 }
            }
            return (v, n)
        }
        guard let (a, n1) = letter(i) else { return nil }
        switch a {
        case 0x73, 0x74, 0x6D, 0x64: return i + n1  // s t m d
        case 0x72, 0x76:  // re ve
            if let (b, n2) = letter(i + n1), b == 0x65 { return i + n1 + n2 }
        case 0x6C:  // ll
            if let (b, n2) = letter(i + n1), b == 0x6C { return i + n1 + n2 }
        default: break
        }
        return nil
    }
}
