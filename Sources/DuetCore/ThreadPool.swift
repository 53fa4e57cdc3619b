#if canImport(Glibc)
import Glibc
#endif
import CDuetKernels
import Synchronization

/// Persistent worker threads for data-parallel kernels. Workers spin briefly after a job
/// (decode issues a job every few microseconds) and then park on a condition variable.
/// Nothing is allocated per call, and the hot path touches no shared read-modify-write:
/// worker w runs index w, only indices beyond the thread count are handed out through an
/// atomic counter, and each worker reports completion in its own cache line.
///
/// One job at a time: a `parallelFor` issued while another runs (from another thread, or
/// nested inside a job) runs serially on the calling thread instead of deadlocking.
public final class ThreadPool: @unchecked Sendable {
    /// Threads that run a job: the workers plus the calling thread.
    public let threadCount: Int
    /// Padded slots, 128 bytes apart: generation, next index, then one "done" per worker.
    private let slots: UnsafeMutablePointer<Int64>
    private static let stride = 16  // Int64s per slot
    private let sleepers = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let busy = Atomic<Bool>(false)
    // Written by the dispatcher before the generation store, read by workers after it.
    private var job: ((Int) -> Void)?
    private var jobCount = 0
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var workers: [pthread_t] = []
    /// Spin iterations (each a `pause`) before a worker parks: on the order of 100 µs.
    private let spinLimit = 2000

    /// `threads` in all (the caller counts as one); 1 = everything inline.
    public init(threads: Int) {
        threadCount = max(1, threads)
        slots = .allocate(capacity: (threadCount + 2) * Self.stride)
        slots.initialize(repeating: 0, count: (threadCount + 2) * Self.stride)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        for w in 1..<threadCount {
            var tid = pthread_t()
            let context = Unmanaged.passRetained(WorkerContext(pool: self, index: w)).toOpaque()
            pthread_create(&tid, nil, { arg in
                let context = Unmanaged<WorkerContext>.fromOpaque(arg!).takeRetainedValue()
                context.pool.workerLoop(index: context.index)
                return nil
            }, context)
            workers.append(tid)
        }
    }

    private final class WorkerContext {
        unowned(unsafe) let pool: ThreadPool
        let index: Int
        init(pool: ThreadPool, index: Int) {
            self.pool = pool
            self.index = index
        }
    }

    /// All online CPUs.
    public static var availableCores: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    private var generation: UnsafeMutablePointer<Int64> { slots }
    private var nextIndex: UnsafeMutablePointer<Int64> { slots + Self.stride }
    private func done(_ w: Int) -> UnsafeMutablePointer<Int64> { slots + (2 + w) * Self.stride }

    deinit {
        stopping.store(true, ordering: .sequentiallyConsistent)
        pthread_mutex_lock(mutex)
        pthread_cond_broadcast(wake)
        pthread_mutex_unlock(mutex)
        for t in workers { pthread_join(t, nil) }
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(wake)
        mutex.deallocate()
        wake.deallocate()
        slots.deallocate()
    }

    /// Runs `body(i)` for every `i` in `0..<count`, spread over the pool; returns when all are done.
    public func parallelFor(_ count: Int, _ body: (Int) -> Void) {
        if count <= 0 { return }
        if count == 1 || threadCount == 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            for i in 0..<count { body(i) }
            return
        }
        withoutActuallyEscaping(body) { body in
            job = body
            jobCount = count
            duet_atomic_store(nextIndex, Int64(threadCount))
            let g = duet_atomic_load(generation) + 1
            duet_atomic_store(generation, g)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(mutex)
                pthread_cond_broadcast(wake)
                pthread_mutex_unlock(mutex)
            }
            run(index: 0)
            for w in 1..<threadCount {
                var spins = 0
                while duet_atomic_load(done(w)) != g {
                    spins += 1
                    // More threads than cores (tests, shared machines): let the worker run.
                    if spins > 1000 { sched_yield() } else { duet_cpu_relax() }
                }
            }
            job = nil
        }
        busy.store(false, ordering: .releasing)
    }

    /// Index `index` (this thread's own), then whatever is left beyond the thread count.
    private func run(index: Int) {
        let body = job!
        if index < jobCount { body(index) }
        guard jobCount > threadCount else { return }
        while true {
            let i = Int(duet_atomic_fetch_add(nextIndex, 1))
            if i >= jobCount { return }
            body(i)
        }
    }

    private func workerLoop(index w: Int) {
        var seen: Int64 = 0
        while true {
            var spins = 0
            var g = duet_atomic_load(generation)
            while g == seen {
                if stopping.load(ordering: .relaxed) { return }
                spins += 1
                if spins < spinLimit {
                    duet_cpu_relax()
                } else {
                    pthread_mutex_lock(mutex)
                    sleepers.add(1, ordering: .sequentiallyConsistent)
                    while duet_atomic_load(generation) == seen && !stopping.load(ordering: .sequentiallyConsistent) {
                        pthread_cond_wait(wake, mutex)
                    }
                    sleepers.subtract(1, ordering: .sequentiallyConsistent)
                    pthread_mutex_unlock(mutex)
                    spins = 0
                }
                g = duet_atomic_load(generation)
            }
            seen = g
            run(index: w)
            duet_atomic_store(done(w), g)
        }
    }
}

extension ThreadPool {
    /// `memcpy` split over the pool in pieces of at least 1 MiB (one thread for less): the
    /// offload path's per-layer staging copies of prompt activations (tens of MiB) are
    /// memory-bound, and one core streams a fraction of what all of them do.
    public func copy(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, bytes: Int) {
        let piece = 1 << 20, pieces = min(threadCount * 4, max(1, bytes / piece))
        guard pieces > 1 else { memcpy(dst, src, bytes); return }
        let d = Unchecked(dst), s = Unchecked(src), per = (bytes + pieces - 1) / pieces
        parallelFor(pieces) { i in
            let start = i * per, n = min(per, bytes - start)
            if n > 0 { memcpy(d.value + start, s.value + start, n) }
        }
    }
}

/// `memcpy`, over `pool` when one is given (`ThreadPool.copy`).
public func copyMemory(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, bytes: Int, pool: ThreadPool?) {
    if let pool { pool.copy(dst, src, bytes: bytes) } else { memcpy(dst, src, bytes) }
}

/// Process-wide allocator settings for serving models.
public enum HostMemory {
    /// Large arrays (a prompt's activations, tens of MiB per layer) are reused from the heap
    /// instead of being mapped fresh and faulted in page by page on every allocation (glibc's
    /// default for anything above 32 MiB). Call once at start; returns whether it applied.
    @discardableResult
    public static func reuseLargeAllocations() -> Bool { duet_reuse_large_allocations() == 1 }
}

