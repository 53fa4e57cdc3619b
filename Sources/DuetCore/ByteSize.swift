/// "24GiB", "800MiB", "512KiB", "2GB", "300MB", "1073741824" -> bytes; nil for anything else.
public func parseByteSize(_ s: String) -> Int? {
    let units: [(String, Double)] = [("GiB", 1_073_741_824), ("MiB", 1_048_576), ("KiB", 1024), ("GB", 1e9), ("MB", 1e6), ("B", 1)]
    for (suffix, scale) in units where s.hasSuffix(suffix) {
        guard let v = Double(s.dropLast(suffix.count)), v >= 0, v.isFinite else { return nil }
        return Int(v * scale)
    }
    guard let n = Int(s), n >= 0 else { return nil }
    return n
}
