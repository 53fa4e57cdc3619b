/// A read-only view of a tensor's bytes in its stored dtype, typically inside an mmap'ed
/// checkpoint. `owner` keeps the memory alive as long as the view exists.
///
/// Views are immutable and the memory they point to is never written, so sharing them
/// between threads is safe; that is why the type is `@unchecked Sendable`.
public struct TensorView: @unchecked Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let base: UnsafeRawPointer
    public let owner: AnyObject?

    public init(name: String, dtype: DType, shape: [Int], base: UnsafeRawPointer, owner: AnyObject?) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.base = base
        self.owner = owner
    }

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { elementCount * dtype.size }

    /// Element `i` (flat index) widened to fp32.
    @inline(__always)
    public func element(_ i: Int) -> Float {
        switch dtype {
        case .f32: base.load(fromByteOffset: i * 4, as: Float.self)
        case .bf16: bf16ToFloat(base.load(fromByteOffset: i * 2, as: UInt16.self))
        case .f16: f16ToFloat(base.load(fromByteOffset: i * 2, as: UInt16.self))
        }
    }

    /// All elements widened to fp32 (for small tensors: norms, biases).
    public func toFloats() -> [Float] {
        (0..<elementCount).map(element)
    }
}

/// A row-major weight matrix `[rows, cols]` (HF `nn.Linear` layout: out_features x
/// in_features) in its stored dtype. Kernels read it as it is; it is never converted.
public struct WeightMatrix: @unchecked Sendable {
    public let view: TensorView
    public let rows: Int
    public let cols: Int

    public init(_ view: TensorView) {
        precondition(view.shape.count == 2, "WeightMatrix needs a 2-D view")  // checked by the loader
        self.view = view
        self.rows = view.shape[0]
        self.cols = view.shape[1]
    }

    public var dtype: DType { view.dtype }
    public var byteCount: Int { view.byteCount }

    /// Row `r` widened to fp32 into `out[0..<cols]`.
    @inline(__always)
    public func loadRow(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        let start = r * cols
        switch view.dtype {
        case .f32:
            out.update(from: view.base.advanced(by: start * 4).assumingMemoryBound(to: Float.self), count: cols)
        case .bf16:
            let src = view.base.advanced(by: start * 2).assumingMemoryBound(to: UInt16.self)
            for c in 0..<cols { out[c] = bf16ToFloat(src[c]) }
        case .f16:
            let src = view.base.advanced(by: start * 2).assumingMemoryBound(to: UInt16.self)
            for c in 0..<cols { out[c] = f16ToFloat(src[c]) }
        }
    }
}
