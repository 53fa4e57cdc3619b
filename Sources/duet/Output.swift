#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Unbuffered writes, so streamed tokens appear as they are produced.
enum Console {
    static func out(_ s: String) { write(1, s) }
    static func err(_ s: String) { write(2, s) }

    private static func write(_ fd: Int32, _ s: String) {
        var s = s
        s.withUTF8 { buf in
            var done = 0
            while done < buf.count {
                let n = unistd_write(fd, buf.baseAddress! + done, buf.count - done)
                if n <= 0 { return }
                done += n
            }
        }
    }

    /// One JSON object on stdout, keys sorted for stable output.
    static func json<T: Encodable>(_ value: T) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        out(String(decoding: try encoder.encode(value), as: UTF8.self) + "\n")
    }
}

#if canImport(Glibc)
private let unistd_write = Glibc.write
#elseif canImport(Darwin)
private let unistd_write = Darwin.write
#endif

/// "1.23" with `digits` decimals.
func fixed(_ x: Double, _ digits: Int = 2) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (x * scale).rounded() / scale
    var s = "\(r)"
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    } else if digits > 0 {
        s += "." + String(repeating: "0", count: digits)
    }
    return s
}

/// A failure while running a verb (not a usage error): printed as one line, no usage text.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

extension String {
    /// Padded with spaces to `width` for a table column (one space after a value that
    /// fills it); `left`: right-aligned.
    func padding(_ width: Int, left: Bool = false) -> String {
        let pad = String(repeating: " ", count: max(0, width - count))
        if left { return pad + self }
        return count >= width ? self + " " : self + pad
    }
}
