/// Element types Duet computes with. Weights keep their stored dtype; activations are fp32.
public enum DType: String, Sendable, CaseIterable, Codable {
    case bf16 = "BF16"
    case f16 = "F16"
    case f32 = "F32"

    /// Bytes per element.
    public var size: Int {
        switch self {
        case .bf16, .f16: 2
        case .f32: 4
        }
    }
}

/// bf16 -> fp32 is exact: bf16 is the top half of an fp32 bit pattern.
@inline(__always)
public func bf16ToFloat(_ bits: UInt16) -> Float {
    Float(bitPattern: UInt32(bits) << 16)
}

/// fp32 -> bf16 with round-to-nearest-even (NaN stays NaN), as torch's `.to(torch.bfloat16)`.
@inline(__always)
public func floatToBF16(_ value: Float) -> UInt16 {
    let bits = value.bitPattern
    if value.isNaN { return UInt16(truncatingIfNeeded: (bits >> 16) | 0x40) }
    let rounding = 0x7FFF + ((bits >> 16) & 1)
    return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
}

/// IEEE binary16 -> fp32, exact.
@inline(__always)
public func f16ToFloat(_ bits: UInt16) -> Float {
    Float(Float16(bitPattern: bits))
}
