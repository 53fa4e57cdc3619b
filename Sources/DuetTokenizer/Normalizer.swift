/// tokenizer.json `normalizer`: rewrites text before pre-tokenization. Works on UTF-8 bytes.
indirect enum Normalizer: Sendable {
    case prepend([UInt8])
    case replace(from: [UInt8], to: [UInt8])
    case replaceRegex(RegexPattern, to: String)
    case nfc
    case nfkc
    case lowercase
    case strip(left: Bool, right: Bool)
    case sequence([Normalizer])

    static func parse(_ json: JSONValue, file: String) throws(TokenizerError) -> Normalizer? {
        if json.isNull { return nil }
        let type = json.type ?? "?"
        let r = ComponentReader(file: file, component: "normalizer \(type)", value: json)
        switch type {
        case "Prepend":
            return .prepend(Array(try r.string("prepend").utf8))
        case "Replace":
            let to = try r.string("content")
            switch try r.pattern("pattern") {
            case .literal(let s): return .replace(from: Array(s.utf8), to: Array(to.utf8))
            case .regex(let re): return .replaceRegex(try RegexPattern(re, file: file, component: "normalizer Replace"), to: to)
            }
        case "NFC": return .nfc
        case "NFKC": return .nfkc
        case "Lowercase": return .lowercase
        case "Strip": return .strip(left: try r.bool("strip_left", default: true), right: try r.bool("strip_right", default: true))
        case "Sequence":
            var parts: [Normalizer] = []
            for n in try r.array("normalizers") { if let p = try parse(n, file: file) { parts.append(p) } }
            return .sequence(parts)
        default:
            throw .unsupported(file: file, component: "normalizer", detail: "'\(type)' (supported: Prepend, Replace, NFC, NFKC, Lowercase, Strip, Sequence)")
        }
    }

    /// Whether normalizing `s` drops what it started with (Strip, or a Replace that deletes
    /// the first characters): HF then no longer sees the text as starting at offset 0, which
    /// decides Metaspace's `prepend_scheme: first`.
    func dropsStart(_ s: [UInt8]) -> Bool {
        switch self {
        case .strip(let left, _):
            return left && s.trimmingWhitespace(leading: true, trailing: false).count < s.count
        case .replace(let from, let to):
            return to.isEmpty && !from.isEmpty && s.starts(with: from)
        case .replaceRegex(let re, let to):
            return to.isEmpty && s.withUnsafeBufferPointer { re.matches($0).first?.lowerBound == 0 }
        case .sequence(let parts):
            var current = s
            for p in parts {
                if p.dropsStart(current) { return true }
                current = p.apply(current)
            }
            return false
        case .prepend, .nfc, .nfkc, .lowercase:
            return false
        }
    }

    func apply(_ s: [UInt8]) -> [UInt8] {
        switch self {
        case .prepend(let p):
            return s.isEmpty ? s : p + s
        case .replace(let from, let to):
            return replaceAll(s, from, to)
        case .replaceRegex(let re, let to):
            return Array(re.replaceAll(String(decoding: s, as: UTF8.self), with: to).utf8)
        case .nfc:
            return isASCII(s) ? s : Array(String(decoding: s, as: UTF8.self)._nfcCodeUnits)
        case .nfkc:
            return isASCII(s) ? s : Array(nfkcNormalize(String(decoding: s, as: UTF8.self)).utf8)
        case .lowercase:
            return Array(String(decoding: s, as: UTF8.self).lowercased().utf8)
        case .strip(let left, let right):
            return s.trimmingWhitespace(leading: left, trailing: right)
        case .sequence(let parts):
            return parts.reduce(s) { $1.apply($0) }
        }
    }
}

private func isASCII(_ s: [UInt8]) -> Bool { s.allSatisfy { $0 < 0x80 } }

/// Every occurrence of `from` in `s` replaced by `to`, scanning left to right.
func replaceAll(_ s: [UInt8], _ from: [UInt8], _ to: [UInt8]) -> [UInt8] {
    guard let first = from.first else { return s }
    var out: [UInt8] = []
    out.reserveCapacity(s.count + s.count / 4 * max(0, to.count - from.count))
    s.withUnsafeBufferPointer { p in
        from.withUnsafeBufferPointer { f in
            var i = 0
            while i < p.count {
                if p[i] == first && i + f.count <= p.count {
                    var k = 1
                    while k < f.count && p[i + k] == f[k] { k += 1 }
                    if k == f.count {
                        out.append(contentsOf: to)
                        i += f.count
                        continue
                    }
                }
                out.append(p[i])
                i += 1
            }
        }
    }
    return out
}
