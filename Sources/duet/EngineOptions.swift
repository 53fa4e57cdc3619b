#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime

/// Where experts run (`--strategy`).
enum Strategy: String, ExpressibleByArgument, CaseIterable {
    case fiddler, cpuOnly = "cpu-only", gpuOnly = "gpu-only", gpuSwap = "gpu-swap", layerSplit = "layer-split"
}

extension KernelPath: ExpressibleByArgument {}

/// `--expert-dtype`.
enum ExpertDType: String, ExpressibleByArgument, CaseIterable {
    case stored, q8, q4
    var format: QuantFormat? { QuantFormat(rawValue: rawValue) }
}

/// Options every verb that runs a model shares.
struct EngineOptions: ParsableArguments {
    @Option(name: .long, help: "Hugging Face checkpoint directory (config.json + safetensors [+ tokenizer.json]). Default: $DUET_MODEL, else the built-in demo model.")
    var model: String?

    @Option(name: .long, help: "Instead of --model: deterministic random weights of a named geometry (\(SyntheticGeometry.names.joined(separator: ", "))).")
    var synthetic: String?

    @Option(name: .long, help: "With --synthetic: number of layers (default: the geometry's).")
    var layers: Int?

    @Option(name: .long, help: "With --synthetic: the weights' seed.")
    var syntheticSeed: UInt64 = 0

    @Option(name: .long, help: "With --synthetic: skew expert popularity (0 = near-uniform routing; 2-4 = strongly popular experts).")
    var routerSkew: Float = 0

    @Option(name: .long, help: "CPU threads (default: all cores).")
    var threads: Int?

    @Option(name: .long, help: "CPU kernel path: auto, reference, portable, avx512, amx.")
    var kernels: KernelPath = .auto

    @Option(name: .long, help: ArgumentHelp("Where experts run: fiddler (popular experts on the device, the rest on the CPU or copied, per a measured latency model; decode's copies stay in the layer's slots, least recently used out), gpu-swap (every expert copied to an LRU cache on the device), layer-split (whole layers' experts on the device, the rest on the CPU), cpu-only, gpu-only (the whole model on the GPU; --gpu-sequences for beams and batches). Default: fiddler with a GPU, cpu-only without."))
    var strategy: Strategy?

    @Option(name: .long, help: "With fiddler, gpu-swap, layer-split: the device that holds experts: gpu, or cpu (a second CPU thread pool in the device role, within --gpu-memory; for trying strategies without a GPU).")
    var offloadDevice: OffloadDeviceKind = .gpu

    @Option(name: .long, help: "With fiddler, gpu-swap, layer-split: where attention, norms, router and lm_head run: gpu (with a GPU KV cache of --max-context positions for each of --gpu-sequences sequences) or cpu (the paged KV cache: batches, the server). Default: gpu where the verb runs one sequence.")
    var denseOn: DensePlacement?

    @Option(name: .long, help: "Positions of the GPU KV cache (gpu-only, --dense-on gpu), per sequence.")
    var maxContext = 4096

    @Option(name: .long, help: "Sequences the GPU KV cache holds at once (gpu-only, --dense-on gpu): beam search with width W needs W + 1 (`generate --beam-width W` asks for that many).")
    var gpuSequences = 1

    @Option(name: .long, help: "Expert popularity profile (written by `duet profile`): the most-picked experts go on the device first.")
    var profile: String?

    @Option(name: .long, help: "Expert weights: stored (as in the checkpoint), q8 (int8, 8.5 bits per weight) or q4 (int4, 4.5 bits), quantized at load.")
    var expertDtype: ExpertDType = .stored

    @Option(name: .long, help: "Where quantized experts are cached between starts ('none' to turn off). Default: $DUET_CACHE/quantized, else ~/.cache/duet/quantized.")
    var quantCache: String?

    @Flag(name: .long, inversion: .prefixedNo, help: "Page-lock the experts an offload strategy may copy, so copies run by DMA at full PCIe speed (off: pageable copies, nothing locked).")
    var pinExperts = true

    @Option(name: .long, help: "With a GPU strategy: device memory Duet may use, e.g. 24GiB or 800MiB (default: the GPU's free memory; with --offload-device cpu, half the experts).")
    var gpuMemory: String?

    func validate() throws {
        if model != nil && synthetic != nil { throw ValidationError("give --model or --synthetic, not both") }
        if synthetic == nil && (layers != nil || routerSkew != 0) { throw ValidationError("--layers and --router-skew go with --synthetic") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if gpuSequences < 1 { throw ValidationError("--gpu-sequences must be at least 1") }
        if expertDtype != .stored && strategy == .gpuOnly {
            throw ValidationError("--strategy gpu-only runs the experts as stored; quantized experts (--expert-dtype \(expertDtype.rawValue)) run with fiddler, gpu-swap, layer-split or cpu-only")
        }
        if let gpuMemory, parseByteSize(gpuMemory) == nil { throw ValidationError("--gpu-memory must look like 24GiB, 800MiB or 1073741824, got '\(gpuMemory)'") }
    }

    /// The offload policy to run: the one `--strategy` names, or fiddler by default when a
    /// GPU driver is there (without one the default is cpu-only).
    func resolvedPolicy() -> OffloadPolicy? {
        if let strategy { return strategy.offloadPolicy }
        return offloadDevice == .cpu || GPU.driverPresent ? .fiddler : nil
    }

    /// Where quantized experts are cached (nil: `--quant-cache none`).
    var quantCacheDirectory: String? { quantCache == "none" ? nil : quantCache ?? QuantizedExpertCache.defaultDirectory() }

    /// The kernels (and thread pool) the options ask for.
    func makeKernels() throws -> CPUKernels {
        try CPUKernels(kernels, pool: ThreadPool(threads: threads ?? ThreadPool.availableCores))
    }

    /// The model directory to use, saying so when it is the built-in one.
    func modelDirectory() throws -> String {
        if let model { return model }
        if let env = environmentVariable("DUET_MODEL") { return env }
        guard let found = DemoModel.locate() else {
            throw CLIError("no --model given, DUET_MODEL is not set and the built-in demo model was not found "
                + "(looked in: \(DemoModel.searchPaths().joined(separator: ", ")))")
        }
        Console.err("using the built-in demo model \(found) (--model DIR for another)\n")
        return found
    }

    /// Loads the model (directory nil for synthetic weights) and reports how long it took.
    /// `directory`: one `modelDirectory()` already resolved.
    /// `singleSequence`: the caller runs one sequence at a time (plain generation), so an
    /// offload strategy may put the non-expert layers on the GPU.
    func load(directory resolved: String? = nil, singleSequence: Bool = false) throws -> (model: any LanguageModel, directory: String?, seconds: Double) {
        HostMemory.reuseLargeAllocations()
        let kernels = try makeKernels()
        let start = ContinuousClock.now
        let model: any LanguageModel
        var directory: String? = nil
        if let synthetic {
            model = try SyntheticWeights.mixtral(synthetic, layers: layers, seed: syntheticSeed, routerSkew: routerSkew,
                                                 expertFormat: expertDtype.format, kernels: kernels)
        } else {
            directory = try resolved ?? modelDirectory()
            model = try ModelRegistry.load(directory: directory!, kernels: kernels)
        }
        if let format = expertDtype.format, synthetic == nil {
            guard let mixtral = model as? MixtralModel else { throw CLIError("--expert-dtype supports Mixtral-family models") }
            let report = try mixtral.quantizeExperts(format, cacheDirectory: quantCacheDirectory)
            Console.err("experts \(report.fromCache ? "mapped from" : "quantized to") \(format.rawValue) (\(report.experts) experts, "
                + "\(report.bytes >> 20) MiB) in \(fixed(report.seconds, 2)) s\(report.cachePath.map { report.fromCache ? " (\($0))" : ", cached in \($0)" } ?? "")\n")
        }
        if strategy == .gpuOnly {
            guard let mixtral = model as? MixtralModel else { throw CLIError("--strategy gpu-only supports Mixtral-family models") }
            do {
                let gpu = try GPU(memoryLimit: gpuMemory.flatMap(parseByteSize))
                let gpuModel = try GPULanguageModel(mixtral, gpu: gpu, maxPositions: min(maxContext, mixtral.maxPositions), sequences: gpuSequences)
                Console.err("GPU: \(gpu.name), \(gpu.budget.total >> 20) of \(gpu.budget.limit >> 20) MiB budget in use\n")
                return (gpuModel, directory, secondsSince(start))
            } catch {
                // No GPU, or the model does not fit the budget: the CPU runs it, and says so.
                Console.err("warning: --strategy gpu-only: \(error); running on the CPU instead\n")
            }
        }
        if let policy = resolvedPolicy(), let mixtral = model as? MixtralModel {
            let dense = denseOn ?? (singleSequence ? .gpu : .cpu)
            return (try offloadModel(policy, mixtral: mixtral, kernels: kernels, dense: dense), directory, secondsSince(start))
        } else if let s = strategy, s.offloadPolicy != nil {
            throw CLIError("--strategy \(s.rawValue) supports Mixtral-family models")
        }
        return (model, directory, secondsSince(start))
    }
}

/// Where the shipped demo model (Models/duet-demo-moe) is looked for.
enum DemoModel {
    static let relativePath = "Models/duet-demo-moe"

    /// The repository around the executable (`swift run` builds under .build/), the current
    /// directory, then the install locations the README documents.
    static func searchPaths() -> [String] {
        var paths: [String] = []
        var dir = executablePath()
        for _ in 0..<6 {
            guard let slash = dir.lastIndex(of: "/") else { break }
            dir = String(dir[..<slash])
            if dir.isEmpty { break }
            paths.append(joinPath(dir, relativePath))
        }
        if let cwd = getcwd(nil, 0) {
            paths.append(joinPath(String(cString: cwd), relativePath))
            free(cwd)
        }
        if let home = environmentVariable("HOME") { paths.append(home + "/.local/share/duet/models/duet-demo-moe") }
        paths.append("/usr/local/share/duet/models/duet-demo-moe")
        return paths
    }

    static func locate() -> String? {
        searchPaths().first { fileExists(joinPath($0, "config.json")) }
    }

    private static func executablePath() -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 { return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return CommandLine.arguments.first ?? ""
    }
}

