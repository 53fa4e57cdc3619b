/// Scalar classes the split patterns use, matching Oniguruma / Rust regex: `\p{L}` is
/// General_Category L*, `\p{N}` is N*, `\s` is the White_Space property.
struct ScalarClass: OptionSet, Sendable {
    let rawValue: UInt8
    static let letter = ScalarClass(rawValue: 1)
    static let number = ScalarClass(rawValue: 2)
    static let whitespace = ScalarClass(rawValue: 4)
    static let newline = ScalarClass(rawValue: 8)  // \r or \n
    static let mark = ScalarClass(rawValue: 16)    // \p{M}

    private static let ascii: [ScalarClass] = (0..<128).map { classify(Unicode.Scalar(UInt8($0))) }

    @inline(__always)
    static func of(_ v: UInt32) -> ScalarClass {
        v < 128 ? ascii[Int(v)] : classify(Unicode.Scalar(v) ?? "\u{FFFD}")
    }

    static func classify(_ s: Unicode.Scalar) -> ScalarClass {
        var c: ScalarClass = []
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: c.insert(.letter)
        case .decimalNumber, .letterNumber, .otherNumber: c.insert(.number)
        case .nonspacingMark, .spacingMark, .enclosingMark: c.insert(.mark)
        default: break
        }
        if s.properties.isWhitespace { c.insert(.whitespace) }
        if s == "\r" || s == "\n" { c.insert(.newline) }
        return c
    }
}

/// Decodes the UTF-8 scalar starting at `i` (input is valid UTF-8): (value, byte length).
@inline(__always)
func decodeScalar(_ p: UnsafeBufferPointer<UInt8>, _ i: Int) -> (UInt32, Int) {
    let b0 = UInt32(p[i])
    if b0 < 0x80 { return (b0, 1) }
    if b0 < 0xE0 { return ((b0 & 0x1F) << 6 | UInt32(p[i + 1] & 0x3F), 2) }
    if b0 < 0xF0 { return ((b0 & 0x0F) << 12 | UInt32(p[i + 1] & 0x3F) << 6 | UInt32(p[i + 2] & 0x3F), 3) }
    return ((b0 & 0x07) << 18 | UInt32(p[i + 1] & 0x3F) << 12 | UInt32(p[i + 2] & 0x3F) << 6 | UInt32(p[i + 3] & 0x3F), 4)
}

/// Byte length of the UTF-8 sequence whose lead byte is `b`.
@inline(__always)
func scalarLength(_ b: UInt8) -> Int {
    b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4
}

/// The byte -> printable-character table of GPT-2's byte-level BPE: printable Latin-1
/// bytes map to themselves, the rest to U+0100 upwards in byte order.
enum ByteLevelAlphabet {
    static let byteToScalar: [Unicode.Scalar] = {
        var printable = Set<Int>()
        for r in [0x21...0x7E, 0xA1...0xAC, 0xAE...0xFF] { for b in r { printable.insert(b) } }
        var next = 256
        return (0..<256).map { b in
            if printable.contains(b) { return Unicode.Scalar(UInt32(b))! }
            defer { next += 1 }
            return Unicode.Scalar(UInt32(next))!
        }
    }()

    static let scalarToByte: [UInt32: UInt8] = {
        var m: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { m[s.value] = UInt8(b) }
        return m
    }()

    /// The raw bytes a byte-level token string stands for; nil if a character is outside the alphabet.
    static func bytes(of token: String) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(token.utf8.count)
        for s in token.unicodeScalars {
            guard let b = scalarToByte[s.value] else { return nil }
            out.append(b)
        }
        return out
    }
}

extension Array where Element == UInt8 {
    /// Scalars of Unicode White_Space at the start and end trimmed.
    func trimmingWhitespace(leading: Bool, trailing: Bool) -> [UInt8] {
        var start = 0, end = count
        withUnsafeBufferPointer { p in
            if leading {
                while start < end {
                    let (v, n) = decodeScalar(p, start)
                    guard ScalarClass.of(v).contains(.whitespace) else { break }
                    start += n
                }
            }
            if trailing {
                while end > start {
                    var i = end - 1
                    while i > start && p[i] & 0xC0 == 0x80 { i -= 1 }
                    guard ScalarClass.of(decodeScalar(p, i).0).contains(.whitespace) else { break }
                    end = i
                }
            }
        }
        return Array(self[start..<end])
    }
}
