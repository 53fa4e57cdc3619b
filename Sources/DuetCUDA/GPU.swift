#if canImport(Glibc)
import Glibc
#endif
import DuetCore
import DuetFormats
import Foundation
import Synchronization

/// Bytes Duet may allocate on the GPU (`--gpu-memory`), tracked by category (weights, KV
/// cache, workspace): an allocation past the limit is an error the caller handles (keeping
/// those weights on the CPU), never a crash.
/// Read from any thread (metrics); changed by the thread that runs the model.
public final class GPUMemoryBudget: Sendable {
    public let limit: Int
    private struct State { var used: [String: Int] = [:]; var total = 0; var peak = 0 }
    private let state = Mutex(State())
    public init(limit: Int) { self.limit = limit }
    /// Bytes in use by category.
    public var used: [String: Int] { state.withLock { $0.used } }
    public var total: Int { state.withLock { $0.total } }
    /// The most ever in use at once.
    public var peak: Int { state.withLock { $0.peak } }

    func reserve(_ bytes: Int, _ category: String) throws(CUDAError) {
        let refused: Int? = state.withLock { s in
            guard s.total + bytes <= limit else { return s.total }
            s.used[category, default: 0] += bytes
            s.total += bytes
            s.peak = max(s.peak, s.total)
            return nil
        }
        if let used = refused { throw .overBudget(category: category, bytes: bytes, used: used, limit: limit) }
    }

    func release(_ bytes: Int, _ category: String) {
        state.withLock { s in
            s.used[category, default: 0] -= bytes
            s.total -= bytes
        }
    }
}

/// Device memory, freed (and returned to the budget) when released.
public final class DeviceBuffer: @unchecked Sendable {
    let gpu: GPU
    let pointer: CUdeviceptr
    public let bytes: Int
    public let category: String
    /// Set for a view into another buffer (which it keeps alive); a view frees nothing.
    private let parent: DeviceBuffer?

    init(gpu: GPU, pointer: CUdeviceptr, bytes: Int, category: String, parent: DeviceBuffer? = nil) {
        self.gpu = gpu
        self.pointer = pointer
        self.bytes = bytes
        self.category = category
        self.parent = parent
    }

    /// `bytes` bytes from `offset` on, as a buffer kernels can take.
    func view(offset: Int, bytes: Int) -> DeviceBuffer {
        DeviceBuffer(gpu: gpu, pointer: pointer + CUdeviceptr(offset), bytes: bytes, category: category, parent: self)
    }

    deinit {
        if parent != nil { return }
        if category == GPU.workspace {
            gpu.recycle(pointer, bytes: bytes)
        } else {
            _ = gpu.driver.cuMemFree(pointer)
            gpu.budget.release(bytes, category)
        }
    }
}

/// One CUDA device with its primary context, an NVRTC compiler with an on-disk CUBIN cache,
/// and a memory budget.
public final class GPU: @unchecked Sendable {
    let driver: CUDADriver
    let nvrtc: NVRTC
    public let name: String
    /// NVRTC target, from the device's compute capability (e.g. "sm_90").
    public let architecture: String
    public let driverVersion: Int
    public let budget: GPUMemoryBudget
    private var functions: [String: OpaquePointer] = [:]
    private var functionNames: [OpaquePointer: String] = [:]
    private var modules: [UInt64: OpaquePointer] = [:]  // by source hash
    /// The category whose buffers are recycled: a decode step allocates the same shapes every
    /// time, and cuMemAlloc/cuMemFree are slow and synchronise the device, so freed workspace
    /// stays reserved (in the budget) and is handed out again by size class (a power of two).
    public static let workspace = "workspace"
    private var freeWorkspace: [Int: [CUdeviceptr]] = [:]
    private let workspaceLock = NSLock()

    /// Whether the CUDA driver library is on this machine (a GPU may still be unusable).
    public static var driverPresent: Bool { (try? CUDADriver()) != nil }

    /// Opens device 0. `memoryLimit` nil: the device's free memory at start.
    public init(memoryLimit: Int? = nil) throws(CUDAError) {
        driver = try CUDADriver()
        nvrtc = try NVRTC()
        try driver.check(driver.cuInit(0), "cuInit")
        var device: Int32 = 0
        try driver.check(driver.cuDeviceGet(&device, 0), "cuDeviceGet")
        var context: OpaquePointer? = nil
        try driver.check(driver.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain")
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        var major: Int32 = 0, minor: Int32 = 0, version: Int32 = 0
        try driver.check(driver.cuDeviceGetAttribute(&major, 75, device), "cuDeviceGetAttribute")  // COMPUTE_CAPABILITY_MAJOR
        try driver.check(driver.cuDeviceGetAttribute(&minor, 76, device), "cuDeviceGetAttribute")  // COMPUTE_CAPABILITY_MINOR
        try driver.check(driver.cuDriverGetVersion(&version), "cuDriverGetVersion")
        var text = [CChar](repeating: 0, count: 256)
        try driver.check(driver.cuDeviceGetName(&text, 256, device), "cuDeviceGetName")
        name = String(cString: text)
        architecture = "sm_\(major)\(minor)"
        driverVersion = Int(version)
        var free = 0, total = 0
        try driver.check(driver.cuMemGetInfo(&free, &total), "cuMemGetInfo")
        budget = GPUMemoryBudget(limit: min(memoryLimit ?? free, free))
    }

    // MARK: memory

    /// Bytes a workspace allocation of `requested` bytes takes: its size class, the next
    /// power of two (at least 256), so budgets that keep workspace free count it the same way.
    public static func workspaceSizeClass(_ requested: Int) -> Int {
        max(256, 1 << (Int.bitWidth - (max(requested, 1) - 1).leadingZeroBitCount))
    }

    public func allocate(_ requested: Int, category: String) throws(CUDAError) -> DeviceBuffer {
        var bytes = requested
        if category == GPU.workspace {
            bytes = Self.workspaceSizeClass(requested)
            if let p = reuseWorkspace(bytes) { return DeviceBuffer(gpu: self, pointer: p, bytes: bytes, category: category) }
            if budget.total + bytes > budget.limit { releaseWorkspaceCache() }
        }
        try budget.reserve(bytes, category)
        var p: CUdeviceptr = 0
        let code = driver.cuMemAlloc(&p, max(bytes, 1))
        if code != 0 {
            budget.release(bytes, category)
            try driver.check(code, "cuMemAlloc (\(bytes >> 20) MiB for \(category))")
        }
        return DeviceBuffer(gpu: self, pointer: p, bytes: bytes, category: category)
    }

    private func reuseWorkspace(_ bytes: Int) -> CUdeviceptr? {
        workspaceLock.lock(); defer { workspaceLock.unlock() }
        return freeWorkspace[bytes]?.popLast()
    }

    func recycle(_ pointer: CUdeviceptr, bytes: Int) {
        workspaceLock.lock(); defer { workspaceLock.unlock() }
        freeWorkspace[bytes, default: []].append(pointer)
    }

    /// Frees the recycled workspace (when a new allocation would not fit the budget beside it).
    func releaseWorkspaceCache() {
        workspaceLock.lock(); defer { workspaceLock.unlock() }
        for (bytes, pointers) in freeWorkspace {
            for p in pointers { _ = driver.cuMemFree(p); budget.release(bytes, GPU.workspace) }
        }
        freeWorkspace = [:]
    }

    /// The same device, context and budget, with its own stream and kernel table: a second
    /// user (the offload device's streams) that shares the memory budget with the first.
    public init(sharing other: GPU) {
        driver = other.driver
        nvrtc = other.nvrtc
        name = other.name
        architecture = other.architecture
        driverVersion = other.driverVersion
        budget = other.budget
    }

    deinit {
        releaseWorkspaceCache()
        for p in [stagingDown, stagingUp] { if let p = p?.pointer { _ = driver.cuMemFreeHost(p) } }
    }

    /// Page-locked host buffers for the per-layer copies of the offload path (grown on
    /// demand): copies from them run at full PCIe speed and asynchronously.
    private var stagingDown: (pointer: UnsafeMutableRawPointer, bytes: Int)?, stagingUp: (pointer: UnsafeMutableRawPointer, bytes: Int)?
    private var uploadDone: OpaquePointer?
    /// Threads for the staging copies of large activations (prompts), if the owner lends them.
    public var hostPool: ThreadPool?

    private func staging(_ current: inout (pointer: UnsafeMutableRawPointer, bytes: Int)?, _ bytes: Int) throws(CUDAError) -> UnsafeMutableRawPointer {
        if let c = current, c.bytes >= bytes { return c.pointer }
        if let c = current { _ = driver.cuMemFreeHost(c.pointer); current = nil }
        var p: UnsafeMutableRawPointer? = nil
        try driver.check(driver.cuMemHostAlloc(&p, max(bytes, 4096), 0), "cuMemHostAlloc")
        current = (p!, max(bytes, 4096))
        return p!
    }

    /// Several buffers' first `count` floats back to the host in one wait: asynchronous copies
    /// into page-locked memory on this GPU's stream, then one stream synchronisation.
    public func download(_ parts: [(buffer: DeviceBuffer, count: Int)]) throws(CUDAError) -> [[Float]] {
        let total = parts.reduce(0) { $0 + $1.count } * 4
        let host = try staging(&stagingDown, total)
        var offset = 0
        for (b, n) in parts {
            try driver.check(driver.cuMemcpyDtoHAsync(host + offset, b.pointer, n * 4, stream), "cuMemcpyDtoHAsync")
            offset += n * 4
        }
        synchronousCopies += 1
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        offset = 0
        return parts.map { (_, n) in
            defer { offset += n * 4 }
            return [Float](unsafeUninitializedCapacity: n) { out, count in
                if n > 0 { copyMemory(UnsafeMutableRawPointer(out.baseAddress!), host + offset, bytes: n * 4, pool: hostPool) }
                count = n
            }
        }
    }

    /// `values` into the start of `b` without waiting: staged in page-locked memory and
    /// copied on this GPU's stream (work issued later on the stream sees them). The staging
    /// is reused only after the previous upload has finished.
    public func uploadAsync(_ values: [Float], into b: DeviceBuffer) throws(CUDAError) {
        try uploadAsync([values], into: b)
    }

    /// Several arrays, one after another, into the start of `b` in one copy (as above).
    public func uploadAsync(_ parts: [[Float]], into b: DeviceBuffer) throws(CUDAError) {
        if uploadDone == nil { try driver.check(driver.cuEventCreate(&uploadDone, 2), "cuEventCreate") }  // CU_EVENT_DISABLE_TIMING
        try driver.check(driver.cuEventSynchronize(uploadDone), "cuEventSynchronize")
        let total = parts.reduce(0) { $0 + $1.count } * 4
        guard total > 0 else { return }
        let host = try staging(&stagingUp, total)
        var offset = 0
        for part in parts {
            part.withUnsafeBytes { if $0.count > 0 { copyMemory(host + offset, $0.baseAddress!, bytes: $0.count, pool: hostPool) } }
            offset += part.count * 4
        }
        try driver.check(driver.cuMemcpyHtoDAsync(b.pointer, host, total, stream), "cuMemcpyHtoDAsync")
        try driver.check(driver.cuEventRecord(uploadDone, stream), "cuEventRecord")
    }

    public func upload(_ values: [Float], category: String) throws(CUDAError) -> DeviceBuffer {
        try upload(array: values, category: category)
    }

    /// An array of plain values (bf16 bits, ids) copied to the device.
    public func upload<T: BitwiseCopyable>(array: [T], category: String) throws(CUDAError) -> DeviceBuffer {
        try array.withUnsafeBytes { bytes in Result { () throws(CUDAError) in try upload(bytes: bytes, category: category) } }.get()
    }

    public func upload(bytes: UnsafeRawBufferPointer, category: String) throws(CUDAError) -> DeviceBuffer {
        let b = try allocate(bytes.count, category: category)
        try copy(bytes, into: b)
        return b
    }

    /// `bytes` from the start of `source` to the start of `destination`, on this GPU's stream.
    func copyAsync(from source: DeviceBuffer, to destination: DeviceBuffer, bytes: Int) throws(CUDAError) {
        try driver.check(driver.cuMemcpyDtoDAsync(destination.pointer, source.pointer, bytes, stream), "cuMemcpyDtoDAsync")
    }

    /// `values` into the start of an existing buffer (synchronous).
    public func copy(_ values: [Float], into b: DeviceBuffer) throws(CUDAError) {
        try values.withUnsafeBytes { bytes in Result { () throws(CUDAError) in try copy(bytes, into: b) } }.get()
    }

    private func copy(_ bytes: UnsafeRawBufferPointer, into b: DeviceBuffer) throws(CUDAError) {
        synchronousCopies += 1
        try driver.check(driver.cuMemcpyHtoD(b.pointer, bytes.baseAddress!, bytes.count), "cuMemcpyHtoD")
    }

    /// Plain values (ids) back from the device.
    public func download<T: BitwiseCopyable>(_ b: DeviceBuffer, count: Int, as: T.Type, zero: T) throws(CUDAError) -> [T] {
        var out = [T](repeating: zero, count: count)
        synchronousCopies += 1
        let code = out.withUnsafeMutableBytes { driver.cuMemcpyDtoH($0.baseAddress!, b.pointer, $0.count) }
        try driver.check(code, "cuMemcpyDtoH")
        return out
    }

    public func download(_ b: DeviceBuffer, count: Int) throws(CUDAError) -> [Float] {
        try download(b, count: count, as: Float.self, zero: 0)
    }

    // MARK: kernels

    /// Function `name` of `source`, compiled once per (source, options, architecture, driver) and
    /// cached on disk (`kernels/` in `duetCacheDirectory`, ~/.cache/duet/kernels by default)
    /// so later starts load the CUBIN directly.
    public func function(_ name: String, in source: String) throws(CUDAError) -> OpaquePointer {
        if let f = functions[name] { return f }
        let key = sourceHash(source)
        var module = modules[key]
        if module == nil {
            let cubin = try cachedCubin(source, key: key, kernel: name)
            let code = cubin.withUnsafeBytes { driver.cuModuleLoadData(&module, $0.baseAddress!) }
            try driver.check(code, "cuModuleLoadData(\(name))")
            modules[key] = module
        }
        var f: OpaquePointer? = nil
        try driver.check(driver.cuModuleGetFunction(&f, module, name), "cuModuleGetFunction(\(name))")
        functions[name] = f
        functionNames[f!] = name
        return f!
    }

    /// Whether the last `function` call found its CUBIN in the disk cache.
    public private(set) var lastCompileWasCached = false

    private func sourceHash(_ source: String) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in (source + architecture + String(driverVersion) + NVRTC.options(architecture).joined()).utf8 {
            h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3
        }
        return h
    }

    /// One CUBIN per source (a module holds all its kernels); `kernel` names it in errors.
    private func cachedCubin(_ source: String, key h: UInt64, kernel: String) throws(CUDAError) -> [UInt8] {
        let dir = duetCacheDirectory("kernels")
        let path = dir + "/duet-\(architecture)-\(driverVersion)-\(String(h, radix: 16)).cubin"
        if let bytes = try? readSmallFile(path), !bytes.isEmpty {
            lastCompileWasCached = true
            return bytes
        }
        lastCompileWasCached = false
        let cubin = try nvrtc.compile(source, kernel: kernel, arch: architecture)
        makeDirectories(dir)
        try? writeFile(cubin, to: path)
        return cubin
    }

    /// Kernel launches and synchronous host<->device copies so far (benchmarks report them per token).
    public private(set) var launches = 0
    public private(set) var synchronousCopies = 0

    /// The stream kernels are launched on (nil: the legacy default stream).
    var stream: OpaquePointer? = nil

    /// Token counts from this up use cuBLAS GEMMs for bf16 matmuls (when libcublas loads).
    public var gemmMinTokens = 32
    private var blasState: (CUBLAS, OpaquePointer?)?? = nil
    /// cuBLAS and a handle on this GPU's stream, created at first use (nil: not available; said once).
    var blas: (library: CUBLAS, handle: OpaquePointer?)? {
        if blasState == nil {
            do {
                let library = try CUBLAS()
                var handle: OpaquePointer? = nil
                guard library.create(&handle) == 0 else { throw CUDAError.unavailable("cublasCreate failed") }
                blasState = .some((library, handle))
            } catch {
                let line = "warning: \(error); large matmuls use the GEMV kernels\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
                blasState = .some(nil)
            }
        }
        guard let state = blasState!, state.0.setStream(state.1, stream) == 0 else { return nil }
        return (state.0, state.1)
    }

    /// Launches `function` with arguments given as pointers to their values.
    public func launch(_ function: OpaquePointer, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
                       sharedBytes: UInt32 = 0, arguments: [UnsafeMutableRawPointer?]) throws(CUDAError) {
        launches += 1
        var args = arguments
        try driver.check(args.withUnsafeMutableBufferPointer {
            driver.cuLaunchKernel(function, grid.0, grid.1, grid.2, block.0, block.1, block.2, sharedBytes, stream, $0.baseAddress, nil)
        }, "cuLaunchKernel")
        if kernelTimer != nil { try timeLast(functionNames[function] ?? "kernel") }
    }

    /// Counts a launch made outside `launch` (cuBLAS).
    func countLaunch() throws(CUDAError) {
        launches += 1
        if kernelTimer != nil { try timeLast("cublas_gemm") }
    }

    // MARK: per-kernel timing

    /// Device time per kernel: while timing, an event follows every launch, so a kernel's time
    /// is from the previous event to its own — its run plus the gap before it (the launch
    /// latency a CUDA graph removes). The times add up to the stream's whole span.
    public struct KernelTime: Sendable {
        public let name: String
        public var launches: Int
        public var seconds: Double
    }
    private var kernelTimer: [(name: String, event: OpaquePointer?)]?
    /// Whether every launch is being timed (steps then run launch by launch, not as graphs).
    public var timesKernels: Bool { kernelTimer != nil }

    /// Starts timing every launch on this GPU's stream (from an event recorded now).
    public func startKernelTimer() throws(CUDAError) {
        kernelTimer = []
        try timeLast("start")
    }

    private func timeLast(_ name: String) throws(CUDAError) {
        var e: OpaquePointer? = nil
        try driver.check(driver.cuEventCreate(&e, 0), "cuEventCreate")
        try driver.check(driver.cuEventRecord(e, stream), "cuEventRecord")
        kernelTimer?.append((name, e))
    }

    /// Stops timing and returns the time per kernel name, in the order first launched.
    public func stopKernelTimer() throws(CUDAError) -> [KernelTime] {
        guard let marks = kernelTimer, let last = marks.last else { return [] }
        kernelTimer = nil
        defer { for m in marks { _ = driver.cuEventDestroy(m.event) } }
        try driver.check(driver.cuEventSynchronize(last.event), "cuEventSynchronize")
        var times: [KernelTime] = [], index: [String: Int] = [:]
        for (previous, mark) in zip(marks, marks.dropFirst()) {
            var ms: Float = 0
            try driver.check(driver.cuEventElapsedTime(&ms, previous.event, mark.event), "cuEventElapsedTime")
            if index[mark.name] == nil { index[mark.name] = times.count; times.append(KernelTime(name: mark.name, launches: 0, seconds: 0)) }
            times[index[mark.name]!].launches += 1
            times[index[mark.name]!].seconds += Double(ms) / 1000
        }
        return times
    }

    public func synchronize() throws(CUDAError) { try driver.check(driver.cuCtxSynchronize(), "cuCtxSynchronize") }

    /// Device seconds per call of `body` (the work it issues on this GPU's stream), from events
    /// around `repeats` calls after one warm-up call.
    public func time(repeats: Int, _ body: () throws(CUDAError) -> Void) throws(CUDAError) -> Double {
        var start: OpaquePointer? = nil, end: OpaquePointer? = nil
        try driver.check(driver.cuEventCreate(&start, 0), "cuEventCreate")
        try driver.check(driver.cuEventCreate(&end, 0), "cuEventCreate")
        try body()
        try driver.check(driver.cuEventRecord(start, stream), "cuEventRecord")
        for _ in 0..<repeats { try body() }
        try driver.check(driver.cuEventRecord(end, stream), "cuEventRecord")
        try driver.check(driver.cuEventSynchronize(end), "cuEventSynchronize")
        var ms: Float = 0
        try driver.check(driver.cuEventElapsedTime(&ms, start, end), "cuEventElapsedTime")
        _ = driver.cuEventDestroy(start)
        _ = driver.cuEventDestroy(end)
        return Double(ms) / 1000 / Double(max(repeats, 1))
    }
}
