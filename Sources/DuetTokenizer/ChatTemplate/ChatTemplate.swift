#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore
import DuetFormats

/// A chat template: the Jinja program a checkpoint ships (tokenizer_config.json's
/// `chat_template`, or chat_template.jinja) or one of Duet's built-ins, parsed once.
/// Rendering follows transformers' `apply_chat_template` (jinja2 with `trim_blocks` and
/// `lstrip_blocks`): the same prompt text, hence the same ids.
public struct ChatTemplate: Sendable {
    /// Where the template came from, for `duet chat` to say ("tokenizer_config.json", "built-in chatml").
    public let origin: String
    public let source: String
    public let bosToken: String
    public let eosToken: String
    private let program: Unchecked<[Node]>

    public init(source: String, origin: String, bosToken: String = "", eosToken: String = "") throws(TemplateError) {
        var parser = TemplateParser(try templateSegments(source))
        let (nodes, _, _, _) = try parser.parseBody(until: [])
        self.source = source
        self.origin = origin
        self.bosToken = bosToken
        self.eosToken = eosToken
        program = Unchecked(nodes)
    }

    /// The prompt for `messages` (JSON objects with at least "role" and "content"). Object
    /// keys are seen sorted (JSONValue keeps no order); see `render(messagesJSON:)` for file order.
    public func render(messages: [JSONValue], addGenerationPrompt: Bool, tools: JSONValue? = nil) throws(TemplateError) -> String {
        try render(values: messages.map(TemplateValue.init(json:)), addGenerationPrompt: addGenerationPrompt,
                   tools: tools.map(TemplateValue.init(json:)))
    }

    func render(values messages: [TemplateValue], addGenerationPrompt: Bool, tools: TemplateValue?) throws(TemplateError) -> String {
        var globals: [String: TemplateValue] = [
            "messages": .list(messages),
            "add_generation_prompt": .bool(addGenerationPrompt),
            "bos_token": .string(bosToken),
            "eos_token": .string(eosToken),
        ]
        if let tools { globals["tools"] = tools }
        return try Interpreter(globals: globals).render(program.value)
    }

    // MARK: built-ins

    /// Templates Duet uses when a checkpoint has none, by family.
    public enum BuiltIn: String, CaseIterable, Sendable {
        case mistral, chatml, olmoe, deepseek

        public var source: String {
            switch self {
            case .mistral:
                "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
            case .chatml:
                "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
            case .olmoe:
                "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
            case .deepseek:
                "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
            }
        }

        /// The built-in for an HF `model_type`.
        public static func forModelType(_ type: String) -> BuiltIn {
            switch type {
            case "qwen2_moe", "qwen2", "qwen3_moe", "qwen3": .chatml
            case "olmoe", "olmo", "olmo2": .olmoe
            case "deepseek_v2", "deepseek_v3", "deepseek": .deepseek
            default: .mistral
            }
        }
    }

    /// The checkpoint's template (tokenizer_config.json `chat_template`, a string or a list of
    /// named templates of which "default" is used, or chat_template.jinja), else the family's
    /// built-in. BOS/EOS strings come from tokenizer_config.json.
    public static func load(directory: String, modelType: String) throws -> ChatTemplate {
        let configPath = joinPath(directory, "tokenizer_config.json")
        var bos = "", eos = ""
        var source: String?, origin = ""
        if fileExists(configPath) {
            let config = try ConfigFile.decode(TokenizerConfigFile.self, path: configPath)
            bos = config.bosToken ?? ""
            eos = config.eosToken ?? ""
            if let t = config.chatTemplate { source = t; origin = "tokenizer_config.json" }
        }
        let jinjaPath = joinPath(directory, "chat_template.jinja")
        if source == nil, fileExists(jinjaPath) {
            source = String(decoding: try readSmallFile(jinjaPath), as: UTF8.self)
            origin = "chat_template.jinja"
        }
        if let source {
            return try ChatTemplate(source: source, origin: joinPath(directory, origin), bosToken: bos, eosToken: eos)
        }
        let builtIn = BuiltIn.forModelType(modelType)
        return try ChatTemplate(source: builtIn.source, origin: "built-in \(builtIn.rawValue) (the checkpoint has none)",
                                bosToken: bos, eosToken: eos)
    }
}

/// What Duet reads from tokenizer_config.json.
struct TokenizerConfigFile: Decodable {
    var chatTemplate: String?
    var bosToken: String?
    var eosToken: String?

    enum CodingKeys: String, CodingKey { case chatTemplate = "chat_template", bosToken = "bos_token", eosToken = "eos_token" }

    private struct Named: Decodable { let name: String; let template: String }
    private struct TokenObject: Decodable { let content: String }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        if let s = try? c.decodeIfPresent(String.self, forKey: .chatTemplate) {
            chatTemplate = s
        } else if let list = try? c.decodeIfPresent([Named].self, forKey: .chatTemplate) {
            chatTemplate = (list.first { $0.name == "default" } ?? list.first)?.template
        }
        func token(_ key: CodingKeys) -> String? {
            if let s = try? c.decodeIfPresent(String.self, forKey: key) { return s }
            return (try? c.decodeIfPresent(TokenObject.self, forKey: key))?.content
        }
        bosToken = token(.bosToken)
        eosToken = token(.eosToken)
    }
}
