#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore
import DuetCPU
import DuetFormats
import DuetModels
import DuetRuntime

/// `duet selftest --gpu`: every CUDA op against its CPU op on random inputs at odd sizes.
/// Without a GPU the checks report that they were skipped.
public enum GPUSelfTest {
    public struct Check: Sendable {
        public var name: String
        public var error: Double
        public var tolerance: Double
        public var passed: Bool { error < tolerance }
    }

    /// The checks, or the reason there is no GPU to check.
    public static func run(memoryLimit: Int? = nil) -> Result<(device: String, checks: [Check]), CUDAError> {
        do throws(CUDAError) {
            let gpu = try GPU(memoryLimit: memoryLimit)
            let ops = GPUOps(gpu: gpu)
            var checks: [Check] = []
            let cpu = CPUKernels.reference()
            for (T, D) in [(1, 4096), (3, 1000), (17, 96)] {
                let x = KernelSelfTest.random(T * D, seed: UInt64(T * 13 + D)), w = KernelSelfTest.random(D, seed: 7).map { 1 + 0.1 * $0 }
                var reference = [Float](repeating: 0, count: T * D)
                rmsNorm(x, weight: w, eps: 1e-5, &reference, tokens: T)
                let gx = try gpu.upload(x, category: "workspace"), gw = try gpu.upload(w, category: "workspace")
                let gy = try gpu.allocate(T * D * 4, category: "workspace")
                try ops.rmsNorm(gx, weight: gw, gy, tokens: T, dim: D, eps: 1e-5)
                checks.append(Check(name: "rms_norm T=\(T) D=\(D)", error: relativeError(try gpu.download(gy, count: T * D), reference), tolerance: 1e-5))
            }
            for n in [1, 1000, 70001] {
                let g = KernelSelfTest.random(n, seed: 3).map { $0 * 6 }, u = KernelSelfTest.random(n, seed: 4)
                var reference = g
                reference.withUnsafeMutableBufferPointer { siluMultiply($0.baseAddress!, u, count: n) }
                let gg = try gpu.upload(g, category: "workspace"), gu = try gpu.upload(u, category: "workspace")
                try ops.siluMultiply(gg, gu, count: n)
                checks.append(Check(name: "silu_mul n=\(n)", error: relativeError(try gpu.download(gg, count: n), reference), tolerance: 1e-5))
            }
            for (N, K, T) in [(83, 101, 1), (1000, 4096, 3), (4096, 1408, 8), (77, 64, 19), (300, 256, 40)] {
                let values = KernelSelfTest.random(N * K, seed: UInt64(N + K)).map(floatToBF16)
                let x = KernelSelfTest.random(T * K, seed: UInt64(T))
                let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: N * K * 2, alignment: 64)
                defer { raw.deallocate() }
                values.withUnsafeBytes { raw.copyMemory(from: $0) }
                var reference = [Float](repeating: 0, count: T * N)
                let w = WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [N, K], base: UnsafeRawPointer(raw.baseAddress!), owner: nil))
                cpu.matmul(x, w, &reference, tokens: T)
                let gw = try gpu.upload(bytes: UnsafeRawBufferPointer(raw), category: "weights"), gx = try gpu.upload(x, category: "workspace")
                let gy = try gpu.allocate(T * N * 4, category: "workspace")
                try ops.gemvBF16(gx, gw, gy, rows: N, cols: K, tokens: T)
                checks.append(Check(name: "gemv_bf16 N=\(N) K=\(K) T=\(T)", error: relativeError(try gpu.download(gy, count: T * N), reference), tolerance: 1e-5))
            }
            // cuBLAS GEMM (x rounded to bf16, fp32 accumulation) against the CPU's fp32 x: the
            // activation rounding alone gives ~1e-3.
            for (N, K, T) in [(77, 96, 33), (1000, 4096, 64), (4096, 1408, 300)] {
                let values = KernelSelfTest.random(N * K, seed: UInt64(N * 3 + K)).map(floatToBF16)
                let x = KernelSelfTest.random(T * K, seed: UInt64(T + 5))
                let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: N * K * 2, alignment: 64)
                defer { raw.deallocate() }
                values.withUnsafeBytes { raw.copyMemory(from: $0) }
                var reference = [Float](repeating: 0, count: T * N)
                cpu.matmul(x, WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [N, K], base: UnsafeRawPointer(raw.baseAddress!), owner: nil)), &reference, tokens: T)
                let gw = try gpu.upload(bytes: UnsafeRawBufferPointer(raw), category: "weights"), gx = try gpu.upload(x, category: "workspace")
                let gy = try gpu.allocate(T * N * 4, category: "workspace")
                guard gpu.blas != nil else { break }
                try ops.matmulBF16(gx, gw, gy, rows: N, cols: K, tokens: T)
                checks.append(Check(name: "cuBLAS gemm bf16 N=\(N) K=\(K) T=\(T)", error: relativeError(try gpu.download(gy, count: T * N), reference), tolerance: 4e-3))
            }
            checks += try quantizedMatmulChecks(gpu: gpu, ops: ops, cpu: cpu)
            for (V, D, T) in [(640, 96, 5), (32000, 4096, 3)] {
                let table = KernelSelfTest.random(V * D, seed: 9).map(floatToBF16)
                let ids: [Int32] = (0..<T).map { Int32(($0 * 7919 + 11) % V) }
                var reference = [Float](repeating: 0, count: T * D)
                for (t, id) in ids.enumerated() { for i in 0..<D { reference[t * D + i] = bf16ToFloat(table[Int(id) * D + i]) } }
                let gt = try gpu.upload(array: table, category: "weights"), gi = try gpu.upload(array: ids, category: "workspace")
                let gy = try gpu.allocate(T * D * 4, category: "workspace")
                try ops.embedBF16(gt, ids: gi, gy, tokens: T, dim: D)
                checks.append(Check(name: "embed_bf16 V=\(V) D=\(D) T=\(T)", error: relativeError(try gpu.download(gy, count: T * D), reference), tolerance: 1e-7))
            }
            checks += try fusedDenseChecks(gpu: gpu, ops: ops, cpu: cpu)
            checks += try sequencePlacesChecks(gpu: gpu, ops: ops, cpu: cpu)
            for n in [1, 4099] {
                let x = KernelSelfTest.random(n, seed: 21), y = KernelSelfTest.random(n, seed: 22)
                let gx = try gpu.upload(x, category: "workspace"), gy = try gpu.upload(y, category: "workspace")
                try ops.add(gx, gy, count: n)
                checks.append(Check(name: "add n=\(n)", error: relativeError(try gpu.download(gx, count: n), zip(x, y).map { $0 + $1 }), tolerance: 1e-7))
            }
            // From 16 queries (or past 12288 positions) the tiled kernel: partial tiles, windows
            // cutting tiles, d < 128.
            for (T, start, H, Hkv, d, window) in [(1, 40, 32, 8, 128, nil), (7, 0, 4, 2, 24, nil), (5, 11, 4, 2, 32, 8 as Int?),
                                                  (40, 0, 32, 8, 128, nil), (77, 100, 4, 2, 24, nil), (50, 30, 4, 2, 32, 20 as Int?),
                                                  (300, 0, 8, 2, 128, nil), (16, 1000, 4, 1, 64, 100 as Int?),
                                                  (1, 13000, 8, 2, 128, nil)] {  // decode past the per-query kernel's 12288 positions
                let P = start + T
                let q = KernelSelfTest.random(T * H * d, seed: 31), k = KernelSelfTest.random(P * Hkv * d, seed: 32)
                let v = KernelSelfTest.random(P * Hkv * d, seed: 33)
                var reference = [Float](repeating: 0, count: T * H * d)
                k.withUnsafeBufferPointer { kp in
                    v.withUnsafeBufferPointer { vp in
                        DuetCPU.attention(queries: q, keys: KVRows(contiguous: kp.baseAddress!, rowWidth: Hkv * d),
                                          values: KVRows(contiguous: vp.baseAddress!, rowWidth: Hkv * d), out: &reference,
                                          tokens: T, start: start, heads: H, kvHeads: Hkv, headDim: d, window: window, pool: cpu.pool)
                    }
                }
                let gq = try gpu.upload(q, category: "workspace"), gk = try gpu.upload(k, category: "kv"), gv = try gpu.upload(v, category: "kv")
                let go = try gpu.allocate(T * H * d * 4, category: "workspace")
                try ops.attention(queries: gq, keys: gk, values: gv, out: go, tokens: T, start: start, heads: H, kvHeads: Hkv, headDim: d, window: window)
                checks.append(Check(name: "attention T=\(T) start=\(start) H=\(H)/\(Hkv) d=\(d) window=\(window.map(String.init) ?? "-")",
                                    error: relativeError(try gpu.download(go, count: T * H * d), reference), tolerance: 1e-5))
            }
            for (T, E, k) in [(1, 8, 2), (37, 8, 2), (5, 64, 6)] {
                let logits = KernelSelfTest.random(T * E, seed: UInt64(E + k)).map { $0 * 4 }
                let reference = DuetCPU.routeTopK(logits, tokens: T, experts: E, k: k)
                let gl = try gpu.upload(logits, category: "workspace")
                let ge = try gpu.allocate(T * k * 4, category: "workspace"), gw = try gpu.allocate(T * k * 4, category: "workspace")
                try ops.routeTopK(gl, experts: ge, weights: gw, tokens: T, experts: E, k: k)
                let ids = try gpu.download(ge, count: T * k, as: Int32.self, zero: 0), weights = try gpu.download(gw, count: T * k)
                let sameIds = ids.map(Int.init) == reference.flatMap(\.experts)
                checks.append(Check(name: "route_topk T=\(T) E=\(E) k=\(k)", error: sameIds ? relativeError(weights, reference.flatMap(\.weights)) : 1, tolerance: 1e-6))
            }
            for (T, E, k, D, F) in [(1, 8, 2, 256, 352), (3, 8, 2, 96, 200), (2, 16, 4, 100, 36)] {
                checks.append(try fusedMoECheck(gpu: gpu, ops: ops, cpu: cpu, tokens: T, experts: E, k: k, dim: D, hidden: F))
            }
            for (T, E, k, D) in [(1, 8, 2, 4096), (3, 8, 2, 1000), (2, 32, 4, 99)] {
                checks.append(try moePrologueCheck(gpu: gpu, ops: ops, cpu: cpu, tokens: T, experts: E, k: k, dim: D))
            }
            // The budget refuses what it cannot hold, with an error, not a crash.
            let small = try GPU(memoryLimit: 1 << 20)
            let refused = (try? small.allocate(2 << 20, category: "weights")) == nil
            checks.append(Check(name: "budget refuses 2 MiB of a 1 MiB budget", error: refused ? 0 : 1, tolerance: 0.5))
            try gpu.synchronize()
            let hbm = try ops.readBandwidth(bytes: 4 << 30)
            return .success(("\(gpu.name) (\(gpu.architecture), driver \(gpu.driverVersion)), read-only kernel over 4 GiB: \(Int(hbm / 1e9)) GB/s", checks))
        } catch {
            return .failure(error)
        }
    }

    /// The model's fused launches against the CPU: residual add + RMSNorm, rope of q and
    /// k with the KV cache writes (positions outside the step untouched), and the three
    /// attention projections in one GEMV launch.
    static func fusedDenseChecks(gpu: GPU, ops: GPUOps, cpu: CPUKernels) throws(CUDAError) -> [Check] {
        var checks: [Check] = []
        for (T, D) in [(1, 4096), (5, 1000)] {
            let x = KernelSelfTest.random(T * D, seed: 51), a = KernelSelfTest.random(T * D, seed: 52)
            let w = KernelSelfTest.random(D, seed: 53).map { 1 + 0.1 * $0 }
            let sum = zip(x, a).map { $0 + $1 }
            var reference = [Float](repeating: 0, count: T * D)
            rmsNorm(sum, weight: w, eps: 1e-5, &reference, tokens: T)
            let gx = try gpu.upload(x, category: "workspace"), ga = try gpu.upload(a, category: "workspace"), gw = try gpu.upload(w, category: "workspace")
            let gy = try gpu.allocate(T * D * 4, category: "workspace")
            try ops.addRMSNorm(gx, adding: ga, weight: gw, gy, tokens: T, dim: D, eps: 1e-5)
            let error = max(relativeError(try gpu.download(gy, count: T * D), reference), relativeError(try gpu.download(gx, count: T * D), sum))
            checks.append(Check(name: "add_rms_norm T=\(T) D=\(D)", error: error, tolerance: 1e-5))
        }
        // The rope cases cover odd head sizes and positions (the model's only rope kernel).
        for (T, H, Hkv, d, start) in [(1, 32, 8, 128, 700), (3, 4, 2, 32, 5), (5, 4, 2, 24, 0), (13, 4, 1, 32, 3)] {
            let P = start + T + 2
            let q = KernelSelfTest.random(T * H * d, seed: 61), k = KernelSelfTest.random(T * Hkv * d, seed: 62), v = KernelSelfTest.random(T * Hkv * d, seed: 63)
            let keys = KernelSelfTest.random(P * Hkv * d, seed: 64), values = KernelSelfTest.random(P * Hkv * d, seed: 65)
            let rope = Rope(headDim: d, theta: 1e6)
            var rq = q, rk = k
            rope.apply(&rq, heads: H, positions: start..<(start + T))
            rope.apply(&rk, heads: Hkv, positions: start..<(start + T))
            var refKeys = keys, refValues = values
            refKeys.replaceSubrange((start * Hkv * d)..<((start + T) * Hkv * d), with: rk)
            refValues.replaceSubrange((start * Hkv * d)..<((start + T) * Hkv * d), with: v)
            let gq = try gpu.upload(q, category: "workspace"), gk = try gpu.upload(k, category: "workspace"), gv = try gpu.upload(v, category: "workspace")
            let gkeys = try gpu.upload(keys, category: "kv"), gvalues = try gpu.upload(values, category: "kv")
            let gf = try gpu.upload(rope.inverseFrequencies, category: "workspace")
            try ops.ropeStore(q: gq, k: gk, v: gv, keys: gkeys, values: gvalues, inverseFrequencies: gf, tokens: T, heads: H, kvHeads: Hkv, headDim: d, start: start)
            let error = max(relativeError(try gpu.download(gq, count: T * H * d), rq), relativeError(try gpu.download(gkeys, count: P * Hkv * d), refKeys),
                            relativeError(try gpu.download(gvalues, count: P * Hkv * d), refValues))
            checks.append(Check(name: "rope_store T=\(T) H=\(H)/\(Hkv) d=\(d) start=\(start)", error: error, tolerance: 1e-6))
        }
        for (N, K, T) in [(4096, 4096, 1), (96, 200, 3)] {
            let Ns = [N, N / 4, N / 4 + 1]
            let x = KernelSelfTest.random(T * K, seed: 71)
            var error = 0.0
            var raws: [UnsafeMutableRawBufferPointer] = []
            defer { raws.forEach { $0.deallocate() } }
            var weights: [DeviceBuffer] = [], outputs: [DeviceBuffer] = [], references: [[Float]] = []
            for (i, rows) in Ns.enumerated() {
                let values = KernelSelfTest.random(rows * K, seed: UInt64(72 + i)).map(floatToBF16)
                let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: rows * K * 2, alignment: 64)
                raws.append(raw)
                values.withUnsafeBytes { raw.copyMemory(from: $0) }
                var reference = [Float](repeating: 0, count: T * rows)
                cpu.matmul(x, WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [rows, K], base: UnsafeRawPointer(raw.baseAddress!), owner: nil)), &reference, tokens: T)
                references.append(reference)
                weights.append(try gpu.upload(bytes: UnsafeRawBufferPointer(raw), category: "weights"))
                outputs.append(try gpu.allocate(T * rows * 4, category: "workspace"))
            }
            try ops.gemv3BF16(try gpu.upload(x, category: "workspace"), (weights[0], weights[1], weights[2]), (outputs[0], outputs[1], outputs[2]),
                              rows: (Ns[0], Ns[1], Ns[2]), cols: K, tokens: T)
            for i in 0..<3 { error = max(error, relativeError(try gpu.download(outputs[i], count: T * Ns[i]), references[i])) }
            checks.append(Check(name: "gemv3_bf16 N=\(Ns) K=\(K) T=\(T)", error: error, tolerance: 1e-5))
        }
        return checks
    }

    /// One token per sequence in one launch each (beams, batches): rope + cache writes and
    /// attention, each token in its own region at its own position (regions out of order,
    /// one unused, positions from 0), against the CPU's rope and attention per token.
    static func sequencePlacesChecks(gpu: GPU, ops: GPUOps, cpu: CPUKernels) throws(CUDAError) -> [Check] {
        var checks: [Check] = []
        for (H, Hkv, d, P, window) in [(32, 8, 128, 300, nil), (4, 2, 24, 40, nil), (8, 2, 32, 64, 9 as Int?)] {
            let places = [(slot: 3, position: P - 1), (slot: 0, position: 0), (slot: 4, position: P / 2), (slot: 1, position: 7)]
            let T = places.count, R = 5, region = P * Hkv * d
            let q = KernelSelfTest.random(T * H * d, seed: 81), k = KernelSelfTest.random(T * Hkv * d, seed: 82), v = KernelSelfTest.random(T * Hkv * d, seed: 83)
            let keys = KernelSelfTest.random(R * region, seed: 84), values = KernelSelfTest.random(R * region, seed: 85)
            let rope = Rope(headDim: d, theta: 1e6)
            var refQ = q, refKeys = keys, refValues = values, reference = [Float](repeating: 0, count: T * H * d)
            for (t, p) in places.enumerated() {
                var qt = Array(q[(t * H * d)..<((t + 1) * H * d)]), kt = Array(k[(t * Hkv * d)..<((t + 1) * Hkv * d)])
                rope.apply(&qt, heads: H, positions: p.position..<(p.position + 1))
                rope.apply(&kt, heads: Hkv, positions: p.position..<(p.position + 1))
                refQ.replaceSubrange((t * H * d)..<((t + 1) * H * d), with: qt)
                let row = p.slot * region + p.position * Hkv * d
                refKeys.replaceSubrange(row..<(row + Hkv * d), with: kt)
                refValues.replaceSubrange(row..<(row + Hkv * d), with: v[(t * Hkv * d)..<((t + 1) * Hkv * d)])
            }
            for (t, p) in places.enumerated() {
                var out = [Float](repeating: 0, count: H * d)
                refKeys.withUnsafeBufferPointer { kp in
                    refValues.withUnsafeBufferPointer { vp in
                        DuetCPU.attention(queries: Array(refQ[(t * H * d)..<((t + 1) * H * d)]),
                                          keys: KVRows(contiguous: kp.baseAddress! + p.slot * region, rowWidth: Hkv * d),
                                          values: KVRows(contiguous: vp.baseAddress! + p.slot * region, rowWidth: Hkv * d), out: &out,
                                          tokens: 1, start: p.position, heads: H, kvHeads: Hkv, headDim: d, window: window, pool: cpu.pool)
                    }
                }
                reference.replaceSubrange((t * H * d)..<((t + 1) * H * d), with: out)
            }
            let table = try gpu.upload(array: places.flatMap { [Int32($0.slot), Int32($0.position)] }, category: "workspace")
            let at = SequencePlaces(table: table, regionFloats: region, positions: places.map { $0.position + 1 }.max()!)
            let gq = try gpu.upload(q, category: "workspace"), gk = try gpu.upload(k, category: "workspace"), gv = try gpu.upload(v, category: "workspace")
            let gkeys = try gpu.upload(keys, category: "kv"), gvalues = try gpu.upload(values, category: "kv")
            let go = try gpu.allocate(T * H * d * 4, category: "workspace")
            try ops.ropeStore(q: gq, k: gk, v: gv, keys: gkeys, values: gvalues, inverseFrequencies: try gpu.upload(rope.inverseFrequencies, category: "workspace"),
                              tokens: T, heads: H, kvHeads: Hkv, headDim: d, start: 0, places: at)
            try ops.attention(queries: gq, keys: gkeys, values: gvalues, out: go, places: at, tokens: T, heads: H, kvHeads: Hkv, headDim: d, window: window)
            let cacheError = max(relativeError(try gpu.download(gkeys, count: R * region), refKeys), relativeError(try gpu.download(gvalues, count: R * region), refValues))
            let name = "T=\(T) H=\(H)/\(Hkv) d=\(d) P=\(P) window=\(window.map(String.init) ?? "-")"
            checks.append(Check(name: "rope_store per sequence \(name)", error: max(cacheError, relativeError(try gpu.download(gq, count: T * H * d), refQ)), tolerance: 1e-6))
            checks.append(Check(name: "attention per sequence \(name)", error: relativeError(try gpu.download(go, count: T * H * d), reference), tolerance: 1e-5))
        }
        return checks
    }

    /// q8 and q4 matrices in the CPU's packed layout: the GEMV kernels against the CPU
    /// reference path (fp32 sums of the dequantized weights) at odd sizes — rows not a multiple
    /// of 16, columns not a multiple of 32 or of 4, an odd group count for q4 — and the
    /// dequantize + cuBLAS path (x rounded to bf16) from 32 tokens.
    static func quantizedMatmulChecks(gpu: GPU, ops: GPUOps, cpu: CPUKernels) throws(CUDAError) -> [Check] {
        var checks: [Check] = []
        let cases = [(83, 101, 1, false), (1000, 4096, 3, false), (4096, 1408, 8, false), (77, 96, 19, false), (50, 224, 5, false),
                     (300, 256, 40, true), (1000, 4096, 64, true)]
        for format in QuantFormat.allCases {
            for (N, K, T, gemm) in cases {
                let values = KernelSelfTest.random(N * K, seed: UInt64(N * 5 + K)).map(floatToBF16)
                let w = values.withUnsafeBytes { raw in
                    QuantizedMatrix(quantizing: WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [N, K], base: raw.baseAddress!, owner: nil)), format: format)
                }
                let x = KernelSelfTest.random(T * K, seed: UInt64(T + 11))
                var reference = [Float](repeating: 0, count: T * N)
                cpu.matmul(x, w, &reference, tokens: T)
                let gw = try gpu.upload(bytes: UnsafeRawBufferPointer(start: w.levels, count: w.byteCount), category: "weights")
                let gx = try gpu.upload(x, category: "workspace"), gy = try gpu.allocate(T * N * 4, category: "workspace")
                if gemm {
                    guard gpu.blas != nil else { continue }
                    let scratch = try gpu.allocate(N * K * 2, category: "workspace")
                    try ops.matmulQuantized(gx, gw, format: format, gy, rows: N, cols: K, tokens: T, scratch: scratch)
                } else {
                    try ops.matmulQuantized(gx, gw, format: format, gy, rows: N, cols: K, tokens: T)
                }
                checks.append(Check(name: "\(gemm ? "dequantize + cuBLAS gemm" : "gemv") \(format.rawValue) N=\(N) K=\(K) T=\(T)",
                                    error: relativeError(try gpu.download(gy, count: T * N), reference), tolerance: gemm ? 4e-3 : 1e-5))
            }
        }
        return checks
    }

    /// Fused decode MoE (router choices on the device, pointer tables) against the CPU's
    /// expert FFNs summed with the router's weights and added to a residual.
    /// The fused MoE prologue (residual add, RMSNorm, bf16 router, top-k in one launch)
    /// against the CPU's: the residual stream, the normed h, the router logits and weights
    /// (relative L2) and the chosen ids (exactly).
    static func moePrologueCheck(gpu: GPU, ops: GPUOps, cpu: CPUKernels, tokens T: Int, experts E: Int, k: Int, dim D: Int) throws(CUDAError) -> Check {
        let x = KernelSelfTest.random(T * D, seed: 71), a = KernelSelfTest.random(T * D, seed: 72)
        let w = KernelSelfTest.random(D, seed: 73).map { 1 + 0.1 * $0 }
        let router = KernelSelfTest.random(E * D, seed: 74).map { floatToBF16($0 * 0.5) }
        let sum = zip(x, a).map { $0 + $1 }
        var h = [Float](repeating: 0, count: T * D), logits = [Float](repeating: 0, count: T * E)
        rmsNorm(sum, weight: w, eps: 1e-5, &h, tokens: T)
        for t in 0..<T {
            for e in 0..<E { logits[t * E + e] = Float((0..<D).reduce(0.0) { $0 + Double(bf16ToFloat(router[e * D + $1])) * Double(h[t * D + $1]) }) }
        }
        let choices = DuetCPU.routeTopK(logits, tokens: T, experts: E, k: k)
        let gx = try gpu.upload(x, category: "workspace"), ga = try gpu.upload(a, category: "workspace"), gw = try gpu.upload(w, category: "workspace")
        let gr = try gpu.upload(array: router, category: "workspace")
        let gh = try gpu.allocate(T * D * 4, category: "workspace"), gl = try gpu.allocate(T * E * 4, category: "workspace")
        let gids = try gpu.allocate(T * k * 4, category: "workspace"), gweights = try gpu.allocate(T * k * 4, category: "workspace")
        try ops.addNormRouterTopK(gx, adding: ga, weight: gw, gh, eps: 1e-5, router: gr, logits: gl, experts: gids, weights: gweights,
                                  tokens: T, experts: E, dim: D, k: k)
        let ids = try gpu.download(gids, count: T * k, as: Int32.self, zero: 0).map(Int.init)
        let error = [relativeError(try gpu.download(gx, count: T * D), sum), relativeError(try gpu.download(gh, count: T * D), h),
                     relativeError(try gpu.download(gl, count: T * E), logits),
                     relativeError(try gpu.download(gweights, count: T * k), choices.flatMap(\.weights))].max()!
        return Check(name: "add_norm_router_topk T=\(T) E=\(E) k=\(k) D=\(D)", error: ids == choices.flatMap(\.experts) ? error : 1, tolerance: 1e-5)
    }

    static func fusedMoECheck(gpu: GPU, ops: GPUOps, cpu: CPUKernels, tokens T: Int, experts E: Int, k: Int, dim D: Int, hidden F: Int) throws(CUDAError) -> Check {
        var raw: [UnsafeMutableRawBufferPointer] = []
        defer { raw.forEach { $0.deallocate() } }
        func matrix(_ rows: Int, _ cols: Int, seed: UInt64) -> WeightMatrix {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: rows * cols * 2, alignment: 64)
            let values: [UInt16] = KernelSelfTest.random(rows * cols, seed: seed).map { floatToBF16($0 * 0.1) }
            values.withUnsafeBytes { buffer.copyMemory(from: $0) }
            raw.append(buffer)
            return WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [rows, cols], base: UnsafeRawPointer(buffer.baseAddress!), owner: nil))
        }
        var gates: [WeightMatrix] = [], ups: [WeightMatrix] = [], downs: [WeightMatrix] = []
        for e in 0..<E {
            gates.append(matrix(F, D, seed: UInt64(3 * e)))
            ups.append(matrix(F, D, seed: UInt64(3 * e + 1)))
            downs.append(matrix(D, F, seed: UInt64(3 * e + 2)))
        }
        let x = KernelSelfTest.random(T * D, seed: 41), residual = KernelSelfTest.random(T * D, seed: 42)
        let choices = DuetCPU.routeTopK(KernelSelfTest.random(T * E, seed: 43).map { $0 * 4 }, tokens: T, experts: E, k: k)
        var reference = residual
        var y = [Float](repeating: 0, count: D)
        for t in 0..<T {
            let xt = Array(x[(t * D)..<((t + 1) * D)])
            for (e, weight) in zip(choices[t].experts, choices[t].weights) {
                cpu.expertFFN(xt, gate: gates[e], up: ups[e], down: downs[e], &y, tokens: 1)
                for i in 0..<D { reference[t * D + i] += weight * y[i] }
            }
        }
        func upload(_ w: WeightMatrix) throws(CUDAError) -> DeviceBuffer {
            try gpu.upload(bytes: UnsafeRawBufferPointer(start: w.view.base, count: w.byteCount), category: "weights")
        }
        func table(_ ws: [WeightMatrix]) throws(CUDAError) -> (DeviceBuffer, [DeviceBuffer]) {
            var buffers: [DeviceBuffer] = []
            for w in ws { buffers.append(try upload(w)) }
            let pointers: [UInt64] = buffers.map { UInt64($0.pointer) }
            return (try gpu.upload(array: pointers, category: "weights"), buffers)
        }
        let (w1s, keep1) = try table(gates), (w3s, keep3) = try table(ups), (w2s, keep2) = try table(downs)
        let ids: [Int32] = choices.flatMap { $0.experts.map(Int32.init) }
        let gids = try gpu.upload(array: ids, category: "workspace")
        let gweights = try gpu.upload(choices.flatMap(\.weights), category: "workspace")
        let gx = try gpu.upload(x, category: "workspace"), gr = try gpu.upload(residual, category: "workspace")
        let gh = try gpu.allocate(T * k * F * 4, category: "workspace")
        try ops.moeGateUp(w1s: w1s, w3s: w3s, ids: gids, x: gx, h: gh, tokens: T, k: k, rows: F, cols: D)
        try ops.moeDownAdd(w2s: w2s, ids: gids, weights: gweights, h: gh, x: gr, tokens: T, k: k, rows: D, cols: F)
        let result = try gpu.download(gr, count: T * D)
        withExtendedLifetime((keep1, keep2, keep3)) {}
        return Check(name: "fused moe T=\(T) E=\(E) k=\(k) D=\(D) F=\(F)", error: relativeError(result, reference), tolerance: 1e-5)
    }

    /// The whole model on the GPU against HF, for the golden checkpoints in `goldens`
    /// (Tests/Fixtures): prefill and 8-step decode logits (relative L2 < 1e-4) and, with HF's
    /// tokens fed back, the same greedy token wherever HF's top-2 margin exceeds 1e-3.
    /// Models whose golden is absent are left out.
    public static func modelChecks(goldens: String, memoryLimit: Int? = nil) throws -> [Check] {
        var out: [Check] = []
        let gpu = try GPU(memoryLimit: memoryLimit)
        for name in ["mixtral-tiny-a", "mixtral-tiny-b"] {
            let file = joinPath(goldens, "\(name).golden.json")
            guard fileExists(file) else { continue }
            let golden = try HFGolden.load(file: file)
            let model = try GPUMixtral(try MixtralModel(directory: joinPath(goldens, name), kernels: .reference()), gpu: gpu)
            out += try goldenChecks(golden, label: "model \(name)") { () throws -> ([Int32]) throws -> [Float] in
                model.reset()
                return { try model.forward($0) }
            }
            if model.decodeGraphSteps > 0 || model.layers.allSatisfy({ $0.expertTables != nil }) {
                out.append(try decodeGraphCheck(model, golden.cases[0], label: "model \(name)"))
            }
        }
        return out
    }

    /// The decode graph against the same steps launched one by one: HF's greedy tokens fed
    /// back through both, every step's logits bit-identical (the same kernels in the same
    /// order), and the graph really used.
    static func decodeGraphCheck(_ model: GPUMixtral, _ c: HFGolden.Case, label: String) throws -> Check {
        func decode(graph: Bool) throws -> [[Float]] {
            model.usesDecodeGraph = graph
            model.reset()
            var out = [try model.forward(c.prompt)]
            for token in c.greedy { out.append(try model.forward([token])) }
            return out
        }
        let before = model.decodeGraphSteps
        let eager = try decode(graph: false), graphed = try decode(graph: true)
        let used = model.decodeGraphSteps - before
        let error = zip(eager, graphed).map { relativeError($1, $0) }.max() ?? 1
        return Check(name: "\(label) decode graph vs launches, \(c.greedy.count) steps (\(used) by the graph): bit-identical",
                     error: used == c.greedy.count ? error : 1, tolerance: 1e-12)
    }

    /// Every offload strategy with the GPU as the device, against HF on the golden
    /// checkpoints: half the experts resident, the rest on the CPU or streamed (the latency
    /// model measured there, so the planner decides as it would in a run); prefill and decode
    /// logits (relative L2 < 1e-4), greedy tokens where HF's margin exceeds 1e-3, device work
    /// really done, and the budget's peak never above its limit.
    ///
    /// `format` q8/q4: the experts quantized, and the reference is the CPU's quantized model
    /// (fp32 on the dequantized weights) run the same way instead of HF: its prefill and decode
    /// logits (relative L2 < 1e-4) and its greedy tokens where its margin exceeds 1e-3.
    public static func offloadChecks(goldens: String, format: QuantFormat? = nil) throws -> [Check] {
        var out: [Check] = []
        for name in ["mixtral-tiny-a", "mixtral-tiny-b"] {
            let file = joinPath(goldens, "\(name).golden.json")
            guard fileExists(file) else { continue }
            var golden = try HFGolden.load(file: file)
            if let format {
                let reference = try MixtralModel(directory: joinPath(goldens, name), kernels: .reference())
                try reference.quantizeExperts(format, cacheDirectory: nil)
                golden = try golden.recomputed { () throws -> ([Int32]) throws -> [Float] in
                    let cache = reference.makeCache()
                    return { try reference.forward($0, cache: cache, allLogits: false) }
                }
            }
            for policy in OffloadPolicy.allCases {
              // Dense layers on the CPU; on the GPU with decode rows sent through the host; on
              // the GPU with every step's rows read and added on the device (resident activations).
              for (denseOnGPU, activationsOnGPU) in [(false, false), (true, false), (true, true)] {
                let model = try MixtralModel(directory: joinPath(goldens, name), kernels: .reference())
                if let format { try model.quantizeExperts(format, cacheDirectory: nil) }
                let c = model.config, L = c.numHiddenLayers, E = c.numLocalExperts
                let shape = ExpertShape(model)
                let maxRows = 16 * c.numExpertsPerToken
                let resident = L * E / 2
                let budget = CUDAExpertDevice.workspaceBytes(shape: shape, maxRows: maxRows)
                    + (resident + OffloadExecutor.streamingSlots(policy)) * shape.bytes
                // With the dense layers on the GPU they come first in the same budget.
                let gpu = try GPU(memoryLimit: budget + (denseOnGPU ? 64 << 20 : 0))
                let dense = denseOnGPU ? try GPUMixtral(model, gpu: gpu, maxPositions: 64, experts: false) : nil
                if activationsOnGPU { dense?.residentActivationsMinTokens = 1 }
                let device = try CUDAExpertDevice(gpu: GPU(sharing: gpu))
                let order: ExpertPlacement.Order = policy == .layerSplit ? .wholeLayers : .layerBalanced
                let executor = try OffloadExecutor(model: model, device: device, policy: policy,
                                                   placement: ExpertPlacement.make(layers: L, experts: E, capacity: resident, order: order),
                                                   latency: .unmeasured, maxRows: maxRows)
                _ = executor.pinStreamedExperts()
                if policy == .fiddler { _ = try executor.calibrate(tokenCounts: [1, 4], repeats: 2, fingerprint: "selftest") }
                let label = "offload \(policy.rawValue) dense-on-\(denseOnGPU ? "gpu" : "cpu")\(activationsOnGPU ? " resident activations" : "") \(name)" + (format.map { " \($0.rawValue) experts vs CPU \($0.rawValue)" } ?? "")
                func forward(_ tokens: [Int32], _ cache: KVCache) throws -> [Float] {
                    if let dense { return try dense.forward(tokens) }
                    return try model.forward(tokens, cache: cache, allLogits: false)
                }
                if let dense { dense.expertExecutor = executor } else { model.expertExecutor = executor }
                out += try goldenChecks(golden, label: label) { () throws -> ([Int32]) throws -> [Float] in
                    let cache = model.makeCache()
                    dense?.reset()
                    return { try forward($0, cache) }
                }
                let s = executor.stats, m = device.memory
                let usedDevice = s.residentTokenExperts > 0 && s.fallbacks == 0 && (policy != .gpuSwap || s.copiedExperts > 0)
                let why = executor.takeWarnings().first.map { ": \($0)" } ?? ""
                out.append(Check(name: "\(label) ran on the device (hit rate \(Int(s.hitRate * 100))%, \(s.copiedExperts) copies, \(s.fallbacks) failures\(why))",
                                 error: usedDevice ? 0 : 1, tolerance: 0.5))
                out.append(Check(name: "\(label) peak \(m.peak) of \(m.limit) budget bytes", error: m.peak <= m.limit ? 0 : 1, tolerance: 0.5))
                // The model and its executor refer to each other: part them, so the device (its
                // slots, its page-locked ranges) goes before the next case.
                model.expertExecutor = nil
                dense?.expertExecutor = nil
              }
            }
        }
        return out
    }

    /// HF's beam search on the golden checkpoints with the dense layers on the GPU, one KV
    /// region per beam (forks taking over or copying their parent's): the whole model on the
    /// GPU, and the dense layers there with half the experts on the device and the rest on
    /// the CPU (fiddler). Every case's sequences equal HF's and the scores agree within 1e-4.
    public static func beamChecks(goldens: String) throws -> [Check] {
        let file = joinPath(goldens, "beam.golden.json")
        guard fileExists(file) else { return [] }
        let golden = try HFBeamGolden.load(file: file)
        var out: [Check] = []
        var loaded: [String: MixtralModel] = [:]  // the cases share a few models
        for offload in [false, true] {
            var mismatches = 0, worst = 0.0
            for c in golden.cases {
                let cpu = try loaded[c.model] ?? MixtralModel(directory: joinPath(goldens, c.model), kernels: .reference())
                loaded[c.model] = cpu
                let gpu = try GPU()
                let model = try GPULanguageModel(cpu, gpu: gpu, maxPositions: 64, sequences: c.num_beams + 1, experts: !offload)
                var executor: OffloadExecutor? = nil
                if offload {
                    let L = cpu.config.numHiddenLayers, E = cpu.config.numLocalExperts, k = cpu.config.numExpertsPerToken
                    let device = try CUDAExpertDevice(gpu: GPU(sharing: gpu))
                    executor = try OffloadExecutor(model: cpu, device: device, policy: .fiddler,
                                                   placement: ExpertPlacement.make(layers: L, experts: E, capacity: L * E / 2, order: .layerBalanced),
                                                   latency: .unmeasured, maxRows: 16 * k)
                    model.gpuModel.expertExecutor = executor
                }
                let options = BeamSearchOptions(width: c.num_beams, maxNewTokens: c.max_new_tokens, lengthPenalty: c.length_penalty,
                                                earlyStopping: c.early_stopping ? .always : .heuristic, stopTokenIds: [c.eos_token_id])
                let result = try beamSearch(model: model, prompt: c.prompt, options: options)
                model.gpuModel.expertExecutor = nil
                if result.map(\.ids) != c.sequences { mismatches += 1 }
                for (r, score) in zip(result, c.sequences_scores) { worst = max(worst, abs(r.score - score)) }
                withExtendedLifetime(executor) {}
            }
            let label = "beam search vs HF, \(golden.cases.count) cases, dense layers on the GPU\(offload ? " with fiddler offload" : ", whole model")"
            out.append(Check(name: "\(label): sequences", error: Double(mismatches), tolerance: 0.5))
            out.append(Check(name: "\(label): scores", error: worst, tolerance: 1e-4))
        }
        return out
    }

    /// A 200-token prompt through the bf16 golden model on the GPU (dense layers and experts
    /// through cuBLAS GEMMs, in chunks) against the CPU's fp32 path: the bf16 rounding of
    /// activations bounds the difference (relative L2 < 2e-2), and with the GEMMs turned off
    /// the GPU matches the CPU to 1e-4.
    public static func longPromptChecks(goldens: String) throws -> [Check] {
        let dir = joinPath(goldens, "mixtral-tiny-b")
        guard fileExists(joinPath(dir, "config.json")) else { return [] }
        let cpu = try MixtralModel(directory: dir, kernels: .reference())
        let prompt = (0..<200).map { Int32(3 + ($0 * 131) % (cpu.vocabSize - 3)) }
        let reference = try cpu.forward(prompt, cache: cpu.makeCache(), allLogits: false)
        var out: [Check] = []
        for useGemm in [true, false] {
            let gpu = try GPU()
            if !useGemm { gpu.gemmMinTokens = .max } else if gpu.blas == nil { continue }
            let model = try GPULanguageModel(cpu, gpu: gpu, maxPositions: 256)
            model.prefillChunk = 128
            let logits = try model.forward(prompt, cache: cpu.makeCache(), allLogits: false)
            out.append(Check(name: "model mixtral-tiny-b 200-token prompt in chunks of 128, \(useGemm ? "cuBLAS" : "GEMV") matmuls vs CPU",
                             error: relativeError(logits, reference), tolerance: useGemm ? 2e-2 : 1e-4))
        }
        return out
    }

    /// One model against HF's golden cases: prefill logits, logits after the recorded decode
    /// steps (relative L2 < 1e-4) with HF's tokens fed back, and HF's greedy token wherever its
    /// top-2 margin exceeds 1e-3. `sequence()` starts a sequence and returns its forward step.
    static func goldenChecks(_ golden: HFGolden, label: String, sequence: () throws -> ([Int32]) throws -> [Float]) throws -> [Check] {
        var out: [Check] = []
        for c in golden.cases {
            let forward = try sequence()
            var logits = try forward(c.prompt)
            out.append(Check(name: "\(label) prefill \(c.prompt.count) tokens", error: relativeError(logits, c.prefill_logits), tolerance: 1e-4))
            var mismatches = 0
            for (step, token) in c.greedy.enumerated() {
                if c.margins[step] > 1e-3 && Int32(argmax(logits)) != token { mismatches += 1 }
                if step == c.decode_steps {
                    out.append(Check(name: "\(label) logits after \(c.decode_steps) decode steps", error: relativeError(logits, c.decode_logits), tolerance: 1e-4))
                }
                if step + 1 < c.greedy.count { logits = try forward([token]) }
            }
            out.append(Check(name: "\(label) greedy tokens (\(c.greedy.count), margin > 1e-3)", error: Double(mismatches), tolerance: 0.5))
        }
        return out
    }

    private static func argmax(_ x: [Float]) -> Int {
        var best = 0
        for i in x.indices where x[i] > x[best] { best = i }
        return best
    }

    private static func relativeError(_ a: [Float], _ b: [Float]) -> Double {
        var num = 0.0, den = 0.0
        for i in a.indices { let d = Double(a[i]) - Double(b[i]); num += d * d; den += Double(b[i]) * Double(b[i]) }
        return (num / max(den, 1e-300)).squareRoot()
    }
}
