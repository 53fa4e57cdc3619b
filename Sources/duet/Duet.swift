import ArgumentParser

@main
struct Duet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "duet",
        abstract: "Run Mixture-of-Experts language models larger than the GPU, fast.",
        subcommands: [Generate.self, Chat.self, Info.self, Tokenize.self, Bench.self, SelfTest.self])
}
