import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime

/// `--offload-device`: what plays the device for fiddler, gpu-swap and layer-split.
enum OffloadDeviceKind: String, ExpressibleByArgument, CaseIterable {
    /// The CUDA GPU.
    case gpu
    /// A second CPU thread pool within a memory budget: the strategies without a GPU (tests, demos).
    case cpu
}

extension Strategy {
    /// The executor policy of an offload strategy (nil: cpu-only, gpu-only).
    var offloadPolicy: OffloadPolicy? {
        switch self {
        case .fiddler: .fiddler
        case .gpuSwap: .gpuSwap
        case .layerSplit: .layerSplit
        case .cpuOnly, .gpuOnly: nil
        }
    }
}

/// What the start-up of an offload strategy did, for one summary line.
struct OffloadSetup {
    var executor: OffloadExecutor
    var pinnedBytes: Int
    var pinSeconds: Double
    var latencySource: String
}

extension EngineOptions {
    /// The experts' device for an offload strategy, or nil (with a warning) when there is
    /// no GPU: the CPU then runs everything.
    func makeExpertDevice(model: MixtralModel, kernels: CPUKernels) -> (any ExpertDevice)? {
        let limit = gpuMemory.flatMap(parseByteSize)
        switch offloadDevice {
        case .cpu:
            // Default budget: half the experts, so the strategies have something to decide.
            let c = model.config
            let experts = c.numHiddenLayers * c.numLocalExperts * ExpertShape(model).bytes
            let pool = ThreadPool(threads: max(1, kernels.pool.threadCount / 2))
            guard let deviceKernels = try? CPUKernels(kernels.path, pool: pool) else { return nil }
            return CPUExpertDevice(kernels: deviceKernels, memoryLimit: limit ?? experts / 2)
        case .gpu:
            do {
                let device = try CUDAExpertDevice(gpu: GPU(memoryLimit: limit))
                device.hostPool = kernels.pool
                return device
            } catch {
                Console.err("warning: --strategy \(strategy?.rawValue ?? "fiddler"): \(error); running on the CPU instead\n")
                return nil
            }
        }
    }

    /// Places experts on `device` within what its budget has left, pins the experts it may
    /// stream and loads or measures the latency model; the caller installs the executor.
    /// `stepTokens`: most tokens one forward step sends (sizes the device's staging);
    /// `reserved`: bytes the budget keeps free besides (the dense layers' workspace).
    func installOffload(_ policy: OffloadPolicy, model: MixtralModel, device: any ExpertDevice,
                        stepTokens: Int = 256, reserved extra: Int = 0) throws -> OffloadSetup {
        let c = model.config
        let shape = ExpertShape(model)
        let maxRows = stepTokens * c.numExpertsPerToken  // grows on demand (within the budget) for longer steps
        let reserved = device.memory.total + extra + device.workspaceBytes(shape: shape, maxRows: maxRows)
            + OffloadExecutor.streamingSlots(policy) * shape.bytes
        let capacity = ExpertPlacement.capacity(budget: device.memory.limit, reserved: reserved, bytesPerExpert: shape.bytes,
                                                total: c.numHiddenLayers * c.numLocalExperts)
        let placement = try placement(policy, model: model, capacity: capacity)
        let executor = try OffloadExecutor(model: model, device: device, policy: policy, placement: placement,
                                           latency: .unmeasured, maxRows: maxRows)
        for w in executor.takeWarnings() { Console.err("warning: \(w)\n") }
        let pinStart = ContinuousClock.now
        let pinned = pinExperts ? executor.pinStreamedExperts() : 0
        let pinSeconds = secondsSince(pinStart)
        let source = calibrate(executor)
        return OffloadSetup(executor: executor, pinnedBytes: pinned, pinSeconds: pinSeconds, latencySource: source)
    }

    /// Experts in popularity order (`--profile`), else the documented order of the policy.
    func placement(_ policy: OffloadPolicy, model: MixtralModel, capacity: Int) throws -> ExpertPlacement {
        let c = model.config, L = c.numHiddenLayers, E = c.numLocalExperts
        if policy == .layerSplit { return ExpertPlacement.make(layers: L, experts: E, capacity: capacity, order: .wholeLayers) }
        if let path = profile {
            let p = try ExpertProfile.load(path: path)
            try p.check(layers: L, experts: E, path: path)
            return ExpertPlacement.make(layers: L, experts: E, capacity: capacity, order: .profile, profile: p)
        }
        if capacity < L * E {
            Console.err("no --profile: experts placed in the layer-balanced order (expert 0 of every layer, then expert 1, ...); "
                + "`duet profile` writes one\n")
        }
        return ExpertPlacement.make(layers: L, experts: E, capacity: capacity, order: .layerBalanced)
    }

    /// Loads the calibration for this machine, else measures one (a few seconds); returns where it came from.
    func calibrate(_ executor: OffloadExecutor) -> String {
        let fingerprint = executor.fingerprint
        let directory = duetCacheDirectory("calibration")
        if let stored = LatencyCalibration.load(directory: directory, fingerprint: fingerprint) {
            executor.use(stored.model)
            return "from \(LatencyCalibration.path(directory: directory, fingerprint: fingerprint))"
        }
        let start = ContinuousClock.now
        do {
            _ = try executor.calibrate(fingerprint: fingerprint)
            return "measured in \(fixed(secondsSince(start), 2)) s (`duet calibrate` stores one)"
        } catch {
            return "not measured (\(error)): every non-resident expert runs on the CPU"
        }
    }
}

/// `--dense-on`: where the non-expert layers (attention, norms, router, lm_head) run with an offload strategy.
enum DensePlacement: String, ExpressibleByArgument, CaseIterable {
    /// On the GPU with its own KV cache (Fiddler's layout): one region per sequence, `--gpu-sequences` of them.
    case gpu
    /// On the CPU with the paged KV cache: batches, beams and the server.
    case cpu
}

extension EngineOptions {
    /// The model for an offload strategy: the non-expert layers on the GPU first (when
    /// `dense` is .gpu and they fit), then the experts placed in what the budget has left.
    func offloadModel(_ policy: OffloadPolicy, mixtral: MixtralModel, kernels: CPUKernels, dense: DensePlacement) throws -> any LanguageModel {
        if dense == .gpu, offloadDevice == .gpu {
            do {
                let gpu = try GPU(memoryLimit: gpuMemory.flatMap(parseByteSize))
                gpu.hostPool = kernels.pool
                let context = min(maxContext, mixtral.maxPositions)
                let model = try GPULanguageModel(mixtral, gpu: gpu, maxPositions: context, sequences: gpuSequences, experts: false)
                let chunk = model.prefillChunk
                let device = try CUDAExpertDevice(gpu: GPU(sharing: gpu))
                device.hostPool = kernels.pool
                let setup = try installOffload(policy, model: mixtral, device: device,
                                               stepTokens: chunk, reserved: GPUMixtral.workspaceBytes(mixtral.config, tokens: chunk))
                model.gpuModel.expertExecutor = setup.executor
                Console.err("non-expert layers and a \(context)-position KV cache on the GPU (\(gpu.budget.used["weights", default: 0] >> 20) MiB of weights); " + setup.summary + "\n")
                return model
            } catch let error as CUDAError {
                Console.err("warning: the non-expert layers stay on the CPU: \(error)\n")
            }
        }
        guard let device = makeExpertDevice(model: mixtral, kernels: kernels) else { return mixtral }
        let setup = try installOffload(policy, model: mixtral, device: device)
        mixtral.expertExecutor = setup.executor
        Console.err("non-expert layers on the CPU; " + setup.summary + "\n")
        return mixtral
    }
}

/// The offload executor a model runs its experts through, if any.
func offloadExecutor(of model: any LanguageModel) -> OffloadExecutor? {
    if let m = model as? MixtralModel { return m.expertExecutor as? OffloadExecutor }
    if let g = model as? GPULanguageModel { return g.gpuModel.expertExecutor as? OffloadExecutor }
    return nil
}

extension OffloadSetup {
    /// One line: where the experts are, what is pinned, the latency model.
    var summary: String {
        let e = executor, m = e.device.memory, l = e.latency
        let total = e.placement.layers * e.placement.experts
        return "\(e.policy.rawValue) on \(e.device.name): \(e.placement.resident.count) of \(total) experts resident "
            + "(\(m.total >> 20) of \(m.limit >> 20) MiB in use), \(e.placement.order.rawValue) order; "
            + "pinned \(pinnedBytes >> 20) MiB in \(fixed(pinSeconds, 2)) s; latency per expert: CPU \(l.cpu), device \(l.gpu), copy \(ms(l.transfer)) "
            + "(CPU x\(fixed(l.cpuSlowdownWhileCopying, 2)) during copies; \(latencySource))"
    }
}

/// "1.23 ms".
func ms(_ seconds: Double) -> String { seconds.isFinite ? "\(fixed(seconds * 1000, 3)) ms" : "never" }

extension OffloadStats {
    /// The time split and hit rate of a run, for one line.
    var summary: String {
        "experts: hit rate \(fixed(hitRate * 100, 1))% | CPU experts \(fixed(cpuSeconds, 3)) s, waiting for the device \(fixed(deviceWaitSeconds, 3)) s "
            + "(device compute \(fixed(deviceComputeSeconds, 3)) s, copies \(fixed(deviceCopySeconds, 3)) s, \(copiedExperts) experts = \(bytesCopied >> 20) MiB)"
            + (fallbacks > 0 ? " | \(fallbacks) device failures" : "")
    }
}
