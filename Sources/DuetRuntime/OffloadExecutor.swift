import DuetCore
import DuetCPU
import DuetModels

/// How the offload executor treats experts that are not resident on the device.
public enum OffloadPolicy: String, Sendable, CaseIterable {
    /// Fiddler's idea with a makespan planner: popular experts resident; each other routed
    /// expert computed on the CPU or copied and computed on the device, whichever finishes
    /// the layer sooner under the measured latency model. Copies in decode-sized steps stay
    /// in the layer's slots (least recently used out), credited with the reuse measured so far.
    case fiddler
    /// mixtral-offloading's: every routed non-resident expert is copied to the device into
    /// an LRU cache of experts that fills the budget.
    case gpuSwap = "gpu-swap"
    /// llama.cpp's -ngl: whole layers' experts resident, every other expert on the CPU.
    case layerSplit = "layer-split"
}

/// Where one run's expert time went (wall-clock seconds on the forward thread, summed over
/// MoE layers), and what moved.
public struct OffloadStats: Sendable, Equatable {
    public var layerSteps = 0
    /// Token-expert pairs by where they ran.
    public var residentTokenExperts = 0
    public var copiedTokenExperts = 0
    public var cpuTokenExperts = 0
    public var copiedExperts = 0
    public var bytesCopied = 0
    /// Host activation bytes sent to the device and results back.
    public var activationBytes = 0
    /// The CPU computing experts; waiting for the device after that; device copy and compute
    /// time as the device measured it (they overlap the CPU's).
    public var cpuSeconds = 0.0
    public var deviceWaitSeconds = 0.0
    /// Whole MoE layer steps (planning, gathering, submitting, CPU experts, waiting, combining):
    /// minus CPU and wait, the executor's own host overhead.
    public var stepSeconds = 0.0
    /// Of the executor's own work: handing the device its step (issuing copies and launches).
    public var submitSeconds = 0.0
    public var deviceCopySeconds = 0.0
    public var deviceComputeSeconds = 0.0
    /// Device failures that sent experts back to the CPU.
    public var fallbacks = 0
    /// The planner's predicted makespans, summed; and the best split of the same routed work
    /// under the calibrated latency model (CPU kernels and copies as measured), summed: the
    /// expert part's bound.
    public var plannedSeconds = 0.0
    public var boundSeconds = 0.0
    /// Of the planned makespans: the CPU's predicted part (against `cpuSeconds`, measured).
    public var plannedCPUSeconds = 0.0

    public init() {}

    /// What happened between `earlier` and this snapshot.
    public func since(_ earlier: OffloadStats) -> OffloadStats {
        var d = OffloadStats()
        d.layerSteps = layerSteps - earlier.layerSteps
        d.residentTokenExperts = residentTokenExperts - earlier.residentTokenExperts
        d.copiedTokenExperts = copiedTokenExperts - earlier.copiedTokenExperts
        d.cpuTokenExperts = cpuTokenExperts - earlier.cpuTokenExperts
        d.copiedExperts = copiedExperts - earlier.copiedExperts
        d.bytesCopied = bytesCopied - earlier.bytesCopied
        d.activationBytes = activationBytes - earlier.activationBytes
        d.cpuSeconds = cpuSeconds - earlier.cpuSeconds
        d.deviceWaitSeconds = deviceWaitSeconds - earlier.deviceWaitSeconds
        d.stepSeconds = stepSeconds - earlier.stepSeconds
        d.submitSeconds = submitSeconds - earlier.submitSeconds
        d.deviceCopySeconds = deviceCopySeconds - earlier.deviceCopySeconds
        d.deviceComputeSeconds = deviceComputeSeconds - earlier.deviceComputeSeconds
        d.fallbacks = fallbacks - earlier.fallbacks
        d.plannedSeconds = plannedSeconds - earlier.plannedSeconds
        d.boundSeconds = boundSeconds - earlier.boundSeconds
        d.plannedCPUSeconds = plannedCPUSeconds - earlier.plannedCPUSeconds
        return d
    }

    /// Share of routed token-expert pairs whose expert was resident.
    public var hitRate: Double {
        let total = residentTokenExperts + copiedTokenExperts + cpuTokenExperts
        return total == 0 ? 0 : Double(residentTokenExperts) / Double(total)
    }
}

/// Runs a Mixtral model's MoE layers across the CPU and an `ExpertDevice` (installed as the
/// model's `expertExecutor`): per layer and step, the planner sends each routed expert to
/// its resident slot, to the CPU, or through a streaming slot; the device's jobs are
/// submitted first, the CPU's run meanwhile on the model's pool, and the outputs are
/// combined on the host in ascending expert order — identical to the plain CPU path
/// whatever ran where.
public final class OffloadExecutor: ExpertExecutor {
    public let model: MixtralModel
    public let device: any ExpertDevice
    public let policy: OffloadPolicy
    public let placement: ExpertPlacement
    public let shape: ExpertShape
    /// The latency model the planner uses: measured at start, scaled by what steps measure.
    public private(set) var latency: ExpertPlanner.LatencyModel
    public private(set) var stats = OffloadStats()
    /// Warnings for the user (device failures), taken by the caller.
    public private(set) var warnings: [String] = []

    private var slotOf: [ExpertKey: Int] = [:]
    /// fiddler: the two streaming buffers, used in turn; gpu-swap: every cache slot (only for
    /// calibration, which borrows the first).
    private var streaming: [Int] = []
    /// gpu-swap and fiddler: each layer's slots, least recently used first, starting with the
    /// placement's experts (mixtral-offloading keeps one LRU cache per layer; one cache
    /// across layers would evict every expert before the next token comes back to its layer).
    /// gpu-swap copies every routed expert in; fiddler only what its plan copies in small steps.
    private var swapSlots: [[Int]] = []
    private var contents: [Int: ExpertKey] = [:]
    private var nextStreaming = 0
    private var reuse: ReuseEstimate

    /// fiddler: steps of at most this many tokens (decode, beams, small batches) copy into
    /// the layer's slots, so the expert stays for the steps after; larger ones (prompts, which
    /// route to most experts once) stream their copies through the streaming slots and leave
    /// the resident experts in place.
    public static let cachedCopyMaxTokens = 16

    /// Device slots `policy` needs beyond the resident experts.
    public static func streamingSlots(_ policy: OffloadPolicy) -> Int { policy == .fiddler ? 2 : 0 }

    /// Prepares the device (slots and workspace within its budget), fills the resident
    /// experts, and page-locks the experts it may stream. `maxRows`: most token rows one
    /// step sends to the device (tokens x experts per token).
    public init(model: MixtralModel, device: any ExpertDevice, policy: OffloadPolicy, placement: ExpertPlacement,
                latency: ExpertPlanner.LatencyModel, maxRows: Int) throws(DeviceError) {
        shape = ExpertShape(model)
        self.model = model
        self.device = device
        self.policy = policy
        self.latency = latency
        reuse = ReuseEstimate(layers: model.config.numHiddenLayers, routedShare: Double(model.config.numExpertsPerToken) / Double(model.config.numLocalExperts))
        let wanted = placement.resident.count + Self.streamingSlots(policy)
        let got = try device.prepare(shape: shape, slots: wanted, maxRows: maxRows)
        // Fewer slots than planned (a real out-of-memory): the least popular residents go.
        let residentCount = min(placement.resident.count, max(0, got - Self.streamingSlots(policy)))
        if residentCount < placement.resident.count {
            warnings.append("the device gave \(got) of \(wanted) expert slots; \(residentCount) experts resident instead of \(placement.resident.count)")
        }
        self.placement = placement.prefix(residentCount)
        for (slot, key) in self.placement.resident.enumerated() {
            try device.fill(slot: slot, with: model.layers[key.layer].experts[key.expert])
            slotOf[key] = slot
            contents[slot] = key
        }
        switch policy {
        case .fiddler: streaming = Array(residentCount..<got)
        case .gpuSwap: streaming = Array(0..<residentCount)
        case .layerSplit: streaming = []
        }
        if policy != .layerSplit {  // the resident set is the caches' initial contents
            swapSlots = [[Int]](repeating: [], count: placement.layers)
            for (slot, key) in self.placement.resident.enumerated() { swapSlots[key.layer].append(slot) }
        }
    }

    /// The experts not placed on the device (what the CPU or the copies take), layer by layer.
    public var nonResident: [ExpertKey] { placement.allKeys.filter { !placement.isResident($0) } }

    /// Page-locks the host memory of every expert this policy may copy — fiddler and
    /// gpu-swap: all of them, since the experts placed at start can be evicted from their
    /// layer's slots and copied back later (a copy from pageable memory blocks the issuing
    /// thread) — and returns the bytes registered.
    public func pinStreamedExperts() -> Int {
        guard policy != .layerSplit else { return 0 }
        return device.pin(model.layers.flatMap(\.experts))
    }

    public func runExperts(layer l: Int, hidden h: [Float], assignments: [[ExpertAssignment]], tokens T: Int) -> [Float] {
        let (outputs, _) = step(layer: l, hidden: h, assignments: assignments, on: nil)
        return combineExperts(outputs, assignments, tokens: T, dim: model.config.hiddenSize, pool: pool)
    }

    public func runExperts(layer l: Int, hidden h: [Float], assignments: [[ExpertAssignment]], tokens T: Int,
                           on activations: any DeviceActivations) -> DeviceStepOutput? {
        guard let device = device as? ResidentActivationDevice, device.holds(activations) else { return nil }
        let (outputs, deviceAdded) = step(layer: l, hidden: h, assignments: assignments, on: (device, activations))
        let D = model.config.hiddenSize
        if !deviceAdded { return .replaced(combineExperts(outputs, assignments, tokens: T, dim: D, pool: pool)) }
        return .added(cpu: outputs.indices.compactMap { e in outputs[e].map { (assignments[e], $0) } })
    }

    /// One layer's experts: the plan, the device's jobs submitted (their rows gathered here
    /// and sent, or read by the device where `resident` activations live), the CPU's experts
    /// computed meanwhile, the device collected. Returns each expert's output rows `[Te, D]`
    /// that the host holds (nil for experts whose outputs the device added into `resident`'s
    /// output), and whether the device did so.
    private func step(layer l: Int, hidden h: [Float], assignments: [[ExpertAssignment]],
                      on resident: (device: ResidentActivationDevice, activations: any DeviceActivations)?) -> (outputs: [[Float]?], deviceAdded: Bool) {
        let D = model.config.hiddenSize, E = assignments.count
        let stepStart = ContinuousClock.now
        defer { stats.stepSeconds += secondsSince(stepStart) }
        // Residency as it stands before this step's copies change the layer's slots: the
        // plan and the bound both see it.
        let loads = loads(layer: l, assignments), routed = Set(loads.map(\.expert))
        let tokenExperts = assignments.reduce(0) { $0 + $1.count }  // tokens x experts per token
        let caching = policy == .gpuSwap || (policy == .fiddler && tokenExperts <= Self.cachedCopyMaxTokens * model.config.numExpertsPerToken)
        let plan = makePlan(layer: l, loads: loads, routed: routed, caching: caching)
        var outputs = [[Float]?](repeating: nil, count: E)

        // Device first: it works while the CPU computes the rest.
        let deviceExperts = plan.resident + plan.copied
        var jobs: [DeviceJob] = []
        for e in deviceExperts {
            let (slot, copy) = slotFor(ExpertKey(layer: l, expert: e), caching: caching, routed: routed)
            jobs.append(DeviceJob(slot: slot, copy: copy ? model.layers[l].experts[e] : nil, tokens: assignments[e].count))
        }
        var submitted = false
        if !jobs.isEmpty {
            let submitStart = ContinuousClock.now
            defer { stats.submitSeconds += secondsSince(submitStart) }
            do {
                if let resident {
                    try resident.device.submit(jobs, rows: deviceExperts.map { assignments[$0] }, on: resident.activations)
                } else {
                    try device.submit(jobs, input: gatherRows(h, deviceExperts.flatMap { assignments[$0] }, dim: D, pool: pool))  // [Σ Te, D] in job order
                }
                submitted = true
            } catch {
                fallBack(error, experts: deviceExperts, copied: plan.copied, layer: l)
            }
        }

        let cpuExperts = submitted ? plan.cpu : (plan.cpu + deviceExperts).sorted()
        let cpuStart = ContinuousClock.now
        for e in cpuExperts {
            outputs[e] = model.expertFFN(gatherRows(h, assignments[e], dim: D, pool: pool), layer: l, expert: e, tokens: assignments[e].count)
        }
        let cpuSeconds = secondsSince(cpuStart)

        var deviceAdded = false
        if submitted {
            let waitStart = ContinuousClock.now
            do {
                let result = try device.collect()
                let rows = jobs.reduce(0) { $0 + $1.tokens }
                if resident != nil {
                    deviceAdded = true
                } else {
                    var row = 0
                    for (job, e) in zip(jobs, deviceExperts) {
                        outputs[e] = slice(result.outputs, rows: row..<(row + job.tokens), dim: D)
                        row += job.tokens
                    }
                }
                record(plan, assignments: assignments, result: result, activationRows: resident == nil ? rows : 0)
            } catch {
                fallBack(error, experts: deviceExperts, copied: plan.copied, layer: l)
                for e in deviceExperts {
                    outputs[e] = model.expertFFN(gatherRows(h, assignments[e], dim: D, pool: pool), layer: l, expert: e, tokens: assignments[e].count)
                }
            }
            stats.deviceWaitSeconds += secondsSince(waitStart)
        }
        let cpuTokenExperts = cpuExperts.reduce(0) { $0 + assignments[$1].count }
        stats.cpuSeconds += cpuSeconds
        stats.cpuTokenExperts += cpuTokenExperts
        stats.layerSteps += 1
        if submitted || jobs.isEmpty {
            if plan.copied.isEmpty { refreshCPU(measured: cpuSeconds, predicted: plan.cpuSeconds) }
            else { refreshSlowdown(measured: cpuSeconds, alone: plan.cpuSeconds / latency.cpuSlowdownWhileCopying) }
        }
        stats.plannedSeconds += plan.makespan
        stats.plannedCPUSeconds += submitted || jobs.isEmpty ? plan.cpuSeconds : 0
        if let reference { stats.boundSeconds += ExpertPlanner.plan(loads, model: reference).makespan }
        model.expertUsage.addCPU(tokenExperts: cpuTokenExperts, seconds: cpuSeconds)
        return (outputs, deviceAdded)
    }

    /// The model's thread pool: the host-side copies of a prompt's activations use it too.
    private var pool: ThreadPool { model.kernels.pool }

    /// Rows `rows` of `[_, D]` as their own array (copied over the pool when large).
    private func slice(_ x: [Float], rows: Range<Int>, dim D: Int) -> [Float] {
        guard !rows.isEmpty else { return [] }
        return [Float](unsafeUninitializedCapacity: rows.count * D) { out, count in
            x.withUnsafeBytes { src in pool.copy(UnsafeMutableRawPointer(out.baseAddress!), src.baseAddress! + rows.lowerBound * D * 4, bytes: rows.count * D * 4) }
            count = rows.count * D
        }
    }

    /// The policy's decision for one layer's routed experts (`routed`: their ids). `caching`:
    /// copies stay in the layer's slots (fiddler's small steps), so each is credited with the
    /// expected reuse.
    func makePlan(layer l: Int, loads: [ExpertPlanner.Load], routed: Set<Int>, caching: Bool) -> ExpertPlanner.Plan {
        switch policy {
        case .fiddler where !streaming.isEmpty:
            guard caching, !swapSlots[l].isEmpty else { return ExpertPlanner.plan(loads, model: latency) }
            let victim = evictable(layer: l, routed: routed)
            let credit = reuse.observe(layer: l, routed: routed, evicted: victim.flatMap { contents[$0]?.expert })
            return ExpertPlanner.plan(loads, model: latency, copyCredit: victim == nil ? 0 : credit * latency.cpu(1))
        case .gpuSwap where !swapSlots[l].isEmpty:
            // More routed experts than slots: slots are reused within the step, in order
            // (the device copies into a slot only after the job before it there is done).
            return fixedPlan(loads, nonResident: \.copied)
        default:  // layer-split, or no streaming slots: the CPU takes every non-resident expert
            return fixedPlan(loads, nonResident: \.cpu)
        }
    }

    /// Resident experts on the device, every other one where `nonResident` says.
    private func fixedPlan(_ loads: [ExpertPlanner.Load], nonResident: WritableKeyPath<ExpertPlanner.Plan, [Int]>) -> ExpertPlanner.Plan {
        var plan = ExpertPlanner.Plan()
        for load in loads {
            if load.resident { plan.resident.append(load.expert) } else { plan[keyPath: nonResident].append(load.expert) }
        }
        return plan
    }

    /// The layer's routed experts, with their token counts and whether they are resident now.
    private func loads(layer l: Int, _ assignments: [[ExpertAssignment]]) -> [ExpertPlanner.Load] {
        assignments.indices.filter { !assignments[$0].isEmpty }.map { e in
            ExpertPlanner.Load(expert: e, tokens: assignments[e].count, resident: slotOf[ExpertKey(layer: l, expert: e)] != nil)
        }
    }

    /// The slot `key` runs from, and whether its weights must be copied there first.
    /// `caching`: a copy replaces the layer's least recently used expert (and stays);
    /// otherwise it goes through a streaming slot.
    private func slotFor(_ key: ExpertKey, caching: Bool, routed: Set<Int>) -> (slot: Int, copy: Bool) {
        if let slot = slotOf[key] {
            touch(slot, layer: key.layer)
            return (slot, false)
        }
        let slot: Int
        // gpu-swap takes the least recently used slot whatever it holds (this step's hits were
        // touched last, so they go only when every slot is one); fiddler never evicts an
        // expert this step uses and streams the copy instead.
        if caching, let lru = policy == .gpuSwap ? swapSlots[key.layer].first : evictable(layer: key.layer, routed: routed) {
            swapSlots[key.layer].removeAll { $0 == lru }
            swapSlots[key.layer].append(lru)
            if let old = contents[lru] { slotOf[old] = nil }
            slotOf[key] = lru
            slot = lru
        } else {
            slot = streaming[nextStreaming % streaming.count]
            nextStreaming += 1
        }
        contents[slot] = key
        return (slot, true)
    }

    /// Layer `l`'s least recently used slot holding none of the step's `routed` experts.
    private func evictable(layer l: Int, routed: Set<Int>) -> Int? {
        swapSlots[l].first { slot in contents[slot].map { !routed.contains($0.expert) } ?? true }
    }

    private func touch(_ slot: Int, layer l: Int) {
        guard !swapSlots.isEmpty, let i = swapSlots[l].firstIndex(of: slot) else { return }
        swapSlots[l].remove(at: i)
        swapSlots[l].append(slot)
    }

    /// `activationRows`: rows of activations that crossed to the device and back.
    private func record(_ plan: ExpertPlanner.Plan, assignments: [[ExpertAssignment]], result: DeviceResult, activationRows rows: Int) {
        stats.residentTokenExperts += plan.resident.reduce(0) { $0 + assignments[$1].count }
        stats.copiedTokenExperts += plan.copied.reduce(0) { $0 + assignments[$1].count }
        stats.copiedExperts += plan.copied.count
        stats.bytesCopied += plan.copied.count * shape.bytes
        stats.activationBytes += 2 * rows * shape.hidden * 4
        stats.deviceCopySeconds += result.copySeconds
        stats.deviceComputeSeconds += result.computeSeconds
        model.expertUsage.addGPU(tokenExperts: (plan.resident + plan.copied).reduce(0) { $0 + assignments[$1].count }, seconds: result.computeSeconds)
        if !plan.copied.isEmpty, result.copySeconds > 0 {
            latency.transfer = 0.8 * latency.transfer + 0.2 * result.copySeconds / Double(plan.copied.count)
        }
    }

    /// Scales the CPU cost by what this step measured against what the plan predicted (an
    /// exponential moving average), so the planner follows the machine as it is now
    /// (other load, frequency, bandwidth).
    private func refreshCPU(measured: Double, predicted: Double) {
        guard predicted > 0, measured > 0 else { return }
        let ratio = min(4, max(0.25, measured / predicted))
        latency.cpu = latency.cpu.scaled(0.8 + 0.2 * ratio)
    }

    /// A step that copied: its CPU time against the same work's time alone is the DRAM
    /// contention of that moment. Learned into the slowdown factor (an exponential moving
    /// average, at least 1) rather than into the CPU's cost — otherwise contention would make
    /// the CPU look slower on every step, which makes copying look better, which makes more
    /// contention.
    private func refreshSlowdown(measured: Double, alone: Double) {
        guard alone > 0, measured > 0 else { return }
        let ratio = min(4, max(1, measured / alone))
        latency.cpuSlowdownWhileCopying = max(1, 0.8 * latency.cpuSlowdownWhileCopying + 0.2 * ratio)
    }

    /// Counts and reports a failed device step; slots that were being filled hold nothing usable.
    private func fallBack(_ error: any Error, experts: [Int], copied: [Int], layer l: Int) {
        for e in copied {
            let key = ExpertKey(layer: l, expert: e)
            if let slot = slotOf[key] { contents[slot] = nil; slotOf[key] = nil }  // a copy into a cache slot
        }
        stats.fallbacks += 1
        if warnings.count < 8 { warnings.append("device step failed (\(error)); \(experts.count) experts ran on the CPU instead") }
    }

    /// A slot holding `key`'s weights for calibration: its resident slot, else a streaming
    /// slot filled with it (a gpu-swap cache entry is dropped for it).
    func calibrationSlot(_ key: ExpertKey) throws(DeviceError) -> Int {
        if let slot = slotOf[key] { return slot }
        guard let slot = streaming.first else { throw .failed("no device slot to calibrate with (the budget holds no expert)") }
        if let old = contents[slot] { slotOf[old] = nil }
        contents[slot] = key
        if policy == .gpuSwap { slotOf[key] = slot }
        try device.fill(slot: slot, with: model.layers[key.layer].experts[key.expert])
        return slot
    }

    /// Replaces the planner's latency model (a calibration, measured or loaded from a file);
    /// it also becomes the reference the bound is computed with.
    public func use(_ latency: ExpertPlanner.LatencyModel) {
        self.latency = latency
        reference = latency
    }

    /// The latency model as calibrated (never refreshed): the best split of each layer-step's
    /// work under it, summed, is the run's bound (`OffloadStats.boundSeconds`).
    public private(set) var reference: ExpertPlanner.LatencyModel?

    /// Whether `key`'s weights are on the device now (placed there, or cached by a copy).
    public func holds(_ key: ExpertKey) -> Bool { slotOf[key] != nil }

    /// Hands over the warnings gathered so far.
    public func takeWarnings() -> [String] {
        defer { warnings = [] }
        return warnings
    }
}

/// fiddler's estimate of what a copy into a layer's slots is worth: how often an expert
/// routed in one small step of a layer is routed again at that layer's next small step,
/// against how often the expert the copy would evict (the layer's least recently used) is
/// routed — exponential moving averages over layer-steps, starting from uniform routing.
public struct ReuseEstimate: Sendable {
    public private(set) var again: Double
    public private(set) var evicted: Double
    /// Per layer: the experts its last small step routed, and the one a copy would have evicted then.
    private var lastRouted: [Set<Int>]
    private var lastVictim: [Int?]
    /// Weight of each new observation.
    public static let rate = 0.05

    public init(layers: Int, routedShare: Double) {
        again = routedShare
        evicted = routedShare
        lastRouted = [Set<Int>](repeating: [], count: layers)
        lastVictim = [Int?](repeating: nil, count: layers)
    }

    /// Learns from this step's routed experts of layer `l` (against the layer's step before)
    /// and notes the expert a copy would evict now (the least recently used one this step
    /// does not use; nil: none). Returns the hits a copy is expected to add at the layer's
    /// next step (>= 0): P(routed again) - P(the evicted one is routed).
    public mutating func observe(layer l: Int, routed now: Set<Int>, evicted victim: Int?) -> Double {
        if !lastRouted[l].isEmpty {
            again += Self.rate * (Double(now.intersection(lastRouted[l]).count) / Double(lastRouted[l].count) - again)
            if let v = lastVictim[l] { evicted += Self.rate * ((now.contains(v) ? 1 : 0) - evicted) }
        }
        lastRouted[l] = now
        lastVictim[l] = victim
        return max(0, again - evicted)
    }
}
