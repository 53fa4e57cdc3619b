#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore

/// One `.safetensors` file, mmap'ed, with its header fully validated before any tensor
/// data is touched (format: 8-byte little-endian header length, JSON header, data).
///
/// Validation: the header length fits the file; the header is a JSON object of
/// `{dtype, shape, data_offsets}` entries (plus an optional `__metadata__` string map);
/// every byte range lies inside the data section; no two ranges overlap; and
/// `product(shape) * size(dtype)` equals each range's length.
public final class SafeTensorsFile: @unchecked Sendable {
    /// A tensor's header entry. `dtype` is the header's string; only BF16/F16/F32 can be read.
    public struct Entry: Sendable, Equatable {
        public let dtype: String
        public let shape: [Int]
        public let begin: Int  // offset in the data section
        public let end: Int
    }

    public let path: String
    public let entries: [String: Entry]
    public let metadata: [String: String]
    private let map: MappedFile
    private let dataStart: Int

    /// Largest header accepted (the reference implementation's limit is 100 MB).
    static let maxHeaderBytes = 100_000_000

    public init(path: String) throws(CheckpointError) {
        let map = try MappedFile(path: path)
        guard map.size >= 8 else {
            throw .truncated(file: path, reason: "\(map.size) bytes, shorter than the 8-byte header length")
        }
        let headerLength = Int(clamping: map.bytes(0, 8).loadUnaligned(as: UInt64.self).littleEndian)
        guard headerLength <= Self.maxHeaderBytes else {
            throw .malformedHeader(file: path, reason: "header length \(headerLength) exceeds \(Self.maxHeaderBytes) bytes")
        }
        guard 8 + headerLength <= map.size else {
            throw .truncated(file: path, reason: "header claims \(headerLength) bytes but the file has \(map.size - 8) after the length")
        }
        let header = try Self.parseHeader(Data(map.bytes(8, headerLength)), file: path)
        let dataBytes = map.size - 8 - headerLength
        try Self.validate(header.entries, dataBytes: dataBytes, file: path)
        self.path = path
        self.map = map
        self.entries = header.entries
        self.metadata = header.metadata
        self.dataStart = 8 + headerLength
    }

    /// A zero-copy view of tensor `name`.
    public func tensor(_ name: String) throws(CheckpointError) -> TensorView {
        guard let e = entries[name] else { throw .missingTensor(tensor: name, checkpoint: path) }
        guard let dtype = DType(rawValue: e.dtype) else {
            throw .unsupportedDType(file: path, tensor: name, dtype: e.dtype)
        }
        let base = map.base!.advanced(by: dataStart + e.begin)  // non-empty: the header is in the file
        return TensorView(name: name, dtype: dtype, shape: e.shape, base: base, owner: map)
    }

    // MARK: header parsing and validation

    private struct Header: Decodable {
        var entries: [String: Entry] = [:]
        var metadata: [String: String] = [:]

        private struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
        private struct RawEntry: Decodable {
            let dtype: String
            let shape: [Int]
            let data_offsets: [Int]
        }

        init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: Key.self)
            for key in c.allKeys {
                if key.stringValue == "__metadata__" {
                    metadata = try c.decode([String: String].self, forKey: key)
                    continue
                }
                let raw = try c.decode(RawEntry.self, forKey: key)
                guard raw.data_offsets.count == 2 else {
                    throw DecodingError.dataCorruptedError(
                        forKey: key, in: c, debugDescription: "data_offsets must have two numbers")
                }
                entries[key.stringValue] = Entry(
                    dtype: raw.dtype, shape: raw.shape, begin: raw.data_offsets[0], end: raw.data_offsets[1])
            }
        }
    }

    private static func parseHeader(_ data: Data, file: String) throws(CheckpointError) -> Header {
        do {
            return try JSONDecoder().decode(Header.self, from: data)
        } catch {
            throw .malformedHeader(file: file, reason: describe(error))
        }
    }

    /// Bytes per element of every dtype the safetensors format defines (nil: unknown).
    static func elementBytes(_ dtype: String) -> Int? {
        switch dtype {
        case "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0": 1
        case "I16", "U16", "F16", "BF16": 2
        case "I32", "U32", "F32": 4
        case "I64", "U64", "F64": 8
        default: nil
        }
    }

    private static func validate(_ entries: [String: Entry], dataBytes: Int, file: String) throws(CheckpointError) {
        for (name, e) in entries {
            guard let size = elementBytes(e.dtype) else {
                throw .unsupportedDType(file: file, tensor: name, dtype: e.dtype)
            }
            guard e.begin >= 0, e.end >= e.begin else {
                throw .malformedHeader(file: file, reason: "tensor '\(name)' has data_offsets [\(e.begin), \(e.end)]")
            }
            guard e.end <= dataBytes else {
                throw .tensorOutOfBounds(file: file, tensor: name, end: e.end, dataBytes: dataBytes)
            }
            var count = 1
            for d in e.shape {
                let (product, overflow) = count.multipliedReportingOverflow(by: d)
                guard d >= 0, !overflow else {
                    throw .malformedHeader(file: file, reason: "tensor '\(name)' has shape \(e.shape)")
                }
                count = product
            }
            let (bytes, overflow) = count.multipliedReportingOverflow(by: size)
            guard !overflow, bytes == e.end - e.begin else {
                throw .sizeMismatch(file: file, tensor: name, shape: e.shape, dtype: e.dtype, bytes: e.end - e.begin)
            }
        }
        // Sorted by start (name breaks ties so the error is deterministic); neighbours must not overlap.
        let sorted = entries.sorted { ($0.value.begin, $0.key) < ($1.value.begin, $1.key) }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.value.begin < a.value.end {
            throw .overlappingTensors(file: file, first: a.key, second: b.key)
        }
    }
}
