/// RMSNorm as HF's `MixtralRMSNorm` computes it in fp32:
/// `weight * (x * rsqrt(mean(x^2) + eps))`, row by row.
/// Shapes: x `[T, D]`, weight `[D]`, out `[T, D]` (may alias x).
public func rmsNorm(_ x: UnsafePointer<Float>, weight: [Float], eps: Float, _ out: UnsafeMutablePointer<Float>, tokens T: Int) {
    let D = weight.count
    for t in 0..<T {
        let row = x.advanced(by: t * D)
        var sumSquares: Float = 0
        for i in 0..<D { sumSquares += row[i] * row[i] }
        let scale = 1 / (sumSquares / Float(D) + eps).squareRoot()
        for i in 0..<D { out[t * D + i] = weight[i] * (row[i] * scale) }
    }
}
