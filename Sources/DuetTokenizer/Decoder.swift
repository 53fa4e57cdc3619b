/// tokenizer.json `decoder`: turns token strings back into text. Each stage maps the list
/// of token strings to a new list, as HF's `decode_chain`; the results are concatenated.
indirect enum TokenDecoder: Sendable {
    case replace(from: [UInt8], to: [UInt8])
    case byteFallback
    case fuse
    case strip(content: Unicode.Scalar, start: Int, stop: Int)
    case metaspace(replacement: Unicode.Scalar, prependScheme: PreTokenizer.PrependScheme)
    case byteLevel
    case sequence([TokenDecoder])

    static func parse(_ json: JSONValue, file: String) throws(TokenizerError) -> TokenDecoder? {
        if json.isNull { return nil }
        let type = json.type ?? "?"
        let r = ComponentReader(file: file, component: "decoder \(type)", value: json)
        func scalar(_ key: String) throws(TokenizerError) -> Unicode.Scalar {
            let s = try r.string(key)
            guard s.unicodeScalars.count == 1 else {
                throw .malformed(file: file, reason: "decoder \(type): '\(key)' should be one character")
            }
            return s.unicodeScalars.first!
        }
        switch type {
        case "Replace":
            guard case .literal(let from) = try r.pattern("pattern") else {
                throw .unsupported(file: file, component: "decoder Replace", detail: "regex patterns")
            }
            return .replace(from: Array(from.utf8), to: Array(try r.string("content").utf8))
        case "ByteFallback": return .byteFallback
        case "Fuse": return .fuse
        case "Strip": return .strip(content: try scalar("content"), start: try r.int("start"), stop: try r.int("stop"))
        case "Metaspace":
            var scheme = PreTokenizer.PrependScheme.always
            if let s = json["prepend_scheme"]?.string { scheme = PreTokenizer.PrependScheme(rawValue: s) ?? .always }
            else if json["add_prefix_space"]?.bool == false { scheme = .never }
            return .metaspace(replacement: try scalar("replacement"), prependScheme: scheme)
        case "ByteLevel": return .byteLevel
        case "Sequence":
            var parts: [TokenDecoder] = []
            for d in try r.array("decoders") { if let p = try parse(d, file: file) { parts.append(p) } }
            return .sequence(parts)
        default:
            throw .unsupported(file: file, component: "decoder",
                               detail: "'\(type)' (supported: Replace, ByteFallback, Fuse, Strip, Metaspace, ByteLevel, Sequence)")
        }
    }

    /// Token strings (as UTF-8 bytes) in, decoded pieces out.
    func decode(_ tokens: [[UInt8]]) -> [[UInt8]] {
        switch self {
        case .sequence(let parts):
            return parts.reduce(tokens) { $1.decode($0) }
        case .replace(let from, let to):
            return tokens.map { replaceAll($0, from, to) }
        case .fuse:
            return [tokens.flatMap { $0 }]
        case .byteFallback:
            return byteFallback(tokens)
        case .strip(let content, let start, let stop):
            return tokens.map { strip($0, content, start, stop) }
        case .metaspace(let replacement, let scheme):
            return tokens.enumerated().map { i, t in
                var out = String.UnicodeScalarView()
                for u in String(decoding: t, as: UTF8.self).unicodeScalars {
                    if u == replacement {
                        if !(i == 0 && scheme != .never) { out.append(" ") }
                    } else {
                        out.append(u)
                    }
                }
                return Array(String(out).utf8)
            }
        case .byteLevel:
            // Each token back to the bytes its characters stand for (a token with a character
            // outside the alphabet, such as an added token, keeps its own UTF-8), then one lossy decode.
            var bytes: [UInt8] = []
            for t in tokens {
                let s = String(decoding: t, as: UTF8.self)
                if let raw = ByteLevelAlphabet.bytes(of: s) { bytes += raw } else { bytes += t }
            }
            return [Array(String(decoding: bytes, as: UTF8.self).utf8)]
        }
    }

    /// `<0xXX>` tokens become bytes; a run of them that is not valid UTF-8 becomes one
    /// U+FFFD per byte, as HF's ByteFallback.
    private func byteFallback(_ tokens: [[UInt8]]) -> [[UInt8]] {
        var out: [[UInt8]] = []
        var pending: [UInt8] = []
        func flush() {
            guard !pending.isEmpty else { return }
            if let valid = validUTF8(pending) { out.append(valid) } else {
                out.append(contentsOf: repeatElement(Array("\u{FFFD}".utf8), count: pending.count))
            }
            pending = []
        }
        for t in tokens {
            if let b = parseByteToken(t) { pending.append(b) } else {
                flush()
                out.append(t)
            }
        }
        flush()
        return out
    }

    private func strip(_ t: [UInt8], _ content: Unicode.Scalar, _ start: Int, _ stop: Int) -> [UInt8] {
        let scalars = Array(String(decoding: t, as: UTF8.self).unicodeScalars)
        var a = 0, b = scalars.count
        while a < min(start, scalars.count) && scalars[a] == content { a += 1 }
        var cut = 0
        while cut < stop && b > a && scalars[b - 1] == content { b -= 1; cut += 1 }
        var v = String.UnicodeScalarView()
        v.append(contentsOf: scalars[a..<b])
        return Array(String(v).utf8)
    }
}

/// The byte of a `<0xXX>` token.
func parseByteToken(_ t: [UInt8]) -> UInt8? {
    guard t.count == 6, t[0] == 0x3C, t[1] == 0x30, t[2] == 0x78, t[5] == 0x3E else { return nil }
    func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x41...0x46: c - 0x41 + 10
        case 0x61...0x66: c - 0x61 + 10
        default: nil
        }
    }
    guard let hi = hex(t[3]), let lo = hex(t[4]) else { return nil }
    return hi << 4 | lo
}

/// `bytes` when they are valid UTF-8.
func validUTF8(_ bytes: [UInt8]) -> [UInt8]? {
    var it = bytes.makeIterator()
    var decoder = UTF8()
    while true {
        switch decoder.decode(&it) {
        case .scalarValue: continue
        case .emptyInput: return bytes
        case .error: return nil
        }
    }
}
