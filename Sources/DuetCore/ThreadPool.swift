#if canImport(Glibc)
import Glibc
#endif
import CDuetKernels
import Synchronization

/// Persistent worker threads for data-parallel kernels. Workers spin briefly after a job
/// (decode issues a job every few microseconds) and then park on a condition variable.
/// `parallelFor` hands out indices through one atomic counter; the caller works too, and
/// nothing is allocated per call.
///
/// One job at a time: a `parallelFor` issued while another runs (from another thread, or
/// nested inside a job) runs serially on the calling thread instead of deadlocking.
public final class ThreadPool: @unchecked Sendable {
    /// Threads that run a job: the workers plus the calling thread.
    public let threadCount: Int
    private let generation = Atomic<Int>(0)
    private let nextIndex = Atomic<Int>(0)
    private let running = Atomic<Int>(0)     // workers still inside the current job
    private let sleepers = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let busy = Atomic<Bool>(false)
    // Written by the dispatcher before the generation bump (release), read by workers after
    // seeing it (acquire).
    private var job: ((Int) -> Void)?
    private var jobCount = 0
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var workers: [pthread_t] = []
    /// Spin iterations (each a `pause`) before a worker parks: about 100 µs.
    private let spinLimit = 4000

    /// `threads` workers in all (the caller counts as one); 1 = everything inline.
    public init(threads: Int) {
        threadCount = max(1, threads)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        for _ in 1..<threadCount {
            var tid = pthread_t()
            let context = Unmanaged.passUnretained(self).toOpaque()
            pthread_create(&tid, nil, { arg in
                Unmanaged<ThreadPool>.fromOpaque(arg!).takeUnretainedValue().workerLoop()
                return nil
            }, context)
            workers.append(tid)
        }
    }

    /// All online CPUs.
    public static var availableCores: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

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
            nextIndex.store(0, ordering: .relaxed)
            running.store(threadCount - 1, ordering: .relaxed)
            generation.add(1, ordering: .sequentiallyConsistent)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(mutex)
                pthread_cond_broadcast(wake)
                pthread_mutex_unlock(mutex)
            }
            runIndices()
            while running.load(ordering: .acquiring) > 0 { duet_cpu_relax() }
            job = nil
        }
        busy.store(false, ordering: .releasing)
    }

    private func runIndices() {
        let body = job!
        while true {
            let i = nextIndex.add(1, ordering: .relaxed).oldValue
            if i >= jobCount { return }
            body(i)
        }
    }

    private func workerLoop() {
        var seen = 0
        while true {
            var spins = 0
            var g = generation.load(ordering: .acquiring)
            while g == seen {
                if stopping.load(ordering: .relaxed) { return }
                spins += 1
                if spins < spinLimit {
                    duet_cpu_relax()
                } else {
                    pthread_mutex_lock(mutex)
                    sleepers.add(1, ordering: .sequentiallyConsistent)
                    while generation.load(ordering: .sequentiallyConsistent) == seen && !stopping.load(ordering: .relaxed) {
                        pthread_cond_wait(wake, mutex)
                    }
                    sleepers.subtract(1, ordering: .sequentiallyConsistent)
                    pthread_mutex_unlock(mutex)
                    spins = 0
                }
                g = generation.load(ordering: .acquiring)
            }
            seen = g
            runIndices()
            running.subtract(1, ordering: .releasing)
        }
    }
}
