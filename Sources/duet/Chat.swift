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

struct Chat: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Chat in the terminal with the model's chat template; or, with --render, print the prompt a conversation file renders to.")

    @OptionGroup var engine: EngineOptions

    @Option(name: .long, help: "A system message for the conversation.")
    var system: String?

    @Option(name: .long, help: "Render this conversation (a JSON array of {\"role\", \"content\"} messages) and exit, without loading weights.")
    var render: String?

    @Flag(name: .long, help: "With --render: leave out the generation prompt.")
    var noGenerationPrompt = false

    @Flag(name: .long, help: "With --render: print {\"prompt\": ..., \"ids\": [...]}.")
    var json = false

    @Option(name: .long, help: "Most tokens per answer.")
    var maxTokens = 256

    @Option(name: .long, help: "Sampling temperature; 0 = greedy.")
    var temperature: Float = 0.7

    @Option(name: .long, help: "Nucleus sampling threshold.")
    var topP: Float = 0.95

    @Option(name: .long, help: "Sampler seed.")
    var seed: UInt64 = 0

    func validate() throws {
        if engine.synthetic != nil { throw ValidationError("chat needs a checkpoint with a tokenizer (--model), not --synthetic") }
        guard maxTokens > 0 else { throw ValidationError("--max-tokens must be positive") }
    }

    func run() throws {
        let directory = try engine.modelDirectory()
        let tokenizer = try Tokenizer(path: joinPath(directory, "tokenizer.json"))
        let template = try ChatTemplate.load(directory: directory, modelType: try ConfigFile.modelType(directory: directory))
        if let render { return try renderOnly(render, template, tokenizer) }
        Console.err("chat template: \(template.origin)\n")
        let (model, _, _) = try engine.load(directory: directory)
        try interactive(model: model, template: template, tokenizer: tokenizer)
    }

    private func renderOnly(_ path: String, _ template: ChatTemplate, _ tokenizer: Tokenizer) throws {
        let bytes: [UInt8]
        do { bytes = try readSmallFile(path) } catch { throw CLIError(error.description) }
        let rendered = Result { () throws(TemplateError) -> String in
            try template.render(messagesJSON: bytes, addGenerationPrompt: !noGenerationPrompt)
        }
        let prompt: String
        switch rendered {
        case .success(let p): prompt = p
        case .failure(let error):
            // Errors in the conversation file itself have no template line.
            if case .syntax(let message, 0) = error { throw CLIError("\(path): \(message)") }
            throw error
        }
        if json {
            try Console.json(RenderOutput(prompt: prompt, ids: try tokenizer.encode(prompt, addSpecialTokens: false), template: template.origin))
        } else {
            Console.err("chat template: \(template.origin)\n")
            Console.out(prompt + "\n")
        }
    }

    struct RenderOutput: Encodable { let prompt: String; let ids: [Int32]; let template: String }

    private func interactive(model: any LanguageModel, template: ChatTemplate, tokenizer: Tokenizer) throws {
        let session = ChatSession(model: model)
        var history: [JSONValue] = system.map { [.object(["role": .string("system"), "content": .string($0)])] } ?? []
        var stops = model.eosTokenIds
        if let id = tokenizer.id(of: template.eosToken), !template.eosToken.isEmpty, !stops.contains(Int(id)) { stops.append(Int(id)) }
        var sampler = Sampler(SamplingOptions(temperature: temperature, topP: topP, seed: seed))
        Console.err("type a message; /reset starts over; Ctrl-D quits\n")
        while true {
            Console.out("> ")
            guard let line = readLine() else { Console.out("\n"); return }
            if line.trimmingPythonWhitespace() == "/reset" {
                session.reset()
                history = system.map { [.object(["role": .string("system"), "content": .string($0)])] } ?? []
                Console.err("(conversation reset)\n")
                continue
            }
            if line.isEmpty { continue }
            history.append(.object(["role": .string("user"), "content": .string(line)]))
            let prompt = try tokenizer.encode(template.render(messages: history, addGenerationPrompt: true), addSpecialTokens: false)
            var stream = try StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
            let result = try session.respond(to: prompt, options: GenerationOptions(maxTokens: maxTokens, stopTokenIds: stops), sampler: &sampler) { id in
                if let text = try? stream.step(id) { Console.out(text) }
            }
            Console.out((try stream.finish()) + "\n")
            let answerIds = result.finishReason == .stop ? Array(result.ids.dropLast()) : result.ids
            history.append(.object(["role": .string("assistant"), "content": .string(try tokenizer.decode(answerIds, skipSpecialTokens: true))]))
            let t = result.timings
            Console.err("[\(t.promptTokens) new prompt tokens in \(fixed(t.prefillSeconds, 3)) s, \(result.ids.count) tokens at \(fixed(t.decodeTokensPerSecond, 1)) tok/s, \(result.finishReason.rawValue)]\n")
        }
    }
}

