/// Words cut from one text segment: byte ranges of `buffer`. For each piece, `startSpans`
/// counts its leading bytes that come from the first character of the original input (0 for
/// most): HF's Metaspace `prepend_scheme: first` prepends to every piece whose original
/// offset is 0 — also each piece a normalizer made out of that one character (NFKC's
/// "↉" -> "0⁄3", split by Digits, gives three).
struct Pieces {
    var buffer: [UInt8]
    var ranges: [Range<Int>]
    var startSpans: [Int]

    init(_ bytes: [UInt8], startSpan: Int) {
        buffer = bytes
        ranges = bytes.isEmpty ? [] : [0..<bytes.count]
        startSpans = bytes.isEmpty ? [] : [startSpan]
    }
}

/// How a Split keeps the delimiters it finds (HF's `SplitDelimiterBehavior`).
enum SplitBehavior: String, Sendable {
    case removed = "Removed"
    case isolated = "Isolated"
    case mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext"
    case contiguous = "Contiguous"
}

/// tokenizer.json `pre_tokenizer`: cuts normalized text into words for the model.
indirect enum PreTokenizer: Sendable {
    case split(RegexPattern?, literal: [UInt8]?, SplitBehavior, invert: Bool)
    case digits(individual: Bool)
    case metaspace(replacement: [UInt8], prepend: PrependScheme, split: Bool)
    /// GPT-2 byte-level: optional prefix space and regex split; the byte -> character
    /// mapping itself is folded into the vocabulary (see `BPEModel`).
    case byteLevel(addPrefixSpace: Bool, useRegex: RegexPattern?)
    case sequence([PreTokenizer])

    enum PrependScheme: String, Sendable { case always, first, never }

    static func parse(_ json: JSONValue, file: String) throws(TokenizerError) -> PreTokenizer? {
        if json.isNull { return nil }
        let type = json.type ?? "?"
        let r = ComponentReader(file: file, component: "pre_tokenizer \(type)", value: json)
        switch type {
        case "Split":
            let behaviorName = try r.string("behavior")
            guard let behavior = SplitBehavior(rawValue: behaviorName) else {
                throw .unsupported(file: file, component: "pre_tokenizer Split", detail: "behavior '\(behaviorName)'")
            }
            let invert = try r.bool("invert", default: false)
            switch try r.pattern("pattern") {
            case .literal(let s): return .split(nil, literal: Array(s.utf8), behavior, invert: invert)
            case .regex(let re): return .split(try RegexPattern(re, file: file, component: "pre_tokenizer Split"), literal: nil, behavior, invert: invert)
            }
        case "Digits":
            return .digits(individual: try r.bool("individual_digits", default: false))
        case "Metaspace":
            let replacement = try r.string("replacement")
            var scheme = PrependScheme.always
            if let s = json["prepend_scheme"]?.string {
                guard let parsed = PrependScheme(rawValue: s) else {
                    throw .unsupported(file: file, component: "pre_tokenizer Metaspace", detail: "prepend_scheme '\(s)'")
                }
                scheme = parsed
            } else if json["add_prefix_space"]?.bool == false {
                scheme = .never
            }
            return .metaspace(replacement: Array(replacement.utf8), prepend: scheme, split: try r.bool("split", default: true))
        case "ByteLevel":
            let useRegex = try r.bool("use_regex", default: true)
            return .byteLevel(addPrefixSpace: try r.bool("add_prefix_space", default: true),
                              useRegex: useRegex ? try RegexPattern(RegexPattern.gpt2, file: file, component: "pre_tokenizer ByteLevel") : nil)
        case "Sequence":
            var parts: [PreTokenizer] = []
            for p in try r.array("pretokenizers") { if let q = try parse(p, file: file) { parts.append(q) } }
            return .sequence(parts)
        default:
            throw .unsupported(file: file, component: "pre_tokenizer",
                               detail: "'\(type)' (supported: Split, Digits, Metaspace, ByteLevel, Sequence)")
        }
    }

    /// Whether the words come out in GPT-2's byte-level space (ByteLevel is last).
    var isByteLevel: Bool {
        switch self {
        case .byteLevel: true
        case .sequence(let parts): parts.last?.isByteLevel ?? false
        default: false
        }
    }

    private var containsByteLevel: Bool {
        switch self {
        case .byteLevel: true
        case .sequence(let parts): parts.contains { $0.containsByteLevel }
        default: false
        }
    }

    /// ByteLevel anywhere but last would hand mapped text to later stages: not supported.
    func validateByteLevelPlacement(file: String) throws(TokenizerError) {
        guard case .sequence(let parts) = self else { return }
        if parts.dropLast().contains(where: { $0.containsByteLevel }) {
            throw .unsupported(file: file, component: "pre_tokenizer Sequence", detail: "ByteLevel must be the last pre-tokenizer")
        }
        try parts.last?.validateByteLevelPlacement(file: file)
    }

    func apply(_ pieces: inout Pieces) {
        switch self {
        case .sequence(let parts):
            for p in parts { p.apply(&pieces) }
        case .split(let regex, let literal, let behavior, let invert):
            splitEach(&pieces, behavior: behavior, invert: invert) { p in
                if let regex { return regex.matches(p) }
                return literalMatches(p, literal!)
            }
        case .digits(let individual):
            splitEach(&pieces, behavior: individual ? .isolated : .contiguous, invert: false) { p in
                scalarMatches(p) { $0.contains(.number) }
            }
        case .byteLevel(let addPrefixSpace, let regex):
            if addPrefixSpace {
                rewriteEach(&pieces) { bytes, _ in bytes.first == 0x20 ? bytes : [0x20] + bytes }
            }
            if let regex { splitEach(&pieces, behavior: .isolated, invert: false) { regex.matches($0) } }
        case .metaspace(let replacement, let scheme, let split):
            rewriteEach(&pieces) { bytes, atStart in
                var out = replaceAll(bytes, [0x20], replacement)
                let prepend = scheme == .always || (scheme == .first && atStart)
                if prepend && !out.starts(with: replacement) { out = replacement + out }
                return out
            }
            if split {
                splitEach(&pieces, behavior: .mergedWithNext, invert: false) { literalMatches($0, replacement) }
            }
        }
    }
}

/// Non-overlapping occurrences of `needle`, left to right.
private func literalMatches(_ p: UnsafeBufferPointer<UInt8>, _ needle: [UInt8]) -> [Range<Int>] {
    guard !needle.isEmpty else { return [] }
    var out: [Range<Int>] = []
    var i = 0
    while i + needle.count <= p.count {
        if p[i] == needle[0] && needle.indices.allSatisfy({ p[i + $0] == needle[$0] }) {
            out.append(i..<(i + needle.count))
            i += needle.count
        } else {
            i += 1
        }
    }
    return out
}

/// Each scalar satisfying `ok` as its own match.
private func scalarMatches(_ p: UnsafeBufferPointer<UInt8>, _ ok: (ScalarClass) -> Bool) -> [Range<Int>] {
    var out: [Range<Int>] = []
    var i = 0
    while i < p.count {
        let (v, n) = decodeScalar(p, i)
        if ok(ScalarClass.of(v)) { out.append(i..<(i + n)) }
        i += n
    }
    return out
}

/// Replaces each piece by `transform(bytes, atStart)`, rebuilding the buffer.
private func rewriteEach(_ pieces: inout Pieces, _ transform: ([UInt8], Bool) -> [UInt8]) {
    var buffer: [UInt8] = []
    var ranges: [Range<Int>] = []
    for (r, span) in zip(pieces.ranges, pieces.startSpans) {
        let out = transform(Array(pieces.buffer[r]), span > 0)
        ranges.append(buffer.count..<(buffer.count + out.count))
        buffer += out
    }
    pieces.buffer = buffer
    pieces.ranges = ranges
}

/// Splits every piece at the matches `find` reports, keeping delimiters per `behavior`
/// (HF's `NormalizedString::split`).
private func splitEach(_ pieces: inout Pieces, behavior: SplitBehavior, invert: Bool,
                       _ find: (UnsafeBufferPointer<UInt8>) -> [Range<Int>]) {
    var ranges: [Range<Int>] = []
    var spans: [Int] = []
    pieces.buffer.withUnsafeBufferPointer { buf in
        for (r, span) in zip(pieces.ranges, pieces.startSpans) {
            let p = UnsafeBufferPointer(rebasing: buf[r])
            // Alternating (range, isMatch) over the whole piece.
            var segments: [(Range<Int>, Bool)] = []
            var last = 0
            for m in find(p) where !m.isEmpty {
                if m.lowerBound > last { segments.append((last..<m.lowerBound, invert)) }
                segments.append((m, !invert))
                last = m.upperBound
            }
            if last < p.count { segments.append((last..<p.count, invert)) }
            for s in merge(segments, behavior) {
                ranges.append((r.lowerBound + s.lowerBound)..<(r.lowerBound + s.upperBound))
                spans.append(max(0, span - s.lowerBound))
            }
        }
    }
    pieces.ranges = ranges
    pieces.startSpans = spans
}

private func merge(_ segments: [(Range<Int>, Bool)], _ behavior: SplitBehavior) -> [Range<Int>] {
    switch behavior {
    case .removed:
        return segments.filter { !$0.1 }.map(\.0)
    case .isolated:
        return segments.map(\.0)
    case .contiguous:
        var out: [(Range<Int>, Bool)] = []
        for (r, isMatch) in segments {
            if let prev = out.last, prev.1 == isMatch { out[out.count - 1].0 = prev.0.lowerBound..<r.upperBound } else { out.append((r, isMatch)) }
        }
        return out.map(\.0)
    case .mergedWithPrevious:
        var out: [Range<Int>] = []
        var previousMatch = false
        for (r, isMatch) in segments {
            if isMatch && !previousMatch, let prev = out.last { out[out.count - 1] = prev.lowerBound..<r.upperBound } else { out.append(r) }
            previousMatch = isMatch
        }
        return out
    case .mergedWithNext:
        var out: [Range<Int>] = []
        var previousMatch = false
        for (r, isMatch) in segments.reversed() {
            if isMatch && !previousMatch, let next = out.last { out[out.count - 1] = r.lowerBound..<next.upperBound } else { out.append(r) }
            previousMatch = isMatch
        }
        return out.reversed()
    }
}
