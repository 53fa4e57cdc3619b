#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Everything that can be wrong with a checkpoint's files. Each case names the file and,
/// where there is one, the tensor.
public enum CheckpointError: Error, Equatable, CustomStringConvertible {
    case fileNotFound(path: String)
    case unreadable(path: String, reason: String)
    case noWeights(directory: String)
    case truncated(file: String, reason: String)
    case malformedHeader(file: String, reason: String)
    case unsupportedDType(file: String, tensor: String, dtype: String)
    case tensorOutOfBounds(file: String, tensor: String, end: Int, dataBytes: Int)
    case overlappingTensors(file: String, first: String, second: String)
    case sizeMismatch(file: String, tensor: String, shape: [Int], dtype: String, bytes: Int)
    case malformedIndex(file: String, reason: String)
    case shardMissingTensor(index: String, shard: String, tensor: String)
    case missingTensor(tensor: String, checkpoint: String)
    case wrongShape(tensor: String, file: String, expected: [Int], actual: [Int])

    public var description: String {
        switch self {
        case .fileNotFound(let path):
            "checkpoint file not found: \(path)"
        case .unreadable(let path, let reason):
            "cannot read \(path): \(reason)"
        case .noWeights(let dir):
            "no weights in \(dir): expected model.safetensors or model.safetensors.index.json"
        case .truncated(let file, let reason):
            "\(file) is truncated: \(reason)"
        case .malformedHeader(let file, let reason):
            "\(file): malformed safetensors header: \(reason)"
        case .unsupportedDType(let file, let tensor, let dtype):
            "\(file): tensor '\(tensor)' has dtype \(dtype); Duet reads BF16, F16 and F32"
        case .tensorOutOfBounds(let file, let tensor, let end, let dataBytes):
            "\(file): tensor '\(tensor)' ends at byte \(end) of a \(dataBytes)-byte data section (file truncated or header corrupt)"
        case .overlappingTensors(let file, let first, let second):
            "\(file): tensors '\(first)' and '\(second)' overlap in the data section"
        case .sizeMismatch(let file, let tensor, let shape, let dtype, let bytes):
            "\(file): tensor '\(tensor)' of shape \(shape) and dtype \(dtype) cannot fill its \(bytes) bytes"
        case .malformedIndex(let file, let reason):
            "\(file): malformed sharded-checkpoint index: \(reason)"
        case .shardMissingTensor(let index, let shard, let tensor):
            "\(index) puts tensor '\(tensor)' in \(shard), which does not contain it"
        case .missingTensor(let tensor, let checkpoint):
            "tensor '\(tensor)' is missing from the checkpoint \(checkpoint)"
        case .wrongShape(let tensor, let file, let expected, let actual):
            "\(file): tensor '\(tensor)' has shape \(actual), expected \(expected)"
        }
    }
}

/// Everything that can be wrong with a `config.json` (or another JSON settings file).
public enum ConfigError: Error, Equatable, CustomStringConvertible {
    case fileNotFound(path: String)
    case malformed(file: String, reason: String)
    case unsupportedModelType(file: String, modelType: String, supported: [String])
    case invalid(file: String, field: String, reason: String)

    public var description: String {
        switch self {
        case .fileNotFound(let path):
            "config file not found: \(path)"
        case .malformed(let file, let reason):
            "\(file): \(reason)"
        case .unsupportedModelType(let file, let modelType, let supported):
            "\(file): model_type '\(modelType)' is not supported; supported: \(supported.joined(separator: ", "))"
        case .invalid(let file, let field, let reason):
            "\(file): \(field) \(reason)"
        }
    }
}

/// A short, readable account of a JSON decoding failure ("missing key 'x' at a.b").
public func describe(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return "\(error)" }
    func path(_ keys: [any CodingKey]) -> String {
        keys.isEmpty ? "the top level" : keys.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
    }
    switch error {
    case .keyNotFound(let key, let ctx):
        return "missing key '\(key.stringValue)' at \(path(ctx.codingPath))"
    case .typeMismatch(let type, let ctx):
        return "\(path(ctx.codingPath)) should be \(type)"
    case .valueNotFound(let type, let ctx):
        return "\(path(ctx.codingPath)) is null, expected \(type)"
    case .dataCorrupted(let ctx):
        return ctx.codingPath.isEmpty ? "not valid JSON" : "invalid value at \(path(ctx.codingPath))"
    @unknown default:
        return "\(error)"
    }
}
