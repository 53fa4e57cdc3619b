import DuetCore

/// Kernel checks the binary runs itself (`duet selftest`), where no test runner exists (the
/// GPU host): each available path against an fp64 scalar reference on random inputs at
/// sizes that are not multiples of any tile or vector width.
public enum KernelSelfTest {
    public struct Check: Sendable, Encodable {
        public var name: String
        public var error: Double
        public var tolerance: Double
        public var passed: Bool
    }

    public static func run(pool: ThreadPool, features: CPUFeatures = .current) -> [Check] {
        var checks: [Check] = []
        for path in [KernelPath.reference, .portable, .avx512, .amx] {
            guard let k = try? CPUKernels(path, pool: pool, features: features) else { continue }
            for (N, K) in [(83, 101), (160, 4096), (37, 64)] {
                for dtype in [DType.bf16, .f32] {
                    for T in [1, 3, 17, 64] {
                        let err = matmulError(k, N: N, K: K, T: T, dtype: dtype)
                        let tol = k.pathFor(dtype, tokens: T) == .amx ? 5e-3 : 1e-5
                        checks.append(Check(name: "matmul \(path.rawValue) \(dtype.rawValue) \(N)x\(K) T=\(T)", error: err, tolerance: tol, passed: err < tol))
                    }
                }
            }
            for T in [1, 5, 40] {
                let err = ffnError(k, D: 200, F: 333, T: T)
                let tol = k.pathFor(.bf16, tokens: T) == .amx ? 1e-2 : 2e-5
                checks.append(Check(name: "expert FFN \(path.rawValue) 200x333 T=\(T)", error: err, tolerance: tol, passed: err < tol))
            }
        }
        return checks
    }

    // MARK: helpers

    private final class Buffer {
        let bytes: UnsafeMutableRawPointer
        init(_ count: Int) { bytes = .allocate(byteCount: count, alignment: 64) }
        deinit { bytes.deallocate() }
    }

    /// Random weights in `dtype` and the exact values they hold.
    private static func weights(_ rows: Int, _ cols: Int, _ dtype: DType, seed: UInt64) -> (WeightMatrix, [Double]) {
        let values = random(rows * cols, seed: seed)
        let buffer = Buffer(rows * cols * dtype.size)
        var exact = [Double](repeating: 0, count: values.count)
        for (i, v) in values.enumerated() {
            switch dtype {
            case .bf16:
                let b = floatToBF16(v)
                buffer.bytes.storeBytes(of: b, toByteOffset: i * 2, as: UInt16.self)
                exact[i] = Double(bf16ToFloat(b))
            case .f16:
                let h = Float16(v)
                buffer.bytes.storeBytes(of: h.bitPattern, toByteOffset: i * 2, as: UInt16.self)
                exact[i] = Double(Float(h))
            case .f32:
                buffer.bytes.storeBytes(of: v, toByteOffset: i * 4, as: Float.self)
                exact[i] = Double(v)
            }
        }
        let view = TensorView(name: "w", dtype: dtype, shape: [rows, cols], base: UnsafeRawPointer(buffer.bytes), owner: buffer)
        return (WeightMatrix(view), exact)
    }

    /// Deterministic floats in [-1, 1), never all zero.
    public static func random(_ n: Int, seed: UInt64) -> [Float] {
        var z = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<n).map { _ in
            z ^= z << 13; z ^= z >> 7; z ^= z << 17
            return Float(z >> 40) / Float(1 << 23) - 1
        }
    }

    private static func reference(_ x: [Float], _ w: [Double], T: Int, N: Int, K: Int) -> [Double] {
        var out = [Double](repeating: 0, count: T * N)
        for t in 0..<T { for n in 0..<N { var s = 0.0; for k in 0..<K { s += Double(x[t * K + k]) * w[n * K + k] }; out[t * N + n] = s } }
        return out
    }

    private static func relativeError(_ a: [Float], _ b: [Double]) -> Double {
        var num = 0.0, den = 0.0
        for i in a.indices { num += (Double(a[i]) - b[i]) * (Double(a[i]) - b[i]); den += b[i] * b[i] }
        return (num / max(den, 1e-300)).squareRoot()
    }

    private static func matmulError(_ k: CPUKernels, N: Int, K: Int, T: Int, dtype: DType) -> Double {
        let (w, exact) = weights(N, K, dtype, seed: UInt64(N * 31 + K))
        let x = random(T * K, seed: UInt64(T * 7 + 1))
        var out = [Float](repeating: .nan, count: T * N)
        k.matmul(x, w, &out, tokens: T)
        return relativeError(out, reference(x, exact, T: T, N: N, K: K))
    }

    private static func ffnError(_ k: CPUKernels, D: Int, F: Int, T: Int) -> Double {
        let (gate, g) = weights(F, D, .bf16, seed: 11), (up, u) = weights(F, D, .bf16, seed: 12)
        let (down, d) = weights(D, F, .bf16, seed: 13)
        let x = random(T * D, seed: UInt64(T + 99))
        var y = [Float](repeating: .nan, count: T * D)
        k.expertFFN(x, gate: gate, up: up, down: down, &y, tokens: T)
        let a = reference(x, g, T: T, N: F, K: D), b = reference(x, u, T: T, N: F, K: D)
        var h = [Float](repeating: 0, count: T * F)
        for i in h.indices { h[i] = Float(a[i] / (1 + _exp(-a[i])) * b[i]) }
        return relativeError(y, reference(h, d, T: T, N: D, K: F))
    }
}

@inline(__always) private func _exp(_ x: Double) -> Double {
    #if canImport(Glibc)
    return Glibc.exp(x)
    #else
    return Darwin.exp(x)
    #endif
}
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
