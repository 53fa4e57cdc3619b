#if canImport(Glibc)
import Glibc
#endif

/// What went wrong with the GPU: no driver, a CUDA error (with its name), a kernel that
/// does not compile (with the compiler's log), or an allocation beyond the budget.
public enum CUDAError: Error, Equatable, CustomStringConvertible {
    case unavailable(String)
    case call(String, code: Int32, name: String)
    case compile(kernel: String, log: String)
    case overBudget(category: String, bytes: Int, used: Int, limit: Int)

    public var description: String {
        switch self {
        case .unavailable(let why): "no usable GPU: \(why)"
        case .call(let fn, let code, let name): "\(fn) failed: \(name) (\(code))"
        case .compile(let kernel, let log): "CUDA kernel '\(kernel)' does not compile:\n\(log)"
        case .overBudget(let category, let bytes, let used, let limit):
            "GPU allocation of \(bytes >> 20) MiB for \(category) exceeds the budget (\(used >> 20) of \(limit >> 20) MiB in use)"
        }
    }
}

typealias CUdeviceptr = UInt64

/// A shared library opened with dlopen (the first of `names` that loads) and its symbols;
/// a missing library or symbol is a `.unavailable` error naming it.
struct SharedLibrary {
    let handle: UnsafeMutableRawPointer
    let label: String

    init(_ names: [String], label: String, notFound: String) throws(CUDAError) {
        guard let h = names.lazy.compactMap({ dlopen($0, RTLD_NOW) }).first else { throw .unavailable(notFound) }
        handle = h
        self.label = label
    }

    func symbol<T>(_ name: String, _: T.Type) throws(CUDAError) -> T {
        guard let p = dlsym(handle, name) else { throw .unavailable("\(label) has no \(name)") }
        return unsafeBitCast(p, to: T.self)
    }
}

/// The CUDA driver API, loaded with dlopen at run time: Duet builds and runs without CUDA
/// and uses it when libcuda.so.1 is there.
final class CUDADriver: @unchecked Sendable {
    private let handle: UnsafeMutableRawPointer
    let cuInit: @convention(c) (UInt32) -> Int32
    let cuDriverGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> Int32
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Int32
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Int32
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> Int32
    let cuCtxSetCurrent: @convention(c) (OpaquePointer?) -> Int32
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int) -> Int32
    let cuMemFree: @convention(c) (CUdeviceptr) -> Int32
    let cuMemcpyHtoD: @convention(c) (CUdeviceptr, UnsafeRawPointer, Int) -> Int32
    let cuMemcpyDtoH: @convention(c) (UnsafeMutableRawPointer, CUdeviceptr, Int) -> Int32
    let cuMemGetInfo: @convention(c) (UnsafeMutablePointer<Int>, UnsafeMutablePointer<Int>) -> Int32
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> Int32
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> Int32
    let cuLaunchKernel: @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32
    let cuCtxSynchronize: @convention(c) () -> Int32
    let cuGetErrorName: @convention(c) (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Int32
    // Streams, events, asynchronous copies and page-locked host memory (the offload device).
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Int32
    let cuStreamDestroy: @convention(c) (OpaquePointer?) -> Int32
    let cuStreamWaitEvent: @convention(c) (OpaquePointer?, OpaquePointer?, UInt32) -> Int32
    let cuStreamSynchronize: @convention(c) (OpaquePointer?) -> Int32
    let cuEventCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Int32
    let cuEventRecord: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
    let cuEventSynchronize: @convention(c) (OpaquePointer?) -> Int32
    let cuEventElapsedTime: @convention(c) (UnsafeMutablePointer<Float>, OpaquePointer?, OpaquePointer?) -> Int32
    let cuEventDestroy: @convention(c) (OpaquePointer?) -> Int32
    let cuMemcpyDtoDAsync: @convention(c) (CUdeviceptr, CUdeviceptr, Int, OpaquePointer?) -> Int32
    let cuMemsetD32Async: @convention(c) (CUdeviceptr, UInt32, Int, OpaquePointer?) -> Int32
    let cuMemcpyHtoDAsync: @convention(c) (CUdeviceptr, UnsafeRawPointer, Int, OpaquePointer?) -> Int32
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer, CUdeviceptr, Int, OpaquePointer?) -> Int32
    let cuMemHostAlloc: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int, UInt32) -> Int32
    let cuMemFreeHost: @convention(c) (UnsafeMutableRawPointer?) -> Int32
    let cuMemHostRegister: @convention(c) (UnsafeMutableRawPointer?, Int, UInt32) -> Int32
    let cuMemHostUnregister: @convention(c) (UnsafeMutableRawPointer?) -> Int32
    /// Stream capture into CUDA graphs (nil where the driver lacks them: steps run launch by launch).
    struct Graphs {
        let beginCapture: @convention(c) (OpaquePointer?, Int32) -> Int32
        let endCapture: @convention(c) (OpaquePointer?, UnsafeMutablePointer<OpaquePointer?>) -> Int32
        let instantiate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UInt64) -> Int32
        let launch: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
        let destroyGraph: @convention(c) (OpaquePointer?) -> Int32
        let destroyExec: @convention(c) (OpaquePointer?) -> Int32
    }
    let graphs: Graphs?

    init() throws(CUDAError) {
        let library = try SharedLibrary(["libcuda.so.1", "libcuda.so"], label: "libcuda",
                                        notFound: "libcuda.so.1 not found (no NVIDIA driver on this machine)")
        handle = library.handle
        func sym<T>(_ name: String, _ type: T.Type) throws(CUDAError) -> T { try library.symbol(name, type) }
        cuInit = try sym("cuInit", type(of: cuInit))
        cuDriverGetVersion = try sym("cuDriverGetVersion", type(of: cuDriverGetVersion))
        cuDeviceGet = try sym("cuDeviceGet", type(of: cuDeviceGet))
        cuDeviceGetAttribute = try sym("cuDeviceGetAttribute", type(of: cuDeviceGetAttribute))
        cuDeviceGetName = try sym("cuDeviceGetName", type(of: cuDeviceGetName))
        cuDevicePrimaryCtxRetain = try sym("cuDevicePrimaryCtxRetain", type(of: cuDevicePrimaryCtxRetain))
        cuCtxSetCurrent = try sym("cuCtxSetCurrent", type(of: cuCtxSetCurrent))
        cuMemAlloc = try sym("cuMemAlloc_v2", type(of: cuMemAlloc))
        cuMemFree = try sym("cuMemFree_v2", type(of: cuMemFree))
        cuMemcpyHtoD = try sym("cuMemcpyHtoD_v2", type(of: cuMemcpyHtoD))
        cuMemcpyDtoH = try sym("cuMemcpyDtoH_v2", type(of: cuMemcpyDtoH))
        cuMemGetInfo = try sym("cuMemGetInfo_v2", type(of: cuMemGetInfo))
        cuModuleLoadData = try sym("cuModuleLoadData", type(of: cuModuleLoadData))
        cuModuleGetFunction = try sym("cuModuleGetFunction", type(of: cuModuleGetFunction))
        cuLaunchKernel = try sym("cuLaunchKernel", type(of: cuLaunchKernel))
        cuCtxSynchronize = try sym("cuCtxSynchronize", type(of: cuCtxSynchronize))
        cuGetErrorName = try sym("cuGetErrorName", type(of: cuGetErrorName))
        cuStreamCreate = try sym("cuStreamCreate", type(of: cuStreamCreate))
        cuStreamDestroy = try sym("cuStreamDestroy_v2", type(of: cuStreamDestroy))
        cuStreamWaitEvent = try sym("cuStreamWaitEvent", type(of: cuStreamWaitEvent))
        cuStreamSynchronize = try sym("cuStreamSynchronize", type(of: cuStreamSynchronize))
        cuEventCreate = try sym("cuEventCreate", type(of: cuEventCreate))
        cuEventRecord = try sym("cuEventRecord", type(of: cuEventRecord))
        cuEventSynchronize = try sym("cuEventSynchronize", type(of: cuEventSynchronize))
        cuEventElapsedTime = try sym("cuEventElapsedTime", type(of: cuEventElapsedTime))
        cuEventDestroy = try sym("cuEventDestroy_v2", type(of: cuEventDestroy))
        cuMemcpyDtoDAsync = try sym("cuMemcpyDtoDAsync_v2", type(of: cuMemcpyDtoDAsync))
        cuMemsetD32Async = try sym("cuMemsetD32Async", type(of: cuMemsetD32Async))
        cuMemcpyHtoDAsync = try sym("cuMemcpyHtoDAsync_v2", type(of: cuMemcpyHtoDAsync))
        cuMemcpyDtoHAsync = try sym("cuMemcpyDtoHAsync_v2", type(of: cuMemcpyDtoHAsync))
        cuMemHostAlloc = try sym("cuMemHostAlloc", type(of: cuMemHostAlloc))
        cuMemFreeHost = try sym("cuMemFreeHost", type(of: cuMemFreeHost))
        cuMemHostRegister = try sym("cuMemHostRegister_v2", type(of: cuMemHostRegister))
        cuMemHostUnregister = try sym("cuMemHostUnregister", type(of: cuMemHostUnregister))
        graphs = try? Graphs(beginCapture: sym("cuStreamBeginCapture_v2", (@convention(c) (OpaquePointer?, Int32) -> Int32).self),
                             endCapture: sym("cuStreamEndCapture", (@convention(c) (OpaquePointer?, UnsafeMutablePointer<OpaquePointer?>) -> Int32).self),
                             instantiate: sym("cuGraphInstantiateWithFlags", (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UInt64) -> Int32).self),
                             launch: sym("cuGraphLaunch", (@convention(c) (OpaquePointer?, OpaquePointer?) -> Int32).self),
                             destroyGraph: sym("cuGraphDestroy", (@convention(c) (OpaquePointer?) -> Int32).self),
                             destroyExec: sym("cuGraphExecDestroy", (@convention(c) (OpaquePointer?) -> Int32).self))
    }

    /// Turns a CUresult into an error naming the call.
    func check(_ code: Int32, _ function: String) throws(CUDAError) {
        guard code != 0 else { return }
        var name: UnsafePointer<CChar>? = nil
        _ = cuGetErrorName(code, &name)
        throw .call(function, code: code, name: name.map { String(cString: $0) } ?? "CUDA error")
    }
}

/// NVRTC, loaded with dlopen: CUDA C source -> CUBIN for the device's architecture.
final class NVRTC: @unchecked Sendable {
    let create: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
                                UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let compile: @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let cubinSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let cubin: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let logSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let log: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let destroy: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32

    init() throws(CUDAError) {
        let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        let library = try SharedLibrary(names, label: "libnvrtc", notFound: "libnvrtc not found (tried \(names.joined(separator: ", ")))")
        func sym<T>(_ name: String, _ type: T.Type) throws(CUDAError) -> T { try library.symbol(name, type) }
        create = try sym("nvrtcCreateProgram", type(of: create))
        compile = try sym("nvrtcCompileProgram", type(of: compile))
        cubinSize = try sym("nvrtcGetCUBINSize", type(of: cubinSize))
        cubin = try sym("nvrtcGetCUBIN", type(of: cubin))
        logSize = try sym("nvrtcGetProgramLogSize", type(of: logSize))
        log = try sym("nvrtcGetProgramLog", type(of: log))
        destroy = try sym("nvrtcDestroyProgram", type(of: destroy))
    }

    /// Compiler options (part of the kernel cache key). No fast math: rope needs precise
    /// sin/cos at large angles.
    static func options(_ arch: String) -> [String] { ["--gpu-architecture=\(arch)", "-std=c++17"] }

    /// CUBIN of `source` for `arch` (e.g. "sm_90"); the log on failure, named after `kernel`.
    func compile(_ source: String, kernel: String, arch: String) throws(CUDAError) -> [UInt8] {
        var program: OpaquePointer? = nil
        guard create(&program, source, kernel + ".cu", 0, nil, nil) == 0 else { throw .compile(kernel: kernel, log: "nvrtcCreateProgram failed") }
        defer { _ = destroy(&program) }
        let options = Self.options(arch)
        let cOptions = options.map { strdup($0) }
        defer { cOptions.forEach { free($0) } }
        let status = cOptions.map { UnsafePointer<CChar>($0) }.withUnsafeBufferPointer { compile(program, Int32($0.count), $0.baseAddress) }
        if status != 0 {
            var n = 0
            _ = logSize(program, &n)
            var text = [CChar](repeating: 0, count: max(n, 1))
            _ = log(program, &text)
            throw .compile(kernel: kernel, log: String(cString: text))
        }
        var n = 0
        _ = cubinSize(program, &n)
        var out = [CChar](repeating: 0, count: n)
        _ = cubin(program, &out)
        return out.map { UInt8(bitPattern: $0) }
    }
}

/// cuBLAS, loaded with dlopen: bf16 GEMMs for steps with many tokens (prefill), where the
/// GEMV kernels would re-read the weights every 8 tokens.
final class CUBLAS: @unchecked Sendable {
    let create: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    let setStream: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
    /// cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo)
    let gemmEx: @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafeRawPointer, UInt64, Int32, Int32,
                                UInt64, Int32, Int32, UnsafeRawPointer, UInt64, Int32, Int32, Int32, Int32) -> Int32

    init() throws(CUDAError) {
        let names = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
        let library = try SharedLibrary(names, label: "libcublas", notFound: "libcublas not found (tried \(names.joined(separator: ", ")))")
        func sym<T>(_ name: String, _ type: T.Type) throws(CUDAError) -> T { try library.symbol(name, type) }
        create = try sym("cublasCreate_v2", type(of: create))
        setStream = try sym("cublasSetStream_v2", type(of: setStream))
        gemmEx = try sym("cublasGemmEx", type(of: gemmEx))
    }

    static let opN: Int32 = 0, opT: Int32 = 1
    static let r32F: Int32 = 0, r16BF: Int32 = 14
    static let compute32F: Int32 = 68
    static let defaultAlgo: Int32 = -1
}
