import DuetTokenizer

// The OpenAI API's request and response bodies, as far as Duet implements them. Field names
// are the API's (snake_case on the wire). Unknown fields are ignored, as OpenAI does.

/// An integer field. Foundation's decoder reports 1.5 for an Int as corrupt JSON with no
/// field name; this reports it as a type mismatch at the field.
struct Integer: Decodable {
    var value: Int
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let i = try? c.decode(Int.self) { value = i; return }
        if let d = try? c.decode(Double.self), let i = Int(exactly: d) { value = i; return }
        throw DecodingError.typeMismatch(Int.self, .init(codingPath: decoder.codingPath, debugDescription: "expected an integer"))
    }
}

/// `stop`: one string or a list of up to 4.
struct StopSequences: Decodable {
    var values: [String]
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { values = [] }
        else if let one = try? c.decode(String.self) { values = [one] }
        else if let many = try? c.decode([String].self) { values = many }
        else { throw DecodingError.typeMismatch(String.self, .init(codingPath: decoder.codingPath, debugDescription: "expected a string or an array of strings")) }
    }
}

struct StreamOptions: Decodable {
    var includeUsage: Bool?
    enum CodingKeys: String, CodingKey { case includeUsage = "include_usage" }
}

/// The sampling and length fields both endpoints share.
protocol SamplingRequest {
    var model: String { get }
    var temperature: Double? { get }
    var topP: Double? { get }
    var topK: Int? { get }
    var n: Int? { get }
    var stream: Bool? { get }
    var streamOptions: StreamOptions? { get }
    var stop: StopSequences? { get }
    var seed: Int? { get }
    var presencePenalty: Double? { get }
    var frequencyPenalty: Double? { get }
}

/// `POST /v1/chat/completions`.
struct ChatCompletionRequest: Decodable, SamplingRequest {
    var model: String
    var messages: [ChatMessage]
    var maxTokensField: Integer?
    var maxTokens: Int? { maxTokensField?.value }
    var maxCompletionTokensField: Integer?
    var maxCompletionTokens: Int? { maxCompletionTokensField?.value }
    var temperature: Double?
    var topP: Double?
    var topKField: Integer?
    var topK: Int? { topKField?.value }
    var nField: Integer?
    var n: Int? { nField?.value }
    var stream: Bool?
    var streamOptions: StreamOptions?
    var stop: StopSequences?
    var seedField: Integer?
    var seed: Int? { seedField?.value }
    var logprobs: Bool?
    var topLogprobsField: Integer?
    var topLogprobs: Int? { topLogprobsField?.value }
    var presencePenalty: Double?
    var frequencyPenalty: Double?
    var tools: JSONValue?

    enum CodingKeys: String, CodingKey {
        case model, messages, temperature, stream, stop, logprobs, tools
        case nField = "n", seedField = "seed"
        case maxTokensField = "max_tokens", maxCompletionTokensField = "max_completion_tokens", topP = "top_p", topKField = "top_k"
        case streamOptions = "stream_options", topLogprobsField = "top_logprobs"
        case presencePenalty = "presence_penalty", frequencyPenalty = "frequency_penalty"
    }
}

struct ChatMessage: Decodable {
    var role: String
    var content: MessageContent?
}

/// A message's content: a string, or an array of parts of which Duet reads the text ones.
enum MessageContent: Decodable {
    case text(String)
    case parts([ContentPart])

    struct ContentPart: Decodable {
        var type: String
        var text: String?
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { self = .text(s); return }
        if let parts = try? c.decode([ContentPart].self) { self = .parts(parts); return }
        throw DecodingError.typeMismatch(String.self, .init(codingPath: decoder.codingPath, debugDescription: "expected a string or an array of content parts"))
    }
}

/// `POST /v1/completions`.
struct CompletionRequest: Decodable, SamplingRequest {
    var model: String
    var prompt: PromptInput
    var maxTokensField: Integer?
    var maxTokens: Int? { maxTokensField?.value }
    var temperature: Double?
    var topP: Double?
    var topKField: Integer?
    var topK: Int? { topKField?.value }
    var nField: Integer?
    var n: Int? { nField?.value }
    var stream: Bool?
    var streamOptions: StreamOptions?
    var stop: StopSequences?
    var seedField: Integer?
    var seed: Int? { seedField?.value }
    var logprobsField: Integer?
    var logprobs: Int? { logprobsField?.value }
    var echo: Bool?
    var suffix: String?
    var bestOfField: Integer?
    var bestOf: Int? { bestOfField?.value }
    var presencePenalty: Double?
    var frequencyPenalty: Double?

    enum CodingKeys: String, CodingKey {
        case model, prompt, temperature, stream, stop, echo, suffix
        case nField = "n", seedField = "seed", logprobsField = "logprobs"
        case maxTokensField = "max_tokens", topP = "top_p", topKField = "top_k", streamOptions = "stream_options"
        case bestOfField = "best_of", presencePenalty = "presence_penalty", frequencyPenalty = "frequency_penalty"
    }
}

/// A completion prompt: text, or token ids; a batch of either is a list of them.
enum PromptInput: Decodable {
    case text(String)
    case ids([Int32])
    case texts([String])
    case idLists([[Int32]])

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { self = .text(s) }
        else if let ids = try? c.decode([Int32].self) { self = .ids(ids) }
        else if let texts = try? c.decode([String].self) { self = .texts(texts) }
        else if let lists = try? c.decode([[Int32]].self) { self = .idLists(lists) }
        else { throw DecodingError.typeMismatch(String.self, .init(codingPath: decoder.codingPath, debugDescription: "expected a string, an array of token ids, or an array of one of them")) }
    }
}

// MARK: responses

struct Usage: Encodable {
    var promptTokens: Int
    var completionTokens: Int
    var totalTokens: Int { promptTokens + completionTokens }
    enum CodingKeys: String, CodingKey { case promptTokens = "prompt_tokens", completionTokens = "completion_tokens", totalTokens = "total_tokens" }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(promptTokens, forKey: .promptTokens)
        try c.encode(completionTokens, forKey: .completionTokens)
        try c.encode(totalTokens, forKey: .totalTokens)
    }
}

/// Chat `logprobs`: one entry per generated token.
struct ChatLogprobs: Encodable {
    struct Alternative: Encodable { var token: String; var logprob: Double; var bytes: [UInt8] }
    struct Entry: Encodable {
        var token: String
        var logprob: Double
        var bytes: [UInt8]
        var topLogprobs: [Alternative]
        enum CodingKeys: String, CodingKey { case token, logprob, bytes, topLogprobs = "top_logprobs" }
    }
    var content: [Entry]
}

/// Completions `logprobs` (the legacy shape).
struct CompletionLogprobs: Encodable {
    var tokens: [String] = []
    var tokenLogprobs: [Double] = []
    var topLogprobs: [[String: Double]] = []
    var textOffset: [Int] = []
    enum CodingKeys: String, CodingKey { case tokens, tokenLogprobs = "token_logprobs", topLogprobs = "top_logprobs", textOffset = "text_offset" }
}

struct AssistantMessage: Encodable { var role = "assistant"; var content: String }

struct ChatChoice: Encodable {
    var index: Int
    var message: AssistantMessage
    var logprobs: ChatLogprobs?
    var finishReason: String
    enum CodingKeys: String, CodingKey { case index, message, logprobs, finishReason = "finish_reason" }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(message, forKey: .message)
        try c.encode(logprobs, forKey: .logprobs)  // null when not asked for
        try c.encode(finishReason, forKey: .finishReason)
    }
}

struct ChatCompletion: Encodable {
    var id: String
    var object = "chat.completion"
    var created: Int
    var model: String
    var choices: [ChatChoice]
    var usage: Usage
}

struct ChatDelta: Encodable { var role: String?; var content: String? }

struct ChatChunkChoice: Encodable {
    var index: Int
    var delta: ChatDelta
    var logprobs: ChatLogprobs?
    var finishReason: String?
    enum CodingKeys: String, CodingKey { case index, delta, logprobs, finishReason = "finish_reason" }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(delta, forKey: .delta)
        try c.encode(logprobs, forKey: .logprobs)
        try c.encode(finishReason, forKey: .finishReason)  // null until the last chunk
    }
}

struct ChatCompletionChunk: Encodable {
    var id: String
    var object = "chat.completion.chunk"
    var created: Int
    var model: String
    var choices: [ChatChunkChoice]
    var usage: Usage?
}

struct CompletionChoice: Encodable {
    var index: Int
    var text: String
    var logprobs: CompletionLogprobs?
    var finishReason: String?
    enum CodingKeys: String, CodingKey { case index, text, logprobs, finishReason = "finish_reason" }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(text, forKey: .text)
        try c.encode(logprobs, forKey: .logprobs)
        try c.encode(finishReason, forKey: .finishReason)
    }
}

struct Completion: Encodable {
    var id: String
    var object = "text_completion"
    var created: Int
    var model: String
    var choices: [CompletionChoice]
    var usage: Usage?
}

struct ModelList: Encodable {
    struct Entry: Encodable {
        var id: String
        var object = "model"
        var created: Int
        var ownedBy = "duet"
        enum CodingKeys: String, CodingKey { case id, object, created, ownedBy = "owned_by" }
    }
    var object = "list"
    var data: [Entry]
}
