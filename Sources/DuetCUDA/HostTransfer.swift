#if canImport(Glibc)
import Glibc
#endif
import DuetCore

/// Host -> device copy bandwidth by kind of host memory: what streaming an expert's weights
/// over PCIe can reach (the planner's copy cost, the scenario bounds).
public enum HostTransfer {
    public enum Source: String, CaseIterable, Sendable {
        /// Page-locked memory from the driver (cuMemHostAlloc).
        case driverPinned = "driver-pinned"
        /// Ordinary anonymous memory with transparent huge pages, registered (cuMemHostRegister).
        case registeredHugePages = "registered-2MiB"
        /// Ordinary 4 KiB-page memory, registered.
        case registeredSmallPages = "registered-4KiB"
        /// Ordinary memory, not registered (the driver stages it).
        case pageable
    }

    /// Host memory of one kind, freed (and unregistered) with it.
    public final class Buffer: @unchecked Sendable {
        public let base: UnsafeMutableRawPointer
        public let bytes: Int
        let gpu: GPU
        let source: Source
        private var owner: AnyObject?

        public init(gpu: GPU, bytes: Int, source: Source) throws(CUDAError) {
            self.gpu = gpu
            self.bytes = bytes
            self.source = source
            let d = gpu.driver
            switch source {
            case .driverPinned:
                var p: UnsafeMutableRawPointer? = nil
                try d.check(d.cuMemHostAlloc(&p, bytes, 0), "cuMemHostAlloc")
                base = p!
            case .registeredHugePages, .pageable:
                let b = HugePageBuffer(byteCount: bytes)
                owner = b
                base = b.base
            case .registeredSmallPages:
                base = .allocate(byteCount: bytes, alignment: 4096)
                _ = madvise(base, bytes, 15)  // MADV_NOHUGEPAGE
            }
            // Touch every page so the copy does not fault.
            memset(base, 1, bytes)
            if source == .registeredHugePages || source == .registeredSmallPages {
                try d.check(d.cuMemHostRegister(base, bytes, 0), "cuMemHostRegister")
            }
        }

        deinit {
            let d = gpu.driver
            switch source {
            case .driverPinned: _ = d.cuMemFreeHost(base)
            case .registeredHugePages: _ = d.cuMemHostUnregister(base)
            case .registeredSmallPages: _ = d.cuMemHostUnregister(base); base.deallocate()
            case .pageable: break
            }
        }
    }

    /// Bytes per second of `repeats` asynchronous copies of `chunk`-byte pieces of `buffer`
    /// to one device buffer (best pass), timed with events on a stream of their own.
    public static func hostToDevice(_ buffer: Buffer, chunk: Int, repeats: Int) throws(CUDAError) -> Double {
        let gpu = buffer.gpu, d = gpu.driver
        let target = try gpu.allocate(min(chunk, buffer.bytes), category: "bandwidth test")
        var stream: OpaquePointer? = nil, start: OpaquePointer? = nil, end: OpaquePointer? = nil
        try d.check(d.cuStreamCreate(&stream, 1), "cuStreamCreate")
        try d.check(d.cuEventCreate(&start, 0), "cuEventCreate")
        try d.check(d.cuEventCreate(&end, 0), "cuEventCreate")
        var best = 0.0
        for _ in 0..<repeats {
            try d.check(d.cuEventRecord(start, stream), "cuEventRecord")
            var offset = 0
            while offset < buffer.bytes {
                let n = min(chunk, buffer.bytes - offset)
                try d.check(d.cuMemcpyHtoDAsync(target.pointer, buffer.base + offset, n, stream), "cuMemcpyHtoDAsync")
                offset += n
            }
            try d.check(d.cuEventRecord(end, stream), "cuEventRecord")
            try d.check(d.cuEventSynchronize(end), "cuEventSynchronize")
            var ms: Float = 0
            try d.check(d.cuEventElapsedTime(&ms, start, end), "cuEventElapsedTime")
            best = max(best, Double(buffer.bytes) / (Double(ms) / 1000))
        }
        return best
    }
}
