import DuetCore
import DuetCPU
import DuetFormats

/// Named model geometries for `--synthetic`: full-size shapes with deterministic random
/// weights generated in memory (the GPU host's disk cannot hold a full Mixtral checkpoint).
public enum SyntheticGeometry {
    public static let all: [String: MixtralConfiguration] = [
        "mixtral-8x7b": MixtralConfiguration(
            hiddenSize: 4096, intermediateSize: 14336, numHiddenLayers: 32, numAttentionHeads: 32, numKeyValueHeads: 8,
            numLocalExperts: 8, vocabSize: 32000, maxPositionEmbeddings: 32768, ropeTheta: 1e6),
        "mixtral-8x22b": MixtralConfiguration(
            hiddenSize: 6144, intermediateSize: 16384, numHiddenLayers: 56, numAttentionHeads: 48, numKeyValueHeads: 8,
            numLocalExperts: 8, vocabSize: 32768, maxPositionEmbeddings: 65536, ropeTheta: 1e6),
        /// The demo model's shape: for tests and quick runs.
        "tiny": MixtralConfiguration(
            hiddenSize: 128, intermediateSize: 128, numHiddenLayers: 6, numAttentionHeads: 4, numKeyValueHeads: 2,
            numLocalExperts: 8, vocabSize: 32000, maxPositionEmbeddings: 2048, ropeTheta: 10000, tieWordEmbeddings: true),
    ]

    public static var names: [String] { all.keys.sorted() }
}

public enum SyntheticError: Error, Equatable, CustomStringConvertible {
    case unknownGeometry(String)
    case badLayerCount(Int)
    public var description: String {
        switch self {
        case .unknownGeometry(let name):
            "unknown synthetic geometry '\(name)'; known: \(SyntheticGeometry.names.joined(separator: ", "))"
        case .badLayerCount(let n):
            "--layers must be at least 1, got \(n)"
        }
    }
}

/// Deterministic random bf16 weights, generated on request in parallel. Matrices are
/// uniform in ±sqrt(3 / cols) (unit-variance outputs for unit-variance inputs); norm
/// weights are 1. The same seed and name always give the same values.
public final class SyntheticWeights: WeightSource, @unchecked Sendable {
    public let seed: UInt64
    private let pool: ThreadPool
    // Filled while the model is built (one thread), read-only afterwards.
    private var parameters = 0
    private var bytes = 0

    public init(seed: UInt64, pool: ThreadPool) {
        self.seed = seed
        self.pool = pool
    }

    /// A Mixtral model of geometry `name` (optionally with fewer layers) over synthetic weights.
    public static func mixtral(_ name: String, layers: Int? = nil, seed: UInt64, kernels: CPUKernels) throws -> MixtralModel {
        guard var config = SyntheticGeometry.all[name] else { throw SyntheticError.unknownGeometry(name) }
        if let layers {
            guard layers >= 1 else { throw SyntheticError.badLayerCount(layers) }
            config.numHiddenLayers = layers
        }
        let weights = SyntheticWeights(seed: seed, pool: kernels.pool)
        return try MixtralModel(config: config, weights: weights, kernels: kernels, eosTokenIds: config.eosTokenIds)
    }

    public func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
        let count = rows * cols
        let storage = Storage(count: count)
        let scale = (3.0 / Float(cols)).squareRoot()
        let key = seed ^ fnv1a(name)
        let chunk = 1 << 16
        let out = Unchecked(storage.pointer)
        pool.parallelFor((count + chunk - 1) / chunk) { c in
            var state = key &+ UInt64(c) &* 0x9E37_79B9_7F4A_7C15
            for i in (c * chunk)..<min(count, (c + 1) * chunk) {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                z ^= z >> 31
                let unit = Float(z >> 40) * (1.0 / Float(1 << 23)) - 1  // [-1, 1)
                out.value[i] = floatToBF16(unit * scale)
            }
        }
        parameters += count
        bytes += count * 2
        let view = TensorView(name: name, dtype: .bf16, shape: [rows, cols], base: UnsafeRawPointer(storage.pointer), owner: storage)
        return WeightMatrix(view)
    }

    public func vector(_ name: String, count: Int) throws -> [Float] {
        parameters += count
        bytes += count * 2
        return [Float](repeating: 1, count: count)
    }

    public var parameterCount: Int { parameters }
    public func bytesByDType() -> [String: Int] { ["BF16": bytes] }
    public var filePaths: [String] { [] }

    private final class Storage {
        let buffer: HugePageBuffer
        var pointer: UnsafeMutablePointer<UInt16> { buffer.base.assumingMemoryBound(to: UInt16.self) }
        init(count: Int) { buffer = HugePageBuffer(byteCount: count * 2) }
    }
}

private func fnv1a(_ s: String) -> UInt64 {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
    return h
}
