#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reading HF JSON settings files (`config.json`, `generation_config.json`) into typed
/// configurations. Families decode their own `Codable` struct; this does the I/O and turns
/// decoding failures into one readable `ConfigError`.
public enum ConfigFile {
    /// Decodes `T` from the JSON file at `path`.
    public static func decode<T: Decodable>(_ type: T.Type, path: String) throws(ConfigError) -> T {
        let bytes: [UInt8]
        do {
            bytes = try readSmallFile(path)
        } catch .fileNotFound {
            throw .fileNotFound(path: path)
        } catch {
            throw .malformed(file: path, reason: error.description)
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch let e as ConfigError {
            throw e
        } catch {
            throw .malformed(file: path, reason: describe(error))
        }
    }

    /// The `model_type` of a checkpoint directory's config.json.
    public static func modelType(directory: String) throws(ConfigError) -> String {
        struct Probe: Decodable { let model_type: String? }
        let path = joinPath(directory, "config.json")
        guard let type = try decode(Probe.self, path: path).model_type else {
            throw .invalid(file: path, field: "model_type", reason: "is missing")
        }
        return type
    }
}

/// A token id or a list of them (HF allows both for `eos_token_id`).
public struct TokenIdList: Decodable, Sendable, Equatable {
    public let ids: [Int]
    public init(_ ids: [Int]) { self.ids = ids }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            ids = []
        } else if let one = try? c.decode(Int.self) {
            ids = [one]
        } else {
            ids = try c.decode([Int].self)
        }
    }
}

/// `generation_config.json`: the stop ids HF's `generate` uses by default.
public struct GenerationConfigFile: Decodable, Sendable {
    public let eosTokenId: TokenIdList?
    enum CodingKeys: String, CodingKey { case eosTokenId = "eos_token_id" }

    /// The file in `directory`, or nil when there is none.
    public static func load(directory: String) throws(ConfigError) -> GenerationConfigFile? {
        let path = joinPath(directory, "generation_config.json")
        guard fileExists(path) else { return nil }
        return try ConfigFile.decode(GenerationConfigFile.self, path: path)
    }
}
