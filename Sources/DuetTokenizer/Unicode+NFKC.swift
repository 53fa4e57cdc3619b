/// Scalar -> its compatibility decomposition, parsed once from the generated table.
private let compatibilityMap: [UInt32: [Unicode.Scalar]] = {
    var map: [UInt32: [Unicode.Scalar]] = [:]
    for entry in compatibilityDecompositions.split(separator: ";") {
        let parts = entry.split(separator: "=")
        guard parts.count == 2, let key = UInt32(parts[0], radix: 16) else { continue }
        map[key] = parts[1].split(separator: " ").compactMap { UInt32($0, radix: 16).flatMap(Unicode.Scalar.init) }
    }
    return map
}()

/// NFKC: NFC of the text with compatibility decompositions applied first (NFC
/// canonically decomposes, reorders and recomposes the rest).
func nfkcNormalize(_ s: String) -> String {
    var decomposed = String.UnicodeScalarView()
    for u in s.unicodeScalars {
        if let d = compatibilityMap[u.value] { decomposed.append(contentsOf: d) } else { decomposed.append(u) }
    }
    return String(decoding: String(decomposed)._nfcCodeUnits, as: UTF8.self)
}
