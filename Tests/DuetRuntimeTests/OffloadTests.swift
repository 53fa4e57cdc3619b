import DuetCore
import DuetCPU
import DuetFormats
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

/// Placement from a profile, by hand-computable cases.
struct ExpertPlacementTests {
    /// 2 layers x 3 experts; counts chosen so the order is unambiguous except one tie.
    private func profile() -> ExpertProfile {
        var p = ExpertProfile(model: "test", layers: 2, experts: 3)
        p.counts = [[5, 1, 9], [5, 7, 0]]
        p.tokens = 13
        return p
    }

    @Test func popularFirstTiesByLayerThenExpert() {
        let placement = ExpertPlacement.make(layers: 2, experts: 3, capacity: 4, order: .profile, profile: profile())
        // 9 (0,2), 7 (1,1), then the tie 5 (0,0) before 5 (1,0).
        #expect(placement.resident == [.init(layer: 0, expert: 2), .init(layer: 1, expert: 1), .init(layer: 0, expert: 0), .init(layer: 1, expert: 0)])
        #expect(placement.resident(layer: 0) == [0, 2])
        // (9 + 7 + 5 + 5) of 27 picks.
        #expect(abs(placement.hitRate(profile()) - 26.0 / 27.0) < 1e-12)
        #expect(placement.prefix(1).resident == [.init(layer: 0, expert: 2)])
    }

    @Test func documentedOrdersWithoutAProfile() {
        let balanced = ExpertPlacement.make(layers: 2, experts: 3, capacity: 3, order: .layerBalanced)
        #expect(balanced.resident == [.init(layer: 0, expert: 0), .init(layer: 1, expert: 0), .init(layer: 0, expert: 1)])
        let layers = ExpertPlacement.make(layers: 2, experts: 3, capacity: 4, order: .wholeLayers)
        #expect(layers.resident(layer: 0) == [0, 1, 2])
        #expect(layers.resident(layer: 1) == [0])
        #expect(abs(layers.hitRate(profile()) - 20.0 / 27.0) < 1e-12)
    }

    @Test func capacityFromTheBudget() {
        #expect(ExpertPlacement.capacity(budget: 1000, reserved: 100, bytesPerExpert: 300, total: 8) == 3)
        #expect(ExpertPlacement.capacity(budget: 1000, reserved: 100, bytesPerExpert: 100, total: 8) == 8)
        #expect(ExpertPlacement.capacity(budget: 100, reserved: 200, bytesPerExpert: 10, total: 8) == 0)
    }

    @Test func profileRoundTripAndBadFiles() throws {
        let dir = makeTemporaryDirectory()
        try profile().save(path: dir + "/p.json")
        #expect(try ExpertProfile.load(path: dir + "/p.json") == profile())
        try writeFile(Array("{\"model\":\"m\",\"layers\":2,\"experts\":3,\"tokens\":1,\"counts\":[[1,2,3]]}".utf8), to: dir + "/short.json")
        #expect(throws: PlacementError.self) { try ExpertProfile.load(path: dir + "/short.json") }
        try writeFile(Array("not json".utf8), to: dir + "/bad.json")
        do {
            _ = try ExpertProfile.load(path: dir + "/bad.json")
            Issue.record("a damaged profile loaded")
        } catch {
            #expect("\(error)".contains(dir + "/bad.json"))
        }
        #expect(throws: PlacementError.self) { try profile().check(layers: 3, experts: 3, path: "p") }
    }

    @Test func calibrationInterpolatesItsPoints() {
        let c = LatencyCalibration(fingerprint: "f", points: [.init(tokens: 1, cpuSeconds: 3, deviceSeconds: 1),
                                                              .init(tokens: 8, cpuSeconds: 2.5, deviceSeconds: 1.5),
                                                              .init(tokens: 16, cpuSeconds: 7, deviceSeconds: 2)], transferSeconds: 6)
        // The CPU's noisy dip at 8 tokens is pooled with the point before it (more tokens never
        // cost less): their mean 2.75 up to 8, then 2.75 + (7 - 2.75) / 8 per token, and the
        // last segment extends beyond 16.
        #expect(c.model.cpu(1) == 2.75 && c.model.cpu(8) == 2.75)
        #expect(c.model.cpu(12) == 4.875 && c.model.cpu(24) == 11.25)
        let expected: Double = 1 + 0.5 * 3 / 7
        #expect(c.model.gpu(4) == expected)
        #expect(c.model.cpu(0) == 0 && c.model.transfer == 6 && c.model.cpuSlowdownWhileCopying == 1)
    }

    @Test func costPoolsEveryRunOfNoise() {
        // 4, 2, 3 pool to their mean 3; 5 and 6 stand until 1 comes: 6 and 1 pool to 3.5,
        // below 5, so 5, 6, 1 pool to 4, which is not below 3.
        let c = ExpertPlanner.Cost(measured: [(1, 4), (2, 2), (4, 3), (8, 5), (16, 6), (32, 1)])
        #expect(c.points.map(\.seconds) == [3, 3, 3, 4, 4, 4])
        #expect(c.points.map(\.tokens) == [1, 2, 4, 8, 16, 32])
    }
}

/// The offload executor with the CPU in the device role: the same placement, planner,
/// executor and budget code the GPU runs, on CI.
@Suite(.serialized) struct OffloadExecutorTests {
    static let name = "mixtral-tiny-a"  // 2 layers x 4 experts, fp32

    /// A model with an executor whose device holds `resident` experts (+ the policy's streaming slots).
    private func offloaded(_ policy: OffloadPolicy, resident: Int, latency: ExpertPlanner.LatencyModel? = nil,
                           kernels: CPUKernels = .reference(), format: QuantFormat? = nil) throws -> (MixtralModel, OffloadExecutor, CPUExpertDevice) {
        let model = try plainModel(kernels: kernels, format: format)
        let c = model.config
        let shape = ExpertShape(model)
        let maxRows = 64 * c.numExpertsPerToken
        let budget = CPUExpertDevice(kernels: kernels, memoryLimit: 0).workspaceBytes(shape: shape, maxRows: maxRows) + (resident + OffloadExecutor.streamingSlots(policy)) * shape.bytes
        let limited = CPUExpertDevice(kernels: try CPUKernels(kernels.path, pool: ThreadPool(threads: 1)), memoryLimit: budget)
        let order: ExpertPlacement.Order = policy == .layerSplit ? .wholeLayers : .layerBalanced
        let placement = ExpertPlacement.make(layers: c.numHiddenLayers, experts: c.numLocalExperts, capacity: resident, order: order)
        // Copying costs as much as 3 CPU tokens: prefill copies, decode computes on the CPU.
        let model0 = latency ?? ExpertPlanner.LatencyModel(cpu: .init(fixed: 1e-3, perToken: 1e-3), gpu: .init(fixed: 1e-5, perToken: 1e-6), transfer: 3e-3)
        let executor = try OffloadExecutor(model: model, device: limited, policy: policy, placement: placement, latency: model0, maxRows: maxRows)
        model.expertExecutor = executor
        return (model, executor, limited)
    }

    /// The fixture, with its experts quantized to `format` when given.
    private func plainModel(kernels: CPUKernels = .reference(), format: QuantFormat? = nil) throws -> MixtralModel {
        let model = try MixtralModel(directory: fixture(Self.name), kernels: kernels)
        if let format { try model.quantizeExperts(format, cacheDirectory: nil) }
        return model
    }

    /// Prefill + 6 decode steps' logits.
    private func logits(_ model: MixtralModel) throws -> [[Float]] {
        let cache = model.makeCache()
        var out = [try model.forward([1, 17, 250, 31, 9, 77, 5, 120], cache: cache, allLogits: true)]
        for t in [4, 88, 3, 200, 61, 7] as [Int32] { out.append(try model.forward([t], cache: cache, allLogits: false)) }
        return out
    }

    @Test(arguments: OffloadPolicy.allCases)
    func logitsEqualThePlainCPUPath(policy: OffloadPolicy) throws {
        let expected = try logits(plainModel())
        let (model, executor, device) = try offloaded(policy, resident: 3)
        #expect(try logits(model) == expected, "\(policy)")
        let s = executor.stats
        #expect(s.residentTokenExperts > 0 && s.fallbacks == 0, "\(s)")
        switch policy {
        case .fiddler: #expect(s.cpuTokenExperts > 0 && s.copiedExperts > 0, "\(s)")  // the 8-token prefill copies
        case .gpuSwap: #expect(s.cpuTokenExperts == 0 && s.copiedExperts > 0, "\(s)")
        case .layerSplit: #expect(s.copiedExperts == 0 && s.cpuTokenExperts > 0, "\(s)")
        }
        #expect(device.memory.peak <= device.memory.limit && device.memory.peak > 0)
        #expect(executor.placement.resident.count == 3)
    }

    /// Quantized experts: slots hold the packed levels and scales (the budget counts them at
    /// that size) and every strategy still gives the plain quantized CPU path's logits.
    @Test(arguments: [QuantFormat.q8, .q4])
    func quantizedExpertsRunOnTheDeviceInTheirFormat(format: QuantFormat) throws {
        let expected = try logits(plainModel(format: format))
        #expect(try expected != logits(plainModel()))  // the quantized model really differs
        for policy in OffloadPolicy.allCases {
            let (model, executor, device) = try offloaded(policy, resident: 3, format: format)
            let shape = ExpertShape(model), q = model.layers[0].experts[0].quantized!
            #expect(shape.format == format && shape.bytes == q.byteCount && shape.bytes < 3 * shape.hidden * shape.ffn * 4)
            #expect(try logits(model) == expected, "\(policy) \(format)")
            let s = executor.stats
            #expect(s.residentTokenExperts > 0 && s.fallbacks == 0, "\(s)")
            #expect(device.memory.used["experts"] == (3 + OffloadExecutor.streamingSlots(policy)) * q.byteCount)
            #expect(device.memory.peak <= device.memory.limit)
        }
    }

    /// The bound prices experts as they were before the step: gpu-swap's copies count as
    /// non-resident work (here 1 ms each on the CPU at best), not as cache hits.
    @Test func theBoundSeesResidencyBeforeTheStepsCopies() throws {
        let (model, executor, _) = try offloaded(.gpuSwap, resident: 3)
        executor.use(.init(cpu: .init(fixed: 1e-3, perToken: 0), gpu: .init(fixed: 1e-5, perToken: 0), transfer: 1))
        _ = try logits(model)
        let s = executor.stats
        #expect(s.copiedExperts > 0)
        #expect(s.boundSeconds >= 1e-3 * Double(s.copiedExperts), "\(s)")
    }

    /// fiddler's small steps copy into the layer's slots: a copied expert stays (the device
    /// holds experts the placement did not put there) and later steps find it there, while a
    /// prompt's copies stream and leave the placement as it was. Logits stay the plain path's.
    @Test func fiddlerKeepsSmallStepsCopies() throws {
        // The CPU so slow (1 s an expert) that every non-resident expert is copied.
        let latency = ExpertPlanner.LatencyModel(cpu: .init(fixed: 1, perToken: 0), gpu: .init(fixed: 1e-5, perToken: 0), transfer: 1e-3)
        let (model, executor, _) = try offloaded(.fiddler, resident: 4, latency: latency)
        let c = model.config
        let keys = executor.placement.allKeys
        let placed = Set(executor.placement.resident)
        let plain = try plainModel()
        let (cache, plainCache) = (model.makeCache(), plain.makeCache())
        let prompt: [Int32] = (0..<40).map { Int32(3 + $0 * 7) }  // 40 tokens x 2 experts: a streamed step
        #expect(try model.forward(prompt, cache: cache, allLogits: false) == plain.forward(prompt, cache: plainCache, allLogits: false))
        let afterPrompt = executor.stats
        #expect(afterPrompt.copiedExperts > 0)
        #expect(Set(keys.filter(executor.holds)) == placed)  // the prompt's copies streamed
        // One token again and again routes to the same experts: each non-resident one is
        // copied once, then hit.
        let steps = 12
        for _ in 0..<steps {
            #expect(try model.forward([4], cache: cache, allLogits: false) == plain.forward([4], cache: plainCache, allLogits: false))
        }
        let decode = executor.stats.since(afterPrompt)
        let cached = keys.filter { executor.holds($0) && !placed.contains($0) }
        #expect(!cached.isEmpty)
        #expect(keys.filter(executor.holds).count == placed.count)  // as many as the slots hold
        #expect(decode.copiedExperts > 0 && decode.copiedExperts <= c.numHiddenLayers * c.numExpertsPerToken, "\(decode)")
        #expect(decode.cpuTokenExperts == 0 && decode.residentTokenExperts > steps * c.numHiddenLayers, "\(decode)")
    }

    @Test func layerSplitKeepsWholeLayers() throws {
        let (_, executor, _) = try offloaded(.layerSplit, resident: 4)
        #expect(executor.placement.resident(layer: 0) == [0, 1, 2, 3])
        #expect(executor.placement.resident(layer: 1) == [])
    }

    @Test func aSmallerDeviceKeepsTheFirstExpertsAndSaysSo() throws {
        let model = try plainModel()
        let c = model.config
        let shape = ExpertShape(model)
        let device = CPUExpertDevice(kernels: .reference(), memoryLimit: 0)
        let budget = device.workspaceBytes(shape: shape, maxRows: 8) + 4 * shape.bytes  // 2 resident + 2 streaming
        let limited = CPUExpertDevice(kernels: .reference(), memoryLimit: budget)
        let placement = ExpertPlacement.make(layers: 2, experts: 4, capacity: 5, order: .layerBalanced)
        let executor = try OffloadExecutor(model: model, device: limited, policy: .fiddler, placement: placement,
                                           latency: .init(cpu: .init(fixed: 1, perToken: 0), gpu: .init(fixed: 1, perToken: 0), transfer: 1), maxRows: 8)
        #expect(executor.placement.resident == Array(placement.resident.prefix(2)))
        #expect(executor.takeWarnings().first?.contains("2 experts resident instead of 5") == true)
    }

    @Test func beamSearchAndBatchesMatchThePlainPath() throws {
        let options = BeamSearchOptions(width: 4, maxNewTokens: 6, stopTokenIds: [])
        let expected = try beamSearch(model: plainModel(), prompt: [1, 17, 250], options: options)
        let (model, executor, _) = try offloaded(.fiddler, resident: 2)
        let got = try beamSearch(model: model, prompt: [1, 17, 250], options: options)
        #expect(got.map(\.ids) == expected.map(\.ids))
        #expect(zip(got, expected).allSatisfy { $0.score == $1.score })
        #expect(executor.stats.residentTokenExperts > 0 && executor.stats.cpuTokenExperts > 0)

        let plain = try plainModel()
        let items = { (m: MixtralModel) in [BatchItem(tokens: [1, 5, 9], cache: m.makeCache()), BatchItem(tokens: [7], cache: m.makeCache())] }
        #expect(try model.forwardBatch(items(model), allLogits: true) == plain.forwardBatch(items(plain), allLogits: true))
    }

    @Test func calibrationMeasuresEveryTerm() throws {
        let (_, executor, _) = try offloaded(.fiddler, resident: 2)
        let calibration = try executor.calibrate(tokenCounts: [1, 4], repeats: 2, fingerprint: "test")
        #expect(calibration.points.map(\.tokens) == [1, 4])
        #expect(calibration.points.allSatisfy { $0.cpuSeconds > 0 && $0.deviceSeconds > 0 })
        #expect(calibration.transferSeconds > 0 && calibration.cpuSlowdownWhileCopying >= 1)
        #expect(executor.latency == calibration.model)
        let dir = makeTemporaryDirectory()
        let path = try calibration.save(directory: dir)
        #expect(path.hasPrefix(dir))
        #expect(LatencyCalibration.load(directory: dir, fingerprint: "test") == calibration)
        #expect(LatencyCalibration.load(directory: dir, fingerprint: "another machine") == nil)
    }

    @Test func aFailingDeviceFallsBackToTheCPU() throws {
        let expected = try logits(plainModel())
        let model = try plainModel()
        let executor = try OffloadExecutor(model: model, device: FailingDevice(), policy: .fiddler,
                                           placement: ExpertPlacement.make(layers: 2, experts: 4, capacity: 2, order: .layerBalanced),
                                           latency: .init(cpu: .init(fixed: 1, perToken: 1), gpu: .init(fixed: 0, perToken: 0), transfer: 0), maxRows: 16)
        model.expertExecutor = executor
        #expect(try logits(model) == expected)
        #expect(executor.stats.fallbacks > 0)
        #expect(executor.takeWarnings().first?.contains("injected failure") == true)
    }
}

/// A device whose steps always fail (after placement succeeds).
private final class FailingDevice: ExpertDevice {
    let name = "failing"
    var memory: DeviceMemory { DeviceMemory(limit: 1 << 30, used: [:], peak: 0) }
    func workspaceBytes(shape: ExpertShape, maxRows: Int) -> Int { 0 }
    func prepare(shape: ExpertShape, slots count: Int, maxRows: Int) throws(DeviceError) -> Int { count }
    func fill(slot: Int, with expert: MixtralExpert) throws(DeviceError) {}
    func pin(_ experts: [MixtralExpert]) -> Int { 0 }
    func submit(_ jobs: [DeviceJob], input: [Float]) throws(DeviceError) { throw .failed("injected failure") }
    func collect() throws(DeviceError) -> DeviceResult { throw .failed("nothing submitted") }
}

/// The host-side gather and combine spread over a pool (prompt-sized steps) give exactly
/// what one thread gives.
struct ParallelHostCopyTests {
    @Test func gatherAndCombineOverAPoolAreIdentical() {
        // Each expert's ~75 rows of 16 KiB cross the 1 MiB line, and 75 rows do not divide
        // into the pool's 16 blocks evenly (the last blocks are empty).
        let T = 300, D = 4096, E = 8
        let h = KernelSelfTest.random(T * D, seed: 5)
        let choices = DuetCPU.routeTopK(KernelSelfTest.random(T * E, seed: 6).map { $0 * 3 }, tokens: T, experts: E, k: 2)
        let assigned = expertAssignments(choices, experts: E)
        let pool = ThreadPool(threads: 4)
        var outputs: [[Float]?] = []
        for e in 0..<E {
            let rows = gatherRows(h, assigned[e], dim: D), pooled = gatherRows(h, assigned[e], dim: D, pool: pool)
            #expect(rows == pooled)
            outputs.append(assigned[e].isEmpty ? nil : rows.map { $0 * Float(e + 1) })
        }
        let one = combineExperts(outputs, assigned, tokens: T, dim: D), many = combineExperts(outputs, assigned, tokens: T, dim: D, pool: pool)
        #expect(one == many)
        // Token 0's row is its experts' weighted sum in ascending expert order.
        let c = choices[0]
        let expected = (0..<D).map { j in
            zip(c.experts, c.weights).sorted { $0.0 < $1.0 }.reduce(Float(0)) { $0 + $1.1 * (h[j] * Float($1.0 + 1)) }
        }
        #expect(Array(one[0..<D]) == expected)
        var copied = [UInt8](repeating: 0, count: 5 << 20)
        let source = (0..<(5 << 20)).map { UInt8(truncatingIfNeeded: $0 * 7) }
        copied.withUnsafeMutableBytes { d in source.withUnsafeBytes { s in pool.copy(d.baseAddress!, s.baseAddress!, bytes: s.count) } }
        #expect(copied == source)
    }

    /// glibc keeps prompt-sized arrays in the heap once asked (no fresh pages per layer).
    @Test func largeAllocationsStayInTheHeap() {
        #if canImport(Glibc)
        #expect(HostMemory.reuseLargeAllocations())
        #endif
    }
}
