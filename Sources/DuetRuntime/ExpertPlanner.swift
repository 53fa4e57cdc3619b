/// Where one MoE layer's experts run in one step (Fiddler's decision, done right): experts
/// resident on the GPU run there; each routed non-resident expert either runs on the CPU
/// (its activations move, not its weights) or has its weights copied to the GPU and runs
/// there. The CPU and the GPU work at the same time, so the layer takes
///   makespan = max(CPU time, GPU time + transfer time)
/// and the plan minimises that — not the sum of the two, which never balances them.
///
/// A pure function of the routed token counts and a latency model, so it is tested with
/// hand-computable cases.
public enum ExpertPlanner {
    /// Seconds as a function of the tokens an expert gets: linear between measured points,
    /// extended along the last segment (0 tokens: 0).
    public struct Cost: Sendable, Equatable, Codable, CustomStringConvertible {
        public struct Point: Sendable, Equatable, Codable {
            public var tokens: Int
            public var seconds: Double
        }
        /// Ascending token counts, seconds never decreasing.
        public private(set) var points: [Point]

        /// `fixed + perToken * T`.
        public init(fixed: Double, perToken: Double) {
            points = [Point(tokens: 1, seconds: fixed + perToken), Point(tokens: 2, seconds: fixed + 2 * perToken)]
        }

        /// Through measured `(tokens, seconds)`; more tokens never cost less: where noise
        /// makes a point cost less than the one before, the run of points involved takes
        /// their mean (the least-squares nondecreasing fit, by pooling adjacent violators —
        /// a running maximum would keep every upward error).
        public init(measured: [(Int, Double)]) {
            let sorted = measured.sorted { $0.0 < $1.0 }
            var pools: [(sum: Double, count: Int)] = []
            for (_, s) in sorted {
                pools.append((s, 1))
                while pools.count > 1, let last = pools.last, last.sum / Double(last.count) < pools[pools.count - 2].sum / Double(pools[pools.count - 2].count) {
                    pools.removeLast()
                    pools[pools.count - 1].sum += last.sum
                    pools[pools.count - 1].count += last.count
                }
            }
            let fitted = pools.flatMap { [Double](repeating: $0.sum / Double($0.count), count: $0.count) }
            points = zip(sorted, fitted).map { Point(tokens: $0.0.0, seconds: $0.1) }
        }

        public func callAsFunction(_ tokens: Int) -> Double {
            guard tokens > 0, let first = points.first else { return 0 }
            if tokens <= first.tokens || points.count == 1 { return first.seconds }
            var i = points.count - 2
            for j in 0..<(points.count - 1) where tokens <= points[j + 1].tokens { i = j; break }
            let a = points[i], b = points[i + 1]
            let slope = max(0, (b.seconds - a.seconds) / Double(b.tokens - a.tokens))
            return a.seconds + slope * Double(tokens - a.tokens)
        }

        /// Every point times `factor`.
        public func scaled(_ factor: Double) -> Cost {
            var c = self
            for i in c.points.indices { c.points[i].seconds *= factor }
            return c
        }

        public var description: String {
            points.count == 2 && points[0].tokens == 1 && points[1].tokens == 2
                ? "\(ms(self(1))) + \(ms(self(2) - self(1)))/token"
                : points.map { "\($0.tokens): \(ms($0.seconds))" }.joined(separator: ", ")
        }

        private func ms(_ s: Double) -> String { s.isFinite ? "\((s * 1e6).rounded() / 1e3) ms" : "never" }
    }

    /// The measured costs of one expert shape and dtype.
    public struct LatencyModel: Sendable, Equatable, Codable {
        public var cpu: Cost
        public var gpu: Cost
        /// Copying one expert's weights host -> device.
        public var transfer: Double
        /// How much slower the CPU computes while copies run (they share the host's DRAM): >= 1.
        public var cpuSlowdownWhileCopying: Double
        public init(cpu: Cost, gpu: Cost, transfer: Double, cpuSlowdownWhileCopying: Double = 1) {
            self.cpu = cpu
            self.gpu = gpu
            self.transfer = transfer
            self.cpuSlowdownWhileCopying = cpuSlowdownWhileCopying
        }
        /// Before anything is measured: nothing is worth copying.
        public static let unmeasured = LatencyModel(cpu: Cost(fixed: 0, perToken: 0), gpu: Cost(fixed: 0, perToken: 0), transfer: .infinity)
    }

    /// One routed expert of the layer.
    public struct Load: Sendable, Equatable {
        public var expert: Int
        public var tokens: Int
        public var resident: Bool
        public init(expert: Int, tokens: Int, resident: Bool) {
            self.expert = expert
            self.tokens = tokens
            self.resident = resident
        }
    }

    public struct Plan: Sendable, Equatable {
        /// Experts computed on the GPU from resident weights, on the CPU, and copied then computed on the GPU (ascending ids).
        public var resident: [Int] = []
        public var cpu: [Int] = []
        public var copied: [Int] = []
        public var cpuSeconds = 0.0
        public var gpuSeconds = 0.0
        public var transferSeconds = 0.0
        public var makespan: Double { max(cpuSeconds, gpuSeconds + transferSeconds) }
        public init() {}
    }

    /// Up to this many non-resident experts the search is exhaustive (2^n plans); beyond,
    /// experts move to the GPU in order of CPU time saved per GPU second spent, and the best
    /// prefix of that order is taken.
    public static let exhaustiveLimit = 14

    /// A plan that copies must beat computing everything on the CPU by this share of the
    /// layer's time: the model's error is of that order (measured on the GPU host: decode
    /// plans that copied one of two experts to save ~7% ran slower than all-CPU ones).
    public static let copyMargin = 0.15

    /// The plan with the smallest makespan (ties: fewer copies); copies only when they save
    /// more than `copyMargin` over the all-CPU plan. `copyCredit`: seconds each copy is worth
    /// beyond this step (the copied expert stays cached, and later steps may find it there):
    /// plans are compared by makespan minus that credit per copy.
    public static func plan(_ loads: [Load], model: LatencyModel, copyCredit: Double = 0) -> Plan {
        let routed = loads.filter { $0.tokens > 0 }
        var base = Plan()
        for l in routed where l.resident {
            base.resident.append(l.expert)
            base.gpuSeconds += model.gpu(l.tokens)
        }
        let movable = routed.filter { !$0.resident }.sorted { $0.expert < $1.expert }
        func evaluate(_ toGPU: [Bool]) -> Plan {
            var p = base
            for (l, copy) in zip(movable, toGPU) {
                if copy {
                    p.copied.append(l.expert)
                    p.gpuSeconds += model.gpu(l.tokens)
                    p.transferSeconds += model.transfer
                } else {
                    p.cpu.append(l.expert)
                    p.cpuSeconds += model.cpu(l.tokens)
                }
            }
            if !p.copied.isEmpty { p.cpuSeconds *= model.cpuSlowdownWhileCopying }
            return p
        }
        func objective(_ p: Plan) -> Double { p.makespan - copyCredit * Double(p.copied.count) }
        func better(_ a: Plan, than b: Plan) -> Bool {
            if objective(a) != objective(b) { return objective(a) < objective(b) }
            return a.copied.count < b.copied.count
        }
        let allCPU = evaluate([Bool](repeating: false, count: movable.count))
        var best = allCPU
        if movable.count <= exhaustiveLimit {
            for mask in 1..<(1 << movable.count) {
                let candidate = evaluate((0..<movable.count).map { mask & (1 << $0) != 0 })
                if better(candidate, than: best) { best = candidate }
            }
        } else {
            // Most CPU time saved per second added to the GPU side first.
            let order = movable.indices.sorted { a, b in
                let ra = model.cpu(movable[a].tokens) / (model.gpu(movable[a].tokens) + model.transfer)
                let rb = model.cpu(movable[b].tokens) / (model.gpu(movable[b].tokens) + model.transfer)
                return ra != rb ? ra > rb : movable[a].expert < movable[b].expert
            }
            var toGPU = [Bool](repeating: false, count: movable.count)
            for i in order {
                toGPU[i] = true
                let candidate = evaluate(toGPU)
                if better(candidate, than: best) { best = candidate }
            }
        }
        if !best.copied.isEmpty && objective(best) > (1 - copyMargin) * allCPU.makespan { best = allCPU }
        best.resident.sort()
        return best
    }
}
