import DuetCore
#if canImport(Glibc)
import Glibc
#endif
import DuetCPU
import DuetModels

/// A Mixtral model entirely on the GPU (the `gpu-only` strategy's model): every weight
/// uploaded once within the budget, one sequence's KV cache on the device, and only the
/// router's choices (a few ids per token) and the logits copied back to the host.
///
/// Shape letters as in DuetModels/Mixtral.swift.
public final class GPUMixtral {
    public let config: MixtralConfiguration
    let gpu: GPU
    /// The device the model lives on.
    public var device: GPU { gpu }
    let ops: GPUOps
    /// Expert work done so far (all of it on the GPU here).
    public let expertUsage = ExpertUsage()

    /// A matrix on the device in its stored dtype.
    struct Matrix {
        let buffer: DeviceBuffer
        let rows: Int
        let cols: Int
        let dtype: DType
    }
    struct Layer {
        let inputNorm, postAttentionNorm: DeviceBuffer
        let q, k, v, o, router: Matrix
        let experts: [(gate: Matrix, up: Matrix, down: Matrix)]
        /// Device pointer tables `[E]` of the experts' w1, w3, w2 (bf16 experts only): the fused
        /// decode path finds the chosen experts through them without a host round trip.
        let expertTables: (gate: DeviceBuffer, up: DeviceBuffer, down: DeviceBuffer)?
    }

    /// Token counts up to this run the MoE with the fused kernels (no host round trip);
    /// larger steps (prefill) gather each expert's tokens and run it once over them.
    public var fusedMoEMaxTokens = 4
    let embed: Matrix
    let layers: [Layer]
    let norm: DeviceBuffer
    let lmHead: Matrix
    let inverseFrequencies: DeviceBuffer
    /// (layer) keys / values [sequences, maxPositions, Hkv, d]: one region per sequence slot.
    let keys: [DeviceBuffer]
    let values: [DeviceBuffer]
    /// Positions filled in slot 0 (the single-sequence `forward(_:)`).
    public private(set) var length = 0
    /// Positions the GPU's KV cache holds per sequence, and the sequences it holds.
    public let maxPositions: Int
    public let sequences: Int
    /// Floats of one sequence's region of a layer's keys or values: `[maxPositions, Hkv, d]`.
    let regionFloats: Int

    /// Runs the MoE layers instead of the experts on this GPU (Fiddler's layout: the
    /// non-expert weights here, the experts placed by the offload executor). One copy of
    /// the layer's normed hidden state and router logits down, one of the result up.
    public var expertExecutor: (any ExpertExecutor)?

    /// Where the host's time goes around the offloaded MoE layers (seconds, accumulated):
    /// issuing a layer's dense kernels, waiting for them and copying the hidden state and
    /// router logits down, routing on the host, and queueing the result's upload.
    public struct OffloadTiming: Sendable {
        public var issueSeconds = 0.0
        public var downloadSeconds = 0.0
        public var routeSeconds = 0.0
        public var uploadSeconds = 0.0
        /// What accumulated after `earlier` (nil: from the start).
        public func since(_ earlier: OffloadTiming?) -> OffloadTiming {
            guard let earlier else { return self }
            return OffloadTiming(issueSeconds: issueSeconds - earlier.issueSeconds, downloadSeconds: downloadSeconds - earlier.downloadSeconds,
                                 routeSeconds: routeSeconds - earlier.routeSeconds, uploadSeconds: uploadSeconds - earlier.uploadSeconds)
        }
    }
    public private(set) var offloadTiming = OffloadTiming()

    /// Uploads `model`'s weights (without the experts unless `experts`); `maxPositions`
    /// bounds the KV cache (default: the model's).
    /// `sequences`: KV cache regions (beams, batches) of `maxPositions` each.
    public init(_ model: MixtralModel, gpu: GPU, maxPositions: Int? = nil, sequences: Int = 1, experts uploadExperts: Bool = true) throws(CUDAError) {
        self.gpu = gpu
        ops = GPUOps(gpu: gpu)
        config = model.config
        func upload(_ w: WeightMatrix) throws(CUDAError) -> Matrix {
            guard w.dtype != .f16 else { throw .unavailable("f16 weights are not supported on the GPU yet (\(w.view.name))") }
            let b = try gpu.upload(bytes: UnsafeRawBufferPointer(start: w.view.base, count: w.byteCount), category: "weights")
            return Matrix(buffer: b, rows: w.rows, cols: w.cols, dtype: w.dtype)
        }
        embed = try upload(model.embed)
        lmHead = config.tieWordEmbeddings ? embed : try upload(model.lmHead)
        norm = try gpu.upload(model.norm, category: "weights")
        layers = try model.layers.map { (l) throws(CUDAError) -> Layer in
            let experts = uploadExperts ? try l.experts.map { (e) throws(CUDAError) in (gate: try upload(e.gate), up: try upload(e.up), down: try upload(e.down)) } : []
            func table(_ pick: ((gate: Matrix, up: Matrix, down: Matrix)) -> Matrix) throws(CUDAError) -> DeviceBuffer {
                try gpu.upload(array: experts.map { UInt64(pick($0).buffer.pointer) }, category: "weights")
            }
            let allBF16 = !experts.isEmpty && experts.allSatisfy { $0.gate.dtype == .bf16 && $0.up.dtype == .bf16 && $0.down.dtype == .bf16 }
            return Layer(inputNorm: try gpu.upload(l.inputNorm, category: "weights"), postAttentionNorm: try gpu.upload(l.postAttentionNorm, category: "weights"),
                         q: try upload(l.q), k: try upload(l.k), v: try upload(l.v), o: try upload(l.o), router: try upload(l.router),
                         experts: experts,
                         expertTables: allBF16 ? (try table(\.gate), try table(\.up), try table(\.down)) : nil)
        }
        inverseFrequencies = try gpu.upload(model.rope.inverseFrequencies, category: "weights")
        self.maxPositions = min(maxPositions ?? config.maxPositionEmbeddings, config.maxPositionEmbeddings)
        self.sequences = max(1, sequences)
        regionFloats = self.maxPositions * config.numKeyValueHeads * config.headDim
        let kvFloats = self.sequences * regionFloats
        keys = try (0..<config.numHiddenLayers).map { (_) throws(CUDAError) in try gpu.allocate(kvFloats * 4, category: "kv cache") }
        values = try (0..<config.numHiddenLayers).map { (_) throws(CUDAError) in try gpu.allocate(kvFloats * 4, category: "kv cache") }
    }

    /// Device bytes the non-expert part takes before any step runs, as `init` allocates them
    /// without the experts: the matrices at `bytesPerWeight` (the checkpoint's dtype: 2 for
    /// bf16), the norms and rope frequencies in fp32, and fp32 keys and values for
    /// `sequences` x `maxPositions` positions. (`duet plan` sizes the dense-on-GPU layout with it.)
    public static func denseBytes(_ c: MixtralConfiguration, bytesPerWeight: Int, maxPositions: Int, sequences: Int = 1) -> Int {
        let D = c.hiddenSize, L = c.numHiddenLayers, qd = c.numAttentionHeads * c.headDim, kvd = c.numKeyValueHeads * c.headDim
        let perLayer = D * qd * 2 + D * kvd * 2 + c.numLocalExperts * D  // q and o, k and v, router
        let matrices = (c.tieWordEmbeddings ? 1 : 2) * c.vocabSize * D + L * perLayer
        let norms = (2 * L + 1) * D, frequencies = c.headDim / 2
        let kv = 2 * L * max(1, sequences) * min(maxPositions, c.maxPositionEmbeddings) * kvd
        return matrices * bytesPerWeight + (norms + frequencies + kv) * 4
    }

    /// Workspace a forward of `tokens` tokens allocates with the experts offloaded (the
    /// recycled buffers are rounded up to powers of two), so a budget can keep it free.
    public static func workspaceBytes(_ c: MixtralConfiguration, tokens T: Int) -> Int {
        func rounded(_ floats: Int) -> Int { GPU.workspaceSizeClass(floats * 4) }
        let D = c.hiddenSize, qd = c.numAttentionHeads * c.headDim, kvd = c.numKeyValueHeads * c.headDim
        // ids, x/attn/moe, routed, q/o, k/v, last/normed, out, the last row's index (no fused
        // MoE: the offload executor runs the experts).
        return rounded(T) + 3 * rounded(T * D) + rounded(T * D + T * c.numLocalExperts) + 2 * rounded(T * qd) + 2 * rounded(T * kvd)
            + 2 * rounded(D) + rounded(c.vocabSize) + rounded(1)
    }

    /// Weight bytes one decode step (one token, every expert on this GPU, the fused MoE) reads,
    /// by the name of the kernel that reads them: the benchmark's per-kernel HBM fractions.
    public var decodeWeightBytesByKernel: [String: Int] {
        var bytes: [String: Int] = [:]
        func add(_ w: Matrix, _ kernel: String? = nil) {
            bytes[kernel ?? (w.dtype == .bf16 ? "gemv_bf16" : "gemv_f32"), default: 0] += w.rows * w.cols * w.dtype.size
        }
        let k = config.numExpertsPerToken
        for layer in layers {
            let fusedQKV = layer.q.dtype == .bf16 && layer.k.dtype == .bf16 && layer.v.dtype == .bf16
            for w in [layer.q, layer.k, layer.v] { add(w, fusedQKV ? "gemv3_bf16" : nil) }
            add(layer.o)
            add(layer.router, layer.expertTables != nil && Self.fusesRouter(layer.router, experts: config.numLocalExperts) ? "add_norm_router_topk_bf16" : nil)
            if layer.expertTables != nil, let e = layer.experts.first {
                bytes["moe_gate_up_bf16", default: 0] += k * (e.gate.rows * e.gate.cols + e.up.rows * e.up.cols) * 2
                bytes["moe_down_bf16", default: 0] += k * e.down.rows * e.down.cols * 2
            }
        }
        add(lmHead)
        return bytes
    }

    /// Forgets the sequence.
    public func reset() { length = 0 }

    /// Forgets every position from `newLength` on (later writes overwrite them).
    public func truncate(_ newLength: Int) { length = min(length, max(0, newLength)) }

    private func matmul(_ x: DeviceBuffer, _ w: Matrix, _ y: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        if w.dtype == .bf16 { try ops.matmulBF16(x, w.buffer, y, rows: w.rows, cols: w.cols, tokens: T) }
        else { try ops.matmulF32(x, w.buffer, y, rows: w.rows, cols: w.cols, tokens: T) }
    }

    /// Host time of the last `forward` until its final copy back: issuing launches and any
    /// synchronous copies in between (when it is near the whole step, the host is the limit).
    public private(set) var lastIssueSeconds = 0.0

    /// Decode steps run as one CUDA graph (captured at the first step that can use it): the
    /// whole model on this GPU with bf16 experts (the fused MoE path, no host round trip),
    /// one token, within the positions the captured attention launch allows. Off: every
    /// step is launched kernel by kernel.
    public var usesDecodeGraph = true
    /// Decode steps the graph has run, and the kernels it holds.
    public private(set) var decodeGraphSteps = 0
    public var decodeGraphKernels: Int { decodeGraph?.kernels ?? 0 }
    private var decodeGraph: DecodeGraph?
    private var decodeGraphFailed = false
    /// Set while the decode graph is captured (its launches compute nothing yet).
    private var capturing = false

    /// The buffers one forward of `T` tokens works in (from the recycled workspace).
    struct Workspace {
        let x, q, k, v, o, attn, moe: DeviceBuffer
        /// The normed hidden state `[T, D]` and the router logits `[T, E]` side by side: one
        /// wait brings both down (offload path).
        let routed, h, logits: DeviceBuffer
        /// The fused MoE's choices `[T, k]`, weights `[T, k]` and hidden activations `[T * k, F]`
        /// (nil when the step does not take that path).
        let expertIds, expertWeights, expertHidden: DeviceBuffer?
        let last, normed, out: DeviceBuffer

        /// `allLogits`: the final norm and logits for every token (`normed` `[T, D]`, `out` `[T, V]`).
        init(_ c: MixtralConfiguration, gpu: GPU, tokens T: Int, fusedMoE: Bool, allLogits: Bool = false) throws(CUDAError) {
            func buffer(_ floats: Int) throws(CUDAError) -> DeviceBuffer { try gpu.allocate(max(floats, 1) * 4, category: GPU.workspace) }
            let D = c.hiddenSize, E = c.numLocalExperts, k = c.numExpertsPerToken
            x = try buffer(T * D)
            q = try buffer(T * c.numAttentionHeads * c.headDim); o = try buffer(T * c.numAttentionHeads * c.headDim)
            self.k = try buffer(T * c.numKeyValueHeads * c.headDim); v = try buffer(T * c.numKeyValueHeads * c.headDim)
            attn = try buffer(T * D); moe = try buffer(T * D)
            routed = try buffer(T * D + T * E)
            h = routed.view(offset: 0, bytes: T * D * 4); logits = routed.view(offset: T * D * 4, bytes: T * E * 4)
            if fusedMoE {
                expertIds = try buffer(T * k); expertWeights = try buffer(T * k); expertHidden = try buffer(T * k * c.intermediateSize)
            } else {
                (expertIds, expertWeights, expertHidden) = (nil, nil, nil)
            }
            last = T > 1 ? try buffer(D) : x
            normed = try buffer(allLogits ? T * D : D); out = try buffer(allLogits ? T * c.vocabSize : c.vocabSize)
        }
    }

    /// Runs `tokens` at the next positions of slot 0 and returns the last token's logits `[V]`.
    public func forward(_ tokens: [Int32]) throws(CUDAError) -> [Float] {
        let logits = try forward(tokens, slot: 0, start: length)
        length += tokens.count
        return logits
    }

    /// Runs `tokens` at positions `start...` of sequence `slot` (earlier positions there are
    /// its history) and returns the last token's logits `[V]`.
    public func forward(_ tokens: [Int32], slot: Int, start: Int) throws(CUDAError) -> [Float] {
        let issueStart = ContinuousClock.now
        let T = tokens.count
        guard T > 0, start + T <= maxPositions else { throw .unavailable("sequence of \(start + T) positions exceeds the GPU cache of \(maxPositions)") }
        guard slot >= 0, slot < sequences else { throw .unavailable("sequence slot \(slot) of \(sequences)") }
        if T == 1, slot == 0, let graph = try graphForDecode(at: start) {
            let logits = try graph.run(token: tokens[0], position: start)
            decodeGraphSteps += 1
            expertUsage.addGPU(tokenExperts: layers.count * config.numExpertsPerToken, seconds: 0)
            lastIssueSeconds = secondsSince(issueStart)
            return logits
        }
        let work = try Workspace(config, gpu: gpu, tokens: T, fusedMoE: usesFusedMoE(tokens: T))
        let ids = try gpu.upload(array: tokens, category: GPU.workspace)
        let lastIndex = T > 1 ? try gpu.upload(array: [Int32(T - 1)], category: GPU.workspace) : nil
        try issueStep(ids: ids, lastIndex: lastIndex, work, tokens: T, places: .sequence(slot: slot, start: start, startAt: nil))
        lastIssueSeconds = secondsSince(issueStart)
        return try gpu.download(work.out, count: config.vocabSize)
    }

    /// One token for each of several sequences (beams, a batch): token i at `places[i]`
    /// (its slot and position; distinct slots). The dense layers run over all of them at
    /// once, attention per sequence over its own slot. Returns each token's logits `[V]`.
    public func forwardBatch(_ tokens: [Int32], at places: [(slot: Int, position: Int)]) throws(CUDAError) -> [[Float]] {
        let issueStart = ContinuousClock.now
        let T = tokens.count, V = config.vocabSize
        guard T > 0, places.count == T else { throw .unavailable("a batch needs one place per token") }
        for p in places where p.slot < 0 || p.slot >= sequences || p.position + 1 > maxPositions {
            throw .unavailable("sequence slot \(p.slot) at position \(p.position) is outside the GPU cache (\(sequences) x \(maxPositions))")
        }
        let work = try Workspace(config, gpu: gpu, tokens: T, fusedMoE: usesFusedMoE(tokens: T), allLogits: true)
        // The ids and, where one launch can attend for all of them, each token's (slot,
        // position) go up in one copy.
        let longest = places.map { $0.position + 1 }.max()!
        let batched = longest <= GPUOps.attentionPlacesMaxPositions
        let table = batched ? places.flatMap { [Int32($0.slot), Int32($0.position)] } : []
        let up = try gpu.upload(array: tokens + table, category: GPU.workspace)
        let ids = up.view(offset: 0, bytes: T * 4)
        let sequencePlaces = batched ? SequencePlaces(table: up.view(offset: T * 4, bytes: 2 * T * 4), regionFloats: regionFloats, positions: longest) : nil
        try issueStep(ids: ids, lastIndex: nil, work, tokens: T, places: .tokens(places, sequencePlaces))
        lastIssueSeconds = secondsSince(issueStart)
        let all = try gpu.download(work.out, count: T * V)
        return (0..<T).map { Array(all[($0 * V)..<(($0 + 1) * V)]) }
    }

    /// Copies positions `0..<rows` of every layer's keys and values from slot `from` to slot
    /// `to` (a forked sequence that cannot take its parent's slot over).
    public func copySequence(from: Int, to: Int, rows: Int) throws(CUDAError) {
        guard rows > 0, from != to else { return }
        let bytes = rows * config.numKeyValueHeads * config.headDim * 4
        for l in layers.indices {
            for cache in [keys[l], values[l]] {
                let (src, dst) = (slotRows(cache, from), slotRows(cache, to))
                try gpu.copyAsync(from: src, to: dst, bytes: bytes)
            }
        }
    }

    /// Sequence `slot`'s region `[maxPositions, Hkv, d]` of one layer's keys or values.
    private func slotRows(_ cache: DeviceBuffer, _ slot: Int) -> DeviceBuffer {
        cache.view(offset: slot * regionFloats * 4, bytes: regionFloats * 4)
    }

    /// Where a step's tokens sit: consecutive positions of one sequence from `start` (or, in
    /// the captured decode step, from the position `startAt` holds, `start` being the
    /// largest it may be), or one token per sequence (with the same list on the device when
    /// one launch can attend for all of them).
    enum Places {
        case sequence(slot: Int, start: Int, startAt: DeviceBuffer?)
        case tokens([(slot: Int, position: Int)], SequencePlaces?)
    }

    /// Issues one step's kernels: embedding, every layer, the final norm and lm_head of the last
    /// token into `work.out` (of every token, for `.tokens` places).
    private func issueStep(ids: DeviceBuffer, lastIndex: DeviceBuffer?, _ work: Workspace, tokens T: Int, places: Places) throws(CUDAError) {
        let c = config, D = c.hiddenSize, H = c.numAttentionHeads, Hkv = c.numKeyValueHeads, d = c.headDim
        let x = work.x, h = work.h, logits = work.logits
        try embedRows(ids, into: x, tokens: T)
        // Each residual add rides on the norm that follows it (one launch for both); an MoE
        // output waits in `pending` for the next layer's input norm.
        var pending: DeviceBuffer? = nil
        for (l, layer) in layers.enumerated() {
            let layerStart = ContinuousClock.now
            if let p = pending {
                try ops.addRMSNorm(x, adding: p, weight: layer.inputNorm, h, tokens: T, dim: D, eps: c.rmsNormEps)
                pending = nil
            } else {
                try ops.rmsNorm(x, weight: layer.inputNorm, h, tokens: T, dim: D, eps: c.rmsNormEps)
            }
            try projectQKV(h, layer, work.q, work.k, work.v, tokens: T)
            switch places {
            case .sequence(let slot, let start, let startAt):
                let (k, v) = (slotRows(keys[l], slot), slotRows(values[l], slot))
                try ops.ropeStore(q: work.q, k: work.k, v: work.v, keys: k, values: v, inverseFrequencies: inverseFrequencies,
                                  tokens: T, heads: H, kvHeads: Hkv, headDim: d, start: start, startAt: startAt)
                try ops.attention(queries: work.q, keys: k, values: v, out: work.o, tokens: T, start: start, startAt: startAt,
                                  heads: H, kvHeads: Hkv, headDim: d, window: c.slidingWindow)
            case .tokens(_, let places?):
                try ops.ropeStore(q: work.q, k: work.k, v: work.v, keys: keys[l], values: values[l], inverseFrequencies: inverseFrequencies,
                                  tokens: T, heads: H, kvHeads: Hkv, headDim: d, start: 0, places: places)
                try ops.attention(queries: work.q, keys: keys[l], values: values[l], out: work.o, places: places,
                                  tokens: T, heads: H, kvHeads: Hkv, headDim: d, window: c.slidingWindow)
            case .tokens(let list, nil):
                // Token i: its row of q, k, v and o, its sequence's keys and values.
                let qRow = H * d * 4, kvRow = Hkv * d * 4
                for (i, p) in list.enumerated() {
                    let (k, v) = (slotRows(keys[l], p.slot), slotRows(values[l], p.slot))
                    let q = work.q.view(offset: i * qRow, bytes: qRow), o = work.o.view(offset: i * qRow, bytes: qRow)
                    try ops.ropeStore(q: q, k: work.k.view(offset: i * kvRow, bytes: kvRow), v: work.v.view(offset: i * kvRow, bytes: kvRow),
                                      keys: k, values: v, inverseFrequencies: inverseFrequencies,
                                      tokens: 1, heads: H, kvHeads: Hkv, headDim: d, start: p.position)
                    try ops.attention(queries: q, keys: k, values: v, out: o, tokens: 1, start: p.position,
                                      heads: H, kvHeads: Hkv, headDim: d, window: c.slidingWindow)
                }
            }
            try matmul(work.o, layer.o, work.attn, tokens: T)
            if let tables = layer.expertTables, usesFusedMoE(tokens: T) {
                try fusedExperts(h, tables: tables, layer: layer, routerLogits: logits, work, addingInto: x, tokens: T)
                continue
            }
            try ops.addRMSNorm(x, adding: work.attn, weight: layer.postAttentionNorm, h, tokens: T, dim: D, eps: c.rmsNormEps)
            try matmul(h, layer.router, logits, tokens: T)
            if let executor = expertExecutor {
                offloadTiming.issueSeconds += secondsSince(layerStart)
                try offloadExperts(h, routerLogits: logits, layer: l, executor: executor, into: work.moe, tokens: T)
            } else {
                try experts(h, layer: layer, routerLogits: logits, into: work.moe, tokens: T)
            }
            pending = work.moe
        }
        if let p = pending { try ops.add(x, p, count: T * D) }
        if case .tokens = places {  // every token's logits
            try ops.rmsNorm(x, weight: norm, work.normed, tokens: T, dim: D, eps: c.rmsNormEps)
            return try matmul(work.normed, lmHead, work.out, tokens: T)
        }
        // Final norm and lm_head for the last token only.
        if let lastIndex { try ops.gatherRows(x, indices: lastIndex, work.last, rows: 1, dim: D) }
        try ops.rmsNorm(work.last, weight: norm, work.normed, tokens: 1, dim: D, eps: c.rmsNormEps)
        try matmul(work.normed, lmHead, work.out, tokens: 1)
    }

    /// Whether the fused MoE computes the norm, the router's logits and the top-k in one launch (bf16 router).
    static func fusesRouter(_ router: Matrix, experts E: Int) -> Bool { router.dtype == .bf16 && E <= 32 }

    /// Whether a step of `T` tokens runs the MoE with the fused kernels (bf16 experts here).
    private func usesFusedMoE(tokens T: Int) -> Bool {
        expertExecutor == nil && T <= fusedMoEMaxTokens && layers.contains { $0.expertTables != nil }
    }

    /// The decode graph when this step can use it (captured now if not yet), else nil. A
    /// capture that fails says why once and leaves decoding launch by launch.
    private func graphForDecode(at position: Int) throws(CUDAError) -> DecodeGraph? {
        guard usesDecodeGraph, !decodeGraphFailed, !gpu.timesKernels,
              layers.allSatisfy({ $0.expertTables != nil }), usesFusedMoE(tokens: 1),
              position < DecodeGraph.positions(maxPositions) else { return nil }
        if let decodeGraph { return decodeGraph }
        capturing = true
        defer { capturing = false }
        do {
            decodeGraph = try DecodeGraph(gpu: gpu, workspace: Workspace(config, gpu: gpu, tokens: 1, fusedMoE: true), vocabSize: config.vocabSize,
                                          positions: DecodeGraph.positions(maxPositions)) { (ids, start, work, positions) throws(CUDAError) in
                try issueStep(ids: ids, lastIndex: nil, work, tokens: 1, places: .sequence(slot: 0, start: positions - 1, startAt: start))
            }
        } catch {
            decodeGraphFailed = true
            let line = "warning: decode steps are launched one by one (\(error))\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
        }
        return decodeGraph
    }

    /// q, k, v `[T, *]` = h W^T for the layer's three projections: one GEMV launch for all
    /// three where they are bf16 and the step is GEMV-sized, else one matmul each.
    private func projectQKV(_ h: DeviceBuffer, _ layer: Layer, _ q: DeviceBuffer, _ k: DeviceBuffer, _ v: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        if T < gpu.gemmMinTokens, layer.q.dtype == .bf16, layer.k.dtype == .bf16, layer.v.dtype == .bf16 {
            return try ops.gemv3BF16(h, (layer.q.buffer, layer.k.buffer, layer.v.buffer), (q, k, v),
                                     rows: (layer.q.rows, layer.k.rows, layer.v.rows), cols: layer.q.cols, tokens: T)
        }
        try matmul(h, layer.q, q, tokens: T)
        try matmul(h, layer.k, k, tokens: T)
        try matmul(h, layer.v, v, tokens: T)
    }

    private func embedRows(_ ids: DeviceBuffer, into x: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        if embed.dtype == .bf16 {
            try ops.embedBF16(embed.buffer, ids: ids, x, tokens: T, dim: config.hiddenSize)
        } else {
            try ops.gatherRows(embed.buffer, indices: ids, x, rows: T, dim: config.hiddenSize)
        }
    }

    /// Steps of at least this many tokens (prompts) let an expert device on this GPU read the
    /// hidden state and add into the MoE output here; smaller ones (decode: a few rows, where
    /// the extra launches would cost more than the copies) send their rows through the host.
    public var residentActivationsMinTokens = 16

    /// The MoE through the offload executor: the normed hidden state `[T, D]` and router logits
    /// `[T, E]` come down, the router runs on the host exactly as on the CPU path, and the
    /// executor's combined expert output `[T, D]` goes up into `out` — or, for large steps
    /// with the executor's device on this GPU, its experts add into `out` here and only the
    /// CPU's experts' rows go up, to be added there too (`addRows`).
    private func offloadExperts(_ h: DeviceBuffer, routerLogits: DeviceBuffer, layer l: Int, executor: any ExpertExecutor,
                                into out: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        let c = config, D = c.hiddenSize, E = c.numLocalExperts
        var start = ContinuousClock.now
        let down = try gpu.download([(h, T * D), (routerLogits, T * E)])
        offloadTiming.downloadSeconds += secondsSince(start)
        start = ContinuousClock.now
        let assignments = expertAssignments(DuetCPU.routeTopK(down[1], tokens: T, experts: E, k: c.numExpertsPerToken), experts: E)
        offloadTiming.routeSeconds += secondsSince(start)
        if T >= residentActivationsMinTokens,
           let result = executor.runExperts(layer: l, hidden: down[0], assignments: assignments, tokens: T,
                                            on: GPUActivations(hidden: h, output: out, tokens: T)) {
            start = ContinuousClock.now
            switch result {
            case .added(let cpu): try addRows(cpu, into: out)
            case .replaced(let y): try gpu.uploadAsync(y, into: out)
            }
            offloadTiming.uploadSeconds += secondsSince(start)
            return
        }
        let y = executor.runExperts(layer: l, hidden: down[0], assignments: assignments, tokens: T)
        start = ContinuousClock.now
        try gpu.uploadAsync(y, into: out)
        offloadTiming.uploadSeconds += secondsSince(start)
    }

    /// out `[T, D]` += each part's output rows times their router weights, at their tokens: the
    /// rows `[Σ Te, D]` with each row's token and weight go up in one copy, then are added
    /// expert by expert (a part is an expert), in the parts' order.
    private func addRows(_ parts: [(rows: [ExpertAssignment], output: [Float])], into out: DeviceBuffer) throws(CUDAError) {
        let D = config.hiddenSize, n = parts.reduce(0) { $0 + $1.rows.count }
        guard n > 0 else { return }
        // Tokens ride along as the bit patterns of floats, so one staged copy carries everything.
        let routes = parts.flatMap { $0.rows.map { Float(bitPattern: UInt32(truncatingIfNeeded: $0.token)) } } + parts.flatMap { $0.rows.map(\.weight) }
        let staged = try gpu.allocate((n * D + 2 * n) * 4, category: GPU.workspace)
        try gpu.uploadAsync(parts.map(\.output) + [routes], into: staged)
        try ops.scatterAddExpertRows(out, staged, indices: staged.view(offset: n * D * 4, bytes: n * 4), weights: staged.view(offset: (n * D + n) * 4, bytes: n * 4),
                                     groups: parts.map(\.rows.count), dim: D)
    }

    /// The MoE half of a layer on the GPU without a host round trip (bf16 experts, few
    /// tokens): the post-attention residual add and norm with the router and its top-k (one
    /// launch for a bf16 router), then gate/up and down through the pointer tables, the
    /// weighted sum added into the residual stream x `[T, D]`.
    private func fusedExperts(_ h: DeviceBuffer, tables: (gate: DeviceBuffer, up: DeviceBuffer, down: DeviceBuffer), layer: Layer,
                              routerLogits: DeviceBuffer, _ work: Workspace, addingInto x: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        let c = config, k = c.numExpertsPerToken, F = c.intermediateSize, D = c.hiddenSize
        let start = ContinuousClock.now
        defer { if !capturing { expertUsage.addGPU(tokenExperts: T * k, seconds: secondsSince(start)) } }
        guard let ids = work.expertIds, let weights = work.expertWeights, let hidden = work.expertHidden else {  // hidden [T * k, F]
            throw .unavailable("no fused-MoE workspace for this step")
        }
        if Self.fusesRouter(layer.router, experts: c.numLocalExperts) {
            try ops.addNormRouterTopK(x, adding: work.attn, weight: layer.postAttentionNorm, h, eps: c.rmsNormEps,
                                      router: layer.router.buffer, logits: routerLogits, experts: ids, weights: weights,
                                      tokens: T, experts: c.numLocalExperts, dim: D, k: k)
        } else {
            try ops.addRMSNorm(x, adding: work.attn, weight: layer.postAttentionNorm, h, tokens: T, dim: D, eps: c.rmsNormEps)
            try matmul(h, layer.router, routerLogits, tokens: T)
            try ops.routeTopK(routerLogits, experts: ids, weights: weights, tokens: T, experts: c.numLocalExperts, k: k)
        }
        try ops.moeGateUp(w1s: tables.gate, w3s: tables.up, ids: ids, x: h, h: hidden, tokens: T, k: k, rows: F, cols: D)
        try ops.moeDownAdd(w2s: tables.down, ids: ids, weights: weights, h: hidden, x: x, tokens: T, k: k, rows: D, cols: F)
    }

    /// Routes on the GPU, copies back only the chosen ids and weights, and runs each chosen
    /// expert over its tokens: gather rows, gate/up, SiLU-multiply, down, weighted scatter-add.
    private func experts(_ h: DeviceBuffer, layer: Layer, routerLogits: DeviceBuffer, into out: DeviceBuffer, tokens T: Int) throws(CUDAError) {
        let c = config, D = c.hiddenSize, F = c.intermediateSize, k = c.numExpertsPerToken
        // Host time to route, issue and (through the next synchronous copy) wait for the experts.
        let start = ContinuousClock.now
        defer { expertUsage.addGPU(tokenExperts: T * k, seconds: secondsSince(start)) }
        let ids = try gpu.allocate(T * k * 4, category: "workspace"), weights = try gpu.allocate(T * k * 4, category: "workspace")
        try ops.routeTopK(routerLogits, experts: ids, weights: weights, tokens: T, experts: c.numLocalExperts, k: k)
        let chosen = try gpu.download(ids, count: T * k, as: Int32.self, zero: 0)
        let chosenWeights = try gpu.download(weights, count: T * k)
        var rows = [[Int32]](repeating: [], count: c.numLocalExperts), rowWeights = [[Float]](repeating: [], count: c.numLocalExperts)
        for t in 0..<T { for j in 0..<k { rows[Int(chosen[t * k + j])].append(Int32(t)); rowWeights[Int(chosen[t * k + j])].append(chosenWeights[t * k + j]) } }
        try gpu.copy([Float](repeating: 0, count: T * D), into: out)
        for e in 0..<c.numLocalExperts where !rows[e].isEmpty {
            let Te = rows[e].count, expert = layer.experts[e]
            let index = try gpu.upload(array: rows[e], category: "workspace"), w = try gpu.upload(rowWeights[e], category: "workspace")
            let xe = try gpu.allocate(Te * D * 4, category: "workspace"), g = try gpu.allocate(Te * F * 4, category: "workspace")
            let u = try gpu.allocate(Te * F * 4, category: "workspace"), y = try gpu.allocate(Te * D * 4, category: "workspace")
            try ops.gatherRows(h, indices: index, xe, rows: Te, dim: D)
            try matmul(xe, expert.gate, g, tokens: Te)
            try matmul(xe, expert.up, u, tokens: Te)
            try ops.siluMultiply(g, u, count: Te * F)
            try matmul(g, expert.down, y, tokens: Te)
            try ops.scatterAddRows(out, y, indices: index, weights: w, rows: Te, dim: D)
        }
    }
}
