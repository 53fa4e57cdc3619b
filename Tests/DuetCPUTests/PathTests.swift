#if canImport(Glibc)
import Glibc
#endif
import DuetCPU
import DuetCore
import DuetTestSupport
import Testing

/// Every kernel path against an fp64 scalar reference, at sizes that are not multiples of
/// any tile or vector width. Paths this CPU lacks are skipped (AMX on most machines).
/// Tolerances (relative L2): fp32-accumulating paths 1e-5; AMX rounds activations to bf16
/// (relative 2^-9 per element), so 5e-3.
private let paths: [KernelPath] = [.reference, .portable, .avx512, .amx]

private func kernels(_ path: KernelPath) -> CPUKernels? {
    try? CPUKernels(path, pool: ThreadPool(threads: 2))
}

private func tolerance(_ path: KernelPath, _ dtype: DType) -> Double {
    path == .amx && dtype == .bf16 ? 5e-3 : 1e-5
}

/// `x @ w^T` in fp64 from the exact stored weights.
private func referenceMatmul(_ x: [Float], _ w: [Float], T: Int, N: Int, K: Int) -> [Double] {
    var out = [Double](repeating: 0, count: T * N)
    for t in 0..<T {
        for n in 0..<N {
            var s = 0.0
            for k in 0..<K { s += Double(x[t * K + k]) * Double(w[n * K + k]) }
            out[t * N + n] = s
        }
    }
    return out
}

private func relErr(_ a: [Float], _ b: [Double]) -> Double {
    relativeL2Error(a, b.map { Float($0) })
}

@Suite(.serialized) struct PathTests {
    @Test(arguments: paths, [DType.bf16, .f32, .f16])
    func matmulMatchesFP64(path: KernelPath, dtype: DType) throws {
        guard let k = kernels(path) else { return }  // not on this CPU
        let N = 83, K = 101  // neither a multiple of 16 rows nor 32 columns
        let (w, exact, keep) = makeWeights(randomFloats(N * K, seed: 21), rows: N, cols: K, dtype: dtype)
        for T in [1, 3, 17, 33] {
            let x = randomFloats(T * K, seed: UInt64(30 + T))
            var out = [Float](repeating: .nan, count: T * N)
            k.matmul(x, w, &out, tokens: T)
            let err = relErr(out, referenceMatmul(x, exact, T: T, N: N, K: K))
            #expect(err < tolerance(k.pathFor(dtype, tokens: T), dtype), "\(path) \(dtype) T=\(T): \(err)")
        }
        withExtendedLifetime(keep) {}
    }

    @Test(arguments: paths)
    func expertFFNMatchesFP64(path: KernelPath) throws {
        guard let k = kernels(path) else { return }
        let D = 72, F = 97
        let (gate, g, k1) = makeWeights(randomFloats(F * D, seed: 41), rows: F, cols: D, dtype: .bf16)
        let (up, u, k2) = makeWeights(randomFloats(F * D, seed: 42), rows: F, cols: D, dtype: .bf16)
        let (down, dn, k3) = makeWeights(randomFloats(D * F, seed: 43), rows: D, cols: F, dtype: .bf16)
        for T in [1, 2, 5, 19, 40] {
            let x = randomFloats(T * D, seed: UInt64(50 + T))
            var y = [Float](repeating: .nan, count: T * D)
            k.expertFFN(x, gate: gate, up: up, down: down, &y, tokens: T)
            let a = referenceMatmul(x, g, T: T, N: F, K: D), b = referenceMatmul(x, u, T: T, N: F, K: D)
            let h: [Float] = zip(a, b).map { (g: Double, u: Double) -> Float in Float(g / (1 + exp(-g)) * u) }
            let reference = referenceMatmul(h, dn, T: T, N: D, K: F)
            let err = relErr(y, reference)
            #expect(err < 2 * tolerance(k.pathFor(.bf16, tokens: T), .bf16), "\(path) T=\(T): \(err)")
        }
        withExtendedLifetime((k1, k2, k3)) {}
    }

    @Test func forcingAnUnavailablePathIsAnError() {
        let none = CPUFeatures(avx512: false, avx512bf16: false, amx: false)
        #expect(throws: KernelError.unavailable(.amx, features: "")) {
            _ = try CPUKernels(.amx, pool: ThreadPool(threads: 1), features: none)
        }
        #expect(throws: KernelError.unavailable(.avx512, features: "")) {
            _ = try CPUKernels(.avx512, pool: ThreadPool(threads: 1), features: none)
        }
    }

    @Test func autoPicksByDTypeAndTokens() throws {
        let all = CPUFeatures(avx512: true, avx512bf16: true, amx: true)
        let k = try CPUKernels(.auto, pool: ThreadPool(threads: 1), features: all)
        #expect(k.pathFor(.bf16, tokens: 1) == .avx512)
        #expect(k.pathFor(.bf16, tokens: 64) == .amx)
        #expect(k.pathFor(.f32, tokens: 64) == .avx512)
        #expect(k.pathFor(.f16, tokens: 1) == .portable)
        let plain = try CPUKernels(.auto, pool: ThreadPool(threads: 1), features: CPUFeatures(avx512: false, avx512bf16: false, amx: false))
        #expect(plain.pathFor(.bf16, tokens: 64) == .portable)
    }
}

@Suite struct ThreadPoolTests {
    @Test func everyIndexRunsExactlyOnce() {
        let pool = ThreadPool(threads: 3)
        for n in [0, 1, 2, 7, 1000] {
            let hits = UnsafeMutablePointer<Int>.allocate(capacity: max(n, 1))
            hits.initialize(repeating: 0, count: max(n, 1))
            let p = Unchecked(hits)
            pool.parallelFor(n) { i in p.value[i] += 1 }
            #expect((0..<n).allSatisfy { hits[$0] == 1 }, "n=\(n)")
            hits.deallocate()
        }
    }

    @Test func nestedCallsRunInline() {
        let pool = ThreadPool(threads: 2)
        let hits = UnsafeMutablePointer<Int>.allocate(capacity: 16)
        hits.initialize(repeating: 0, count: 16)
        let p = Unchecked(hits)
        pool.parallelFor(4) { i in pool.parallelFor(4) { j in p.value[i * 4 + j] += 1 } }
        #expect((0..<16).allSatisfy { hits[$0] == 1 })
        hits.deallocate()
    }
}
