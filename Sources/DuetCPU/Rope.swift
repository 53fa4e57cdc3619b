#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Rotary position embedding in HF's rotate-half convention: for pair `(i, i + d/2)`,
/// `x' = x * cos(p * f_i) + rotate_half(x) * sin(p * f_i)` with `f_i = theta^(-2i/d)`.
public struct Rope: Sendable {
    public let headDim: Int
    /// `[headDim / 2]`, computed in fp32 as HF's default rope does.
    public let inverseFrequencies: [Float]

    public init(headDim: Int, theta: Double) {
        self.headDim = headDim
        inverseFrequencies = (0..<(headDim / 2)).map { i in
            1 / Float(pow(theta, Double(2 * i) / Double(headDim)))
        }
    }

    /// Rotates `x` in place. Shape: x `[T, heads, headDim]`, token t at `positions[t]`.
    public func apply(_ x: UnsafeMutablePointer<Float>, heads: Int, positions: Range<Int>) {
        let half = headDim / 2
        for (t, p) in positions.enumerated() {
            for i in 0..<half {
                let angle = Float(p) * inverseFrequencies[i]
                let c = cos(angle), s = sin(angle)
                for h in 0..<heads {
                    let v = x.advanced(by: (t * heads + h) * headDim)
                    let a = v[i], b = v[i + half]
                    v[i] = a * c - b * s
                    v[i + half] = b * c + a * s
                }
            }
        }
    }
}
