import ArgumentParser
import DuetModels

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a checkpoint's configuration, parameter counts and bytes by dtype (reads headers only).")

    @OptionGroup var engine: EngineOptions

    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    func run() throws {
        let (model, _, loadSeconds) = try engine.load()
        let s = model.summary
        if json {
            try Console.json(InfoOutput(
                family: s.family, config: Dictionary(uniqueKeysWithValues: s.settings),
                totalParameters: s.totalParameters, activeParameters: s.activeParameters,
                parametersPerExpert: s.parametersPerExpert, bytesByDType: s.bytesByDType,
                files: s.files, loadSeconds: loadSeconds))
            return
        }
        var rows: [(String, String)] = [("family", s.family)] + s.settings
        rows.append(("parameters, total", grouped(s.totalParameters)))
        rows.append(("parameters, active", "\(grouped(s.activeParameters)) per token"))
        rows.append(("parameters, per expert", grouped(s.parametersPerExpert)))
        for (dtype, bytes) in s.bytesByDType.sorted(by: { $0.key < $1.key }) {
            rows.append(("bytes, \(dtype)", "\(grouped(bytes)) (\(fixed(Double(bytes) / 1_048_576, 1)) MiB)"))
        }
        rows.append(("files", "\(s.files.count)"))
        rows.append(("load time", "\(fixed(loadSeconds, 3)) s " + (s.files.isEmpty ? "(synthetic weights generated in memory)" : "(headers only; weights stay mmap'ed)")))
        let width = rows.map(\.0.count).max()! + 2
        let lines = rows.map { $0.0.padding(width) + $0.1 }
        Console.out(lines.joined(separator: "\n") + "\n")
    }
}

struct InfoOutput: Encodable {
    var family: String
    var config: [String: String]
    var totalParameters: Int
    var activeParameters: Int
    var parametersPerExpert: Int
    var bytesByDType: [String: Int]
    var files: [String]
    var loadSeconds: Double
    enum CodingKeys: String, CodingKey {
        case family, config, files
        case totalParameters = "total_parameters", activeParameters = "active_parameters"
        case parametersPerExpert = "parameters_per_expert", bytesByDType = "bytes_by_dtype", loadSeconds = "load_s"
    }
}

/// 1234567 -> "1,234,567".
func grouped(_ n: Int) -> String {
    let digits = Array(String(n.magnitude))
    var out = ""
    for (i, c) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return n < 0 ? "-" + out : out
}
