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
    case badRouterSkew(Float)
    public var description: String {
        switch self {
        case .unknownGeometry(let name):
            "unknown synthetic geometry '\(name)'; known: \(SyntheticGeometry.names.joined(separator: ", "))"
        case .badLayerCount(let n):
            "--layers must be at least 1, got \(n)"
        case .badRouterSkew(let s):
            "--router-skew must be a finite number >= 0, got \(s)"
        }
    }
}

/// Deterministic random bf16 weights, generated on request in parallel. Matrices are
/// uniform in ±sqrt(3 / cols) (unit-variance outputs for unit-variance inputs); norm
/// weights are 1. The same seed and name always give the same values.
///
/// Router skew S > 0 makes some experts popular the way trained models do, within the
/// architecture (Mixtral's router has no bias): every embedding row gets a shared direction
/// u (±a per element), so every token's hidden state leans along u, and expert e's router
/// row gets S * z_e * u / D with z_e falling linearly from 1 (expert 0) to 0 (the last):
/// expert e's logit then leans by about S * z_e on every token.
///
/// With an expert format (q8, q4), each expert matrix is generated, quantized at once and
/// only its quantized form kept: a full-size host cannot hold Mixtral-8x7B's 87 GiB of bf16
/// experts and their quantized copies together. The model's stored-dtype expert views then
/// all read one shared zero matrix, so only the quantized experts carry the weights (the
/// CPU kernels and the offload devices compute with those).
public final class SyntheticWeights: WeightSource, @unchecked Sendable {
    public let seed: UInt64
    public let routerSkew: Float
    public let expertFormat: QuantFormat?
    private let pool: ThreadPool
    // Filled while the model is built (one thread), read-only afterwards.
    private var parameters = 0
    private var bytes = 0
    private var quantized: [String: QuantizedMatrix] = [:]
    private var zeros: Storage?

    public init(seed: UInt64, pool: ThreadPool, routerSkew: Float = 0, expertFormat: QuantFormat? = nil) {
        self.seed = seed
        self.pool = pool
        self.routerSkew = routerSkew
        self.expertFormat = expertFormat
    }

    /// A Mixtral model of geometry `name` (optionally with fewer layers) over synthetic weights.
    /// `expertFormat`: generate the experts straight into that format (see the type's note).
    public static func mixtral(_ name: String, layers: Int? = nil, seed: UInt64, routerSkew: Float = 0,
                               expertFormat: QuantFormat? = nil, kernels: CPUKernels) throws -> MixtralModel {
        guard var config = SyntheticGeometry.all[name] else { throw SyntheticError.unknownGeometry(name) }
        if let layers {
            guard layers >= 1 else { throw SyntheticError.badLayerCount(layers) }
            config.numHiddenLayers = layers
        }
        guard routerSkew >= 0, routerSkew.isFinite else { throw SyntheticError.badRouterSkew(routerSkew) }
        let weights = SyntheticWeights(seed: seed, pool: kernels.pool, routerSkew: routerSkew, expertFormat: expertFormat)
        let model = try MixtralModel(config: config, weights: weights, kernels: kernels, eosTokenIds: config.eosTokenIds)
        if expertFormat != nil {
            model.useExperts((0..<config.numHiddenLayers).map { l in
                (0..<config.numLocalExperts).map { e in
                    let m = { (w: String) in weights.quantized[MixtralNames.expert(l, e, w)]! }
                    return QuantizedExpert(gate: m("w1"), up: m("w3"), down: m("w2"))
                }
            })
        }
        return model
    }

    public func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
        let generated = generate(name, rows: rows, cols: cols)
        guard let format = expertFormat, name.contains(".block_sparse_moe.experts.") else { return generated }
        quantized[name] = QuantizedMatrix(quantizing: generated, format: format, pool: pool)
        if (zeros?.count ?? 0) < rows * cols { zeros = Storage(count: rows * cols) }
        return WeightMatrix(TensorView(name: name, dtype: .bf16, shape: [rows, cols], base: UnsafeRawPointer(zeros!.pointer), owner: zeros!))
    }

    private func generate(_ name: String, rows: Int, cols: Int) -> WeightMatrix {
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
        if routerSkew > 0 { addSkew(name, storage.pointer, rows: rows, cols: cols, scale: scale) }
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

    /// The shared direction u: ±1 per element, from the seed.
    private func direction(_ n: Int) -> [Float] {
        var z = seed ^ 0xD1B5_4A32_D192_ED03
        return (0..<n).map { _ in
            z = z &* 6364136223846793005 &+ 1442695040888963407
            return (z >> 63) == 0 ? 1 : -1
        }
    }

    private func addSkew(_ name: String, _ p: UnsafeMutablePointer<UInt16>, rows: Int, cols: Int, scale: Float) {
        let u = direction(cols)
        if name == MixtralNames.embed {
            for r in 0..<rows {
                for c in 0..<cols { p[r * cols + c] = floatToBF16(bf16ToFloat(p[r * cols + c]) + scale * u[c]) }
            }
        } else if name.hasSuffix("block_sparse_moe.gate.weight") {
            for e in 0..<rows {
                let z = rows > 1 ? 1 - Float(e) / Float(rows - 1) : 1
                for c in 0..<cols { p[e * cols + c] = floatToBF16(bf16ToFloat(p[e * cols + c]) + routerSkew * z * u[c] / Float(cols)) }
            }
        }
    }

    public var parameterCount: Int { parameters }
    public func bytesByDType() -> [String: Int] { ["BF16": bytes] }
    public var filePaths: [String] { [] }

    private final class Storage {
        let buffer: HugePageBuffer
        let count: Int
        var pointer: UnsafeMutablePointer<UInt16> { buffer.base.assumingMemoryBound(to: UInt16.self) }
        init(count: Int) {
            buffer = HugePageBuffer(byteCount: count * 2)
            self.count = count
        }
    }
}

private func fnv1a(_ s: String) -> UInt64 {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
    return h
}
