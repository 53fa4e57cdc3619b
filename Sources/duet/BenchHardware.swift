import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore
import DuetFormats
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetModels
import DuetRuntime

struct BenchMemory: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memory",
        abstract: "CPU read bandwidth (all threads, 4 AVX-512 streams each; plain / prefetch / non-temporal) and thread-pool dispatch latency.")

    @Option(name: .long, help: "CPU threads (default: all cores).")
    var threads: Int?
    @Option(name: .long, help: "Buffer size in GiB.")
    var gib: Double = 4
    @Option(name: .long, help: "Passes per load kind; the best is reported.")
    var repeats = 5
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    func run() throws {
        let pool = ThreadPool(threads: threads ?? ThreadPool.availableCores)
        let rows = MemoryBandwidth.measure(pool: pool, bytes: Int(gib * 1_073_741_824), repeats: repeats)
        guard !rows.isEmpty else { throw CLIError("bench memory needs AVX-512 (this CPU has: \(CPUFeatures.current))") }
        let dispatch = MemoryBandwidth.dispatchLatency(pool: pool)
        for r in rows { try Console.json(MemoryRow(row: r, dispatchMicroseconds: dispatch * 1e6)) }
        if !json {
            let best = rows.max { $0.gbps < $1.gbps }!
            Console.out(rows.map { "\($0.mode.padding(12)) \(String($0.streamsPerThread).padding(3)) streams/thread  \(fixed($0.gbps, 1)) GB/s" }.joined(separator: "\n")
                + "\nbest: \(fixed(best.gbps, 1)) GB/s (\(best.mode), \(best.streamsPerThread) streams per thread, \(best.threads) threads, \(fixed(Double(best.bytes) / 1e9, 2)) GB per pass)"
                + "\nthread-pool dispatch + join (empty parallel-for, \(pool.threadCount) threads): \(fixed(dispatch * 1e6, 2)) µs\n")
        }
    }

    struct MemoryRow: Encodable {
        var bench = "memory"
        var row: MemoryBandwidth.Row
        var dispatchMicroseconds: Double
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: Key.self)
            try c.encode(bench, forKey: .bench)
            try c.encode(row.mode, forKey: .mode)
            try c.encode(row.streamsPerThread, forKey: .streams)
            try c.encode(row.threads, forKey: .threads)
            try c.encode(row.bytes, forKey: .bytes)
            try c.encode(row.gbps, forKey: .gbps)
            try c.encode(dispatchMicroseconds, forKey: .dispatchMicroseconds)
        }
        enum Key: String, CodingKey { case bench, mode, streams = "streams_per_thread", threads, bytes, gbps, dispatchMicroseconds = "pool_dispatch_us" }
    }
}

/// The best bandwidth of `bench memory`, measured in the caller's run.
func measuredBandwidth(pool: ThreadPool, gib: Double) throws -> Double {
    let rows = MemoryBandwidth.measure(pool: pool, bytes: Int(gib * 1_073_741_824), repeats: 2)
    guard let best = rows.map(\.gbps).max() else { throw CLIError("measuring bandwidth needs AVX-512") }
    return best * 1e9
}

struct BenchKernels: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernels",
        abstract: "Expert FFN at Mixtral's shape (4096 x 14336, bf16) per kernel path and token count, with its roofline fraction.")

    @Option(name: .long, help: "CPU threads (default: all cores).")
    var threads: Int?
    @Option(name: .long, help: "Largest token count (powers of two from 1).")
    var maxTokens = 128
    @Option(name: .long, parsing: .upToNextOption, help: "Paths to run (default: every available one of avx512, amx, portable).")
    var paths: [KernelPath] = []
    @Option(name: .long, help: "Distinct experts cycled through (so weights come from memory, not cache).")
    var experts = 4
    @Option(name: .long, help: "Seconds per row, at least.")
    var minSeconds = 0.3
    @Option(name: .long, help: "GiB for the bandwidth measurement done first.")
    var memoryGib: Double = 4
    @Option(name: .long, help: "Parallel tasks per thread in each matmul.")
    var tasksPerThread = 4
    @Option(name: .long, parsing: .upToNextOption, help: "Weight formats: bf16, q8, q4 (quantized rows run the VNNI and portable integer paths).")
    var dtypes: [String] = ["bf16", "q8", "q4"]
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    func validate() throws {
        for d in dtypes where d != "bf16" && QuantFormat(rawValue: d) == nil { throw ValidationError("--dtypes takes bf16, q8 and q4, got '\(d)'") }
    }

    func run() throws {
        let pool = ThreadPool(threads: threads ?? ThreadPool.availableCores)
        // The ceiling is measured before and after the rows; the higher figure is used
        // (hosts are shared: a low reading would flatter every fraction).
        var bandwidth = try measuredBandwidth(pool: pool, gib: memoryGib)
        let features = CPUFeatures.current
        let chosen = paths.isEmpty ? [KernelPath.avx512, .amx, .portable].filter { (try? CPUKernels($0, pool: pool)) != nil } : paths
        let D = 4096, F = 14336
        let source = SyntheticWeights(seed: 7, pool: pool)
        let set = try (0..<max(1, experts)).map { e in
            (gate: try source.matrix("e\(e).w1", rows: F, cols: D), up: try source.matrix("e\(e).w3", rows: F, cols: D),
             down: try source.matrix("e\(e).w2", rows: D, cols: F))
        }
        let bytes = Double(3 * D * F * 2)
        if !json {
            Console.out("bandwidth \(fixed(bandwidth / 1e9, 1)) GB/s, \(pool.threadCount) threads, CPU: \(features)\n")
            Console.out("dtype path      T      ms     GB/s   GFLOP/s  fraction (bound)\n")
        }
        var rows: [KernelRow] = []
        for path in chosen where dtypes.contains("bf16") {
            var kernels = try CPUKernels(path, pool: pool)
            kernels.tasksPerThread = tasksPerThread
            let peak = kernels.measuredPeakFlops() ?? peakFlops(kernels, D: D)
            var T = 1
            while T <= maxTokens {
                if path == .portable && T > 16 { break }  // minutes per row beyond this
                let x = KernelSelfTest.random(T * D, seed: UInt64(T))
                var y = [Float](repeating: 0, count: T * D)
                let seconds = secondsPerCall { call in
                    let e = set[call % set.count]
                    kernels.expertFFN(x, gate: e.gate, up: e.up, down: e.down, &y, tokens: T)
                }
                rows.append(KernelRow(path: path.rawValue, tokens: T, bytes: bytes, ms: seconds * 1e3, gbps: bytes / seconds / 1e9,
                                      gflops: 2 * 3 * Double(D * F * T) / seconds / 1e9, fraction: 0, bound: "",
                                      peakGflops: peak / 1e9, bandwidthGbps: 0, threads: pool.threadCount))
                T *= 2
            }
        }
        rows += try quantizedRows(set, pool: pool, D: D, F: F)
        bandwidth = max(bandwidth, try measuredBandwidth(pool: pool, gib: memoryGib))
        for var row in rows {
            // Roofline: the time the row cannot beat is max(bytes / bandwidth, flops / peak).
            let bytes = row.bytes
            let memoryTime = bytes / bandwidth, computeTime = row.peakGflops > 0 ? row.gflops / row.peakGflops * row.ms * 1e-3 : 0
            row.fraction = max(memoryTime, computeTime) / (row.ms * 1e-3)
            row.bound = memoryTime >= computeTime ? "memory" : "compute"
            row.bandwidthGbps = bandwidth / 1e9
            try Console.json(row)
            if !json {
                Console.out("\(row.dtype.padding(5)) \(row.path.padding(9)) \(String(row.tokens).padding(5)) \(fixed(row.ms, 2).padding(7)) \(fixed(row.gbps, 1).padding(7)) \(fixed(row.gflops, 0).padding(9)) \(fixed(row.fraction, 2)) (\(row.bound), peak \(fixed(row.peakGflops, 0)) GFLOP/s)\n")
            }
        }
        if !json { Console.out("bandwidth after the rows \(fixed(bandwidth / 1e9, 1)) GB/s (the higher reading is used)\n") }
    }

    /// Portable path's peak: its matmul on cache-resident weights (64 rows per thread of width D, 16 tokens).
    private func peakFlops(_ kernels: CPUKernels, D: Int) -> Double {
        let rows = 64 * kernels.pool.threadCount, T = kernels.path == .portable ? 16 : 128
        let source = SyntheticWeights(seed: 3, pool: kernels.pool)
        guard let w = try? source.matrix("peak", rows: rows, cols: D) else { return .infinity }
        let x = KernelSelfTest.random(T * D, seed: 5)
        var y = [Float](repeating: 0, count: T * rows)
        kernels.matmul(x, w, &y, tokens: T)
        var calls = 0
        let start = ContinuousClock.now
        repeat {
            kernels.matmul(x, w, &y, tokens: T)
            calls += 1
        } while secondsSince(start) < 0.2 || calls < 3
        return 2 * Double(rows * D * T) * Double(calls) / secondsSince(start)
    }

    /// Seconds per `call(i)` (i = 0, 1, ... cycles the experts) after a warm-up call, over
    /// at least `minSeconds` and 3 calls.
    private func secondsPerCall(_ call: (Int) -> Void) -> Double {
        call(0)
        var calls = 0
        let start = ContinuousClock.now
        repeat {
            call(calls)
            calls += 1
        } while secondsSince(start) < minSeconds || calls < 3
        return secondsSince(start) / Double(calls)
    }

    /// q8 and q4 rows: the same experts quantized, on the VNNI path (where the CPU has it)
    /// and the portable integer path. Bytes counted: packed levels and scales.
    private func quantizedRows(_ set: [(gate: WeightMatrix, up: WeightMatrix, down: WeightMatrix)], pool: ThreadPool, D: Int, F: Int) throws -> [KernelRow] {
        var rows: [KernelRow] = []
        for format in QuantFormat.allCases where dtypes.contains(format.rawValue) {
            let start = ContinuousClock.now
            let quantized = QuantizedExpert.quantizing(set, format: format, pool: pool)
            if !json { Console.out("quantized \(set.count) experts to \(format.rawValue) in \(fixed(secondsSince(start), 2)) s\n") }
            let bytes = Double(quantized[0].byteCount)
            let paths: [KernelPath] = (CPUFeatures.current.vnni ? [.avx512] : []) + [.portable]
            for path in paths {
                var kernels = try CPUKernels(path, pool: pool)
                kernels.tasksPerThread = tasksPerThread
                let name = path == .avx512 ? "vnni" : "portable"
                let peak = path == .avx512 ? kernels.measuredPeakIntOps() ?? 0 : 0  // 0: not measured, memory bound only
                var T = 1
                while T <= maxTokens {
                    if path == .portable && T > 4 { break }  // minutes per row beyond this
                    let x = KernelSelfTest.random(T * D, seed: UInt64(T))
                    var y = [Float](repeating: 0, count: T * D)
                    let seconds = secondsPerCall { call in kernels.expertFFN(x, quantized[call % quantized.count], &y, tokens: T) }
                    rows.append(KernelRow(dtype: format.rawValue, path: name, tokens: T, bytes: bytes, ms: seconds * 1e3,
                                          gbps: bytes / seconds / 1e9, gflops: 2 * 3 * Double(D * F * T) / seconds / 1e9,
                                          fraction: 0, bound: "", peakGflops: peak / 1e9, bandwidthGbps: 0, threads: pool.threadCount))
                    T *= 2
                }
            }
        }
        return rows
    }

    struct KernelRow: Encodable {
        var bench = "kernels"
        var dtype = "bf16"
        var path: String
        var tokens: Int
        /// Weight bytes one call reads (levels and scales for q8/q4).
        var bytes: Double
        var ms: Double
        var gbps: Double
        var gflops: Double
        var fraction: Double
        var bound: String
        var peakGflops: Double
        var bandwidthGbps: Double
        var threads: Int
        enum CodingKeys: String, CodingKey {
            case bench, dtype, path, tokens, bytes, ms, gbps, gflops, fraction, bound, threads
            case peakGflops = "path_peak_gflops", bandwidthGbps = "bandwidth_gbps"
        }
    }
}

struct BenchDecode: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Single-sequence decode speed next to its roofline (weight bytes per token / measured bandwidth).")

    @OptionGroup var engine: EngineOptions
    @Option(name: .long, help: "Prompt length.")
    var promptTokens = 16
    @Option(name: .long, help: "Tokens to decode.")
    var tokens = 32
    @Option(name: .long, help: "GiB for the bandwidth measurement done first.")
    var memoryGib: Double = 4
    @Flag(name: .long, help: "Print only the JSON row.")
    var json = false
    @Flag(name: .long, help: "GPU: also time every kernel of 8 more decode steps (launched one by one) against the HBM ceiling.")
    var kernelTimes = false

    func run() throws {
        // The ceiling first, before the weights take memory (measured after loading many GB,
        // the buffer gets fewer huge pages and reads slower), then again after the run.
        let pool = ThreadPool(threads: engine.threads ?? ThreadPool.availableCores)
        var bandwidth = try measuredBandwidth(pool: pool, gib: memoryGib)
        let (model, _, loadSeconds) = try engine.load(singleSequence: true)
        let prompt = (0..<promptTokens).map { Int32(1 + ($0 * 7919) % (model.vocabSize - 1)) }
        // GPU: launches, synchronous copies and host time in `forward` of the decode steps
        // after the first (which captures the decode graph).
        let gpuModel = (model as? GPULanguageModel)?.gpuModel.expertExecutor == nil ? (model as? GPULanguageModel)?.gpuModel : nil
        var launches = 0, copies = 0, issue = 0.0, steps = 0, seen = 0
        var counted: (Int, Int)? = nil
        let result = try generate(model: model, prompt: prompt, options: GenerationOptions(maxTokens: tokens + 1, stopTokenIds: [])) { _ in
            guard let g = gpuModel else { return }
            seen += 1
            if let a = counted {
                launches = g.device.launches - a.0; copies = g.device.synchronousCopies - a.1
                issue += g.lastIssueSeconds; steps += 1
            } else if seen == 2 {
                counted = (g.device.launches, g.device.synchronousCopies)
            }
        }
        if let gpuModel = model as? GPULanguageModel, gpuModel.gpuModel.expertExecutor == nil {
            // On the GPU the ceiling is HBM: a read-only kernel over the same GPU, same run.
            bandwidth = try GPUOps(gpu: gpuModel.gpuModel.device).readBandwidth(bytes: 4 << 30)
            Console.err("GPU read ceiling \(fixed(bandwidth / 1e9, 0)) GB/s\n")
            if kernelTimes { try printKernelTimes(gpuModel.gpuModel, lastToken: result.ids.last ?? 1, position: prompt.count + result.ids.count - 1, bandwidth: bandwidth) }
        } else {
            bandwidth = max(bandwidth, try measuredBandwidth(pool: pool, gib: memoryGib))  // the higher reading, as bench kernels
        }
        let s = model.summary
        let bytesPerToken = Double(s.decodeBytesPerToken)
        let t = result.timings
        let row = DecodeRow(model: s.family, layers: s.settings.first { $0.0 == "num_hidden_layers" }?.1 ?? "?",
                            kernels: model is GPULanguageModel ? "gpu" : engine.kernels.rawValue, threads: pool.threadCount, loadSeconds: loadSeconds,
                            prefillTokensPerSecond: t.prefillTokensPerSecond, decodeTokensPerSecond: t.decodeTokensPerSecond,
                            bytesPerToken: bytesPerToken, bandwidthGbps: bandwidth / 1e9, rooflineTokensPerSecond: bandwidth / bytesPerToken,
                            fraction: t.decodeTokensPerSecond / (bandwidth / bytesPerToken),
                            launchesPerToken: steps > 0 ? Double(launches) / Double(steps) : nil,
                            synchronousCopiesPerToken: steps > 0 ? Double(copies) / Double(steps) : nil,
                            hostIssueMsPerToken: steps > 0 ? issue / Double(steps) * 1e3 : nil)
        try Console.json(row)
        if !json {
            Console.out("decode \(fixed(row.decodeTokensPerSecond, 2)) tok/s, roofline \(fixed(row.rooflineTokensPerSecond, 2)) tok/s "
                + "(\(fixed(bytesPerToken / 1e9, 3)) GB of weights per token at \(fixed(row.bandwidthGbps, 1)) GB/s): \(fixed(row.fraction, 2)) of roofline\n")
            if let l = row.launchesPerToken, let c = row.synchronousCopiesPerToken, let h = row.hostIssueMsPerToken, let g = gpuModel {
                let graphed = g.decodeGraphSteps > 0
                Console.out("per decode token: \(fixed(l, 1)) launches" + (graphed ? " (one CUDA graph of \(g.decodeGraphKernels) kernels)" : "")
                    + ", \(fixed(c, 0)) synchronous copies, host time in forward \(fixed(h, 3)) ms of \(fixed(1e3 / row.decodeTokensPerSecond, 3)) ms"
                    + (graphed ? " (launch + wait)\n" : " (issuing launches)\n"))
            }
        }
    }

    /// Eight decode steps launched kernel by kernel with an event after each: per kernel, its
    /// launches and device time per token (with the gap before it), and for the kernels that
    /// read weights, the bytes per token over that time as a fraction of the HBM ceiling.
    private func printKernelTimes(_ model: GPUMixtral, lastToken: Int32, position: Int, bandwidth: Double) throws {
        let steps = 8, graphs = model.usesDecodeGraph
        model.usesDecodeGraph = false
        defer { model.usesDecodeGraph = graphs }
        _ = try model.forward([lastToken], slot: 0, start: position)  // warm: the same step as timed (it rewrites that position)
        try model.device.startKernelTimer()
        for _ in 0..<steps { _ = try model.forward([lastToken], slot: 0, start: position) }
        let times = try model.device.stopKernelTimer()
        let weightBytes = model.decodeWeightBytesByKernel
        let total = times.reduce(0) { $0 + $1.seconds } / Double(steps)
        Console.out("kernels of one decode step (eager launches, \(steps) steps; time includes the gap before each launch):\n")
        Console.out("  kernel                     launches    us/token  share   weights GB/token  of HBM\n")
        for t in times.sorted(by: { $0.seconds > $1.seconds }) {
            let seconds = t.seconds / Double(steps)
            var line = "  " + t.name.padding(26) + " " + fixed(Double(t.launches) / Double(steps), 0).padding(8, left: true)
                + "  " + fixed(seconds * 1e6, 1).padding(10, left: true) + "  " + fixed(seconds / total, 3).padding(5, left: true)
            if let bytes = weightBytes[t.name] {
                line += "  " + fixed(Double(bytes) / 1e9, 3).padding(16, left: true) + "  " + fixed(Double(bytes) / seconds / bandwidth, 2).padding(6, left: true)
            }
            Console.out(line + "\n")
            try Console.json(KernelRow(kernel: t.name, launchesPerToken: Double(t.launches) / Double(steps), secondsPerToken: seconds,
                                       weightBytesPerToken: weightBytes[t.name], fractionOfHBM: weightBytes[t.name].map { Double($0) / seconds / bandwidth }))
        }
        Console.out("  total \(fixed(total * 1e3, 3)) ms per token (eager)\n")
    }

    struct KernelRow: Encodable {
        var bench = "decode-kernel"
        var kernel: String
        var launchesPerToken: Double
        var secondsPerToken: Double
        var weightBytesPerToken: Int?
        var fractionOfHBM: Double?
        enum CodingKeys: String, CodingKey {
            case bench, kernel
            case launchesPerToken = "launches_per_token", secondsPerToken = "s_per_token"
            case weightBytesPerToken = "weight_bytes_per_token", fractionOfHBM = "fraction_of_hbm"
        }
    }

    struct DecodeRow: Encodable {
        var bench = "decode"
        var model: String
        var layers: String
        var kernels: String
        var threads: Int
        var loadSeconds: Double
        var prefillTokensPerSecond: Double
        var decodeTokensPerSecond: Double
        var bytesPerToken: Double
        var bandwidthGbps: Double
        var rooflineTokensPerSecond: Double
        var fraction: Double
        var launchesPerToken: Double?
        var synchronousCopiesPerToken: Double?
        var hostIssueMsPerToken: Double?
        enum CodingKeys: String, CodingKey {
            case bench, model, layers, kernels, threads, fraction
            case launchesPerToken = "launches_per_token", synchronousCopiesPerToken = "sync_copies_per_token", hostIssueMsPerToken = "host_issue_ms_per_token"
            case loadSeconds = "load_s", prefillTokensPerSecond = "prefill_tok_s", decodeTokensPerSecond = "decode_tok_s"
            case bytesPerToken = "bytes_per_token", bandwidthGbps = "bandwidth_gbps", rooflineTokensPerSecond = "roofline_tok_s"
        }
    }
}

struct SelfTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check every available CPU kernel path against an fp64 reference on random inputs.")

    @Option(name: .long, help: "CPU threads (default: all cores).")
    var threads: Int?

    @Flag(name: .long, help: "Also check every CUDA op against its CPU op (skipped, with the reason, without a GPU).")
    var gpu = false

    @Option(name: .long, help: "With --gpu: the golden checkpoints and HF outputs (Tests/Fixtures) to run the whole model on the GPU against.")
    var goldens = "Tests/Fixtures"
    @Flag(name: .long, help: "Print every check (by default only failures once there are more than 200).")
    var verbose = false

    func run() throws {
        let pool = ThreadPool(threads: threads ?? ThreadPool.availableCores)
        Console.out("CPU: \(CPUFeatures.current), \(pool.threadCount) threads\n")
        var results = KernelSelfTest.run(pool: pool).map { (name: $0.name, error: $0.error, tolerance: $0.tolerance, passed: $0.passed) }
        var skipped = 0
        if gpu {
            switch GPUSelfTest.run() {
            case .success(let r):
                Console.out("GPU: \(r.device)\n")
                results += r.checks.map { (name: "gpu " + $0.name, error: $0.error, tolerance: $0.tolerance, passed: $0.passed) }
                results += try (GPUSelfTest.modelChecks(goldens: goldens) + GPUSelfTest.longPromptChecks(goldens: goldens) + GPUSelfTest.beamChecks(goldens: goldens)
                                 + GPUSelfTest.offloadChecks(goldens: goldens) + GPUSelfTest.offloadChecks(goldens: goldens, format: .q8)
                                 + GPUSelfTest.offloadChecks(goldens: goldens, format: .q4)).map {
                    (name: "gpu " + $0.name, error: $0.error, tolerance: $0.tolerance, passed: $0.passed)
                }
            case .failure(.unavailable(let why)):
                Console.out("GPU checks skipped: \(why)\n")
                skipped = 1
            case .failure(let error):
                Console.out("FAIL gpu: \(error)\n")
                results.append((name: "gpu setup", error: 1, tolerance: 0, passed: false))
            }
        }
        for c in results where !c.passed || verbose || results.count < 200 {
            Console.out("\(c.passed ? "ok  " : "FAIL") \(c.name): error \(c.error) (tolerance \(c.tolerance))\n")
        }
        let failed = results.filter { !$0.passed }.count
        Console.out("\(results.count - failed) passed, \(failed) failed" + (skipped > 0 ? ", \(skipped) skipped" : "") + "\n")
        if failed > 0 { throw ExitCode.failure }
    }

}

struct BenchBatch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch",
        abstract: "Aggregate decode tokens/s for batch sizes and beam widths, next to the roofline of the distinct expert bytes each step reads.")

    @OptionGroup var engine: EngineOptions
    @Option(name: .long, parsing: .upToNextOption, help: "Batch sizes.")
    var batchSizes: [Int] = [1, 2, 4, 8, 16]
    @Option(name: .long, parsing: .upToNextOption, help: "Beam widths.")
    var beamWidths: [Int] = [4, 8, 16]
    @Option(name: .long, help: "Decode steps measured per row.")
    var steps = 8
    @Option(name: .long, help: "Prompt length per sequence.")
    var promptTokens = 24
    @Option(name: .long, help: "GiB for the bandwidth measurement.")
    var memoryGib: Double = 4
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    func run() throws {
        let pool = ThreadPool(threads: engine.threads ?? ThreadPool.availableCores)
        var bandwidth = try measuredBandwidth(pool: pool, gib: memoryGib)
        let (loaded, _, _) = try engine.load()
        guard let model = loaded as? MixtralModel else { throw CLIError("bench batch needs a Mixtral-family model") }
        let c = model.config
        let expertBytes = Double(model.layers[0].experts[0].quantized?.byteCount ?? c.parametersPerExpert * 2)  // bf16 or quantized
        let nonExpertBytes = Double(model.summary.decodeBytesPerToken) - Double(c.numHiddenLayers * c.numExpertsPerToken) * expertBytes
        // Distinct experts per layer in each decode step (steps have at most `width` tokens).
        var distinct = 0, stepsSeen = 0, limit = 0
        model.routingObserver = { _, choices in
            guard choices.count <= limit else { return }
            distinct += Set(choices.flatMap(\.experts)).count
            stepsSeen += 1
        }
        var rows: [BatchRow] = []
        for B in batchSizes {
            limit = B
            let caches = (0..<B).map { _ in model.makeCache() }
            let prompts = (0..<B).map { b in (0..<promptTokens).map { Int32(1 + (b * 7919 + $0 * 104_729) % (c.vocabSize - 1)) } }
            var logits = try model.forwardBatch(zip(prompts, caches).map { BatchItem(tokens: $0, cache: $1) }, allLogits: false)
            distinct = 0; stepsSeen = 0
            let start = ContinuousClock.now
            for _ in 0..<steps {
                logits = try model.forwardBatch(zip(logits, caches).map { BatchItem(tokens: [Int32(argmax($0))], cache: $1) }, allLogits: false)
            }
            rows.append(row("batch", B, seconds: secondsSince(start) / Double(steps), tokensPerStep: B))
        }
        for W in beamWidths {
            limit = W
            let prompt = (0..<promptTokens).map { Int32(1 + ($0 * 7919) % (c.vocabSize - 1)) }
            distinct = 0; stepsSeen = 0
            let start = ContinuousClock.now
            _ = try beamSearch(model: model, prompt: prompt, options: BeamSearchOptions(width: W, maxNewTokens: steps + 1, stopTokenIds: []))
            let total = secondsSince(start)
            // The prompt's prefill is timed apart and taken out.
            let prefillStart = ContinuousClock.now
            _ = try model.forward(prompt, cache: model.makeCache(), allLogits: false)
            let perStep = (total - secondsSince(prefillStart)) / Double(max(1, stepsSeen / c.numHiddenLayers))
            rows.append(row("beam", W, seconds: perStep, tokensPerStep: W))
        }
        bandwidth = max(bandwidth, try measuredBandwidth(pool: pool, gib: memoryGib))
        for var r in rows {
            r.rooflineMs = r.bytesPerStep / bandwidth * 1e3
            r.fraction = r.rooflineMs / r.stepMs
            r.bandwidthGbps = bandwidth / 1e9
            try Console.json(r)
            if !json {
                Console.out("\(r.kind.padding(6)) \(String(r.size).padding(4)) step \(fixed(r.stepMs, 1)) ms  \(fixed(r.tokensPerSecond, 1)) tok/s  "
                    + "\(fixed(r.expertsPerLayer, 2)) experts/layer  \(fixed(r.bytesPerStep / 1e9, 2)) GB/step  roofline \(fixed(r.rooflineMs, 1)) ms  fraction \(fixed(r.fraction, 2))\n")
            }
        }

        func row(_ kind: String, _ size: Int, seconds: Double, tokensPerStep: Int) -> BatchRow {
            let perLayer = Double(distinct) / Double(max(1, stepsSeen))
            let bytes = nonExpertBytes + perLayer * Double(c.numHiddenLayers) * expertBytes
            return BatchRow(kind: kind, size: size, stepMs: seconds * 1e3, tokensPerSecond: Double(tokensPerStep) / seconds,
                            expertsPerLayer: perLayer, bytesPerStep: bytes)
        }
    }

    struct BatchRow: Encodable {
        var bench = "batch"
        var kind: String
        var size: Int
        var stepMs: Double
        var tokensPerSecond: Double
        var expertsPerLayer: Double
        var bytesPerStep: Double
        var rooflineMs = 0.0
        var fraction = 0.0
        var bandwidthGbps = 0.0
        enum CodingKeys: String, CodingKey {
            case bench, kind, size, fraction
            case stepMs = "step_ms", tokensPerSecond = "tok_s", expertsPerLayer = "distinct_experts_per_layer"
            case bytesPerStep = "bytes_per_step", rooflineMs = "roofline_ms", bandwidthGbps = "bandwidth_gbps"
        }
    }
}
