#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore

/// The weights of a Hugging Face checkpoint directory: `model.safetensors`, or shards
/// listed by `model.safetensors.index.json`. Every file's header is validated at open;
/// no tensor data is read until a kernel touches it.
public final class Checkpoint: @unchecked Sendable {
    public let directory: String
    public let files: [SafeTensorsFile]
    /// Tensor name -> index into `files`.
    private let location: [String: Int]

    public init(directory: String) throws(CheckpointError) {
        self.directory = directory
        let indexPath = joinPath(directory, "model.safetensors.index.json")
        let singlePath = joinPath(directory, "model.safetensors")
        if fileExists(indexPath) {
            (files, location) = try Self.openSharded(indexPath: indexPath, directory: directory)
        } else if fileExists(singlePath) {
            let file = try SafeTensorsFile(path: singlePath)
            files = [file]
            location = file.entries.mapValues { _ in 0 }
        } else {
            throw .noWeights(directory: directory)
        }
    }

    public var tensorNames: [String] { location.keys.sorted() }

    /// The header entry of `name`, if present.
    public func entry(_ name: String) -> (file: SafeTensorsFile, entry: SafeTensorsFile.Entry)? {
        guard let i = location[name], let e = files[i].entries[name] else { return nil }
        return (files[i], e)
    }

    /// A zero-copy view of tensor `name`.
    public func tensor(_ name: String) throws(CheckpointError) -> TensorView {
        guard let i = location[name] else { throw .missingTensor(tensor: name, checkpoint: directory) }
        return try files[i].tensor(name)
    }

    /// Tensor `name`, which must have exactly `shape`.
    public func tensor(_ name: String, shape: [Int]) throws(CheckpointError) -> TensorView {
        let t = try tensor(name)
        guard t.shape == shape else {
            throw .wrongShape(tensor: name, file: files[location[name]!].path, expected: shape, actual: t.shape)
        }
        return t
    }

    /// A `[rows, cols]` weight matrix.
    public func matrix(_ name: String, rows: Int, cols: Int) throws(CheckpointError) -> WeightMatrix {
        WeightMatrix(try tensor(name, shape: [rows, cols]))
    }

    /// A `[count]` vector widened to fp32 (norm weights).
    public func vector(_ name: String, count: Int) throws(CheckpointError) -> [Float] {
        try tensor(name, shape: [count]).toFloats()
    }

    /// Stored bytes per dtype string, over all tensors.
    public func bytesByDType() -> [String: Int] {
        var out: [String: Int] = [:]
        for f in files {
            for e in f.entries.values { out[e.dtype, default: 0] += e.end - e.begin }
        }
        return out
    }

    // MARK: sharded checkpoints

    private struct Index: Decodable {
        let weight_map: [String: String]
    }

    private static func openSharded(indexPath: String, directory: String)
        throws(CheckpointError) -> ([SafeTensorsFile], [String: Int])
    {
        let index: Index
        do {
            index = try JSONDecoder().decode(Index.self, from: Data(try readSmallFile(indexPath)))
        } catch let e as CheckpointError {
            throw e
        } catch {
            throw .malformedIndex(file: indexPath, reason: describe(error))
        }
        var files: [SafeTensorsFile] = []
        var fileIndex: [String: Int] = [:]
        var location: [String: Int] = [:]
        for (tensor, shard) in index.weight_map.sorted(by: { $0.key < $1.key }) {
            guard !shard.contains("/"), !shard.isEmpty else {
                throw .malformedIndex(file: indexPath, reason: "shard name '\(shard)' must be a file name in the directory")
            }
            let i: Int
            if let known = fileIndex[shard] {
                i = known
            } else {
                i = files.count
                files.append(try SafeTensorsFile(path: joinPath(directory, shard)))
                fileIndex[shard] = i
            }
            guard files[i].entries[tensor] != nil else {
                throw .shardMissingTensor(index: indexPath, shard: shard, tensor: tensor)
            }
            location[tensor] = i
        }
        if files.isEmpty { throw .malformedIndex(file: indexPath, reason: "weight_map is empty") }
        return (files, location)
    }
}
