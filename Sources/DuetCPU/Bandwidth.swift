import CDuetKernels
import DuetCore

/// `duet bench memory`: the CPU read ceiling every other figure is a fraction of.
/// All threads, 4, 8 or 16 independent AVX-512 streams each, over a buffer much larger than
/// the caches; plain, prefetching and non-temporal loads; the best of `repeats` passes. The
/// ceiling is the best row: a kernel reading faster would mean it was measured too low.
public struct MemoryBandwidth: Sendable {
    public struct Row: Sendable, Encodable {
        public var mode: String
        public var streamsPerThread: Int
        public var threads: Int
        public var bytes: Int
        public var bestSeconds: Double
        public var gbps: Double
    }

    public static let modes = ["plain", "prefetch", "nontemporal"]

    /// Measures each load kind; `bytes` is rounded to whole 4 KiB pages per thread.
    public static func measure(pool: ThreadPool, bytes: Int, repeats: Int) -> [Row] {
        guard CPUFeatures.current.avx512 else { return [] }
        let threads = pool.threadCount
        let perThread = max(1 << 16, bytes / threads / 4096 * 4096)
        let total = perThread * threads
        let buffer = HugePageBuffer(byteCount: total)
        let base = Unchecked(buffer.base)
        pool.parallelFor(threads) { t in  // first touch by the thread that reads it (NUMA locality)
            let p = base.value + t * perThread
            for i in stride(from: 0, to: perThread, by: 8) { p.storeBytes(of: UInt64(i) &* 0x9E37_79B9, toByteOffset: i, as: UInt64.self) }
        }
        let sink = UnsafeMutablePointer<UInt64>.allocate(capacity: threads)
        defer { sink.deallocate() }
        let sinks = Unchecked(sink)
        var rows: [Row] = []
        for streams in [4, 8, 16] {
            for (mode, name) in modes.enumerated() {
                var best = Double.infinity
                for _ in 0..<max(1, repeats) {
                    let start = ContinuousClock.now
                    pool.parallelFor(threads) { t in
                        sinks.value[t] = duet_read_bandwidth(base.value + t * perThread, perThread, Int32(mode), Int32(streams))
                    }
                    best = min(best, secondsSince(start))
                }
                let read = (perThread / streams / 256 * 256) * streams * threads
                rows.append(Row(mode: name, streamsPerThread: streams, threads: threads, bytes: read, bestSeconds: best,
                                gbps: Double(read) / best / 1e9))
            }
        }
        withExtendedLifetime(buffer) {}
        return rows
    }

    /// Mean seconds of an empty `parallelFor` with one task per thread (dispatch + join).
    public static func dispatchLatency(pool: ThreadPool, iterations: Int = 20000) -> Double {
        for _ in 0..<1000 { pool.parallelFor(pool.threadCount) { _ in } }
        let start = ContinuousClock.now
        for _ in 0..<iterations { pool.parallelFor(pool.threadCount) { _ in } }
        return secondsSince(start) / Double(iterations)
    }
}
