#if canImport(Glibc)
import Glibc
#endif
import DuetCPU
import DuetCore
import DuetTestSupport
import Testing

/// A `[rows, cols]` weight matrix in `dtype` made from `values`, with the exact fp32 values it holds.
func makeWeights(_ values: [Float], rows: Int, cols: Int, dtype: DType) -> (WeightMatrix, [Float], AnyObject) {
    final class Storage { var bytes: [UInt8]; init(_ b: [UInt8]) { bytes = b } }
    let stored: [UInt8]
    let exact: [Float]
    switch dtype {
    case .f32:
        stored = bytes(of: values); exact = values
    case .bf16:
        let b = values.map(floatToBF16); stored = b.withUnsafeBytes { Array($0) }; exact = b.map(bf16ToFloat)
    case .f16:
        let h = values.map { Float16($0).bitPattern }; stored = h.withUnsafeBytes { Array($0) }; exact = h.map(f16ToFloat)
    }
    let storage = Storage(stored)
    let base = storage.bytes.withUnsafeBytes { $0.baseAddress! }  // stable: the array is never mutated again
    let view = TensorView(name: "w", dtype: dtype, shape: [rows, cols], base: base, owner: storage)
    return (WeightMatrix(view), exact, storage)
}

/// Kernels against straightforward fp64 references on random inputs.
@Suite struct KernelTests {
    @Test func rmsNormMatchesReference() {
        let D = 37, T = 3
        let x = randomFloats(T * D, seed: 1), w = randomFloats(D, seed: 2)
        var out = [Float](repeating: 0, count: T * D)
        rmsNorm(x, weight: w, eps: 1e-5, &out, tokens: T)
        var reference = [Float](repeating: 0, count: T * D)
        for t in 0..<T {
            let ms = (0..<D).reduce(0.0) { $0 + Double(x[t * D + $1]) * Double(x[t * D + $1]) } / Double(D)
            for i in 0..<D { reference[t * D + i] = Float(Double(w[i]) * Double(x[t * D + i]) / (ms + 1e-5).squareRoot()) }
        }
        #expect(relativeL2Error(out, reference) < 1e-6)
    }

    /// The vectorised log-sum-exp against float64 on random logits of several sizes (tails of
    /// 1-15 lanes included) and spreads, and with -inf entries (masked tokens).
    @Test func logSumExpMatchesFloat64() {
        for (n, scale) in [(1, 1.0), (15, 3.0), (16, 1.0), (17, 8.0), (1000, 0.1), (32000, 4.0), (32003, 30.0)] {
            var x = randomFloats(n, seed: UInt64(n)).map { $0 * Float(scale) }
            if n > 2 { x[n / 2] = -.infinity }
            let reference = x.reduce(-Double.infinity) { max($0, Double($1)) }
            let exact = reference + log(x.reduce(0.0) { $0 + exp(Double($1) - reference) })
            let fast = x.withUnsafeBufferPointer(logSumExp)
            #expect(abs(fast - exact) < 1e-6 * max(1, abs(exact)), "n \(n) scale \(scale): \(fast) vs \(exact)")
        }
        // +inf logits: float64's answer (inf - inf is NaN), not a finite number.
        let infinite: [Float] = [1, .infinity, 2]
        #expect(infinite.withUnsafeBufferPointer(logSumExp).isNaN)
    }

    /// exp on [-87, 0] (the range logSumExp feeds it) within 2e-7 relative of float64's, and
    /// below -87 no larger than exp(-87).
    @Test func vectorExpIsAccurate() {
        var worst = 0.0
        for start in stride(from: -87.0, to: 0, by: 0.37) {
            let x = SIMD16<Float>((0..<16).map { Float(start + Double($0) * 0.0231) })
            let y = expNonPositive(x)
            for i in 0..<16 where x[i] <= 0 { worst = max(worst, abs(Double(y[i]) / exp(Double(x[i])) - 1)) }
        }
        #expect(worst < 2e-7)
        #expect(expNonPositive(SIMD16(repeating: -1000))[0] <= Float(exp(-86.9)))
    }

    /// Rotating by position p then q equals rotating by p + q (rope is a rotation), and
    /// position 0 is the identity; the first pair's angle is p (frequency 1).
    @Test func ropeIsARotationInTheRotateHalfLayout() {
        let rope = Rope(headDim: 8, theta: 10000)
        let x = randomFloats(8, seed: 3)
        var a = x
        rope.apply(&a, heads: 1, positions: 0..<1)
        #expect(a == x)
        var b = x
        rope.apply(&b, heads: 1, positions: 5..<6)
        let c = Double(cos(Float(5))), s = Double(sin(Float(5)))
        #expect(abs(Double(b[0]) - (Double(x[0]) * c - Double(x[4]) * s)) < 1e-6)
        #expect(abs(Double(b[4]) - (Double(x[4]) * c + Double(x[0]) * s)) < 1e-6)
        var twice = x
        rope.apply(&twice, heads: 1, positions: 2..<3)
        rope.apply(&twice, heads: 1, positions: 3..<4)
        #expect(relativeL2Error(twice, b) < 1e-5)
    }

    @Test(arguments: [nil, 3] as [Int?])
    func attentionMatchesReference(window: Int?) {
        let T = 4, start = 2, H = 4, Hkv = 2, d = 8, P = start + T
        let q = randomFloats(T * H * d, seed: 4), k = randomFloats(P * Hkv * d, seed: 5), v = randomFloats(P * Hkv * d, seed: 6)
        var out = [Float](repeating: .nan, count: T * H * d)
        k.withUnsafeBufferPointer { kp in
            v.withUnsafeBufferPointer { vp in
                attention(queries: q, keys: KVRows(contiguous: kp.baseAddress!, rowWidth: Hkv * d),
                          values: KVRows(contiguous: vp.baseAddress!, rowWidth: Hkv * d), out: &out, tokens: T, start: start,
                          heads: H, kvHeads: Hkv, headDim: d, window: window, pool: ThreadPool(threads: 2))
            }
        }
        // The same rows in blocks of 4 positions (a paged KV cache) give the same output.
        let bs = 4, w = Hkv * d
        let blocks = stride(from: 0, to: P, by: bs).map { p0 -> (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>) in
            let kb = UnsafeMutablePointer<Float>.allocate(capacity: bs * w), vb = UnsafeMutablePointer<Float>.allocate(capacity: bs * w)
            for i in 0..<min(bs, P - p0) * w { kb[i] = k[p0 * w + i]; vb[i] = v[p0 * w + i] }
            return (kb, vb)
        }
        var paged = [Float](repeating: .nan, count: T * H * d)
        attention(queries: q, keys: KVRows(blocks: blocks.map { UnsafePointer($0.0) }, blockSize: bs, rowWidth: w),
                  values: KVRows(blocks: blocks.map { UnsafePointer($0.1) }, blockSize: bs, rowWidth: w), out: &paged, tokens: T,
                  start: start, heads: H, kvHeads: Hkv, headDim: d, window: window, pool: ThreadPool(threads: 1))
        for (kb, vb) in blocks { kb.deallocate(); vb.deallocate() }
        #expect(paged == out)
        var reference = [Float](repeating: 0, count: T * H * d)
        for t in 0..<T {
            let p = start + t
            for h in 0..<H {
                let g = h / (H / Hkv)
                let keys = (0...p).filter { window == nil || $0 > p - window! }
                let scores = keys.map { j in (0..<d).reduce(0.0) { $0 + Double(q[(t * H + h) * d + $1]) * Double(k[(j * Hkv + g) * d + $1]) } / Double(d).squareRoot() }
                let m = scores.max()!
                let e = scores.map { exp($0 - m) }
                let z = e.reduce(0, +)
                for i in 0..<d {
                    reference[(t * H + h) * d + i] = Float(zip(keys, e).reduce(0.0) { $0 + $1.1 / z * Double(v[($1.0 * Hkv + g) * d + i]) })
                }
            }
        }
        #expect(relativeL2Error(out, reference) < 1e-5)
    }

    @Test func routerRenormalisesTopK() {
        let logits: [Float] = [0.1, 2.0, -1.0, 1.5,   3.0, 3.0, 0.0, -2.0]  // [2, 4]
        let choices = routeTopK(logits, tokens: 2, experts: 4, k: 2)
        #expect(choices[0].experts == [1, 3])
        let w = 1 / (1 + exp(Double(1.5 - 2.0)))  // softmax restricted to the two kept experts
        #expect(abs(Double(choices[0].weights[0]) - w) < 1e-6)
        #expect(choices[1].experts == [0, 1])  // a tie goes to the lower id
        #expect(abs(choices[1].weights[0] - 0.5) < 1e-7)
    }

    @Test func bf16RoundsToNearestEven() {
        #expect(floatToBF16(1.0) == 0x3F80)
        #expect(floatToBF16(Float(bitPattern: 0x3F80_8000)) == 0x3F80)  // tie, even stays
        #expect(floatToBF16(Float(bitPattern: 0x3F81_8000)) == 0x3F82)  // tie, odd rounds up
        #expect(floatToBF16(Float(bitPattern: 0x3F80_8001)) == 0x3F81)
        #expect(bf16ToFloat(floatToBF16(-2.5)) == -2.5)
    }
}

@Suite struct ByteSizeTests {
    @Test func sizesParseAndNonsenseDoesNot() {
        #expect(parseByteSize("24GiB") == 24 << 30)
        #expect(parseByteSize("800MiB") == 800 << 20)
        #expect(parseByteSize("1.5GiB") == 3 << 29)
        #expect(parseByteSize("2GB") == 2_000_000_000)
        #expect(parseByteSize("4096") == 4096)
        #expect(parseByteSize("12XB") == nil)
        #expect(parseByteSize("-1GiB") == nil)
        #expect(parseByteSize("") == nil)
    }
}
