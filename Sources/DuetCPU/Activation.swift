#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// SwiGLU's inner product: `gate[i] = silu(gate[i]) * up[i]`, `silu(x) = x * sigmoid(x)`.
public func siluMultiply(_ gate: UnsafeMutablePointer<Float>, _ up: UnsafePointer<Float>, count: Int) {
    for i in 0..<count {
        let g = gate[i]
        gate[i] = g / (1 + expf(-g)) * up[i]
    }
}

/// In-place softmax of `x[0..<count]` with the max subtracted first.
public func softmax(_ x: UnsafeMutablePointer<Float>, count: Int) {
    var m = -Float.infinity
    for i in 0..<count { m = max(m, x[i]) }
    var total: Float = 0
    for i in 0..<count {
        x[i] = expf(x[i] - m)
        total += x[i]
    }
    for i in 0..<count { x[i] /= total }
}

/// `log(softmax(x))[index]`, computed stably in Double.
public func logSoftmax(_ x: UnsafeBufferPointer<Float>, at index: Int) -> Double {
    Double(x[index]) - logSumExp(x)
}

/// log(sum(exp(x))), in float64 and without overflow.
public func logSumExp(_ x: UnsafeBufferPointer<Float>) -> Double {
    var m = -Double.infinity
    for v in x { m = max(m, Double(v)) }
    var total = 0.0
    for v in x { total += exp(Double(v) - m) }
    return m + log(total)
}
