#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import DuetCore
import DuetCPU
import DuetFormats
import DuetModels

/// The planner's latency model as measured on one machine (`duet calibrate`, or a few
/// seconds at start-up): per token count, the CPU and device time of one expert FFN, and
/// the time to copy one expert's weights to the device. Keyed by a fingerprint of the
/// machine, the thread count and the expert's shape, so a file from another setup is not used.
public struct LatencyCalibration: Codable, Sendable, Equatable {
    public struct Point: Codable, Sendable, Equatable {
        public var tokens: Int
        public var cpuSeconds: Double
        public var deviceSeconds: Double
        public init(tokens: Int, cpuSeconds: Double, deviceSeconds: Double) {
            self.tokens = tokens
            self.cpuSeconds = cpuSeconds
            self.deviceSeconds = deviceSeconds
        }
    }
    public var fingerprint: String
    public var points: [Point]
    public var transferSeconds: Double
    /// CPU time of one token's expert while a copy runs / alone (>= 1).
    public var cpuSlowdownWhileCopying: Double
    /// What the planner uses: the points themselves, interpolated.
    public var model: ExpertPlanner.LatencyModel

    public init(fingerprint: String, points: [Point], transferSeconds: Double, cpuSlowdownWhileCopying: Double = 1) {
        self.fingerprint = fingerprint
        self.points = points
        self.transferSeconds = transferSeconds
        self.cpuSlowdownWhileCopying = cpuSlowdownWhileCopying
        model = ExpertPlanner.LatencyModel(
            cpu: ExpertPlanner.Cost(measured: points.map { ($0.tokens, $0.cpuSeconds) }),
            gpu: ExpertPlanner.Cost(measured: points.map { ($0.tokens, $0.deviceSeconds) }),
            transfer: transferSeconds, cpuSlowdownWhileCopying: cpuSlowdownWhileCopying)
    }

    /// The machine, thread count, device and expert shape a calibration belongs to.
    public static func fingerprint(threads: Int, device: String, shape: ExpertShape, cpuPath: String) -> String {
        "\(cpuModelName()) | \(threads) threads, \(cpuPath) kernels | \(device) | expert \(shape.hidden)x\(shape.ffn) \(shape.formatName)"
    }

    /// Where `duet calibrate` writes the calibration for `fingerprint`.
    public static func path(directory: String, fingerprint: String) -> String {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in fingerprint.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        return joinPath(directory, "latency-\(String(h, radix: 16)).json")
    }

    /// The calibration stored for `fingerprint` in `directory`, if any (a damaged or
    /// foreign file counts as none).
    public static func load(directory: String, fingerprint: String) -> LatencyCalibration? {
        let path = path(directory: directory, fingerprint: fingerprint)
        guard fileExists(path), let bytes = try? readSmallFile(path),
              let c = try? JSONDecoder().decode(LatencyCalibration.self, from: Data(bytes)), c.fingerprint == fingerprint else { return nil }
        return c
    }

    /// Writes it where `load` finds it; returns the path.
    public func save(directory: String) throws -> String {
        makeDirectories(directory)
        let path = Self.path(directory: directory, fingerprint: fingerprint)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        try writeFile(Array(try encoder.encode(self)), to: path)
        return path
    }
}

extension LatencyCalibration {
    /// The CPU's time for one expert FFN at each token count: the mean over `experts`
    /// distinct experts (as in a real step: weights straight from DRAM, no warm TLB or cache),
    /// after one warm-up call (buffers, pool). `among`: the experts the CPU will really run
    /// (the non-resident ones: their memory is the page-locked kind a run reads), spread
    /// evenly; nil: a rotation over layers and experts.
    public static func cpuExpertSeconds(_ model: MixtralModel, tokenCounts: [Int], experts: Int = 4, among candidates: [ExpertKey]? = nil) -> [Double] {
        let L = model.config.numHiddenLayers, E = model.config.numLocalExperts, D = model.config.hiddenSize
        var rotation = (0..<experts).map { i in ExpertKey(layer: i % L, expert: (i / L + i) % E) }
        if let candidates, !candidates.isEmpty {
            rotation = (0..<experts).map { i in candidates[i * candidates.count / experts] }
        }
        return tokenCounts.map { T in
            let x = KernelSelfTest.random(T * D, seed: UInt64(T))
            _ = model.expertFFN(x, layer: 0, expert: 0, tokens: T)
            var mean = 0.0
            for key in rotation {
                let start = ContinuousClock.now
                _ = model.expertFFN(x, layer: key.layer, expert: key.expert, tokens: T)
                mean += secondsSince(start) / Double(rotation.count)
            }
            return mean
        }
    }
}

extension OffloadExecutor {
    /// This executor's machine, threads, kernel path, device and expert shape (the key of its calibration file).
    public var fingerprint: String {
        LatencyCalibration.fingerprint(threads: model.kernels.pool.threadCount, device: device.name, shape: shape,
                                       cpuPath: model.kernels.path.rawValue)
    }
}

/// The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere).
func cpuModelName() -> String {
    guard let f = fopen("/proc/cpuinfo", "r") else { return "unknown CPU" }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 1024)
    while fgets(&line, Int32(line.count), f) != nil {
        let text = String(cString: line)
        if text.hasPrefix("model name"), let colon = text.firstIndex(of: ":") {
            return String(text[text.index(after: colon)...].drop { $0 == " " || $0 == "\t" }.prefix { $0 != "\n" })
        }
    }
    return "unknown CPU"
}

extension OffloadExecutor {
    /// Measures the latency model on this machine now: the CPU runs experts at `tokenCounts`
    /// tokens (the mean over 4 x `repeats` distinct experts, at least 12: single experts'
    /// times are noisy, and the planner's bound is only as good as this mean), the device
    /// one (best of `repeats`), and the device copies one expert's weights into a slot. Takes
    /// a few seconds for a Mixtral-8x7B expert; the planner uses the result.
    public func calibrate(tokenCounts: [Int] = [1, 4, 16, 64], repeats: Int = 3, fingerprint: String) throws(DeviceError) -> LatencyCalibration {
        let D = shape.hidden
        let probe = ExpertKey(layer: 0, expert: 0)
        let slot = try calibrationSlot(probe)
        let cpuTimes = LatencyCalibration.cpuExpertSeconds(model, tokenCounts: tokenCounts, experts: max(12, 4 * repeats), among: nonResident)
        var points: [LatencyCalibration.Point] = []
        for (T, cpu) in zip(tokenCounts, cpuTimes) {
            // The device's best time over its slot.
            let x = KernelSelfTest.random(T * D, seed: UInt64(T))
            var onDevice = Double.infinity
            do {
                for _ in 0..<repeats {
                    try device.submit([DeviceJob(slot: slot, copy: nil, tokens: T)], input: x)
                    onDevice = min(onDevice, try device.collect().computeSeconds)
                }
            } catch .overBudget {
                // More rows than the budget's staging holds: such steps would run on the CPU anyway;
                // the device's time is extended in proportion from the last count it took.
                guard let last = points.last else { throw DeviceError.overBudget("no token count fits the device's staging") }
                onDevice = last.deviceSeconds * Double(T) / Double(last.tokens)
            }
            points.append(.init(tokens: T, cpuSeconds: cpu, deviceSeconds: onDevice))
        }
        var transfer = Double.infinity
        let expert = model.layers[probe.layer].experts[probe.expert]
        _ = device.pin([expert])  // copied as streamed experts are: from page-locked memory
        for _ in 0..<max(2, repeats - 1) {
            try device.submit([DeviceJob(slot: slot, copy: expert, tokens: 1)], input: [Float](repeating: 0, count: D))
            transfer = min(transfer, try device.collect().copySeconds)
        }
        // The CPU's one-token probe expert alone and while the device copies (the same weights
        // into the same slot, which changes nothing), measured the same way (best of
        // `repeats`, same expert): the DRAM both share slows the CPU down by their ratio.
        var contended = Double.infinity, alone = Double.infinity
        let x = [Float](repeating: 0.5, count: D)
        for _ in 0..<repeats {
            var start = ContinuousClock.now
            _ = model.expertFFN(x, layer: probe.layer, expert: probe.expert, tokens: 1)
            alone = min(alone, secondsSince(start))
            try device.submit([DeviceJob(slot: slot, copy: expert, tokens: 1)], input: x)
            start = ContinuousClock.now
            _ = model.expertFFN(x, layer: probe.layer, expert: probe.expert, tokens: 1)
            contended = min(contended, secondsSince(start))
            _ = try device.collect()
        }
        let calibration = LatencyCalibration(fingerprint: fingerprint, points: points, transferSeconds: transfer,
                                             cpuSlowdownWhileCopying: max(1, contended / alone))
        use(calibration.model)
        return calibration
    }
}
