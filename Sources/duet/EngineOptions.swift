#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import DuetCore
import DuetFormats
import DuetModels

/// Options every verb that runs a model shares.
struct EngineOptions: ParsableArguments {
    @Option(name: .long, help: "Hugging Face checkpoint directory (config.json + safetensors [+ tokenizer.json]). Default: $DUET_MODEL, else the built-in demo model.")
    var model: String?

    /// The model directory to use, saying so when it is the built-in one.
    func modelDirectory() throws -> String {
        if let model { return model }
        if let env = getenv("DUET_MODEL").map({ String(cString: $0) }), !env.isEmpty { return env }
        guard let found = DemoModel.locate() else {
            throw CLIError("no --model given, DUET_MODEL is not set and the built-in demo model was not found "
                + "(looked in: \(DemoModel.searchPaths().joined(separator: ", ")))")
        }
        Console.err("using the built-in demo model \(found) (--model DIR for another)\n")
        return found
    }

    /// Loads the model and reports how long it took.
    func load() throws -> (model: any LanguageModel, directory: String, seconds: Double) {
        let directory = try modelDirectory()
        let start = ContinuousClock.now
        let model = try ModelRegistry.load(directory: directory)
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
        if let home = getenv("HOME") { paths.append(String(cString: home) + "/.local/share/duet/models/duet-demo-moe") }
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
