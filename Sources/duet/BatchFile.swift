#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime
import DuetTokenizer
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `duet generate --prompts FILE.jsonl --output OUT.jsonl`: many prompts through the batch
/// generator, results written as they finish, with a progress line.
struct BatchFileRun {
    let model: any LanguageModel
    let directory: String?
    let defaults: GenerationOptions
    let batchSize: Int
    let cacheMemory: Int?

    /// One input line: {"id", "prompt"} or {"id", "messages"}, optional max_tokens, temperature, top_p, seed.
    struct Line: Decodable {
        let id: String?
        let prompt: String?
        let messages: [JSONValue]?
        let max_tokens: Int?
        let temperature: Float?
        let top_p: Float?
        let seed: UInt64?
    }

    func run(input: String, output: String) throws {
        let tokenizer = try directory.map { try Tokenizer(path: joinPath($0, "tokenizer.json")) }
        guard let tokenizer, let directory else { throw CLIError("--prompts needs a model with a tokenizer (--model DIR)") }
        let template = try? ChatTemplate.load(directory: directory, modelType: try ConfigFile.modelType(directory: directory))
        let requests = try parse(input, tokenizer: tokenizer, template: template)
        guard let out = fopen(output, "w") else { throw CLIError("cannot write \(output)") }
        defer { fclose(out) }
        let generator = BatchGenerator(model: model, maxSequences: batchSize, cacheMemoryLimit: cacheMemory)
        let start = ContinuousClock.now
        let terminal = isatty(2) != 0
        var done = 0, tokens = 0
        try generator.run(requests) { request, result in
            let text = try continuation(tokenizer, prompt: request.prompt, ids: result.ids)
            let line = OutputLine(id: request.id, sequences: [.init(ids: result.ids, text: text, score: result.logProbability,
                                                                     finishReason: result.finishReason.rawValue)],
                                  promptTokens: request.prompt.count, seconds: result.timings.decodeSeconds)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            fputs(String(decoding: try encoder.encode(line), as: UTF8.self) + "\n", out)
            fflush(out)
            done += 1
            tokens += result.ids.count
            let rate = Double(tokens) / max(secondsSince(start), 1e-9)
            let status = "\(done)/\(requests.count) prompts done, \(tokens) tokens, \(fixed(rate, 1)) tok/s"
            Console.err(terminal ? "\r" + status : status + "\n")
        }
        if terminal { Console.err("\n") }
    }

    private func parse(_ path: String, tokenizer: Tokenizer, template: ChatTemplate?) throws -> [BatchRequest] {
        let text = String(decoding: try readSmallFile(path), as: UTF8.self)
        var requests: [BatchRequest] = []
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() where !raw.allSatisfy(\.isWhitespace) {
            let line: Line
            do { line = try JSONDecoder().decode(Line.self, from: Data(raw.utf8)) } catch {
                throw CLIError("\(path) line \(n + 1): \(describe(error))")
            }
            let ids: [Int32]
            if let prompt = line.prompt {
                ids = try tokenizer.encode(prompt)
            } else if let messages = line.messages {
                guard let template else { throw CLIError("\(path) line \(n + 1): messages need a chat template, and none could be loaded") }
                ids = try tokenizer.encode(template.render(messages: messages, addGenerationPrompt: true), addSpecialTokens: false)
            } else {
                throw CLIError("\(path) line \(n + 1): needs \"prompt\" or \"messages\"")
            }
            var options = defaults
            if let m = line.max_tokens { options.maxTokens = m }
            if let t = line.temperature { options.sampling.temperature = t }
            if let p = line.top_p { options.sampling.topP = p }
            if let s = line.seed { options.sampling.seed = s }
            guard options.maxTokens > 0 else { throw CLIError("\(path) line \(n + 1): max_tokens must be positive") }
            requests.append(BatchRequest(id: line.id ?? String(n + 1), prompt: ids, options: options))
        }
        return requests
    }

    struct OutputLine: Encodable {
        struct Sequence: Encodable {
            var ids: [Int32]; var text: String; var score: Double; var finishReason: String
            enum CodingKeys: String, CodingKey { case ids, text, score, finishReason = "finish_reason" }
        }
        var id: String
        var sequences: [Sequence]
        var promptTokens: Int
        var seconds: Double
        enum CodingKeys: String, CodingKey { case id, sequences, timings }
        enum TimingKeys: String, CodingKey { case promptTokens = "prompt_tokens", seconds = "seconds" }
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(id, forKey: .id)
            try c.encode(sequences, forKey: .sequences)
            var t = c.nestedContainer(keyedBy: TimingKeys.self, forKey: .timings)
            try t.encode(promptTokens, forKey: .promptTokens)
            try t.encode(seconds, forKey: .seconds)
        }
    }
}
