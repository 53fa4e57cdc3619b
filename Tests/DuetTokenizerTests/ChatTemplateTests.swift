#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetFormats
import DuetTestSupport
import DuetTokenizer
import Testing

/// Templates of Tests/Fixtures/chat/templates.json rendered by transformers'
/// apply_chat_template (jinja2) — scripts/make_chat_goldens.py.
struct ChatGoldens: Decodable {
    struct Template: Decodable { let template: String; let source: String; let licence: String; let bos: String; let eos: String }
    struct Case: Decodable {
        let template: String
        let conversation: Int
        let add_generation_prompt: Bool
        let prompt: String?
        let ids: [Int32]?
        let error: String?
        /// ids, or {"error": ...} where mistral-common refuses the conversation.
        let mistral_common_ids: JSONValue?
        var mistralCommonIds: [Int32]? { mistral_common_ids?.array?.compactMap { $0.int.map { Int32($0) } } }
    }
    let conversations: [[JSONValue]]
    /// The same conversations as JSON text in their original key order.
    let conversations_json: [String]
    let cases: [Case]
}

@Suite struct ChatTemplateTests {
    static let templates: [String: ChatGoldens.Template] = try! JSONDecoder().decode(
        [String: ChatGoldens.Template].self, from: Data(fixtureBytes("chat/templates.json")))
    static let goldens: ChatGoldens = try! JSONDecoder().decode(ChatGoldens.self, from: Data(fixtureBytes("chat/goldens.json")))

    @Test func everyCaseRendersAsTransformers() throws {
        var mismatches: [String] = []
        for c in Self.goldens.cases {
            let spec = try #require(Self.templates[c.template])
            let template = try ChatTemplate(source: spec.template, origin: c.template, bosToken: spec.bos, eosToken: spec.eos)
            let messages = Array(Self.goldens.conversations_json[c.conversation].utf8)
            let result = Result { () throws(TemplateError) -> String in
                try template.render(messagesJSON: messages, addGenerationPrompt: c.add_generation_prompt)
            }
            switch result {
            case .success(let prompt):
                if prompt != c.prompt { mismatches.append("\(c.template) #\(c.conversation) gen=\(c.add_generation_prompt): \(prompt.debugDescription) vs \(String(describing: c.prompt?.debugDescription))") }
            case .failure(let error):
                let message: String
                if case .raised(let m, _) = error { message = m } else { message = error.description }
                if message != c.error { mismatches.append("\(c.template) #\(c.conversation): raised '\(message)', expected \(c.error ?? "a prompt")") }
            }
        }
        #expect(Self.goldens.cases.count == 126)
        #expect(mismatches.isEmpty, "\(mismatches.count): \(mismatches.prefix(3))")
    }

    /// Rendered with the template, tokenized without adding BOS again (the template has it),
    /// the ids equal transformers' apply_chat_template(tokenize=True).
    @Test func idsMatchTransformers() throws {
        let mixtral = try Tokenizer(path: demoModelDirectory + "/tokenizer.json")
        let qwenPath = fixture("tokenizers/qwen/tokenizer.json.gz")
        let qwen = try Tokenizer(json: gunzip(qwenPath)!, file: qwenPath)
        var checked = 0
        for c in Self.goldens.cases {
            guard let ids = c.ids, let prompt = c.prompt else { continue }
            let tokenizer = c.template.hasPrefix("qwen") ? qwen : mixtral
            #expect(try tokenizer.encode(prompt, addSpecialTokens: false) == ids, "\(c.template) #\(c.conversation)")
            checked += 1
        }
        #expect(checked >= 40)
    }

    /// mistral-common's own chat encoding: equal to Duet's (via the HF template) wherever
    /// transformers' template agrees with it. Where they differ, the template puts an
    /// assistant reply straight after "[/INST]" (no space), so "Hello" tokenizes without
    /// its word boundary; Duet follows the checkpoint's template, as transformers does.
    @Test func mistralCommonWhereTheTemplateAgrees() throws {
        let mixtral = try Tokenizer(path: demoModelDirectory + "/tokenizer.json")
        var agreed = 0
        for c in Self.goldens.cases {
            guard let reference = c.mistralCommonIds, let ids = c.ids, let prompt = c.prompt else { continue }
            let duet = try mixtral.encode(prompt, addSpecialTokens: false)
            #expect(duet == ids)
            if ids == reference { agreed += 1 }
        }
        #expect(agreed >= 1)
    }

    /// Through the unordered JSONValue path, message content still renders identically.
    @Test func valueMessagesRenderTheSame() throws {
        let spec = try #require(Self.templates["qwen2-chatml"])
        let template = try ChatTemplate(source: spec.template, origin: "qwen2", bosToken: spec.bos, eosToken: spec.eos)
        for (conversation, json) in zip(Self.goldens.conversations, Self.goldens.conversations_json) {
            #expect(try template.render(messages: conversation, addGenerationPrompt: true)
                == template.render(messagesJSON: Array(json.utf8), addGenerationPrompt: true))
        }
    }

    @Test func malformedConversationsAreNamed() throws {
        let t = try ChatTemplate(source: "{{ messages | length }}", origin: "t")
        #expect(throws: TemplateError.syntax("message 0 needs a string \"role\" and a \"content\"", line: 0)) {
            _ = try t.render(messagesJSON: Array(#"[{"content": "x"}]"#.utf8), addGenerationPrompt: false)
        }
        #expect(throws: TemplateError.syntax("JSON at byte 2: expected a key", line: 0)) {
            _ = try t.render(messagesJSON: Array("[{,".utf8), addGenerationPrompt: false)
        }
    }

    @Test func unsupportedConstructsNameTheLine() {
        #expect(throws: TemplateError.unsupported("'{% macro %}'", line: 2)) {
            _ = try ChatTemplate(source: "hello\n{% macro f() %}x{% endmacro %}", origin: "t")
        }
        #expect(throws: TemplateError.unsupported("filter 'wordwrap'", line: 1)) {
            _ = try ChatTemplate(source: "{{ 'a' | wordwrap }}", origin: "t").render(messages: [], addGenerationPrompt: false)
        }
        #expect(throws: TemplateError.syntax("'{% if %}' is never closed (no {% elif / else / endif %})", line: 2)) {
            _ = try ChatTemplate(source: "\n{% if true %}x", origin: "t")
        }
        #expect(throws: TemplateError.runtime("cannot add string and int (use '~' to join as text)", line: 3)) {
            _ = try ChatTemplate(source: "\n\n{{ 'a' + 1 }}", origin: "t").render(messages: [], addGenerationPrompt: false)
        }
    }

    @Test func languageFeatures() throws {
        func render(_ s: String, _ messages: [JSONValue] = []) throws -> String {
            try ChatTemplate(source: s, origin: "t").render(messages: messages, addGenerationPrompt: true)
        }
        #expect(try render("{% for x in [1, 2, 3] %}{{ loop.index0 }}{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}{% endfor %}") == "0F12L")
        #expect(try render("{% set ns = namespace(n=0) %}{% for x in range(4) %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}") == "6")
        #expect(try render("{% set n = 1 %}{% for x in [5] %}{% set n = 9 %}{% endfor %}{{ n }}") == "1")  // loop scope
        #expect(try render("{{ ' a b '.strip().upper() ~ '|' ~ 'x,y'.split(',') | join('+') }}") == "A B|x+y")
        #expect(try render("{{ 'yes' if 'ab' in 'cabd' else 'no' }} {{ [1,2,3][1:] | length }} {{ 'abc'[::-1] }}") == "yes 2 cba")
        #expect(try render("{{ {'b': 1, 'a': [true, none, 'é\"']} | tojson }}") == #"{"b": 1, "a": [true, null, "é\""]}"#)
        #expect(try render("{{ x | default('d') }}{{ none is none }}{{ 3 is odd }}{{ not false and (1 < 2 or 0) }}") == "dTrueTrueTrue")
        #expect(try render("{%- if true -%}\n  a  \n{%- endif -%}\n") == "a")
        #expect(try render("  {% if true %}\nline\n  {% endif %}\nend") == "line\nend")  // lstrip_blocks + trim_blocks
        #expect(try render("{% for m in messages %}{{ m.role }}:{{ m['content'] }};{% endfor %}",
                           [.object(["role": .string("user"), "content": .string("hi")])]) == "user:hi;")
    }

    @Test func loadsTheCheckpointOrTheBuiltIn() throws {
        let demo = try ChatTemplate.load(directory: demoModelDirectory, modelType: "mixtral")
        #expect(demo.origin.hasPrefix("built-in mistral"))
        #expect(demo.bosToken == "<s>" && demo.eosToken == "</s>")
        let dir = makeTemporaryDirectory()
        try writeFile(Array(#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}], "eos_token": {"content": "<e>"}}"#.utf8),
                      to: dir + "/tokenizer_config.json")
        let t = try ChatTemplate.load(directory: dir, modelType: "qwen2_moe")
        #expect(try t.render(messages: [], addGenerationPrompt: true) == "D<e>")
        #expect(ChatTemplate.BuiltIn.forModelType("qwen2_moe") == .chatml)
        #expect(ChatTemplate.BuiltIn.forModelType("olmoe") == .olmoe)
    }
}
