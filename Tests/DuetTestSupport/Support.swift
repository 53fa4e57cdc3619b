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
import DuetFormats

/// Tests/Fixtures, found from this file's location (no bundle resources needed).
public let fixturesDirectory: String = {
    var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(2)  // DuetTestSupport/Support.swift
    return parts.joined(separator: "/") + "/Fixtures"
}()

public func fixture(_ name: String) -> String { fixturesDirectory + "/" + name }

/// A fresh empty directory under /tmp.
public func makeTemporaryDirectory() -> String {
    var template = Array("/tmp/duet-test-XXXXXX".utf8CString)
    let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(p != nil, "mkdtemp failed")
    return String(cString: p!)
}

/// Copies the regular files of `source` into `destination`.
public func copyDirectory(_ source: String, to destination: String) throws {
    let fm = FileManager.default
    for name in try fm.contentsOfDirectory(atPath: source) {
        try fm.copyItem(atPath: source + "/" + name, toPath: destination + "/" + name)
    }
}

/// ||a - b|| / ||b||, in Double.
public func relativeL2Error(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    var num = 0.0, den = 0.0
    for i in a.indices {
        let d = Double(a[i]) - Double(b[i])
        num += d * d
        den += Double(b[i]) * Double(b[i])
    }
    return (num / max(den, 1e-300)).squareRoot()
}

/// Deterministic pseudo-random floats in [-1, 1) (never all zeros).
public func randomFloats(_ count: Int, seed: UInt64) -> [Float] {
    var z = seed &+ 0x9E37_79B9_7F4A_7C15
    return (0..<count).map { _ in
        z &+= 0x9E37_79B9_7F4A_7C15
        var x = z
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        x ^= x >> 31
        return Float(x >> 40) / Float(1 << 23) - 1
    }
}

/// Little-endian bytes of fp32 values.
public func bytes(of values: [Float]) -> [UInt8] {
    values.withUnsafeBytes { Array($0) }
}

/// The decompressed contents of a .gz file (through the system's gzip).
public func gunzip(_ path: String) -> [UInt8]? { gunzipFile(path) }

/// The repository root (parent of Tests/).
public let repositoryRoot: String = {
    var parts = fixturesDirectory.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(2)  // Tests/Fixtures
    return parts.joined(separator: "/")
}()

/// The shipped demo model (Models/duet-demo-moe).
public let demoModelDirectory = repositoryRoot + "/Models/duet-demo-moe"

/// A fixture's bytes, decompressed when the name ends in .gz.
public func fixtureBytes(_ name: String) throws -> [UInt8] {
    let path = fixture(name)
    if name.hasSuffix(".gz") {
        guard let bytes = gunzip(path) else { throw FixtureError.unreadable(path) }
        return bytes
    }
    guard let data = FileManager.default.contents(atPath: path) else { throw FixtureError.unreadable(path) }
    return Array(data)
}

public enum FixtureError: Error { case unreadable(String) }
