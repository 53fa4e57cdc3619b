import ArgumentParser

@main
struct Duet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "duet",
        abstract: "Run Mixture-of-Experts language models larger than the GPU, fast.",
        subcommands: [Generate.self, Chat.self, Serve.self, Info.self, Tokenize.self, Profile.self, Plan.self, Calibrate.self, Bench.self, SelfTest.self])
}
