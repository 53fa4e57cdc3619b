import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime
import DuetTokenizer

/// `duet profile`: which experts the router picks on a set of prompts (JSON), the input
/// of popularity placement (`--profile`).
struct Profile: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run prompts and write an expert-popularity profile (token counts per layer and expert, JSON).")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, help: "Prompts, one per line: text (tokenized with the model's tokenizer) or comma-separated token ids.")
    var prompts: String

    @Option(name: .long, help: "Tokens to generate (greedy) after each prompt; their routing counts too.")
    var maxTokens = 16

    @Option(name: .long, help: "Where the profile goes.")
    var output: String

    func validate() throws {
        guard maxTokens >= 0 else { throw ValidationError("--max-tokens must be >= 0") }
    }

    func run() throws {
        let (loaded, directory, _) = try engine.load()
        guard let model = loaded as? MixtralModel else { throw CLIError("duet profile supports Mixtral-family models on the CPU path") }
        let c = model.config
        let tokenizerPath = directory.map { joinPath($0, "tokenizer.json") }
        let tokenizer = try tokenizerPath.flatMap { fileExists($0) ? try Tokenizer(path: $0) : nil }
        let lines = String(decoding: try readSmallFile(prompts), as: UTF8.self).split(separator: "\n").map(String.init).filter { !$0.isEmpty }
        guard !lines.isEmpty else { throw CLIError("\(prompts) holds no prompts") }
        var profile = ExpertProfile(model: directory ?? "synthetic \(engine.synthetic ?? "")", layers: c.numHiddenLayers, experts: c.numLocalExperts)
        model.routingObserver = { layer, choices in profile.record(layer: layer, choices) }
        let start = ContinuousClock.now
        for (i, line) in lines.enumerated() {
            let ids: [Int32]
            if line.allSatisfy({ $0.isNumber || $0 == "," || $0 == " " }) {
                ids = try parseIds(line, option: "\(prompts) line \(i + 1)")
            } else {
                guard let tokenizer else { throw CLIError("\(prompts) line \(i + 1) is text, and this model has no tokenizer: give token ids") }
                ids = try tokenizer.encode(line)
            }
            _ = try generate(model: model, prompt: ids, options: GenerationOptions(maxTokens: max(1, maxTokens), stopTokenIds: []))
        }
        model.routingObserver = nil
        try profile.save(path: output)
        let total = profile.counts.joined().reduce(0, +)
        let top = profile.counts.map { $0.max() ?? 0 }.reduce(0, +)
        Console.err("\(lines.count) prompts, \(profile.tokens) tokens through \(c.numHiddenLayers) layers in \(fixed(secondsSince(start), 2)) s; "
            + "the most-picked expert of each layer took \(fixed(Double(top) / Double(max(total, 1)) * 100, 1))% of the picks "
            + "(uniform: \(fixed(100.0 / Double(c.numLocalExperts), 1))%); written to \(output)\n")
    }
}

/// `duet plan`: what goes where under a budget, from the configuration alone (no weights
/// are loaded, so it runs anywhere for any geometry).
struct Plan: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the expert placement for a GPU budget: bytes per category, experts per dtype, expected hit rate.")

    @Option(name: .long, help: "Checkpoint directory (its config.json).")
    var model: String?

    @Option(name: .long, help: "Or a synthetic geometry (\(SyntheticGeometry.names.joined(separator: ", "))).")
    var synthetic: String?

    @Option(name: .long, help: "With --synthetic: number of layers.")
    var layers: Int?

    @Option(name: .long, help: "The device budget, e.g. 24GiB.")
    var gpuMemory: String

    @Option(name: .long, help: "Expert popularity profile (duet profile); without one, the layer-balanced order.")
    var profile: String?

    @Option(name: .long, help: "fiddler, gpu-swap or layer-split.")
    var strategy: Strategy = .fiddler

    @Option(name: .long, help: "With --dense-on cpu: most tokens one step sends to the device (sizes the workspace).")
    var maxTokens = 64

    @Option(name: .long, help: "Where the non-expert layers run, as the engine's option: gpu (their bf16 weights, the KV cache and a prompt chunk's workspace come first out of the budget; the default for one sequence) or cpu.")
    var denseOn: DensePlacement = .gpu

    @Option(name: .long, help: "With --dense-on gpu: positions of the GPU KV cache per sequence.")
    var maxContext = 4096

    @Option(name: .long, help: "With --dense-on gpu: sequences the GPU KV cache holds (beam width + 1 for beam search).")
    var gpuSequences = 1

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func validate() throws {
        if (model == nil) == (synthetic == nil) { throw ValidationError("give --model or --synthetic") }
        if parseByteSize(gpuMemory) == nil { throw ValidationError("--gpu-memory must look like 24GiB, got '\(gpuMemory)'") }
        if strategy.offloadPolicy == nil { throw ValidationError("--strategy must be fiddler, gpu-swap or layer-split") }
        if maxContext < 1 || gpuSequences < 1 || maxTokens < 1 { throw ValidationError("--max-context, --gpu-sequences and --max-tokens must be at least 1") }
    }

    struct Row: Encodable {
        var dtype: String
        var bytesPerExpert: Int
        var reservedBytes: Int
        var residentExperts: Int
        var totalExperts: Int
        var expertBytesOnDevice: Int
        var expertBytesOnHost: Int
        var residentPerLayer: [Int]
        var expectedHitRate: Double?
    }

    func run() throws {
        var config: MixtralConfiguration
        if let synthetic {
            guard let c = SyntheticGeometry.all[synthetic] else { throw SyntheticError.unknownGeometry(synthetic) }
            config = c
            if let layers { config.numHiddenLayers = layers }
        } else {
            let path = joinPath(model!, "config.json")
            config = try ConfigFile.decode(MixtralConfiguration.self, path: path)
            try config.validate(file: path)
        }
        let c = config, L = c.numHiddenLayers, E = c.numLocalExperts, D = c.hiddenSize, F = c.intermediateSize
        let budget = parseByteSize(gpuMemory)!
        let policy = strategy.offloadPolicy!
        let p = try profile.map { path in
            let p = try ExpertProfile.load(path: path)
            try p.check(layers: L, experts: E, path: path)
            return p
        }
        // Dense layers on the GPU: their weights (bf16 assumed), KV cache and one prompt chunk's
        // workspace first, and device staging for a chunk's rows — what the engine reserves.
        let chunk = GPULanguageModel.defaultPrefillChunk
        let dense = denseOn == .gpu
            ? GPUMixtral.denseBytes(c, bytesPerWeight: 2, maxPositions: maxContext, sequences: gpuSequences) + GPUMixtral.workspaceBytes(c, tokens: chunk)
            : 0
        let stepRows = (denseOn == .gpu ? chunk : maxTokens) * c.numExpertsPerToken
        var rows: [Row] = []
        let shapes = [ExpertShape(hidden: D, ffn: F, dtype: .bf16)] + QuantFormat.allCases.map { ExpertShape(hidden: D, ffn: F, dtype: .bf16, format: $0) }
        for shape in shapes {
            let name = shape.format?.rawValue ?? "bf16", bytes = shape.bytes
            let reserved = dense + CUDAExpertDevice.workspaceBytes(shape: shape, maxRows: stepRows)
                + OffloadExecutor.streamingSlots(policy) * bytes
            let capacity = ExpertPlacement.capacity(budget: budget, reserved: reserved, bytesPerExpert: bytes, total: L * E)
            let order: ExpertPlacement.Order = policy == .layerSplit ? .wholeLayers : (p == nil ? .layerBalanced : .profile)
            let placement = ExpertPlacement.make(layers: L, experts: E, capacity: capacity, order: order, profile: p)
            rows.append(Row(dtype: name, bytesPerExpert: bytes, reservedBytes: reserved, residentExperts: capacity, totalExperts: L * E,
                            expertBytesOnDevice: capacity * bytes, expertBytesOnHost: (L * E - capacity) * bytes,
                            residentPerLayer: (0..<L).map { placement.resident(layer: $0).count }, expectedHitRate: p.map(placement.hitRate)))
        }
        if json { return try Console.json(rows) }
        Console.out("\(strategy.rawValue) with \(gpuMemory) of device memory, \(L) layers x \(E) experts of \(D)x\(F); "
            + (denseOn == .gpu ? "non-expert layers on the GPU (\(fixed(Double(dense) / 1048576, 0)) MiB: bf16 weights, a \(gpuSequences) x \(maxContext)-position KV cache, a \(chunk)-token workspace)\n"
                               : "non-expert weights, the KV cache and attention on the CPU\n"))
        Console.out("dtype  MiB/expert  reserved MiB  resident  on device GiB  on host GiB  hit rate  resident per layer\n")
        for r in rows {
            Console.out(r.dtype.padding(5) + "  " + fixed(Double(r.bytesPerExpert) / 1048576, 1).padding(10, left: true)
                + "  " + fixed(Double(r.reservedBytes) / 1048576, 1).padding(12, left: true)
                + "  " + "\(r.residentExperts)/\(r.totalExperts)".padding(8, left: true)
                + "  " + fixed(Double(r.expertBytesOnDevice) / 1073741824, 2).padding(13, left: true)
                + "  " + fixed(Double(r.expertBytesOnHost) / 1073741824, 2).padding(11, left: true)
                + "  " + (r.expectedHitRate.map { fixed($0 * 100, 1) + "%" } ?? "n/a").padding(8, left: true)
                + "  " + r.residentPerLayer.map(String.init).joined(separator: " ") + "\n")
        }
        if p == nil { Console.out("(no --profile: expected hit rate needs one; `duet profile` writes it)\n") }
    }
}

/// `duet calibrate`: measures the latency model (CPU and device time per expert vs tokens,
/// the copy time) and stores it for this machine, so later starts skip the measurement.
struct Calibrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure the planner's latency model on this machine and store it (used by fiddler at start-up).")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, parsing: .upToNextOption, help: "Token counts to time one expert at.")
    var tokens: [Int] = [1, 2, 4, 8, 16, 32, 64, 128]

    func run() throws {
        let (loaded, _, _) = try engine.load()
        guard let model = loaded as? MixtralModel, let executor = model.expertExecutor as? OffloadExecutor else {
            throw CLIError("duet calibrate needs an offload strategy with a device (a GPU, or --offload-device cpu)")
        }
        let calibration = try executor.calibrate(tokenCounts: tokens, repeats: 3, fingerprint: executor.fingerprint)
        Console.out("tokens  CPU ms  device ms\n")
        for p in calibration.points {
            Console.out("\(p.tokens)".padding(6, left: true) + "  " + fixed(p.cpuSeconds * 1000, 3).padding(6, left: true)
                + "  " + fixed(p.deviceSeconds * 1000, 3).padding(9, left: true) + "\n")
        }
        Console.out("copy one expert: \(ms(calibration.transferSeconds)); the CPU is x\(fixed(calibration.cpuSlowdownWhileCopying, 2)) slower while copies run\n")
        Console.out("stored in \(try calibration.save(directory: duetCacheDirectory("calibration")))\n")
    }
}
