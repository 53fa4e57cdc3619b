import Synchronization

/// Running totals of where expert work ran: token-expert pairs computed by the GPU (hits:
/// the expert's weights were resident there) and by the CPU, and the time each spent.
/// Models add to it from their forward thread; anyone may read a snapshot (metrics).
public final class ExpertUsage: Sendable {
    public struct Snapshot: Sendable, Equatable {
        public var gpuTokenExperts = 0
        public var cpuTokenExperts = 0
        public var gpuSeconds = 0.0
        public var cpuSeconds = 0.0

        /// Share of routed token-expert pairs whose expert ran on the GPU (0 when nothing ran yet).
        public var hitRate: Double {
            let total = gpuTokenExperts + cpuTokenExperts
            return total == 0 ? 0 : Double(gpuTokenExperts) / Double(total)
        }
    }

    private let totals = Mutex(Snapshot())

    public init() {}

    public var snapshot: Snapshot { totals.withLock { $0 } }

    public func addCPU(tokenExperts: Int, seconds: Double) {
        totals.withLock { $0.cpuTokenExperts += tokenExperts; $0.cpuSeconds += seconds }
    }

    public func addGPU(tokenExperts: Int, seconds: Double) {
        totals.withLock { $0.gpuTokenExperts += tokenExperts; $0.gpuSeconds += seconds }
    }
}
