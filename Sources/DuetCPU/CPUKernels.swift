import CDuetKernels
import DuetCore

/// Which CPU kernels run: `auto` picks per call from the CPU's features and the token
/// count; the others force one path (tests, equality checks, benchmarks).
public enum KernelPath: String, CaseIterable, Sendable {
    case auto
    /// Plain scalar fp32 loops: slow, simple, the path equality checks compare against.
    case reference
    /// Swift SIMD, no CPU-specific instructions: for CPUs without AVX-512.
    case portable
    /// AVX-512 F/BW/VL: bf16 widened in registers, fp32 FMA.
    case avx512
    /// AMX-BF16 tiles (activations rounded to bf16), for many tokens per weight.
    case amx
}

/// What this CPU (and OS) can run.
public struct CPUFeatures: Sendable, Equatable, CustomStringConvertible {
    public let avx512: Bool
    public let avx512bf16: Bool
    public let amx: Bool
    /// AVX512-VNNI (vpdpbusd), for the quantized kernels.
    public let vnni: Bool

    public init(avx512: Bool, avx512bf16: Bool, amx: Bool, vnni: Bool = false) {
        self.avx512 = avx512
        self.avx512bf16 = avx512bf16
        self.amx = amx
        self.vnni = vnni
    }

    public static let current: CPUFeatures = {
        let f = duet_cpu_features()
        return CPUFeatures(avx512: f & UInt32(DUET_CPU_AVX512) != 0, avx512bf16: f & UInt32(DUET_CPU_AVX512_BF16) != 0,
                           amx: f & UInt32(DUET_CPU_AMX_BF16) != 0, vnni: f & UInt32(DUET_CPU_AVX512_VNNI) != 0)
    }()

    public var description: String {
        [avx512 ? "avx512" : nil, avx512bf16 ? "avx512_bf16" : nil, vnni ? "avx512_vnni" : nil, amx ? "amx-bf16" : nil].compactMap { $0 }.joined(separator: " ")
    }
}

public enum KernelError: Error, Equatable, CustomStringConvertible {
    case unavailable(KernelPath, features: String)
    public var description: String {
        switch self {
        case .unavailable(let path, let features):
            "--kernels \(path.rawValue) is not available on this CPU (it has: \(features.isEmpty ? "none of avx512, amx" : features))"
        }
    }
}

/// The CPU kernels a model runs with: a path and a thread pool.
///
/// Shapes: x `[T, K]`, weights `[N, K]` (nn.Linear layout), outputs `[T, N]`.
public struct CPUKernels: Sendable {
    public let path: KernelPath
    public let pool: ThreadPool
    public let features: CPUFeatures
    /// From this many tokens on, `auto` uses AMX for bf16 weights (below, AVX-512 streams
    /// the weights at the memory roofline anyway).
    public var amxMinTokens = 8

    public init(_ path: KernelPath, pool: ThreadPool, features: CPUFeatures = .current) throws(KernelError) {
        switch path {
        case .avx512 where !features.avx512, .amx where !features.amx:
            throw .unavailable(path, features: features.description)
        default: break
        }
        self.path = path
        self.pool = pool
        self.features = features
    }

    /// The plain scalar path on one thread.
    public static func reference() -> CPUKernels {
        try! CPUKernels(.reference, pool: ThreadPool(threads: 1))  // reference never throws
    }

    /// The path one call takes.
    public func pathFor(_ dtype: DType, tokens T: Int) -> KernelPath {
        switch path {
        case .auto:
            if dtype == .bf16 && features.amx && T >= amxMinTokens { return .amx }
            if dtype != .f16 && features.avx512 { return .avx512 }
            return .portable
        case .amx where dtype != .bf16:
            return features.avx512 && dtype == .f32 ? .avx512 : .portable
        case .avx512 where dtype == .f16:
            return .portable
        default:
            return path
        }
    }

    /// Tasks per thread in a parallel matmul: more tasks shorten the tail where some
    /// threads wait for the last ones (tasks are handed out dynamically).
    public var tasksPerThread = 4

    /// Rows per parallel task: `tasksPerThread` tasks per thread, a multiple of 32 (AMX tiles).
    func rowBlock(_ rows: Int) -> Int {
        let tasks = pool.threadCount * tasksPerThread
        let perTask = (rows + tasks - 1) / tasks
        return max(32, (perTask + 31) / 32 * 32)
    }

    // MARK: matmul

    /// `out = x @ w^T`. x `[T, K]`, w `[N, K]`, out `[T, N]`.
    public func matmul(_ x: UnsafePointer<Float>, _ w: WeightMatrix, _ out: UnsafeMutablePointer<Float>, tokens T: Int) {
        let N = w.rows, K = w.cols
        let block = rowBlock(N)
        let blocks = (N + block - 1) / block
        let px = Unchecked(x), po = Unchecked(out)
        switch pathFor(w.dtype, tokens: T) {
        case .amx:
            let packed = packForAMX(x, K: K, T: T)
            defer { packed.deallocate() }
            let pp = Unchecked(UnsafePointer(packed))
            pool.parallelFor(blocks) { b in
                duet_matmul_bf16_amx(w.view.base.assumingMemoryBound(to: UInt16.self), K, K, pp.value, T,
                                     po.value, N, b * block, min(N, (b + 1) * block))
            }
        case .avx512:
            pool.parallelFor(blocks) { b in
                let r0 = b * block, r1 = min(N, (b + 1) * block)
                if w.dtype == .bf16 {
                    duet_matmul_bf16_avx512(w.view.base.assumingMemoryBound(to: UInt16.self), K, K, px.value, K, T, po.value, N, r0, r1)
                } else {
                    duet_matmul_f32_avx512(w.view.base.assumingMemoryBound(to: Float.self), K, K, px.value, K, T, po.value, N, r0, r1)
                }
            }
        case .portable, .auto:
            pool.parallelFor(blocks) { b in matmulRows(px.value, w, po.value, tokens: T, rows: (b * block)..<min(N, (b + 1) * block), dot: dot) }
        case .reference:
            pool.parallelFor(blocks) { b in
                matmulRows(px.value, w, po.value, tokens: T, rows: (b * block)..<min(N, (b + 1) * block), dot: referenceDot)
            }
        }
    }

    // MARK: expert FFN

    /// SwiGLU expert `y = w2(silu(w1 x) * w3 x)`. x `[T, D]`, gate/up `[F, D]`, down `[D, F]`,
    /// y `[T, D]`. Gate and up are read in one pass over both matrices.
    public func expertFFN(_ x: UnsafePointer<Float>, gate: WeightMatrix, up: WeightMatrix, down: WeightMatrix,
                          _ y: UnsafeMutablePointer<Float>, tokens T: Int) {
        let F = gate.rows
        let h = UnsafeMutablePointer<Float>.allocate(capacity: T * F)  // [T, F]
        defer { h.deallocate() }
        gateUp(x, gate: gate, up: up, h, tokens: T)
        matmul(h, down, y, tokens: T)
    }

    /// `h = silu(gate x) * (up x)`. x `[T, D]`, h `[T, F]`.
    public func gateUp(_ x: UnsafePointer<Float>, gate: WeightMatrix, up: WeightMatrix, _ h: UnsafeMutablePointer<Float>, tokens T: Int) {
        let F = gate.rows, D = gate.cols
        let block = rowBlock(F)
        let blocks = (F + block - 1) / block
        let px = Unchecked(x), ph = Unchecked(h)
        let bothBF16 = gate.dtype == .bf16 && up.dtype == .bf16
        switch pathFor(gate.dtype, tokens: T) {
        case .amx where bothBF16:
            let packed = packForAMX(x, K: D, T: T)
            defer { packed.deallocate() }
            let pp = Unchecked(UnsafePointer(packed))
            pool.parallelFor(blocks) { b in
                duet_gate_up_bf16_amx(gate.view.base.assumingMemoryBound(to: UInt16.self), up.view.base.assumingMemoryBound(to: UInt16.self),
                                      D, D, pp.value, T, ph.value, F, b * block, min(F, (b + 1) * block))
            }
        case .avx512 where bothBF16:
            pool.parallelFor(blocks) { b in
                duet_gate_up_bf16_avx512(gate.view.base.assumingMemoryBound(to: UInt16.self), up.view.base.assumingMemoryBound(to: UInt16.self),
                                         D, D, px.value, D, T, ph.value, F, b * block, min(F, (b + 1) * block))
            }
        default:
            let u = UnsafeMutablePointer<Float>.allocate(capacity: T * F)
            defer { u.deallocate() }
            matmul(x, gate, h, tokens: T)
            matmul(x, up, u, tokens: T)
            siluMultiply(h, u, count: T * F)
        }
    }

    /// Activations in AMX's tile layout (bf16), packed in parallel over k-blocks.
    private func packForAMX(_ x: UnsafePointer<Float>, K: Int, T: Int) -> UnsafeMutablePointer<UInt16> {
        let packed = UnsafeMutablePointer<UInt16>.allocate(capacity: duet_amx_packed_floats(K, T))
        let kBlocks = (K + 31) / 32
        let chunk = max(1, (kBlocks + pool.threadCount - 1) / pool.threadCount)
        let px = Unchecked(x), pp = Unchecked(packed)
        pool.parallelFor((kBlocks + chunk - 1) / chunk) { c in
            duet_amx_pack_activations_range(px.value, K, K, T, pp.value, c * chunk, min(kBlocks, (c + 1) * chunk))
        }
        return packed
    }

    /// The path's compute peak on this machine (GFLOP/s × 1e9) with every pool thread in a
    /// register-only loop; nil for paths without one (reference, portable).
    public func measuredPeakFlops(seconds: Double = 0.2) -> Double? {
        switch path {
        case .amx: measuredPeak(seconds: seconds) { duet_peak_amx($0) }
        case .avx512: measuredPeak(seconds: seconds) { duet_peak_avx512($0) }
        default: nil
        }
    }

    /// The int8 peak of the quantized kernels (vpdpbusd, 2 ops per multiply-add) in ops/s;
    /// nil without VNNI.
    public func measuredPeakIntOps(seconds: Double = 0.2) -> Double? {
        features.vnni ? measuredPeak(seconds: seconds) { duet_peak_vnni($0) } : nil
    }

    /// Operations per second of `kernel(iterations)` (which returns the operations it did)
    /// on every pool thread at once, iterations doubled until a pass takes `seconds`.
    private func measuredPeak(seconds: Double, _ kernel: @escaping (Int) -> Double) -> Double {
        let ops = UnsafeMutablePointer<Double>.allocate(capacity: pool.threadCount)
        defer { ops.deallocate() }
        let po = Unchecked(ops)
        var iterations = 1 << 14
        while true {
            let start = ContinuousClock.now
            pool.parallelFor(pool.threadCount) { t in po.value[t] = kernel(iterations) }
            let elapsed = secondsSince(start)
            if elapsed >= seconds { return (0..<pool.threadCount).reduce(0) { $0 + ops[$1] } / elapsed }
            iterations *= 2
        }
    }
}

/// Rows `rows` of `x @ w^T`, each weight row widened once and used for all T tokens.
@inline(__always)
func matmulRows(_ x: UnsafePointer<Float>, _ w: WeightMatrix, _ out: UnsafeMutablePointer<Float>, tokens T: Int,
                rows: Range<Int>, dot: (UnsafePointer<Float>, UnsafePointer<Float>, Int) -> Float) {
    let N = w.rows, K = w.cols
    let row = UnsafeMutablePointer<Float>.allocate(capacity: K)
    defer { row.deallocate() }
    for n in rows {
        w.loadRow(n, into: row)
        for t in 0..<T { out[t * N + n] = dot(x.advanced(by: t * K), row, K) }
    }
}

/// `sum_i a[i] * b[i]` accumulated left to right in fp32: the reference.
@inline(never)
public func referenceDot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var s: Float = 0
    for i in 0..<n { s += a[i] * b[i] }
    return s
}
