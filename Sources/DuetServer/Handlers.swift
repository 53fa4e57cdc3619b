import DuetRuntime
import DuetTokenizer
import Hummingbird
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The two generation endpoints: parse and validate the body, tokenize, submit the choices
/// to the engine, and answer whole or as server-sent events.
struct Handlers: Sendable {
    let server: ServerContext
    static let maxBodyBytes = 8 << 20

    func chat(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let body = try await decode(ChatCompletionRequest.self, request, context)
        return try await respond(try chatPlan(body))
    }

    func complete(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let body = try await decode(CompletionRequest.self, request, context)
        return try await respond(try completionPlan(body))
    }

    private func decode<T: Decodable>(_ type: T.Type, _ request: Request, _ context: BasicRequestContext) async throws -> T {
        let buffer: ByteBuffer
        do { buffer = try await request.body.collect(upTo: Self.maxBodyBytes) } catch {
            throw APIError(status: .contentTooLarge, "The request body is larger than \(Self.maxBodyBytes >> 20) MiB.")
        }
        do { return try JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView)) } catch {
            throw APIError.decoding(error)
        }
    }

    // MARK: plans

    /// Everything a validated request asks for.
    struct Plan: Sendable {
        enum Kind { case chat, completion }
        var kind: Kind
        var submissions: [InferenceEngine.Submission]
        /// Ids each choice's text continues (a completion's prompt; none for chat).
        var contexts: [[Int32]]
        /// With `echo`: the prompt text each completion choice starts with.
        var echoes: [String]
        var promptTokens: Int
        var stops: [String]
        var stream: Bool
        var includeUsage: Bool
        /// Chat: `top_logprobs` when `logprobs` is true; completions: `logprobs`.
        var logprobs: Int?
    }

    private func chatPlan(_ r: ChatCompletionRequest) throws -> Plan {
        try checkModel(r.model)
        if let tools = r.tools, !tools.isNull { throw APIError.invalid("tools", "Tools are not supported by this server.") }
        guard !r.messages.isEmpty else { throw APIError.invalid("messages", "'messages' must contain at least one message.") }
        var rendered: [JSONValue] = []
        for (i, m) in r.messages.enumerated() {
            let text: String
            switch m.content {
            case nil: text = ""
            case .text(let s): text = s
            case .parts(let parts):
                if let bad = parts.first(where: { $0.type != "text" || $0.text == nil }) {
                    throw APIError.invalid("messages.\(i).content", "Only text content parts are supported, got a part of type '\(bad.type)'.")
                }
                text = parts.compactMap(\.text).joined()
            }
            rendered.append(.object(["role": .string(m.role), "content": .string(text)]))
        }
        let promptText: String
        do { promptText = try server.template.render(messages: rendered, addGenerationPrompt: true) } catch {
            throw APIError.invalid("messages", "The model's chat template rejected these messages: \(error)")
        }
        let prompt = try server.tokenizer.encode(promptText, addSpecialTokens: false)
        if r.topLogprobs != nil && r.logprobs != true {
            throw APIError.invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
        }
        if let k = r.topLogprobs, !(0...20).contains(k) { throw APIError.invalid("top_logprobs", "'top_logprobs' must be between 0 and 20, got \(k).") }
        let logprobs = r.logprobs == true ? (r.topLogprobs ?? 0) : nil
        var stopIds = server.eosTokenIds
        if !server.template.eosToken.isEmpty, let id = server.tokenizer.id(of: server.template.eosToken), !stopIds.contains(Int(id)) {
            stopIds.append(Int(id))
        }
        if r.maxTokens != nil && r.maxCompletionTokens != nil {
            throw APIError.invalid("max_tokens", "Give 'max_tokens' or 'max_completion_tokens', not both.")
        }
        let (maxParam, maxTokens) = r.maxCompletionTokens != nil ? ("max_completion_tokens", r.maxCompletionTokens) : ("max_tokens", r.maxTokens)
        return try plan(.chat, r, prompts: [prompt], promptParam: "messages", maxTokens: maxTokens, maxParam: maxParam,
                        defaultMaxTokens: nil, stopIds: stopIds, logprobs: logprobs, echo: false)
    }

    private func completionPlan(_ r: CompletionRequest) throws -> Plan {
        try checkModel(r.model)
        if r.suffix != nil { throw APIError.invalid("suffix", "'suffix' is not supported by this server.") }
        if let b = r.bestOf, b != (r.n ?? 1) { throw APIError.invalid("best_of", "'best_of' is not supported by this server (it must equal 'n').") }
        if let k = r.logprobs, !(0...5).contains(k) { throw APIError.invalid("logprobs", "'logprobs' must be between 0 and 5, got \(k).") }
        let prompts: [[Int32]]
        switch r.prompt {
        case .text(let s): prompts = [try server.tokenizer.encode(s)]
        case .texts(let list): prompts = try list.map { try server.tokenizer.encode($0) }
        case .ids(let ids): prompts = [ids]
        case .idLists(let lists): prompts = lists
        }
        guard !prompts.isEmpty else { throw APIError.invalid("prompt", "'prompt' must not be an empty list.") }
        for p in prompts {
            if let bad = p.first(where: { $0 < 0 || Int($0) >= server.engine.vocabSize }) {
                throw APIError.invalid("prompt", "Token id \(bad) in 'prompt' is outside the vocabulary (0..<\(server.engine.vocabSize)).")
            }
        }
        return try plan(.completion, r, prompts: prompts, promptParam: "prompt", maxTokens: r.maxTokens, maxParam: "max_tokens",
                        defaultMaxTokens: 16, stopIds: server.eosTokenIds, logprobs: r.logprobs, echo: r.echo ?? false)
    }

    private func checkModel(_ name: String) throws {
        guard name == server.modelID else {
            throw APIError(status: .badRequest, "The model '\(name)' does not exist; this server serves '\(server.modelID)'.",
                           param: "model", code: "model_not_found")
        }
    }

    /// Validates the fields both endpoints share and makes one submission per prompt and choice.
    private func plan(_ kind: Plan.Kind, _ r: some SamplingRequest, prompts: [[Int32]], promptParam: String,
                      maxTokens: Int?, maxParam: String, defaultMaxTokens: Int?, stopIds: [Int],
                      logprobs: Int?, echo: Bool) throws -> Plan {
        let temperature = r.temperature ?? 1
        guard temperature.isFinite, (0...2).contains(temperature) else {
            throw APIError.invalid("temperature", "'temperature' must be between 0 and 2, got \(temperature).")
        }
        let topP = r.topP ?? 1
        guard topP > 0, topP <= 1 else { throw APIError.invalid("top_p", "'top_p' must be greater than 0 and at most 1, got \(topP).") }
        let topK = r.topK ?? 0
        guard topK >= 0 else { throw APIError.invalid("top_k", "'top_k' must be 0 (off) or positive, got \(topK).") }
        let n = r.n ?? 1
        guard (1...16).contains(n) else { throw APIError.invalid("n", "'n' must be between 1 and 16, got \(n).") }
        if let p = r.presencePenalty, p != 0 { throw APIError.invalid("presence_penalty", "'presence_penalty' is not supported by this server (only 0).") }
        if let p = r.frequencyPenalty, p != 0 { throw APIError.invalid("frequency_penalty", "'frequency_penalty' is not supported by this server (only 0).") }
        let stops = r.stop?.values ?? []
        guard stops.count <= 4 else { throw APIError.invalid("stop", "'stop' takes at most 4 sequences, got \(stops.count).") }
        if stops.contains("") { throw APIError.invalid("stop", "'stop' sequences must not be empty.") }
        if let m = maxTokens, m < 1 { throw APIError.invalid(maxParam, "'\(maxParam)' must be at least 1, got \(m).") }
        let seed = r.seed.map { UInt64(bitPattern: Int64($0)) } ?? UInt64.random(in: 0...UInt64.max)

        let capacity = server.engine.capacityTokens
        var submissions: [InferenceEngine.Submission] = [], contexts: [[Int32]] = [], echoes: [String] = []
        for prompt in prompts {
            guard !prompt.isEmpty else { throw APIError.invalid(promptParam, "The prompt is empty.") }
            guard prompt.count < capacity else {
                throw APIError.invalid(promptParam, "This model's maximum context length is \(capacity) tokens, but the prompt has \(prompt.count) tokens.")
            }
            let room = capacity - prompt.count
            if let m = maxTokens, m > room {
                throw APIError.invalid(maxParam, "This model's maximum context length is \(capacity) tokens; the prompt has \(prompt.count), "
                    + "so '\(maxParam)' can be at most \(room), got \(m).")
            }
            let options = GenerationOptions(maxTokens: maxTokens ?? min(defaultMaxTokens ?? room, room), stopTokenIds: stopIds)
            let echoText = echo ? try server.tokenizer.decode(prompt, skipSpecialTokens: true) : ""
            for i in 0..<n {
                var choice = options
                choice.sampling = SamplingOptions(temperature: Float(temperature), topK: topK, topP: Float(topP), seed: seed &+ UInt64(i))
                submissions.append(.init(prompt: prompt, options: choice, topLogprobs: logprobs))
                contexts.append(kind == .completion ? prompt : [])
                echoes.append(echoText)
            }
        }
        return Plan(kind: kind, submissions: submissions, contexts: contexts, echoes: echoes,
                    promptTokens: prompts.reduce(0) { $0 + $1.count }, stops: stops, stream: r.stream ?? false,
                    includeUsage: r.streamOptions?.includeUsage ?? false, logprobs: logprobs)
    }

    // MARK: answering

    private func respond(_ plan: Plan) async throws -> Response {
        let run = try ChoiceRun(plan: plan, tokenizer: server.tokenizer)
        let handle = server.engine.submit(plan.submissions)
        let ids = ResponseIDs(kind: plan.kind, model: server.modelID)
        if plan.stream { return streamResponse(plan, handle, run, ids) }
        var state = run
        for await event in handle.events {
            _ = try state.apply(event, handle)
        }
        if let failure = state.failure { throw APIError.server(failure) }
        let usage = Usage(promptTokens: plan.promptTokens, completionTokens: state.completionTokens)
        switch plan.kind {
        case .chat:
            return try jsonResponse(ChatCompletion(id: ids.id, created: ids.created, model: ids.model, choices: state.choices.indices.map { i in
                ChatChoice(index: i, message: .init(content: state.choices[i].text.text),
                           logprobs: plan.logprobs.map { _ in state.chatLogprobs(i, tokenizer: server.tokenizer) },
                           finishReason: state.choices[i].finish ?? "length")
            }, usage: usage))
        case .completion:
            return try jsonResponse(Completion(id: ids.id, created: ids.created, model: ids.model, choices: state.choices.indices.map { i in
                CompletionChoice(index: i, text: plan.echoes[i] + state.choices[i].text.text,
                                 logprobs: plan.logprobs.map { _ in state.completionLogprobs(i, tokenizer: server.tokenizer, offset: plan.echoes[i].utf8.count) },
                                 finishReason: state.choices[i].finish ?? "length")
            }, usage: usage))
        }
    }

    /// Server-sent events: one chunk per piece of text, a last chunk per choice with its
    /// finish reason, usage when asked, then `data: [DONE]`. A client that goes away (a
    /// failed write) cancels the request's sequences at once.
    private func streamResponse(_ plan: Plan, _ handle: InferenceEngine.Handle, _ run: ChoiceRun, _ ids: ResponseIDs) -> Response {
        let tokenizer = server.tokenizer
        nonisolated(unsafe) let run = run  // moved into the body writer, used by it alone
        let body = ResponseBody { writer in
            var state = run
            let encoder = makeEncoder()
            func send(_ value: some Encodable) async throws {
                var buffer = ByteBuffer(string: "data: ")
                buffer.writeBytes(try encoder.encode(value))
                buffer.writeString("\n\n")
                try await writer.write(buffer)
            }
            func chunk(_ piece: ChoiceRun.Piece?, choice: Int, role: String? = nil, text: String? = nil) -> any Encodable {
                let content = text ?? piece?.text
                switch plan.kind {
                case .chat:
                    let logprobs = piece.flatMap { p in p.token.map { ChatLogprobs(content: [state.chatEntry($0, tokenizer: tokenizer)]) } }
                    return ChatCompletionChunk(id: ids.id, created: ids.created, model: ids.model, choices: [
                        ChatChunkChoice(index: choice, delta: .init(role: role, content: piece?.finish != nil && content == "" ? nil : content),
                                        logprobs: logprobs, finishReason: piece?.finish)])
                case .completion:
                    var logprobs: CompletionLogprobs? = nil
                    if let token = piece?.token, plan.logprobs != nil {
                        logprobs = state.completionLogprobs(of: [token], tokenizer: tokenizer, offset: plan.echoes[choice].utf8.count)
                    }
                    return Completion(id: ids.id, created: ids.created, model: ids.model, choices: [
                        CompletionChoice(index: choice, text: content ?? "", logprobs: logprobs, finishReason: piece?.finish)])
                }
            }
            do {
                for i in plan.submissions.indices {
                    if plan.kind == .chat { try await send(chunk(nil, choice: i, role: "assistant", text: "")) }
                    else if !plan.echoes[i].isEmpty { try await send(chunk(nil, choice: i, text: plan.echoes[i])) }
                }
                for await event in handle.events {
                    for piece in try state.apply(event, handle) where !piece.text.isEmpty || piece.finish != nil || piece.token != nil && plan.logprobs != nil {
                        try await send(chunk(piece, choice: piece.choice))
                    }
                }
                if let failure = state.failure {
                    try await send(APIError.server(failure).body)
                } else if plan.includeUsage {
                    let usage = Usage(promptTokens: plan.promptTokens, completionTokens: state.completionTokens)
                    switch plan.kind {
                    case .chat: try await send(ChatCompletionChunk(id: ids.id, created: ids.created, model: ids.model, choices: [], usage: usage))
                    case .completion: try await send(Completion(id: ids.id, created: ids.created, model: ids.model, choices: [], usage: usage))
                    }
                }
                try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
                try await writer.finish(nil)
            } catch {
                handle.cancel()
                throw error
            }
        }
        return Response(status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"], body: body)
    }
}

/// A response's id, creation time and model name.
struct ResponseIDs {
    var id: String
    var created: Int
    var model: String
    init(kind: Handlers.Plan.Kind, model: String) {
        let hex = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        id = (kind == .chat ? "chatcmpl-" : "cmpl-") + hex
        created = Int(Date().timeIntervalSince1970)
        self.model = model
    }
}
