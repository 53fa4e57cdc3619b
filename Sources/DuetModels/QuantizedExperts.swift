#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DuetCPU
import DuetCore
import DuetFormats
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What `--expert-dtype q8|q4` did at load.
public struct QuantizationReport: Sendable {
    public var format: QuantFormat
    public var experts: Int
    /// Bytes of all experts' packed levels and scales.
    public var bytes: Int
    public var seconds: Double
    /// Where the quantized experts came from or went: nil when there is no cache (synthetic weights).
    public var cachePath: String?
    public var fromCache: Bool
}

/// Quantized experts on disk, so the second start maps them instead of quantizing again.
///
/// One file per checkpoint and format, `<directory>/<key>.duetq`, the key hashing the
/// layout version, the format and every safetensors file's path, size and modification
/// time (a changed checkpoint gets a new file). The file: the 8 bytes `DUETQ001`, a
/// little-endian UInt64 header length, a JSON header `{"format", "experts": [{"layer",
/// "expert", "matrices": [{"rows", "cols", "offset"}] x3}]}`, then each matrix's packed
/// levels and scales (`QuantizedMatrix` layout) at its offset, 64-byte aligned.
public enum QuantizedExpertCache {
    static let magic = Array("DUETQ001".utf8)

    struct Header: Codable {
        struct Matrix: Codable { var rows: Int; var cols: Int; var offset: Int }
        struct Expert: Codable { var layer: Int; var expert: Int; var matrices: [Matrix] }
        var format: QuantFormat
        var experts: [Expert]
    }

    /// `quantized/` in Duet's cache directory (`duetCacheDirectory`).
    public static func defaultDirectory() -> String { duetCacheDirectory("quantized") }

    /// The cache file for these weight files, or nil when the weights have no files.
    public static func path(directory: String, files: [String], format: QuantFormat) -> String? {
        guard !files.isEmpty else { return nil }
        var key = "duetq-1|\(format.rawValue)"
        for f in files.sorted() {
            var st = stat()
            guard stat(f, &st) == 0 else { return nil }
            key += "|\(f):\(st.st_size):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        }
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a
        for b in key.utf8 { hash = (hash ^ UInt64(b)) &* 0x100_0000_01b3 }
        return joinPath(directory, String(hash, radix: 16) + ".duetq")
    }

    /// The experts in `path`, if the file is there and matches the model's shapes.
    static func load(path: String, format: QuantFormat, layers: Int, experts: Int) throws -> [[QuantizedExpert]]? {
        guard fileExists(path) else { return nil }
        let file = try MappedFile(path: path)
        guard file.size >= 16, let base = file.base, Array(file.bytes(0, 8)) == magic else {
            throw CheckpointError.malformedHeader(file: path, reason: "not a Duet quantized-experts file (delete it to rebuild)")
        }
        let headerLength = Int(base.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian)
        guard headerLength <= file.size - 16 else {
            throw CheckpointError.malformedHeader(file: path, reason: "header length \(headerLength) exceeds the file (delete it to rebuild)")
        }
        let header = try JSONDecoder().decode(Header.self, from: Data(file.bytes(16, headerLength)))
        guard header.format == format, header.experts.count == layers * experts else { return nil }
        var out = [[QuantizedExpert]](repeating: [], count: layers)
        for e in header.experts {
            let matrices = try e.matrices.map { m -> QuantizedMatrix in
                let (pr, pc) = QuantizedMatrix.paddedShape(rows: m.rows, cols: m.cols)
                let bytes = pr / 16 * (pc / 32) * format.blockBytes + pr * (pc / 32) * 2
                guard m.offset % 64 == 0, m.offset >= 16 + headerLength, m.offset + bytes <= file.size else {
                    throw CheckpointError.malformedHeader(file: path, reason: "expert \(e.layer).\(e.expert) lies outside the file (delete it to rebuild)")
                }
                return QuantizedMatrix(format: format, rows: m.rows, cols: m.cols, data: base + m.offset, owner: file)
            }
            guard matrices.count == 3, e.layer < layers else { return nil }
            out[e.layer].append(QuantizedExpert(gate: matrices[0], up: matrices[1], down: matrices[2]))
        }
        return out.allSatisfy({ $0.count == experts }) ? out : nil
    }

    /// Writes the experts to `path` (through a temporary file renamed into place).
    static func store(_ experts: [[QuantizedExpert]], format: QuantFormat, path: String) throws {
        var header = Header(format: format, experts: [])
        var offset = 0
        var matrices: [QuantizedMatrix] = []
        for (l, layer) in experts.enumerated() {
            for (e, x) in layer.enumerated() {
                var entry = Header.Expert(layer: l, expert: e, matrices: [])
                for m in [x.gate, x.up, x.down] {
                    entry.matrices.append(.init(rows: m.rows, cols: m.cols, offset: offset))
                    matrices.append(m)
                    offset += (m.byteCount + 63) / 64 * 64
                }
                header.experts.append(entry)
            }
        }
        // Offsets so far are relative to the data; the header's own size moves them.
        var json = try JSONEncoder().encode(header)
        var dataStart = 0
        for _ in 0..<4 {  // the offsets' digits change the header's length: iterate to a fixed point
            dataStart = (16 + json.count + 63) / 64 * 64
            var shifted = header
            for i in shifted.experts.indices { for j in 0..<3 { shifted.experts[i].matrices[j].offset += dataStart } }
            json = try JSONEncoder().encode(shifted)
            if (16 + json.count + 63) / 64 * 64 == dataStart { break }
        }
        makeDirectories(String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)]))
        let temporary = path + ".partial"
        guard let f = fopen(temporary, "wb") else { throw CheckpointError.unreadable(path: temporary, reason: String(cString: strerror(errno))) }
        var ok = true
        func write(_ p: UnsafeRawPointer, _ n: Int) { if n > 0 && fwrite(p, 1, n, f) != n { ok = false } }
        var prefix = magic
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { prefix += $0 }
        prefix += json
        prefix += [UInt8](repeating: 0, count: dataStart - prefix.count)
        prefix.withUnsafeBytes { write($0.baseAddress!, $0.count) }
        let zeros = [UInt8](repeating: 0, count: 64)
        for m in matrices {
            write(m.levels, m.levelBytes)
            write(UnsafeRawPointer(m.scales), m.scaleBytes)
            zeros.withUnsafeBytes { write($0.baseAddress!, (64 - m.byteCount % 64) % 64) }
        }
        if fclose(f) != 0 { ok = false }
        guard ok, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw CheckpointError.unreadable(path: path, reason: "could not write the quantized-experts cache: \(String(cString: strerror(errno)))")
        }
    }
}

extension MixtralModel {
    /// Quantizes every expert to `format` (in parallel over experts), or maps them from the
    /// cache in `cacheDirectory` when an earlier start left them there; stores them there
    /// otherwise. Non-expert weights stay as they are.
    @discardableResult
    public func quantizeExperts(_ format: QuantFormat, cacheDirectory: String? = QuantizedExpertCache.defaultDirectory()) throws -> QuantizationReport {
        let (experts, report) = try quantizedExperts(format, cacheDirectory: cacheDirectory)
        useExperts(experts)
        return report
    }

    /// Computes with these quantized experts (`[layer][expert]`), or with the stored weights (nil).
    public func useExperts(_ quantized: [[QuantizedExpert]]?) {
        for l in 0..<config.numHiddenLayers {
            for e in 0..<config.numLocalExperts { setQuantized(quantized?[l][e], layer: l, expert: e) }
        }
    }

    /// Every expert quantized to `format` (`[layer][expert]`), from the cache or made now
    /// (and cached); the model keeps computing as before.
    public func quantizedExperts(_ format: QuantFormat, cacheDirectory: String? = QuantizedExpertCache.defaultDirectory()) throws -> ([[QuantizedExpert]], QuantizationReport) {
        let start = ContinuousClock.now
        let L = config.numHiddenLayers, E = config.numLocalExperts
        let cachePath = cacheDirectory.flatMap { QuantizedExpertCache.path(directory: $0, files: weights.filePaths, format: format) }
        var fromCache = false
        var quantized: [[QuantizedExpert]]
        if let cachePath, let cached = try QuantizedExpertCache.load(path: cachePath, format: format, layers: L, experts: E) {
            quantized = cached
            fromCache = true
        } else {
            let flat = QuantizedExpert.quantizing(layers.flatMap { $0.experts.map { ($0.gate, $0.up, $0.down) } }, format: format, pool: kernels.pool)
            quantized = (0..<L).map { l in Array(flat[(l * E)..<((l + 1) * E)]) }
            if let cachePath { try QuantizedExpertCache.store(quantized, format: format, path: cachePath) }
        }
        return (quantized, QuantizationReport(format: format, experts: L * E, bytes: quantized.joined().reduce(0) { $0 + $1.byteCount },
                                  seconds: secondsSince(start), cachePath: cachePath, fromCache: fromCache))
    }
}
