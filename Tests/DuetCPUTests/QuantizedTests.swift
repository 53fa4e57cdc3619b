#if canImport(Glibc)
import Glibc
#endif
import DuetCPU
import DuetCore
import DuetTestSupport
import Testing

/// Weights like a real expert's: small, with a few larger outliers.
private func expertLike(_ count: Int, seed: UInt64) -> [Float] {
    randomFloats(count, seed: seed).enumerated().map { i, v in v * (i % 97 == 0 ? 0.2 : 0.02) }
}

private func quantizedPaths() -> [KernelPath] {
    CPUFeatures.current.vnni ? [.portable, .avx512] : [.portable]
}

/// Shapes with padding in both dimensions, and one exact.
private let shapes: [(rows: Int, cols: Int)] = [(37, 100), (64, 128), (16, 33), (112, 64)]

@Suite struct QuantizedTests {
    /// Every dequantized weight is within the stated bound: scale / 2 + max|w| * 2^-11.
    @Test(arguments: QuantFormat.allCases)
    func roundTripWithinTheBound(format: QuantFormat) {
        for (rows, cols) in shapes {
            let values = expertLike(rows * cols, seed: 3)
            let (w, exact, keep) = makeWeights(values, rows: rows, cols: cols, dtype: .bf16)
            let q = QuantizedMatrix(quantizing: w, format: format)
            var row = [Float](repeating: 0, count: cols)
            var worstRatio = 0.0
            for r in 0..<rows {
                row.withUnsafeMutableBufferPointer { q.dequantizeRow(r, into: $0.baseAddress!) }
                for g in 0..<((cols + 31) / 32) {
                    let ks = (g * 32)..<min(cols, g * 32 + 32)
                    let amax = ks.map { abs(exact[r * cols + $0]) }.max()!
                    let bound = Double(q.scale(r, group: g)) / 2 + Double(amax) * 0x1p-11 + 1e-12
                    for k in ks { worstRatio = max(worstRatio, Double(abs(row[k] - exact[r * cols + k])) / bound) }
                    #expect(ks.allSatisfy { abs(q.level(r, $0)) <= format.maxLevel })
                }
            }
            #expect(worstRatio <= 1, "\(format) \(rows)x\(cols): worst error / bound = \(worstRatio)")
            #expect(worstRatio > 0.3, "the bound should be near tight")
            withExtendedLifetime(keep) {}
        }
    }

    /// The integer kernels equal an fp64 matmul of the dequantized weights with the
    /// dequantized activation levels (the same numbers the kernel multiplies).
    @Test(arguments: QuantFormat.allCases, [1, 3, 5, 9])
    func integerKernelsMatchFP64OnTheSameLevels(format: QuantFormat, tokens T: Int) throws {
        for (N, K) in shapes {
            let (w, _, keep) = makeWeights(expertLike(N * K, seed: 5), rows: N, cols: K, dtype: .bf16)
            let q = QuantizedMatrix(quantizing: w, format: format)
            let x = randomFloats(T * K, seed: 6)
            let xq = x.withUnsafeBufferPointer { QuantizedActivations($0.baseAddress!, tokens: T, cols: K, paddedCols: q.paddedCols, offset: format.offset) }
            var reference = [Double](repeating: 0, count: T * N)
            for t in 0..<T {
                for n in 0..<N {
                    var s = 0.0
                    for k in 0..<K {
                        s += Double(q.level(n, k)) * Double(q.scale(n, group: k / 32)) * Double(xq.levels[t * q.paddedCols + k]) * Double(xq.scales[t * q.groups + k / 32])
                    }
                    reference[t * N + n] = s
                }
            }
            // Many small tasks (one row block each) and one task with every row block (the
            // kernels' multi-block passes and their tails).
            for path in quantizedPaths() {
                for (threads, tasksPerThread) in [(2, 4), (1, 1)] {
                    var kernels = try CPUKernels(path, pool: ThreadPool(threads: threads))
                    kernels.tasksPerThread = tasksPerThread
                    var out = [Float](repeating: .nan, count: T * N)
                    x.withUnsafeBufferPointer { xb in out.withUnsafeMutableBufferPointer { kernels.matmul(xb.baseAddress!, q, $0.baseAddress!, tokens: T) } }
                    let err = relativeL2Error(out, reference.map(Float.init))
                    #expect(err < 2e-6, "\(path) \(format) T=\(T) \(N)x\(K) threads \(threads): \(err)")
                }
            }
            withExtendedLifetime(keep) {}
        }
    }

    /// Against the unquantized weights and activations, for uniform weights (no outliers):
    /// a rounding step of max|w| / L has rms error step / sqrt(12), i.e. 0.45% of the weights'
    /// rms for q8 (L = 127) and 8% for q4 (L = 7); activations add ~0.45%.
    @Test(arguments: QuantFormat.allCases)
    func quantizedMatmulIsCloseToBF16(format: QuantFormat) throws {
        let N = 64, K = 256, T = 4
        let (w, exact, keep) = makeWeights(randomFloats(N * K, seed: 8).map { $0 * 0.02 }, rows: N, cols: K, dtype: .bf16)
        let q = QuantizedMatrix(quantizing: w, format: format)
        let x = randomFloats(T * K, seed: 9)
        var reference = [Float](repeating: 0, count: T * N)
        for t in 0..<T { for n in 0..<N { reference[t * N + n] = Float((0..<K).reduce(0.0) { $0 + Double(exact[n * K + $1]) * Double(x[t * K + $1]) }) } }
        for path in quantizedPaths() + [.reference] {
            let kernels = try CPUKernels(path, pool: ThreadPool(threads: 2))
            var out = [Float](repeating: .nan, count: T * N)
            x.withUnsafeBufferPointer { xb in out.withUnsafeMutableBufferPointer { kernels.matmul(xb.baseAddress!, q, $0.baseAddress!, tokens: T) } }
            let err = relativeL2Error(out, reference)
            #expect(err < (format == .q8 ? 0.01 : 0.1), "\(path) \(format): \(err)")
        }
        withExtendedLifetime(keep) {}
    }

    /// The quantized SwiGLU expert equals its three matmuls composed.
    @Test(arguments: QuantFormat.allCases)
    func expertFFNComposesTheMatmuls(format: QuantFormat) throws {
        let D = 64, F = 96, T = 3
        let (g, _, k1) = makeWeights(expertLike(F * D, seed: 11), rows: F, cols: D, dtype: .bf16)
        let (u, _, k2) = makeWeights(expertLike(F * D, seed: 12), rows: F, cols: D, dtype: .bf16)
        let (d, _, k3) = makeWeights(expertLike(D * F, seed: 13), rows: D, cols: F, dtype: .bf16)
        let expert = QuantizedExpert(gate: QuantizedMatrix(quantizing: g, format: format), up: QuantizedMatrix(quantizing: u, format: format),
                                     down: QuantizedMatrix(quantizing: d, format: format))
        let x = randomFloats(T * D, seed: 14)
        for path in quantizedPaths() {
            let kernels = try CPUKernels(path, pool: ThreadPool(threads: 2))
            var h = [Float](repeating: 0, count: T * F), up = h, y = [Float](repeating: 0, count: T * D), composed = y
            kernels.matmul(x, expert.gate, &h, tokens: T)
            kernels.matmul(x, expert.up, &up, tokens: T)
            for i in h.indices { h[i] = h[i] / (1 + exp(-h[i])) * up[i] }
            kernels.matmul(h, expert.down, &composed, tokens: T)
            kernels.expertFFN(x, expert, &y, tokens: T)
            #expect(relativeL2Error(y, composed) < 1e-6, "\(path) \(format)")
        }
        withExtendedLifetime((k1, k2, k3)) {}
    }

    @Test func formatsCountTheirBits() {
        #expect(QuantFormat.q8.bitsPerWeight == 8.5)
        #expect(QuantFormat.q4.bitsPerWeight == 4.5)
        let (w, _, keep) = makeWeights(expertLike(20 * 40, seed: 1), rows: 20, cols: 40, dtype: .bf16)
        let q = QuantizedMatrix(quantizing: w, format: .q4)
        #expect(q.paddedRows == 32 && q.paddedCols == 64)
        #expect(q.byteCount == 32 * 64 / 2 + 32 * 2 * 2)
        withExtendedLifetime(keep) {}
    }
}
