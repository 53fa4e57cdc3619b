import ArgumentParser

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks: each figure printed with its reference or roofline (JSON + a table).",
        subcommands: [BenchMemory.self, BenchPCIe.self, BenchGPUMatmul.self, BenchKernels.self, BenchDecode.self, BenchBatch.self, BenchScenarios.self, BenchTokenizer.self, BenchPerplexity.self])
}
