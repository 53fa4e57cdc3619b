#if canImport(Glibc)
import Glibc
#endif
import DuetCore
import DuetModels
import DuetRuntime

/// The GPU in the offload executor's device role. Expert slots live in device memory within
/// the budget. A step's input rows go up in one asynchronous copy from a page-locked
/// buffer, the experts run on a compute stream, and their outputs come back in one copy.
/// Streamed experts are copied by DMA on a second stream straight from their (page-locked)
/// host memory into their slot, each copy waiting only until the job before it in that
/// slot has finished, and each expert's compute waiting only for its own copy — so copies
/// overlap compute, and the host thread, free after `submit`, computes the CPU's experts.
///
/// With the dense layers on the same GPU (`GPUActivations`), a step's rows are instead
/// gathered on the device from the hidden state the dense layers left there, and each
/// output is added, times its router weight, into their MoE output (`ResidentActivationDevice`).
///
/// Shape letters as in DuetModels/Mixtral.swift.
public final class CUDAExpertDevice: ExpertDevice, ResidentActivationDevice {
    public let gpu: GPU
    private let ops: GPUOps
    public let name: String
    private var shape = ExpertShape(hidden: 0, ffn: 0, dtype: .bf16)
    private var slots: [DeviceBuffer] = []
    private let compute: OpaquePointer?, copies: OpaquePointer?
    /// Per slot: its last job's compute is done / its last copy is done.
    private var slotFree: [OpaquePointer?] = [], copyDone: [OpaquePointer?] = []
    private let computeStart: OpaquePointer?, computeEnd: OpaquePointer?, copyStart: OpaquePointer?, copyEnd: OpaquePointer?
    /// Rows the staging buffers hold; activations `[rows, D]` in and out, pinned on the host.
    private var rowCapacity = 0
    private var input: DeviceBuffer?, output: DeviceBuffer?
    private var hostIn: UnsafeMutableRawPointer?, hostOut: UnsafeMutableRawPointer?
    /// Resident activations: each row's token `[rows]` (Int32) and router weight `[rows]`,
    /// side by side on the device and in page-locked host memory.
    private var rowRoutes: DeviceBuffer?, hostRoutes: UnsafeMutableRawPointer?
    /// `[chunk, F]` gate and up activations; an expert's tokens run in chunks of this many rows.
    private var gateRows: DeviceBuffer?, upRows: DeviceBuffer?
    /// Quantized experts: one matrix dequantized to bf16 `[F, D]` for cuBLAS (prefill).
    private var dequantized: DeviceBuffer?
    static let chunkRows = 256
    /// GEMM token counts are rounded up to a multiple of this (cuBLAS picks its algorithm once
    /// per shape, a cost of the order of the GEMM itself, so a prompt's ever-different
    /// per-expert counts would pay it every time); the input and output staging keep this
    /// many spare rows for the rounding, whose outputs are ignored.
    static let gemmRowMultiple = 32
    private var registered: [UnsafeMutableRawPointer] = []
    private var pending: (rows: Int, copied: Bool)?
    static let category = "experts", workspace = "offload workspace"
    /// Threads for the host-side staging copies of large steps (prompts); idle while a step
    /// is submitted and collected (the CPU's experts run between the two).
    public var hostPool: ThreadPool?

    public init(gpu: GPU) throws(CUDAError) {
        self.gpu = gpu
        ops = GPUOps(gpu: gpu)
        name = "\(gpu.name) (\(gpu.architecture))"
        let d = gpu.driver
        var s1: OpaquePointer? = nil, s2: OpaquePointer? = nil
        try d.check(d.cuStreamCreate(&s1, 1), "cuStreamCreate")  // CU_STREAM_NON_BLOCKING
        try d.check(d.cuStreamCreate(&s2, 1), "cuStreamCreate")
        compute = s1
        copies = s2
        func event() throws(CUDAError) -> OpaquePointer? {
            var e: OpaquePointer? = nil
            try d.check(d.cuEventCreate(&e, 0), "cuEventCreate")
            return e
        }
        computeStart = try event(); computeEnd = try event(); copyStart = try event(); copyEnd = try event()
        gpu.stream = compute
    }

    deinit {
        for p in registered { _ = gpu.driver.cuMemHostUnregister(p) }
        if let hostIn { _ = gpu.driver.cuMemFreeHost(hostIn) }
        if let hostOut { _ = gpu.driver.cuMemFreeHost(hostOut) }
        if let hostRoutes { _ = gpu.driver.cuMemFreeHost(hostRoutes) }
    }

    public var memory: DeviceMemory { DeviceMemory(limit: gpu.budget.limit, used: gpu.budget.used, peak: gpu.budget.peak) }

    public func workspaceBytes(shape: ExpertShape, maxRows: Int) -> Int { Self.workspaceBytes(shape: shape, maxRows: maxRows) }

    /// Staging for `maxRows` rows in and out, one chunk's gate and up activations, the chunk's
    /// activations rounded to bf16 for cuBLAS (a recycled workspace buffer, a power of two),
    /// and for quantized experts one matrix dequantized to bf16 (what cuBLAS multiplies).
    public static func workspaceBytes(shape: ExpertShape, maxRows: Int) -> Int {
        let chunk = min(maxRows, Self.chunkRows)
        return 2 * (maxRows + gemmRowMultiple) * shape.hidden * 4 + 2 * maxRows * 4 + 2 * chunk * shape.ffn * 4 + GPU.workspaceSizeClass(chunk * max(shape.hidden, shape.ffn) * 2)
            + (shape.format != nil ? shape.hidden * shape.ffn * 2 : 0)
    }

    private func mapped<T>(_ body: () throws(CUDAError) -> T) throws(DeviceError) -> T {
        do { return try body() } catch {
            if case .overBudget = error { throw .overBudget(error.description) }
            throw .failed(error.description)
        }
    }

    public func prepare(shape: ExpertShape, slots count: Int, maxRows: Int) throws(DeviceError) -> Int {
        guard shape.format != nil || shape.dtype == .bf16 || shape.dtype == .f32 else { throw .failed("\(shape.dtype.rawValue) experts are not supported on the GPU") }
        self.shape = shape
        try mapped { () throws(CUDAError) in
            try ensureRows(maxRows)
            if shape.format != nil { dequantized = try gpu.allocate(shape.hidden * shape.ffn * 2, category: Self.workspace) }
            for _ in 0..<count {
                guard let slot = try? gpu.allocate(shape.bytes, category: Self.category) else { break }
                slots.append(slot)
                var a: OpaquePointer? = nil, b: OpaquePointer? = nil
                try gpu.driver.check(gpu.driver.cuEventCreate(&a, 2), "cuEventCreate")  // CU_EVENT_DISABLE_TIMING
                try gpu.driver.check(gpu.driver.cuEventCreate(&b, 2), "cuEventCreate")
                slotFree.append(a)
                copyDone.append(b)
            }
        }
        return slots.count
    }

    /// Staging for `rows` activation rows and a chunk's gate and up rows (grown on demand,
    /// within the budget).
    private func ensureRows(_ rows: Int) throws(CUDAError) {
        guard rows > rowCapacity else { return }
        let bytes = (max(rows, 1) + Self.gemmRowMultiple) * shape.hidden * 4
        let chunkBytes = min(max(rows, 1) + Self.gemmRowMultiple, Self.chunkRows) * shape.ffn * 4
        input = nil; output = nil; gateRows = nil; upRows = nil; rowRoutes = nil
        rowCapacity = 0  // until the new buffers exist (a failure here leaves none)
        input = try gpu.allocate(bytes, category: Self.workspace)
        output = try gpu.allocate(bytes, category: Self.workspace)
        rowRoutes = try gpu.allocate(max(rows, 1) * 8, category: Self.workspace)
        gateRows = try gpu.allocate(chunkBytes, category: Self.workspace)
        upRows = try gpu.allocate(chunkBytes, category: Self.workspace)
        for p in [hostIn, hostOut, hostRoutes] { if let p { _ = gpu.driver.cuMemFreeHost(p) } }
        hostIn = nil
        hostOut = nil
        hostRoutes = nil
        try gpu.driver.check(gpu.driver.cuMemHostAlloc(&hostIn, bytes, 0), "cuMemHostAlloc")
        try gpu.driver.check(gpu.driver.cuMemHostAlloc(&hostOut, bytes, 0), "cuMemHostAlloc")
        try gpu.driver.check(gpu.driver.cuMemHostAlloc(&hostRoutes, max(rows, 1) * 8, 0), "cuMemHostAlloc")
        rowCapacity = rows
    }

    public func fill(slot: Int, with expert: MixtralExpert) throws(DeviceError) {
        try mapped { () throws(CUDAError) in
            var offset = 0
            for part in expert.parts(shape) {
                try gpu.driver.check(gpu.driver.cuMemcpyHtoD(slots[slot].pointer + CUdeviceptr(offset), part.baseAddress!, part.count), "cuMemcpyHtoD")
                offset += part.count
            }
        }
    }

    /// Registers the experts' host memory with the driver (merged page ranges, so tensors
    /// sharing a page of a checkpoint are registered once), read-only where the mapping is.
    public func pin(_ experts: [MixtralExpert]) -> Int {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var ranges: [(Int, Int)] = []
        for e in experts {
            for part in e.parts(shape) {
                let start = Int(bitPattern: part.baseAddress)
                ranges.append((start / page * page, (start + part.count + page - 1) / page * page))
            }
        }
        ranges.sort { $0.0 < $1.0 }
        var merged: [(Int, Int)] = []
        for r in ranges {
            if let last = merged.last, r.0 <= last.1 { merged[merged.count - 1].1 = max(last.1, r.1) } else { merged.append(r) }
        }
        var bytes = 0
        for (start, end) in merged {
            let p = UnsafeMutableRawPointer(bitPattern: start)
            // 0: read-write; 8: CU_MEMHOSTREGISTER_READ_ONLY (mmap'ed checkpoints).
            if gpu.driver.cuMemHostRegister(p, end - start, 0) == 0 || gpu.driver.cuMemHostRegister(p, end - start, 8) == 0 {
                registered.append(p!)
                bytes += end - start
            }
        }
        return bytes
    }

    public func submit(_ jobs: [DeviceJob], input x: [Float]) throws(DeviceError) {
        guard pending == nil else { throw .failed("GPU device: submit before the previous step was collected") }
        try mapped { () throws(CUDAError) in try issue(jobs, .host(x)) }
    }

    public func holds(_ activations: any DeviceActivations) -> Bool {
        (activations as? GPUActivations)?.hidden.gpu.driver === gpu.driver
    }

    public func submit(_ jobs: [DeviceJob], rows: [[ExpertAssignment]], on activations: any DeviceActivations) throws(DeviceError) {
        guard pending == nil else { throw .failed("GPU device: submit before the previous step was collected") }
        guard let a = activations as? GPUActivations, holds(a) else { throw .failed("GPU device: activations of another device") }
        try mapped { () throws(CUDAError) in try issue(jobs, .resident(rows.flatMap { $0 }, a)) }
    }

    /// Where a step's input rows come from and its outputs go: rows sent from the host (and
    /// outputs sent back), or read from and added into activations on this GPU.
    private enum Rows {
        case host([Float])
        case resident([ExpertAssignment], GPUActivations)
    }

    private func issue(_ jobs: [DeviceJob], _ source: Rows) throws(CUDAError) {
        let d = gpu.driver, D = shape.hidden
        let rows = jobs.reduce(0) { $0 + $1.tokens }
        try ensureRows(rows)
        guard let input, let output, let hostIn, let hostOut, let rowRoutes, let hostRoutes else { throw .unavailable("offload staging buffers missing") }
        try d.check(d.cuEventRecord(computeStart, compute), "cuEventRecord")
        switch source {
        case .host(let x):
            x.withUnsafeBytes { copyMemory(hostIn, $0.baseAddress!, bytes: rows * D * 4, pool: hostPool) }
            try d.check(d.cuMemcpyHtoDAsync(input.pointer, hostIn, rows * D * 4, compute), "cuMemcpyHtoDAsync")
        case .resident(let routes, let a):
            for (i, r) in routes.enumerated() {
                hostRoutes.storeBytes(of: Int32(r.token), toByteOffset: i * 4, as: Int32.self)
                hostRoutes.storeBytes(of: r.weight, toByteOffset: (rows + i) * 4, as: Float.self)
            }
            try d.check(d.cuMemcpyHtoDAsync(rowRoutes.pointer, hostRoutes, rows * 8, compute), "cuMemcpyHtoDAsync")
            try d.check(d.cuMemsetD32Async(a.output.pointer, 0, a.tokens * D, compute), "cuMemsetD32Async")
            if rows > 0 { try ops.gatherRows(a.hidden, indices: rowRoutes, input, rows: rows, dim: D) }
        }
        var copied = false, row = 0
        for job in jobs {
            if let expert = job.copy {
                if !copied { try d.check(d.cuEventRecord(copyStart, copies), "cuEventRecord") }
                copied = true
                try copy(expert, into: job.slot)
            }
            try runExpert(slot: job.slot, rows: row..<(row + job.tokens), input: input, output: output)
            try d.check(d.cuEventRecord(slotFree[job.slot], compute), "cuEventRecord")
            row += job.tokens
        }
        if copied { try d.check(d.cuEventRecord(copyEnd, copies), "cuEventRecord") }
        if case .resident(_, let a) = source {
            // Each expert's rows, times their weights, into the tokens' output rows. (A GEMM's
            // spare rows may spill into later jobs' rows; those jobs, issued after it, overwrite them.)
            try ops.scatterAddExpertRows(a.output, output, indices: rowRoutes, weights: rowRoutes.view(offset: rows * 4, bytes: rows * 4),
                                         groups: jobs.map(\.tokens), dim: D)
        }
        var hostRows = 0
        if case .host = source {
            try d.check(d.cuMemcpyDtoHAsync(hostOut, output.pointer, rows * D * 4, compute), "cuMemcpyDtoHAsync")
            hostRows = rows
        }
        try d.check(d.cuEventRecord(computeEnd, compute), "cuEventRecord")
        pending = (hostRows, copied)
    }

    /// DMA of an expert's three matrices into `slot` once its previous job there is done;
    /// the compute stream waits for it before using the slot.
    private func copy(_ expert: MixtralExpert, into slot: Int) throws(CUDAError) {
        let d = gpu.driver
        try d.check(d.cuStreamWaitEvent(copies, slotFree[slot], 0), "cuStreamWaitEvent")
        var offset = 0
        for part in expert.parts(shape) {
            try d.check(d.cuMemcpyHtoDAsync(slots[slot].pointer + CUdeviceptr(offset), part.baseAddress!, part.count, copies), "cuMemcpyHtoDAsync")
            offset += part.count
        }
        try d.check(d.cuEventRecord(copyDone[slot], copies), "cuEventRecord")
        try d.check(d.cuStreamWaitEvent(compute, copyDone[slot], 0), "cuStreamWaitEvent")
    }

    /// `y = w2(silu(w1 x) * w3 x)` for the input rows `rows`, in chunks of `chunkRows`.
    private func runExpert(slot: Int, rows: Range<Int>, input: DeviceBuffer, output: DeviceBuffer) throws(CUDAError) {
        guard let gateRows, let upRows else { throw .unavailable("offload workspace missing") }
        let D = shape.hidden, F = shape.ffn, parts = shape.partBytes
        let w1 = slots[slot].view(offset: 0, bytes: parts[0]), w3 = slots[slot].view(offset: parts[0], bytes: parts[1])
        let w2 = slots[slot].view(offset: parts[0] + parts[1], bytes: parts[2])
        for start in stride(from: rows.lowerBound, to: rows.upperBound, by: Self.chunkRows) {
            var n = min(Self.chunkRows, rows.upperBound - start)
            // GEMM-sized chunks run rounded up (the spare rows' outputs land past this job's
            // rows, where the next job or nothing writes later).
            if n >= gpu.gemmMinTokens { n = min(Self.chunkRows, (n + Self.gemmRowMultiple - 1) / Self.gemmRowMultiple * Self.gemmRowMultiple) }
            let x = input.view(offset: start * D * 4, bytes: n * D * 4), y = output.view(offset: start * D * 4, bytes: n * D * 4)
            try matmul(x, w1, gateRows, rows: F, cols: D, tokens: n)
            try matmul(x, w3, upRows, rows: F, cols: D, tokens: n)
            try ops.siluMultiply(gateRows, upRows, count: n * F)
            try matmul(gateRows, w2, y, rows: D, cols: F, tokens: n)
        }
    }

    private func matmul(_ x: DeviceBuffer, _ w: DeviceBuffer, _ y: DeviceBuffer, rows: Int, cols: Int, tokens: Int) throws(CUDAError) {
        if let format = shape.format { try ops.matmulQuantized(x, w, format: format, y, rows: rows, cols: cols, tokens: tokens, scratch: dequantized) }
        else if shape.dtype == .bf16 { try ops.matmulBF16(x, w, y, rows: rows, cols: cols, tokens: tokens) }
        else { try ops.matmulF32(x, w, y, rows: rows, cols: cols, tokens: tokens) }
    }

    public func collect() throws(DeviceError) -> DeviceResult {
        guard let (rows, copied) = pending else { throw .failed("GPU device: collect without a submitted step") }
        pending = nil
        return try mapped { () throws(CUDAError) in
            let d = gpu.driver
            try d.check(d.cuEventSynchronize(computeEnd), "cuEventSynchronize")
            var computeMs: Float = 0, copyMs: Float = 0
            try d.check(d.cuEventElapsedTime(&computeMs, computeStart, computeEnd), "cuEventElapsedTime")
            if copied {
                try d.check(d.cuEventSynchronize(copyEnd), "cuEventSynchronize")
                try d.check(d.cuEventElapsedTime(&copyMs, copyStart, copyEnd), "cuEventElapsedTime")
            }
            let n = rows * shape.hidden
            let outputs = [Float](unsafeUninitializedCapacity: n) { out, count in
                if n > 0 { copyMemory(UnsafeMutableRawPointer(out.baseAddress!), hostOut!, bytes: n * 4, pool: hostPool) }
                count = n
            }
            return DeviceResult(outputs: outputs, copySeconds: Double(copyMs) / 1000, computeSeconds: Double(computeMs) / 1000)
        }
    }
}

/// A step's hidden state `[T, D]` and MoE output `[T, D]` on the GPU (the dense layers'
/// buffers), for an expert device on the same GPU to read and add into.
public final class GPUActivations: DeviceActivations {
    let hidden: DeviceBuffer
    let output: DeviceBuffer
    let tokens: Int
    init(hidden: DeviceBuffer, output: DeviceBuffer, tokens: Int) {
        self.hidden = hidden
        self.output = output
        self.tokens = tokens
    }
}
