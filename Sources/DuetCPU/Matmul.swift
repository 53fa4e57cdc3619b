import DuetCore

/// `out[t, n] = sum_k x[t, k] * w[n, k]` — `x @ w^T` as `nn.Linear` computes it, with `w`
/// read in its stored dtype (bf16/f16 widened to fp32 exactly) and fp32 accumulation.
///
/// Shapes: x `[T, K]`, w `[N, K]`, out `[T, N]`. Each weight row is widened once and used
/// for all T tokens, so the weights are read once per call whatever T is. Rows are split
/// into blocks run in parallel. (The roofline kernels replace this one behind the same call.)
public func matmul(_ x: UnsafePointer<Float>, _ w: WeightMatrix, _ out: UnsafeMutablePointer<Float>, tokens T: Int) {
    let N = w.rows, K = w.cols
    let blockRows = 64
    let blocks = (N + blockRows - 1) / blockRows
    let px = Unchecked(x), po = Unchecked(out)
    let parallel = N * K * max(T, 1) >= 1 << 16
    let body: (Int) -> Void = { b in
        let row = UnsafeMutablePointer<Float>.allocate(capacity: K)
        defer { row.deallocate() }
        for n in (b * blockRows)..<min(N, (b + 1) * blockRows) {
            w.loadRow(n, into: row)
            for t in 0..<T {
                po.value[t * N + n] = dot(px.value.advanced(by: t * K), row, K)
            }
        }
    }
    if parallel { parallelFor(blocks, body) } else { for b in 0..<blocks { body(b) } }
}

/// `sum_i a[i] * b[i]` with four independent 8-wide accumulators.
@inline(__always)
public func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), s2 = SIMD8<Float>(), s3 = SIMD8<Float>()
    let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
    var i = 0
    while i + 32 <= n {
        s0 += ra.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) * rb.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
        s1 += ra.loadUnaligned(fromByteOffset: i * 4 + 32, as: SIMD8<Float>.self) * rb.loadUnaligned(fromByteOffset: i * 4 + 32, as: SIMD8<Float>.self)
        s2 += ra.loadUnaligned(fromByteOffset: i * 4 + 64, as: SIMD8<Float>.self) * rb.loadUnaligned(fromByteOffset: i * 4 + 64, as: SIMD8<Float>.self)
        s3 += ra.loadUnaligned(fromByteOffset: i * 4 + 96, as: SIMD8<Float>.self) * rb.loadUnaligned(fromByteOffset: i * 4 + 96, as: SIMD8<Float>.self)
        i += 32
    }
    while i + 8 <= n {
        s0 += ra.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) * rb.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
        i += 8
    }
    let v = (s0 + s1) + (s2 + s3)
    var sum = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    while i < n {
        sum += a[i] * b[i]
        i += 1
    }
    return sum
}
