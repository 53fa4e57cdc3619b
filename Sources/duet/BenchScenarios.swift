#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime

/// `duet bench scenarios`: Fiddler's evaluation (single batch, long prefill, beam search)
/// for every strategy on one set of weights, each row next to its bound — the best split of
/// the same routed expert work between the CPU and PCIe, under the latency model measured in
/// the same run (CPU expert kernels at the token counts that occur, copies of pinned experts).
struct BenchScenarios: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scenarios",
        abstract: "Single-batch decode, prefill and beam search per strategy, with bounds (JSON lines + a table).")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, parsing: .upToNextOption, help: "Strategies to run: fiddler, gpu-swap, layer-split, cpu-only.")
    var strategies: [Strategy] = [.fiddler, .gpuSwap, .layerSplit, .cpuOnly]

    @Option(name: .long, parsing: .upToNextOption, help: "Scenario groups: single, prefill, beam.")
    var groups: [String] = ["single", "prefill", "beam"]

    @Option(name: .long, parsing: .upToNextOption, help: "Only the scenarios whose name starts with one of these (e.g. 'single 32/64', 'beam W=4').")
    var only: [String] = []

    @Flag(name: .long, help: "Fiddler's whole grid: inputs 32-256 x outputs 64-512, beam widths 4, 8, 12, 16.")
    var full = false

    @Option(name: .long, help: "Where beam search runs the non-expert layers: gpu (a KV cache region per beam) or cpu.")
    var beamDense: DensePlacement = .gpu

    @Option(name: .long, help: "Rows are appended here as they finish (JSON lines).")
    var output = "scenarios.jsonl"

    @Option(name: .long, help: "Skip the rows this file already holds (same scenario, strategy and settings).")
    var resume: String?

    @Option(name: .long, parsing: .upToNextOption, help: "Calibration token counts (cover the per-expert token counts of the prefill rows).")
    var calibrationTokens: [Int] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

    struct Scenario: Codable, Hashable {
        var group: String
        var input: Int
        var output: Int
        var width: Int
        var name: String { group == "beam" ? "beam W=\(width) \(input)/\(output)" : group == "prefill" ? "prefill \(input)" : "single \(input)/\(output)" }
    }

    struct Row: Codable {
        var bench = "scenarios"
        var device: String
        var scenario: Scenario
        var strategy: String
        var layout: String
        /// The experts' format: bf16 (stored), q8, q4 (absent in rows from before quantized experts: bf16).
        var expertDtype: String?
        var gpuMemoryGiB: Double
        var prefillSeconds: Double
        var decodeTokensPerSecond: Double?
        var stepSeconds: Double?
        /// The measured phase's time split (seconds) and what moved.
        var cpuExpertSeconds: Double
        var deviceWaitSeconds: Double
        var deviceCopySeconds: Double
        var otherSeconds: Double
        /// Dense layers on the GPU: the host's time issuing them, waiting for them plus the
        /// per-layer download, routing on the host, queueing the upload (nil: dense on the CPU).
        var denseIssueSeconds: Double?
        var downloadSeconds: Double?
        var routeSeconds: Double?
        var uploadSeconds: Double?
        /// The executor's own host work per MoE step (plan, gather, submit, collect, combine).
        var executorOverheadSeconds: Double?
        /// Of that, handing the device its steps (issuing copies and launches).
        var submitSeconds: Double?
        var hitRate: Double
        var bytesCopiedPerStep: Double
        var activationBytesPerStep: Double
        /// fiddler: what the planner predicted for the expert part (the latency model as
        /// refreshed during the run), and of that the CPU's part (against cpuExpertSeconds).
        var plannedSeconds: Double?
        var plannedCPUSeconds: Double?
        /// The expert part's best CPU/PCIe split under the measured latency model, and bound / measured.
        var boundSeconds: Double
        var measuredSeconds: Double
        var fraction: Double
    }

    func scenarios() -> [Scenario] {
        var out: [Scenario] = []
        if groups.contains("single") {
            let grid = full ? [32, 64, 128, 256].flatMap { i in [64, 128, 256, 512].map { (i, $0) } } : [(32, 64), (128, 128), (256, 64)]
            out += grid.map { Scenario(group: "single", input: $0.0, output: $0.1, width: 1) }
        }
        if groups.contains("prefill") { out += [128, 512, 2048, 4096].map { Scenario(group: "prefill", input: $0, output: 1, width: 1) } }
        if groups.contains("beam") { out += (full ? [4, 8, 12, 16] : [4, 16]).map { Scenario(group: "beam", input: 32, output: 64, width: $0) } }
        return only.isEmpty ? out : out.filter { s in only.contains { s.name.hasPrefix($0) } }
    }

    func run() throws {
        guard let synthetic = engine.synthetic else { throw CLIError("bench scenarios runs on --synthetic weights (e.g. mixtral-8x7b)") }
        let engine = self.engine
        let done = try resume.map(Self.finished) ?? []
        HostMemory.reuseLargeAllocations()
        let kernels = try engine.makeKernels()
        let start = ContinuousClock.now
        let model = try SyntheticWeights.mixtral(synthetic, layers: engine.layers, seed: engine.syntheticSeed, routerSkew: engine.routerSkew,
                                                 expertFormat: engine.expertDtype.format, kernels: kernels)
        Console.err("weights generated in \(fixed(secondsSince(start), 1)) s\n")
        var calibration: LatencyCalibration? = nil
        // Offload strategies first: the first one calibrates, cpu-only's bound uses its CPU times.
        for strategy in strategies.filter({ $0 != .cpuOnly }) + strategies.filter({ $0 == .cpuOnly }) {
            let todo = scenarios().filter { !done.contains(Key(scenario: $0, strategy: strategy.rawValue, expertDtype: dtype)) }
            guard !todo.isEmpty else { continue }
            // One set-up for the single-sequence rows, one for the beams (their own GPU KV
            // cache: width + 1 sequences of input + output positions each).
            for beams in [false, true] {
                let rows = todo.filter { ($0.group == "beam") == beams }
                guard !rows.isEmpty else { continue }
                var setup = engine
                let layout: DensePlacement = strategy == .cpuOnly ? .cpu : beams ? beamDense : .gpu
                let longest = rows.map { $0.input + $0.output + 1 }.max()!
                setup.maxContext = beams ? longest : max(engine.maxContext, longest)
                if beams { setup.gpuSequences = rows.map(\.width).max()! + 1 }
                try runStrategy(strategy, layout: layout, model: model, scenarios: rows, calibration: &calibration, engine: setup)
            }
        }
    }

    struct Key: Hashable { var scenario: Scenario; var strategy: String; var expertDtype: String }

    /// The experts' format as rows record it.
    var dtype: String { engine.expertDtype.format?.rawValue ?? "bf16" }

    static func finished(_ path: String) throws -> Set<Key> {
        guard fileExists(path) else { return [] }
        let lines = String(decoding: try readSmallFile(path), as: UTF8.self).split(separator: "\n")
        return Set(lines.compactMap { try? JSONDecoder().decode(Row.self, from: Data($0.utf8)) }.map { Key(scenario: $0.scenario, strategy: $0.strategy, expertDtype: $0.expertDtype ?? "bf16") })
    }

    /// Sets up one strategy in one layout, runs its scenarios, and tears it down.
    func runStrategy(_ strategy: Strategy, layout: DensePlacement, model: MixtralModel, scenarios: [Scenario],
                     calibration: inout LatencyCalibration?, engine: EngineOptions) throws {
        var run: any LanguageModel = model
        var executor: OffloadExecutor? = nil
        var deviceName = "CPU"
        if let policy = strategy.offloadPolicy {
            run = try engine.offloadModel(policy, mixtral: model, kernels: model.kernels, dense: layout)
            guard let e = offloadExecutor(of: run) else { throw CLIError("no device for --strategy \(strategy.rawValue)") }
            executor = e
            deviceName = e.device.name
            if let calibration { e.use(calibration.model) } else {
                calibration = try e.calibrate(tokenCounts: calibrationTokens, repeats: 3, fingerprint: e.fingerprint)
                _ = try? calibration!.save(directory: duetCacheDirectory("calibration"))  // later set-ups load it
                Console.err("calibrated: CPU \(calibration!.model.cpu); device \(calibration!.model.gpu); copy \(ms(calibration!.transferSeconds)); "
                    + "CPU x\(fixed(calibration!.cpuSlowdownWhileCopying, 2)) during copies\n")
            }
        }
        defer {
            model.expertExecutor = nil
            model.routingObserver = nil
        }
        // cpu-only: the bound is the CPU's time for the routed experts (calibrated kernels).
        var cpuBound = 0.0
        if executor == nil {
            let cost = calibration?.model.cpu ?? cpuCost(model)
            model.routingObserver = { _, choices in
                var counts = [Int: Int]()
                for c in choices { for e in c.experts { counts[e, default: 0] += 1 } }
                cpuBound += counts.values.reduce(0.0) { $0 + cost($1) }
            }
        }
        // One short prompt first, so the first row does not pay for first use (kernel modules,
        // cuBLAS's heuristics, staging buffers growing): rows are steady-state figures.
        _ = try generate(model: run, prompt: (0..<48).map { Int32(1 + $0 * 31) }, options: GenerationOptions(maxTokens: 2, stopTokenIds: []))
        for s in scenarios {
            let row = try measure(s, strategy: strategy, layout: layout, model: run, executor: executor, cpuBound: { cpuBound },
                                  device: deviceName, gpuMemory: engine.gpuMemory)
            try append(row)
            Console.out(describe(row) + "\n")
        }
    }

    /// The CPU's expert time at the calibration token counts, measured as a calibration
    /// does, when no device calibrated.
    func cpuCost(_ model: MixtralModel) -> ExpertPlanner.Cost {
        ExpertPlanner.Cost(measured: Array(zip(calibrationTokens, LatencyCalibration.cpuExpertSeconds(model, tokenCounts: calibrationTokens))))
    }

    func measure(_ s: Scenario, strategy: Strategy, layout: DensePlacement, model: any LanguageModel, executor: OffloadExecutor?,
                 cpuBound: () -> Double, device: String, gpuMemory: String?) throws -> Row {
        let prompt = (0..<s.input).map { Int32(1 + ($0 * 7919 + s.input) % (model.vocabSize - 1)) }
        let gpuModel = (model as? GPULanguageModel)?.gpuModel
        var before = executor?.stats ?? OffloadStats(), boundBefore = cpuBound(), timingBefore = gpuModel?.offloadTiming
        var prefill = 0.0, measured = 0.0, steps = 0
        var tokensPerSecond: Double? = nil, stepSeconds: Double? = nil
        switch s.group {
        case "beam":
            let t0 = ContinuousClock.now
            let beams = try beamSearch(model: model, prompt: prompt, options: BeamSearchOptions(width: s.width, maxNewTokens: s.output, stopTokenIds: []))
            measured = secondsSince(t0)
            steps = s.output
            stepSeconds = measured / Double(steps)
            _ = beams
        case "prefill":
            let r = try generate(model: model, prompt: prompt, options: GenerationOptions(maxTokens: 1, stopTokenIds: []))
            prefill = r.timings.prefillSeconds
            measured = prefill
            steps = 1
        default:
            var first = true
            let r = try generate(model: model, prompt: prompt, options: GenerationOptions(maxTokens: s.output + 1, stopTokenIds: [])) { _ in
                if first { before = executor?.stats ?? OffloadStats(); boundBefore = cpuBound(); timingBefore = gpuModel?.offloadTiming; first = false }
            }
            prefill = r.timings.prefillSeconds
            measured = r.timings.decodeSeconds
            steps = r.timings.decodeSteps
            tokensPerSecond = r.timings.decodeTokensPerSecond
        }
        let after = executor?.stats ?? OffloadStats(), timing = gpuModel?.offloadTiming.since(timingBefore)
        let d = after.since(before)
        let bound = executor == nil ? cpuBound() - boundBefore : d.boundSeconds
        let cpu = executor == nil ? measured : d.cpuSeconds
        let planned = executor?.policy == .fiddler  // the others' placement decides, not the planner
        return Row(device: device, scenario: s, strategy: strategy.rawValue, layout: "dense-on-\(layout.rawValue)", expertDtype: dtype,
                   gpuMemoryGiB: Double(gpuMemory.flatMap(parseByteSize) ?? 0) / 1073741824, prefillSeconds: prefill,
                   decodeTokensPerSecond: tokensPerSecond, stepSeconds: stepSeconds,
                   cpuExpertSeconds: cpu, deviceWaitSeconds: d.deviceWaitSeconds, deviceCopySeconds: d.deviceCopySeconds,
                   otherSeconds: max(0, measured - cpu - d.deviceWaitSeconds),
                   denseIssueSeconds: timing?.issueSeconds, downloadSeconds: timing?.downloadSeconds,
                   routeSeconds: timing?.routeSeconds, uploadSeconds: timing?.uploadSeconds,
                   executorOverheadSeconds: executor.map { _ in max(0, d.stepSeconds - d.cpuSeconds - d.deviceWaitSeconds) },
                   submitSeconds: executor.map { _ in d.submitSeconds },
                   hitRate: d.hitRate, bytesCopiedPerStep: Double(d.bytesCopied) / Double(max(steps, 1)),
                   activationBytesPerStep: Double(d.activationBytes) / Double(max(steps, 1)),
                   plannedSeconds: planned ? d.plannedSeconds : nil, plannedCPUSeconds: planned ? d.plannedCPUSeconds : nil,
                   boundSeconds: bound, measuredSeconds: measured, fraction: measured > 0 ? bound / measured : 0)
    }

    func append(_ row: Row) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let line = String(decoding: try encoder.encode(row), as: UTF8.self) + "\n"
        guard let f = fopen(output, "a") else { throw CLIError("cannot append to \(output)") }
        defer { fclose(f) }
        fputs(line, f)
    }

    func describe(_ r: Row) -> String {
        let speed = r.decodeTokensPerSecond.map { "\(fixed($0, 2)) tok/s" } ?? r.stepSeconds.map { "\(fixed($0, 3)) s/step" } ?? "\(fixed(r.prefillSeconds, 3)) s"
        return "\(r.scenario.name.padding(18)) \(r.strategy.padding(11)) \((r.expertDtype ?? "bf16").padding(5)) \(r.layout.padding(12)) \(speed.padding(13)) prefill \(fixed(r.prefillSeconds, 2)) s | "
            + "CPU \(fixed(r.cpuExpertSeconds, 2)) s\(r.plannedCPUSeconds.map { " (planned \(fixed($0, 2)) s)" } ?? ""), wait \(fixed(r.deviceWaitSeconds, 2)) s, copies \(fixed(r.deviceCopySeconds, 2)) s, other \(fixed(r.otherSeconds, 2)) s"
            + (r.denseIssueSeconds.map { " (dense issue \(fixed($0, 2)) s, download \(fixed(r.downloadSeconds ?? 0, 2)) s, route \(fixed(r.routeSeconds ?? 0, 2)) s, upload \(fixed(r.uploadSeconds ?? 0, 2)) s, executor \(fixed(r.executorOverheadSeconds ?? 0, 2)) s of which submit \(fixed(r.submitSeconds ?? 0, 2)) s)" } ?? "") + " | "
            + "hit \(fixed(r.hitRate * 100, 1))% | \(fixed(r.bytesCopiedPerStep / 1e9, 2)) GB copied/step | bound \(fixed(r.boundSeconds, 2)) s of \(fixed(r.measuredSeconds, 2)) s = \(fixed(r.fraction, 2))"
    }
}

extension Strategy: Codable {}
