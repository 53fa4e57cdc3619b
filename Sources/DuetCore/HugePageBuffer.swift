#if canImport(Glibc)
import Glibc
#endif

/// Anonymous memory for large read-mostly buffers (synthetic weights, the bandwidth
/// benchmark), 2 MiB aligned and advised to use transparent huge pages: with 4 KiB pages,
/// streaming reads over many GB lose ~25% to TLB misses on the GPU host.
public final class HugePageBuffer: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let byteCount: Int
    private let mapped: Int
    private let region: (UnsafeMutableRawPointer, Int)?

    public init(byteCount: Int) {
        let huge = 2 << 20
        self.byteCount = byteCount
        mapped = max(huge, (byteCount + huge - 1) / huge * huge)
        // Over-map by 2 MiB so the start can be aligned to a huge page.
        let raw = mmap(nil, mapped + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if raw == MAP_FAILED || raw == nil {
            base = .allocate(byteCount: mapped, alignment: 4096)  // still usable, no advice
            region = nil
            return
        }
        let start = (Int(bitPattern: raw) + huge - 1) / huge * huge
        base = UnsafeMutableRawPointer(bitPattern: start)!
        region = (raw!, mapped + huge)
        _ = madvise(base, mapped, 14 /* MADV_HUGEPAGE */)
    }

    deinit {
        if let (p, n) = region { munmap(p, n) } else { base.deallocate() }
    }
}
