#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import DuetCore
import DuetCPU
import DuetModels

/// One expert's geometry and the format its weights compute in: the stored dtype, or a
/// quantized format (`--expert-dtype q8|q4`), in which case slots hold the packed levels and
/// scales exactly as the CPU kernels read them — one host copy serves both paths.
public struct ExpertShape: Sendable, Equatable {
    public var hidden: Int  // D
    public var ffn: Int     // F
    public var dtype: DType
    /// The quantized format the experts compute in (nil: `dtype`).
    public var format: QuantFormat?
    public init(hidden: Int, ffn: Int, dtype: DType, format: QuantFormat? = nil) {
        self.hidden = hidden
        self.ffn = ffn
        self.dtype = dtype
        self.format = format
    }
    /// A Mixtral model's experts as they compute (quantized where the model's are).
    public init(_ model: MixtralModel) {
        self.init(hidden: model.config.hiddenSize, ffn: model.config.intermediateSize, dtype: model.layers[0].experts[0].gate.dtype,
                  format: model.expertFormat)
    }
    /// Bytes of w1, w3 `[F, D]` and w2 `[D, F]` in a slot, in that order.
    public var partBytes: [Int] {
        guard let format else { return [hidden * ffn * dtype.size, hidden * ffn * dtype.size, hidden * ffn * dtype.size] }
        let upward = QuantizedMatrix.byteCount(format: format, rows: ffn, cols: hidden)
        return [upward, upward, QuantizedMatrix.byteCount(format: format, rows: hidden, cols: ffn)]
    }
    /// Bytes of one expert at its computing format.
    public var bytes: Int { partBytes.reduce(0, +) }
    /// "bf16", "q8", ...
    public var formatName: String { format?.rawValue ?? dtype.rawValue }
}

extension MixtralExpert {
    /// The memory a device slot receives for this expert in `shape`'s format: w1, w3, w2 —
    /// quantized ones as their packed levels followed by their scales (one contiguous range
    /// each, `QuantizedMatrix`'s layout).
    public func parts(_ shape: ExpertShape) -> [UnsafeRawBufferPointer] {
        if shape.format != nil, let q = quantized {
            return [q.gate, q.up, q.down].map { UnsafeRawBufferPointer(start: $0.levels, count: $0.byteCount) }
        }
        return [gate, up, down].map { UnsafeRawBufferPointer(start: $0.view.base, count: $0.byteCount) }
    }
}

/// A device's memory: the budget, what is in use by category, and the most ever in use.
public struct DeviceMemory: Sendable, Equatable {
    public var limit: Int
    public var used: [String: Int]
    public var peak: Int
    public var total: Int { used.values.reduce(0, +) }
    public init(limit: Int, used: [String: Int], peak: Int) {
        self.limit = limit
        self.used = used
        self.peak = peak
    }
}

/// Why device work failed; the executor then runs those experts on the CPU.
public enum DeviceError: Error, Equatable, CustomStringConvertible {
    case overBudget(String)
    case failed(String)
    public var description: String {
        switch self {
        case .overBudget(let why), .failed(let why): why
        }
    }
}

/// One expert's work in a device step: compute from the weights in `slot`, after copying
/// `copy`'s weights into it when given (a streamed expert), over `tokens` rows of the input.
public struct DeviceJob {
    public var slot: Int
    public var copy: MixtralExpert?
    public var tokens: Int
    public init(slot: Int, copy: MixtralExpert?, tokens: Int) {
        self.slot = slot
        self.copy = copy
        self.tokens = tokens
    }
}

/// What a device step produced: every job's outputs `[Te, D]` concatenated in job order,
/// and where its time went (device clocks where it has them).
public struct DeviceResult {
    public var outputs: [Float]
    public var copySeconds: Double
    public var computeSeconds: Double
    public init(outputs: [Float], copySeconds: Double, computeSeconds: Double) {
        self.outputs = outputs
        self.copySeconds = copySeconds
        self.computeSeconds = computeSeconds
    }
}

/// The "device" role of the offload executor: expert weights in slots within a memory
/// budget, and expert FFNs run there while the host CPU computes others. The CUDA backend
/// implements it with streams and DMA; `CPUExpertDevice` implements it with a second
/// thread pool, so CI runs the same planner, executor and budget code without a GPU.
public protocol ExpertDevice: AnyObject {
    var name: String { get }
    var memory: DeviceMemory { get }
    /// Bytes that stay in use besides the slots (workspace for up to `maxRows` input rows).
    func workspaceBytes(shape: ExpertShape, maxRows: Int) -> Int
    /// Allocates up to `count` slots for experts of `shape` and workspace for `maxRows` rows;
    /// returns how many slots it got (fewer when the budget or the device runs out).
    func prepare(shape: ExpertShape, slots count: Int, maxRows: Int) throws(DeviceError) -> Int
    /// Copies an expert's weights into a slot and waits (placement at start).
    func fill(slot: Int, with expert: MixtralExpert) throws(DeviceError)
    /// Makes the host memory of experts that will be streamed DMA-able (page-locked) once;
    /// returns the bytes it registered (a device without DMA registers none).
    func pin(_ experts: [MixtralExpert]) -> Int
    /// Starts one layer's device work on `input` `[Σ Te, D]` (the jobs' rows in job order)
    /// and returns without waiting.
    func submit(_ jobs: [DeviceJob], input: [Float]) throws(DeviceError)
    /// Waits for the submitted work.
    func collect() throws(DeviceError) -> DeviceResult
}

/// A device that can also run a step on activations that already live on it (the dense
/// layers on the same GPU): it gathers each job's token rows from the hidden state there,
/// and adds each output times its router weight into the output there (zeroed first), so no
/// activation row of its experts crosses PCIe and the host neither gathers nor combines them.
public protocol ResidentActivationDevice: ExpertDevice {
    /// Whether `activations` live on this device.
    func holds(_ activations: any DeviceActivations) -> Bool
    /// Starts the step: `rows[j]` are job j's tokens and router weights. `collect` then
    /// returns no outputs (they are in `activations`).
    func submit(_ jobs: [DeviceJob], rows: [[ExpertAssignment]], on activations: any DeviceActivations) throws(DeviceError)
}

/// The CPU in the device role: slots are host buffers within a budget, filled by copying
/// the weights (as DMA would), and the experts run on a thread pool of their own, on a
/// thread of their own, while the executor's CPU experts run on the main pool. Same
/// kernels as the host path, so outputs are identical to the plain CPU model.
public final class CPUExpertDevice: ExpertDevice, @unchecked Sendable {
    public let name: String
    private let kernels: CPUKernels
    private let limit: Int
    private var used: [String: Int] = [:]
    private var peak = 0
    private var shape = ExpertShape(hidden: 0, ffn: 0, dtype: .bf16)
    private var slots: [HugePageBuffer] = []
    private let queue = DispatchQueue(label: "duet.cpu-device")
    private var pending: DispatchWorkItem?
    private var result: Result<DeviceResult, DeviceError>?

    /// `kernels`: the device's own kernels and pool (not the host's); `memoryLimit`: its budget.
    public init(kernels: CPUKernels, memoryLimit: Int) {
        self.kernels = kernels
        limit = memoryLimit
        name = "CPU device (\(kernels.pool.threadCount) threads, \(kernels.path.rawValue) kernels)"
    }

    public var memory: DeviceMemory { DeviceMemory(limit: limit, used: used, peak: peak) }

    private func reserve(_ bytes: Int, _ category: String) throws(DeviceError) {
        let total = used.values.reduce(0, +)
        guard total + bytes <= limit else {
            throw .overBudget("device allocation of \(bytes >> 10) KiB for \(category) exceeds the budget (\(total >> 10) of \(limit >> 10) KiB in use)")
        }
        used[category, default: 0] += bytes
        peak = max(peak, total + bytes)
    }

    public func workspaceBytes(shape: ExpertShape, maxRows: Int) -> Int { 2 * maxRows * shape.hidden * 4 }

    public func prepare(shape: ExpertShape, slots count: Int, maxRows: Int) throws(DeviceError) -> Int {
        self.shape = shape
        try reserve(workspaceBytes(shape: shape, maxRows: maxRows), "workspace")
        for _ in 0..<count {
            do { try reserve(shape.bytes, "experts") } catch { break }
            slots.append(HugePageBuffer(byteCount: shape.bytes))
        }
        return slots.count
    }

    public func fill(slot: Int, with expert: MixtralExpert) throws(DeviceError) { copy(expert, into: slot) }

    public func pin(_ experts: [MixtralExpert]) -> Int { 0 }

    private func copy(_ expert: MixtralExpert, into slot: Int) {
        var offset = 0
        for part in expert.parts(shape) {
            memcpy(slots[slot].base + offset, part.baseAddress!, part.count)
            offset += part.count
        }
    }

    /// y `[T, D]` = the expert in `slot` applied to x `[T, D]`, in the slot's format.
    private func expertFFN(slot: Int, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, tokens T: Int) {
        let D = shape.hidden, F = shape.ffn, base = UnsafeRawPointer(slots[slot].base), owner = slots[slot]
        let offsets = [0, shape.partBytes[0], shape.partBytes[0] + shape.partBytes[1]]
        if let format = shape.format {
            func matrix(_ i: Int, _ rows: Int, _ cols: Int) -> QuantizedMatrix {
                QuantizedMatrix(format: format, rows: rows, cols: cols, data: base + offsets[i], owner: owner)
            }
            kernels.expertFFN(x, QuantizedExpert(gate: matrix(0, F, D), up: matrix(1, F, D), down: matrix(2, D, F)), y, tokens: T)
        } else {
            func view(_ i: Int, _ rows: Int, _ cols: Int) -> WeightMatrix {
                WeightMatrix(TensorView(name: "slot \(slot)", dtype: shape.dtype, shape: [rows, cols], base: base + offsets[i], owner: owner))
            }
            kernels.expertFFN(x, gate: view(0, F, D), up: view(1, F, D), down: view(2, D, F), y, tokens: T)
        }
    }

    public func submit(_ jobs: [DeviceJob], input: [Float]) throws(DeviceError) {
        guard pending == nil else { throw .failed("CPU device: submit before the previous step was collected") }
        let work = DispatchWorkItem { [self] in
            var copySeconds = 0.0, computeSeconds = 0.0
            var outputs = [Float](repeating: 0, count: input.count)
            var row = 0
            let D = shape.hidden
            for job in jobs {
                if let expert = job.copy {
                    let start = ContinuousClock.now
                    copy(expert, into: job.slot)
                    copySeconds += secondsSince(start)
                }
                let start = ContinuousClock.now
                input.withUnsafeBufferPointer { x in
                    outputs.withUnsafeMutableBufferPointer { y in
                        expertFFN(slot: job.slot, x.baseAddress! + row * D, y.baseAddress! + row * D, tokens: job.tokens)
                    }
                }
                computeSeconds += secondsSince(start)
                row += job.tokens
            }
            result = .success(DeviceResult(outputs: outputs, copySeconds: copySeconds, computeSeconds: computeSeconds))
        }
        pending = work
        queue.async(execute: work)
    }

    public func collect() throws(DeviceError) -> DeviceResult {
        guard let work = pending else { throw .failed("CPU device: collect without a submitted step") }
        work.wait()
        pending = nil
        defer { result = nil }
        return try result!.get()
    }
}
