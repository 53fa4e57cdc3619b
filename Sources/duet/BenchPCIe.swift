import ArgumentParser
import Dispatch
import DuetCPU
import DuetCUDA
import DuetCore

/// `duet bench pcie`: host -> device copy bandwidth by kind of host memory, alone and while
/// every CPU thread streams memory (the two share the host's DRAM: the prefill bound and
/// the planner's copy cost use the concurrent figure).
struct BenchPCIe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pcie",
        abstract: "Host-to-GPU copy bandwidth (driver-pinned, registered, pageable memory), alone and during CPU memory streaming.")

    @Option(name: .long, help: "GiB copied per pass.")
    var gib: Double = 1
    @Option(name: .long, help: "MiB per copy (one Mixtral expert matrix is 112 MiB).")
    var chunkMib = 112
    @Option(name: .long, help: "Passes; the best is reported.")
    var repeats = 3
    @Option(name: .long, help: "CPU threads streaming memory in the concurrent rows (default: all cores).")
    var threads: Int?
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    struct Row: Encodable {
        var bench = "pcie"
        var source: String
        var concurrentCPU: Bool
        var gbps: Double
        var cpuGbps: Double?
        enum CodingKeys: String, CodingKey { case bench, source, gbps, concurrentCPU = "during_cpu_streaming", cpuGbps = "cpu_gbps_meanwhile" }
    }

    func run() throws {
        let gpu = try GPU()
        let bytes = Int(gib * 1_073_741_824), chunk = chunkMib << 20
        var rows: [Row] = []
        for source in HostTransfer.Source.allCases {
            let buffer = try HostTransfer.Buffer(gpu: gpu, bytes: bytes, source: source)
            rows.append(Row(source: source.rawValue, concurrentCPU: false,
                            gbps: try HostTransfer.hostToDevice(buffer, chunk: chunk, repeats: repeats) / 1e9))
            guard source == .driverPinned || source == .registeredHugePages else { continue }
            // The CPU streams 4 GiB with every thread on another thread while the copies repeat.
            let pool = ThreadPool(threads: threads ?? ThreadPool.availableCores)
            let done = DispatchSemaphore(value: 0)
            final class Readings: @unchecked Sendable { var gbps: [Double] = [] }  // written before `done` is signalled
            let cpu = Readings()
            DispatchQueue.global().async {
                cpu.gbps = MemoryBandwidth.measure(pool: pool, bytes: 4 << 30, repeats: 2).map(\.gbps)
                done.signal()
            }
            var best = 0.0
            while done.wait(timeout: .now()) == .timedOut {
                best = max(best, try HostTransfer.hostToDevice(buffer, chunk: chunk, repeats: 1))
            }
            rows.append(Row(source: source.rawValue, concurrentCPU: true, gbps: best / 1e9, cpuGbps: cpu.gbps.max()))
        }
        for r in rows { try Console.json(r) }
        if !json {
            for r in rows {
                Console.out("\(r.source.padding(16)) \(r.concurrentCPU ? "during CPU streaming" : "alone".padding(20)) \(fixed(r.gbps, 1)) GB/s"
                    + (r.cpuGbps.map { "  (CPU read meanwhile \(fixed($0, 1)) GB/s)" } ?? "") + "\n")
            }
        }
    }
}
