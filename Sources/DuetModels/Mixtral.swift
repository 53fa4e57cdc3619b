import DuetCore
import DuetCPU
import DuetFormats

// Mixtral (HF `model_type: "mixtral"`): a Mistral decoder whose MLP is a sparse mixture of
// SwiGLU experts with a top-k softmax router.
//
// Shape letters: T tokens in this step, D hidden, F expert FFN width, H query heads,
// Hkv key/value heads, d head dim, E experts, k experts per token, V vocabulary.

// MARK: - Configuration

/// `config.json` of a Mixtral checkpoint. HF names are mapped once, in `CodingKeys`;
/// absent optional fields take HF's `MixtralConfig` defaults.
public struct MixtralConfiguration: Decodable, Sendable {
    public var hiddenSize: Int             // D
    public var intermediateSize: Int       // F
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int      // H
    public var numKeyValueHeads: Int       // Hkv
    public var headDim: Int                // d; default D / H
    public var numLocalExperts: Int        // E
    public var numExpertsPerToken: Int     // k
    public var rmsNormEps: Float
    public var ropeTheta: Double
    public var ropeType: String
    public var vocabSize: Int              // V
    public var maxPositionEmbeddings: Int
    public var tieWordEmbeddings: Bool
    public var bosTokenId: Int?
    public var eosTokenIds: [Int]
    public var slidingWindow: Int?
    public var hiddenAct: String

    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size"
        case numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads"
        case numKeyValueHeads = "num_key_value_heads"
        case headDim = "head_dim"
        case numLocalExperts = "num_local_experts"
        case numExpertsPerToken = "num_experts_per_tok"
        case rmsNormEps = "rms_norm_eps"
        case ropeTheta = "rope_theta"
        case ropeParameters = "rope_parameters"  // transformers >= 5 keeps rope_theta here
        case ropeScaling = "rope_scaling"
        case vocabSize = "vocab_size"
        case maxPositionEmbeddings = "max_position_embeddings"
        case tieWordEmbeddings = "tie_word_embeddings"
        case bosTokenId = "bos_token_id"
        case eosTokenId = "eos_token_id"
        case slidingWindow = "sliding_window"
        case hiddenAct = "hidden_act"
    }

    /// A configuration built in code (synthetic models); HF defaults for what is not given.
    public init(hiddenSize: Int, intermediateSize: Int, numHiddenLayers: Int, numAttentionHeads: Int,
                numKeyValueHeads: Int, headDim: Int? = nil, numLocalExperts: Int, numExpertsPerToken: Int = 2,
                vocabSize: Int, maxPositionEmbeddings: Int = 32768, ropeTheta: Double = 1e6, rmsNormEps: Float = 1e-5,
                tieWordEmbeddings: Bool = false, bosTokenId: Int? = 1, eosTokenIds: [Int] = [2], slidingWindow: Int? = nil) {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads
        self.numKeyValueHeads = numKeyValueHeads
        self.headDim = headDim ?? hiddenSize / numAttentionHeads
        self.numLocalExperts = numLocalExperts
        self.numExpertsPerToken = numExpertsPerToken
        self.rmsNormEps = rmsNormEps
        self.ropeTheta = ropeTheta
        self.ropeType = "default"
        self.vocabSize = vocabSize
        self.maxPositionEmbeddings = maxPositionEmbeddings
        self.tieWordEmbeddings = tieWordEmbeddings
        self.bosTokenId = bosTokenId
        self.eosTokenIds = eosTokenIds
        self.slidingWindow = slidingWindow
        self.hiddenAct = "silu"
    }

    private struct RopeParameters: Decodable {
        var rope_theta: Double?
        var rope_type: String?
        var type: String?
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
        numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
        numKeyValueHeads = try c.decodeIfPresent(Int.self, forKey: .numKeyValueHeads) ?? 8
        headDim = try c.decodeIfPresent(Int.self, forKey: .headDim) ?? hiddenSize / max(numAttentionHeads, 1)
        numLocalExperts = try c.decode(Int.self, forKey: .numLocalExperts)
        numExpertsPerToken = try c.decodeIfPresent(Int.self, forKey: .numExpertsPerToken) ?? 2
        rmsNormEps = try c.decodeIfPresent(Float.self, forKey: .rmsNormEps) ?? 1e-5
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        maxPositionEmbeddings = try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? 4096 * 32
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? false
        bosTokenId = try c.decodeIfPresent(Int.self, forKey: .bosTokenId)
        eosTokenIds = try c.decodeIfPresent(TokenIdList.self, forKey: .eosTokenId)?.ids ?? []
        slidingWindow = try c.decodeIfPresent(Int.self, forKey: .slidingWindow)
        hiddenAct = try c.decodeIfPresent(String.self, forKey: .hiddenAct) ?? "silu"
        // Rope: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (Hub checkpoints).
        let params = try c.decodeIfPresent(RopeParameters.self, forKey: .ropeParameters)
            ?? c.decodeIfPresent(RopeParameters.self, forKey: .ropeScaling)
        ropeTheta = try params?.rope_theta ?? c.decodeIfPresent(Double.self, forKey: .ropeTheta) ?? 1e6
        ropeType = params?.rope_type ?? params?.type ?? "default"
    }

    /// Rejects what the forward pass cannot run, naming the field.
    public func validate(file: String) throws(ConfigError) {
        func require(_ ok: Bool, _ field: String, _ reason: String) throws(ConfigError) {
            if !ok { throw .invalid(file: file, field: field, reason: reason) }
        }
        for (field, value) in [("hidden_size", hiddenSize), ("intermediate_size", intermediateSize),
                               ("num_hidden_layers", numHiddenLayers), ("num_attention_heads", numAttentionHeads),
                               ("num_key_value_heads", numKeyValueHeads), ("head_dim", headDim),
                               ("num_local_experts", numLocalExperts), ("num_experts_per_tok", numExpertsPerToken),
                               ("vocab_size", vocabSize), ("max_position_embeddings", maxPositionEmbeddings)] {
            try require(value > 0, field, "must be positive, is \(value)")
        }
        try require(numAttentionHeads % numKeyValueHeads == 0, "num_attention_heads",
                    "(\(numAttentionHeads)) must be a multiple of num_key_value_heads (\(numKeyValueHeads))")
        try require(headDim % 2 == 0, "head_dim", "must be even for rotary embeddings, is \(headDim)")
        try require(numExpertsPerToken <= numLocalExperts, "num_experts_per_tok",
                    "(\(numExpertsPerToken)) exceeds num_local_experts (\(numLocalExperts))")
        try require(hiddenAct == "silu", "hidden_act", "'\(hiddenAct)' is not supported (only silu)")
        try require(ropeType == "default", "rope_type", "'\(ropeType)' is not supported (only default rope)")
        try require(ropeTheta > 0, "rope_theta", "must be positive")
        try require(rmsNormEps > 0, "rms_norm_eps", "must be positive")
        if let w = slidingWindow { try require(w > 0, "sliding_window", "must be positive or null, is \(w)") }
    }

    /// Parameters of one expert: w1 and w3 `[F, D]`, w2 `[D, F]`.
    public var parametersPerExpert: Int { 3 * hiddenSize * intermediateSize }
}

// MARK: - Weights

/// HF tensor names of a Mixtral checkpoint (the Hub layout; a pure function of indices).
enum MixtralNames {
    static let embed = "model.embed_tokens.weight"
    static let norm = "model.norm.weight"
    static let lmHead = "lm_head.weight"
    static func layer(_ l: Int, _ suffix: String) -> String { "model.layers.\(l).\(suffix)" }
    static func attention(_ l: Int, _ proj: String) -> String { layer(l, "self_attn.\(proj).weight") }
    static func router(_ l: Int) -> String { layer(l, "block_sparse_moe.gate.weight") }
    static func expert(_ l: Int, _ e: Int, _ w: String) -> String { layer(l, "block_sparse_moe.experts.\(e).\(w).weight") }
}

/// One expert's weights (public for the other backends, which read the same bytes).
public struct MixtralExpert: Sendable {
    public let gate: WeightMatrix  // w1 [F, D]
    public let up: WeightMatrix    // w3 [F, D]
    public let down: WeightMatrix  // w2 [D, F]
    /// The same weights quantized (`--expert-dtype q8|q4`); when set, the CPU computes with these.
    public var quantized: QuantizedExpert?
}

/// One decoder layer's weights.
public struct MixtralLayer: Sendable {
    public let inputNorm: [Float]          // [D]
    public let q: WeightMatrix             // [H * d, D]
    public let k: WeightMatrix             // [Hkv * d, D]
    public let v: WeightMatrix             // [Hkv * d, D]
    public let o: WeightMatrix             // [D, H * d]
    public let postAttentionNorm: [Float]  // [D]
    public let router: WeightMatrix        // [E, D]
    public var experts: [MixtralExpert]    // (E)
}

// MARK: - Model

/// A Mixtral model ready to run on the CPU: weights stay where their source keeps them
/// (mmap'ed checkpoint, or synthetic memory) in their stored dtype; activations are fp32.
public final class MixtralModel: LanguageModel {
    public let config: MixtralConfiguration
    public let weights: any WeightSource
    public let kernels: CPUKernels
    public let embed: WeightMatrix   // [V, D]
    public private(set) var layers: [MixtralLayer]
    public let norm: [Float]         // [D]
    public let lmHead: WeightMatrix  // [V, D]; the embedding when tied
    public let rope: Rope
    public let eosTokenIds: [Int]
    /// Sees every layer's routing decisions (layer, one choice per token): popularity
    /// profiles and tests.
    public var routingObserver: ((Int, [ExpertChoice]) -> Void)?
    /// Expert work done so far (on the CPU here, unless an executor reports its own).
    public let expertUsage = ExpertUsage()
    /// Runs the routed experts of every MoE layer instead of the CPU loop below (the
    /// offload executor: some experts on a device, the rest on the CPU); nil: all on the CPU.
    public var expertExecutor: (any ExpertExecutor)?

    /// Opens `directory` (config.json, safetensors, optional generation_config.json) and
    /// checks every tensor's name and shape; tensor data stays on disk until used.
    public convenience init(directory: String, kernels: CPUKernels) throws {
        let configPath = joinPath(directory, "config.json")
        let config = try ConfigFile.decode(MixtralConfiguration.self, path: configPath)
        try config.validate(file: configPath)
        let checkpoint = try Checkpoint(directory: directory)
        var eos = config.eosTokenIds
        for id in try GenerationConfigFile.load(directory: directory)?.eosTokenId?.ids ?? [] where !eos.contains(id) { eos.append(id) }
        try self.init(config: config, weights: checkpoint, kernels: kernels, eosTokenIds: eos)
    }

    /// A model over any weight source (checkpoint or synthetic) with a validated config.
    public init(config c: MixtralConfiguration, weights: any WeightSource, kernels: CPUKernels, eosTokenIds: [Int]) throws {
        let D = c.hiddenSize, F = c.intermediateSize, d = c.headDim
        embed = try weights.matrix(MixtralNames.embed, rows: c.vocabSize, cols: D)
        norm = try weights.vector(MixtralNames.norm, count: D)
        lmHead = c.tieWordEmbeddings ? embed : try weights.matrix(MixtralNames.lmHead, rows: c.vocabSize, cols: D)
        layers = try (0..<c.numHiddenLayers).map { l in
            MixtralLayer(
                inputNorm: try weights.vector(MixtralNames.layer(l, "input_layernorm.weight"), count: D),
                q: try weights.matrix(MixtralNames.attention(l, "q_proj"), rows: c.numAttentionHeads * d, cols: D),
                k: try weights.matrix(MixtralNames.attention(l, "k_proj"), rows: c.numKeyValueHeads * d, cols: D),
                v: try weights.matrix(MixtralNames.attention(l, "v_proj"), rows: c.numKeyValueHeads * d, cols: D),
                o: try weights.matrix(MixtralNames.attention(l, "o_proj"), rows: D, cols: c.numAttentionHeads * d),
                postAttentionNorm: try weights.vector(MixtralNames.layer(l, "post_attention_layernorm.weight"), count: D),
                router: try weights.matrix(MixtralNames.router(l), rows: c.numLocalExperts, cols: D),
                experts: try (0..<c.numLocalExperts).map { e in
                    MixtralExpert(
                        gate: try weights.matrix(MixtralNames.expert(l, e, "w1"), rows: F, cols: D),
                        up: try weights.matrix(MixtralNames.expert(l, e, "w3"), rows: F, cols: D),
                        down: try weights.matrix(MixtralNames.expert(l, e, "w2"), rows: D, cols: F))
                })
        }
        rope = Rope(headDim: d, theta: c.ropeTheta)
        self.eosTokenIds = eosTokenIds
        self.config = c
        self.weights = weights
        self.kernels = kernels
    }

    public var vocabSize: Int { config.vocabSize }
    public var maxPositions: Int { config.maxPositionEmbeddings }
    public var bosTokenId: Int? { config.bosTokenId }

    public func makeCache() -> KVCache {
        KVCache(layers: config.numHiddenLayers, kvHeads: config.numKeyValueHeads, headDim: config.headDim)
    }

    public func makeCachePool(memoryLimit bytes: Int?, blockSize: Int) -> KVBlockPool {
        let c = config
        if let bytes {
            return KVBlockPool(layers: c.numHiddenLayers, kvHeads: c.numKeyValueHeads, headDim: c.headDim, blockSize: blockSize, memoryLimit: bytes)
        }
        return KVBlockPool(layers: c.numHiddenLayers, kvHeads: c.numKeyValueHeads, headDim: c.headDim, blockSize: blockSize)
    }

    // MARK: forward

    public func forward(_ tokens: [Int32], cache: KVCache, allLogits: Bool) throws(ModelError) -> [Float] {
        try forwardBatch([BatchItem(tokens: tokens, cache: cache)], allLogits: allLogits)[0]
    }

    /// One step for several sequences: their tokens go through every matmul together (so
    /// an expert's weights are read once for all tokens routed to it), attention runs per
    /// sequence over its own cache and positions. Logits per item: `[V]`, or `[T, V]` with `allLogits`.
    public func forwardBatch(_ items: [BatchItem], allLogits: Bool) throws(ModelError) -> [[Float]] {
        let D = config.hiddenSize
        for item in items {
            guard !item.tokens.isEmpty else { throw .emptyInput }
            if let bad = item.tokens.first(where: { $0 < 0 || Int($0) >= config.vocabSize }) {
                throw .tokenOutOfRange(id: bad, vocabSize: config.vocabSize)
            }
            let needed = item.cache.length + item.tokens.count
            guard needed <= maxPositions else { throw .contextFull(needed: needed, limit: maxPositions) }
        }
        do {
            for item in items { try item.cache.reserve(item.tokens.count) }
        } catch {
            throw .cacheFull(error.description)
        }
        var rowStarts: [Int] = []                      // first row of each item in the batch
        var N = 0
        for item in items { rowStarts.append(N); N += item.tokens.count }

        var x = embedTokens(items.flatMap(\.tokens))   // [N, D] residual stream
        var h = [Float](repeating: 0, count: N * D)    // [N, D] normed input of a block
        for (l, layer) in layers.enumerated() {
            rmsNorm(x, weight: layer.inputNorm, eps: config.rmsNormEps, &h, tokens: N)
            add(attentionBlock(h, layer: layer, index: l, items: items, rowStarts: rowStarts, rows: N), into: &x)
            rmsNorm(x, weight: layer.postAttentionNorm, eps: config.rmsNormEps, &h, tokens: N)
            add(moeBlock(h, layer: layer, index: l, tokens: N), into: &x)
        }
        for item in items { item.cache.advance(item.tokens.count) }

        // Final norm and lm_head over the rows that need logits.
        let picked = zip(items, rowStarts).flatMap { item, r in
            allLogits ? Array(r..<(r + item.tokens.count)) : [r + item.tokens.count - 1]
        }
        var last = [Float](repeating: 0, count: picked.count * D)  // [rows, D]
        for (i, r) in picked.enumerated() { last.replaceSubrange((i * D)..<((i + 1) * D), with: x[(r * D)..<((r + 1) * D)]) }
        var normed = [Float](repeating: 0, count: picked.count * D)
        rmsNorm(last, weight: norm, eps: config.rmsNormEps, &normed, tokens: picked.count)
        let V = config.vocabSize
        var logits = [Float](repeating: 0, count: picked.count * V)  // [rows, V]
        kernels.matmul(normed, lmHead, &logits, tokens: picked.count)
        var out: [[Float]] = []
        var row = 0
        for item in items {
            let n = allLogits ? item.tokens.count : 1
            out.append(Array(logits[(row * V)..<((row + n) * V)]))
            row += n
        }
        return out
    }

    /// Rows of the embedding table, widened to fp32. `[T, D]`
    private func embedTokens(_ tokens: [Int32]) -> [Float] {
        let D = config.hiddenSize
        var x = [Float](repeating: 0, count: tokens.count * D)
        x.withUnsafeMutableBufferPointer { out in
            for (t, id) in tokens.enumerated() { embed.loadRow(Int(id), into: out.baseAddress! + t * D) }
        }
        return x
    }

    /// Self-attention with rope and grouped KV heads; projections over all N rows, rope,
    /// cache writes and attention per sequence. `[N, D]`
    private func attentionBlock(_ h: [Float], layer: MixtralLayer, index l: Int, items: [BatchItem],
                                rowStarts: [Int], rows N: Int) -> [Float] {
        let c = config, H = c.numAttentionHeads, Hkv = c.numKeyValueHeads, d = c.headDim
        var q = [Float](repeating: 0, count: N * H * d)    // [N, H, d]
        var k = [Float](repeating: 0, count: N * Hkv * d)  // [N, Hkv, d]
        var v = [Float](repeating: 0, count: N * Hkv * d)  // [N, Hkv, d]
        kernels.matmul(h, layer.q, &q, tokens: N)
        kernels.matmul(h, layer.k, &k, tokens: N)
        kernels.matmul(h, layer.v, &v, tokens: N)
        var o = [Float](repeating: 0, count: N * H * d)    // [N, H, d]
        q.withUnsafeMutableBufferPointer { qp in
            k.withUnsafeMutableBufferPointer { kp in
                v.withUnsafeMutableBufferPointer { vp in
                    o.withUnsafeMutableBufferPointer { op in
                        for (item, r) in zip(items, rowStarts) {
                            let T = item.tokens.count, start = item.cache.length
                            let qi = qp.baseAddress! + r * H * d, ki = kp.baseAddress! + r * Hkv * d
                            rope.apply(qi, heads: H, positions: start..<(start + T))
                            rope.apply(ki, heads: Hkv, positions: start..<(start + T))
                            item.cache.store(layer: l, keys: ki, values: vp.baseAddress! + r * Hkv * d, count: T)
                            let (keys, values) = item.cache.blockRows(layer: l)
                            let bs = item.cache.pool.blockSize, w = Hkv * d
                            attention(queries: qi, keys: KVRows(blocks: keys, blockSize: bs, rowWidth: w),
                                      values: KVRows(blocks: values, blockSize: bs, rowWidth: w),
                                      out: op.baseAddress! + r * H * d, tokens: T, start: start,
                                      heads: H, kvHeads: Hkv, headDim: d, window: c.slidingWindow, pool: kernels.pool)
                        }
                    }
                }
            }
        }
        var out = [Float](repeating: 0, count: N * c.hiddenSize)  // [N, D]
        kernels.matmul(o, layer.o, &out, tokens: N)
        return out
    }

    /// Sparse MoE: route each token to k experts, run each chosen expert once over all the
    /// tokens routed to it (its weights are read once per step), sum weighted outputs. `[T, D]`
    private func moeBlock(_ h: [Float], layer: MixtralLayer, index layerIndex: Int, tokens T: Int) -> [Float] {
        let c = config, D = c.hiddenSize, E = c.numLocalExperts
        var routerLogits = [Float](repeating: 0, count: T * E)  // [T, E]
        kernels.matmul(h, layer.router, &routerLogits, tokens: T)
        let choices = routeTopK(routerLogits, tokens: T, experts: E, k: c.numExpertsPerToken)
        routingObserver?(layerIndex, choices)

        let assigned = expertAssignments(choices, experts: E)  // (E) tokens routed to e
        if let executor = expertExecutor {
            return executor.runExperts(layer: layerIndex, hidden: h, assignments: assigned, tokens: T)
        }
        let start = ContinuousClock.now
        var outputs = [[Float]?](repeating: nil, count: E)
        for e in 0..<E where !assigned[e].isEmpty {
            outputs[e] = expertFFN(gatherRows(h, assigned[e], dim: D, pool: kernels.pool), layer: layerIndex, expert: e, tokens: assigned[e].count)
        }
        expertUsage.addCPU(tokenExperts: T * c.numExpertsPerToken, seconds: secondsSince(start))
        return combineExperts(outputs, assigned, tokens: T, dim: D, pool: kernels.pool)
    }

    /// SwiGLU expert `(layer, expert)` on the CPU: `w2(silu(w1 x) * w3 x)`, on its quantized
    /// weights when it has them. x `[Te, D]` -> `[Te, D]`
    public func expertFFN(_ x: [Float], layer l: Int, expert e: Int, tokens T: Int) -> [Float] {
        let expert = layers[l].experts[e]
        var y = [Float](repeating: 0, count: T * config.hiddenSize)
        if let q = expert.quantized {
            kernels.expertFFN(x, q, &y, tokens: T)
        } else {
            kernels.expertFFN(x, gate: expert.gate, up: expert.up, down: expert.down, &y, tokens: T)
        }
        return y
    }

    func setQuantized(_ q: QuantizedExpert?, layer l: Int, expert e: Int) {
        layers[l].experts[e].quantized = q
    }

    /// The format the experts are quantized to (nil: stored dtype).
    public var expertFormat: QuantFormat? { layers.first?.experts.first?.quantized?.gate.format }

    // MARK: summary

    public var summary: ModelSummary {
        let c = config
        let total = weights.parameterCount
        let perExpert = c.parametersPerExpert
        let inactive = c.numHiddenLayers * (c.numLocalExperts - c.numExpertsPerToken) * perExpert
        return ModelSummary(
            family: "mixtral",
            settings: [
                ("hidden_size", "\(c.hiddenSize)"), ("intermediate_size", "\(c.intermediateSize)"),
                ("num_hidden_layers", "\(c.numHiddenLayers)"), ("num_attention_heads", "\(c.numAttentionHeads)"),
                ("num_key_value_heads", "\(c.numKeyValueHeads)"), ("head_dim", "\(c.headDim)"),
                ("num_local_experts", "\(c.numLocalExperts)"), ("num_experts_per_tok", "\(c.numExpertsPerToken)"),
                ("vocab_size", "\(c.vocabSize)"), ("max_position_embeddings", "\(c.maxPositionEmbeddings)"),
                ("rope_theta", "\(c.ropeTheta)"), ("rms_norm_eps", "\(c.rmsNormEps)"),
                ("sliding_window", c.slidingWindow.map(String.init) ?? "none"),
                ("tie_word_embeddings", "\(c.tieWordEmbeddings)"),
                ("bos_token_id", c.bosTokenId.map(String.init) ?? "none"),
                ("eos_token_id", eosTokenIds.map(String.init).joined(separator: ",")),
            ],
            totalParameters: total,
            activeParameters: total - inactive,
            parametersPerExpert: perExpert,
            decodeBytesPerToken: decodeBytes(total: total, inactive: inactive),
            bytesByDType: weights.bytesByDType(),
            files: weights.filePaths)
    }
}

extension MixtralModel {
    /// Active weights at their stored size, minus the embedding table unless the lm_head is
    /// it; quantized experts at their quantized size.
    func decodeBytes(total: Int, inactive: Int) -> Int {
        let bytes = weights.bytesByDType().values.reduce(0, +)
        let perParameter = Double(bytes) / Double(max(total, 1))
        let embedding = config.tieWordEmbeddings ? 0 : config.vocabSize * config.hiddenSize
        let stored = Int(Double(total - inactive - embedding) * perParameter)
        guard let q = layers.first?.experts.first?.quantized else { return stored }
        let active = config.numHiddenLayers * config.numExpertsPerToken
        return stored - Int(Double(active * config.parametersPerExpert) * perParameter) + active * q.byteCount
    }
}

/// One token routed to an expert, with the router's weight for it.
public struct ExpertAssignment: Sendable, Equatable {
    public var token: Int
    public var weight: Float
    public init(token: Int, weight: Float) {
        self.token = token
        self.weight = weight
    }
}

/// Runs one MoE layer's routed experts (the seam between the model and the offload executor).
public protocol ExpertExecutor: AnyObject {
    /// `[T, D]`: for every token, the router-weighted sum of its experts' outputs, summed in
    /// ascending expert order (`combineExperts`), so the result does not depend on where
    /// each expert ran. `assignments[e]`: the tokens routed to expert e.
    func runExperts(layer: Int, hidden h: [Float], assignments: [[ExpertAssignment]], tokens T: Int) -> [Float]

    /// The same step for a model whose hidden state and MoE output also live on the
    /// executor's device (`activations`): the device's experts read their rows there and add
    /// their weighted outputs into the output there, so only the CPU's part crosses to the
    /// device, to be added there as well. A token's terms are then summed in the order they
    /// arrive rather than by expert (the same float sum for two experts per token, as
    /// Mixtral's). nil: not possible here (the caller takes `runExperts` above).
    func runExperts(layer: Int, hidden h: [Float], assignments: [[ExpertAssignment]], tokens T: Int,
                    on activations: any DeviceActivations) -> DeviceStepOutput?
}

extension ExpertExecutor {
    public func runExperts(layer: Int, hidden h: [Float], assignments: [[ExpertAssignment]], tokens T: Int,
                           on activations: any DeviceActivations) -> DeviceStepOutput? { nil }
}

/// A step's hidden state `[T, D]` and MoE output `[T, D]` where an accelerator keeps them
/// (opaque here: the device they belong to reads them).
public protocol DeviceActivations: AnyObject {}

/// What a step run on device-resident activations left for the caller.
public enum DeviceStepOutput {
    /// The device's experts' weighted outputs are in the device output; add the CPU's experts'
    /// (in ascending expert order: each one's tokens with their router weights, and its
    /// output rows `[Te, D]`) to it.
    case added(cpu: [(rows: [ExpertAssignment], output: [Float])])
    /// The device's work failed and everything ran on the host: the output is this `[T, D]`.
    case replaced([Float])
}

/// Per expert, the tokens the router sent to it with their weights, in token order. `(E)`
public func expertAssignments(_ choices: [ExpertChoice], experts E: Int) -> [[ExpertAssignment]] {
    var assigned = [[ExpertAssignment]](repeating: [], count: E)
    for (t, choice) in choices.enumerated() {
        for (e, w) in zip(choice.experts, choice.weights) { assigned[e].append(ExpertAssignment(token: t, weight: w)) }
    }
    return assigned
}

/// The rows of `h` `[T, D]` routed to one expert, packed. `[Te, D]`. With `pool`, large
/// gathers (prompts) are spread over it.
public func gatherRows(_ h: [Float], _ rows: [ExpertAssignment], dim D: Int, pool: ThreadPool? = nil) -> [Float] {
    [Float](unsafeUninitializedCapacity: rows.count * D) { out, count in
        h.withUnsafeBufferPointer { src in
            let o = Unchecked(out.baseAddress!), s = Unchecked(src.baseAddress!)
            forBlocks(rows.count, rowFloats: D, pool: pool) { range in
                for i in range { (o.value + i * D).update(from: s.value + rows[i].token * D, count: D) }
            }
        }
        count = rows.count * D
    }
}

/// `[T, D]`: each expert's outputs `[Te, D]` (nil where no token went) weighted by the
/// router and summed per token in ascending expert order. With `pool`, large steps are
/// spread over tokens (each token's sum keeps the same order, so the result is identical).
public func combineExperts(_ outputs: [[Float]?], _ assigned: [[ExpertAssignment]], tokens T: Int, dim D: Int,
                           pool: ThreadPool? = nil) -> [Float] {
    // Per token, its (expert, row) pairs in ascending expert order.
    var terms = [[(expert: Int, row: Int, weight: Float)]](repeating: [], count: T)
    for (e, rows) in assigned.enumerated() where outputs[e] != nil {
        for (i, r) in rows.enumerated() { terms[r.token].append((e, i, r.weight)) }
    }
    var out = [Float](repeating: 0, count: T * D)
    withPointers(outputs) { sources in
        out.withUnsafeMutableBufferPointer { o in
            let base = Unchecked(o.baseAddress!), src = Unchecked(sources)
            forBlocks(T, rowFloats: D, pool: pool) { range in
                for t in range {
                    let dst = base.value + t * D
                    for term in terms[t] {
                        let y = src.value[term.expert]! + term.row * D, w = term.weight
                        for j in 0..<D { dst[j] += w * y[j] }
                    }
                }
            }
        }
    }
    return out
}

/// `body` with the base address of every array (nil where there is none), all valid at once.
func withPointers(_ arrays: [[Float]?], _ body: ([UnsafePointer<Float>?]) -> Void) {
    var pointers: [UnsafePointer<Float>?] = []
    func next(_ i: Int) {
        guard i < arrays.count else { return body(pointers) }
        guard let a = arrays[i] else {
            pointers.append(nil)
            return next(i + 1)
        }
        a.withUnsafeBufferPointer { p in
            pointers.append(p.baseAddress)
            next(i + 1)
        }
    }
    next(0)
}

/// Runs `body` over `0..<count` rows of `rowFloats` floats: in blocks over `pool` when the
/// rows hold at least 1 MiB, else in one call.
func forBlocks(_ count: Int, rowFloats: Int, pool: ThreadPool?, _ body: (Range<Int>) -> Void) {
    guard let pool, pool.threadCount > 1, count * rowFloats * 4 >= 1 << 20 else { body(0..<count); return }
    let blocks = min(pool.threadCount * 4, count), per = (count + blocks - 1) / blocks
    pool.parallelFor(blocks) { b in
        let range = min(count, b * per)..<min(count, (b + 1) * per)  // the last blocks may be empty
        if !range.isEmpty { body(range) }
    }
}

/// `x += y`, elementwise.
@inline(__always)
func add(_ y: [Float], into x: inout [Float]) {
    for i in x.indices { x[i] += y[i] }
}
