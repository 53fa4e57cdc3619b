#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Standard output of a shell command, or nil if it could not run or failed
/// (decompressing gzipped fixtures and tokenizers with the system's gzip).
public func commandOutput(_ command: String) -> [UInt8]? {
    guard let pipe = popen(command, "r") else { return nil }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, pipe) }
        if n <= 0 { break }
        out += chunk[0..<n]
    }
    return pclose(pipe) == 0 ? out : nil
}

/// The contents of a gzipped file.
public func gunzipFile(_ path: String) -> [UInt8]? {
    commandOutput("gzip -dc '\(path.replacing("'", with: "'\\''"))'")
}
