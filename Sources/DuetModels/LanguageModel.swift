import DuetCPU
import DuetCore
import DuetFormats

/// Where a model's tensors come from: a checkpoint on disk or synthetic weights in memory.
/// The model code after loading is the same for both.
public protocol WeightSource: AnyObject, Sendable {
    /// A `[rows, cols]` matrix in its stored dtype.
    func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix
    /// A `[count]` vector widened to fp32.
    func vector(_ name: String, count: Int) throws -> [Float]
    var parameterCount: Int { get }
    func bytesByDType() -> [String: Int]
    /// Files the weights come from (none for synthetic weights).
    var filePaths: [String] { get }
}

extension Checkpoint: WeightSource {
    public var parameterCount: Int {
        files.reduce(0) { total, f in f.entries.values.reduce(total) { $0 + $1.shape.reduce(1, *) } }
    }
    public var filePaths: [String] { files.map(\.path) }
}

/// What the generation loop needs from any model family.
public protocol LanguageModel: AnyObject {
    var vocabSize: Int { get }
    /// Longest sequence (prompt + generated) the model accepts.
    var maxPositions: Int { get }
    /// Ids that end generation by default (config.json and generation_config.json).
    var eosTokenIds: [Int] { get }
    var bosTokenId: Int? { get }
    /// What `duet info` prints.
    var summary: ModelSummary { get }

    /// An empty cache for one sequence (with a private, unbounded block pool).
    func makeCache() -> KVCache

    /// A block pool for many sequences (batching, beams), at most `memoryLimit` bytes.
    func makeCachePool(memoryLimit: Int?, blockSize: Int) -> KVBlockPool

    /// Runs `tokens` at positions `cache.length ..< cache.length + T`, appends their keys
    /// and values to `cache`, and returns logits: `[V]` for the last token, or `[T, V]`
    /// for every token when `allLogits` is true.
    func forward(_ tokens: [Int32], cache: KVCache, allLogits: Bool) throws(ModelError) -> [Float]

    /// One forward step for several sequences at once (see MixtralModel.forwardBatch).
    func forwardBatch(_ items: [BatchItem], allLogits: Bool) throws(ModelError) -> [[Float]]

    /// Most sequences one `forwardBatch` takes (nil: no limit).
    var maxBatchItems: Int? { get }

    /// Where expert work ran so far (hit rate, CPU and GPU expert time).
    var expertUsage: ExpertUsage { get }
}

extension LanguageModel {
    public var maxBatchItems: Int? { nil }
}

/// One sequence's tokens for a batched step, and its cache.
public struct BatchItem {
    public var tokens: [Int32]
    public var cache: KVCache
    public init(tokens: [Int32], cache: KVCache) {
        self.tokens = tokens
        self.cache = cache
    }
}

/// Errors a forward pass reports on bad input (never a crash).
public enum ModelError: Error, Equatable, CustomStringConvertible {
    case emptyInput
    case tokenOutOfRange(id: Int32, vocabSize: Int)
    case contextFull(needed: Int, limit: Int)
    case cacheFull(String)

    public var description: String {
        switch self {
        case .emptyInput:
            "no input tokens"
        case .tokenOutOfRange(let id, let vocab):
            "token id \(id) is outside the vocabulary (0..<\(vocab))"
        case .contextFull(let needed, let limit):
            "sequence of \(needed) tokens exceeds the model's \(limit) positions (max_position_embeddings)"
        case .cacheFull(let why):
            why
        }
    }
}

/// A model's configuration and sizes, for `duet info`.
public struct ModelSummary: Sendable {
    public var family: String
    /// (HF name, value) in config order.
    public var settings: [(String, String)]
    public var totalParameters: Int
    /// Parameters a token touches: everything but the experts, plus k experts per layer.
    public var activeParameters: Int
    public var parametersPerExpert: Int
    /// Weight bytes one decode step of one sequence reads: everything active except the
    /// embedding table (one row of it), with the lm_head in full.
    public var decodeBytesPerToken: Int
    /// Stored bytes per dtype.
    public var bytesByDType: [String: Int]
    public var files: [String]
}

/// The model families Duet can load, keyed by HF `model_type`.
public enum ModelRegistry {
    public static let families: [String: @Sendable (String, CPUKernels) throws -> any LanguageModel] = [
        "mixtral": { try MixtralModel(directory: $0, kernels: $1) },
    ]

    public static var supportedTypes: [String] { families.keys.sorted() }

    /// Loads the checkpoint in `directory` with the family its config.json names.
    public static func load(directory: String, kernels: CPUKernels) throws -> any LanguageModel {
        let type = try ConfigFile.modelType(directory: directory)
        guard let make = families[type] else {
            throw ConfigError.unsupportedModelType(
                file: joinPath(directory, "config.json"), modelType: type, supported: supportedTypes)
        }
        return try make(directory, kernels)
    }
}
