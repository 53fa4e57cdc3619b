import DuetCPU
import DuetCore
import DuetModels
import DuetRuntime
@testable import DuetServer
import DuetTestSupport
import DuetTokenizer
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// The demo model behind a router, tested without a socket. Reference kernels, so any
/// batch mix computes exactly what a single run computes.
final class ServerFixture: @unchecked Sendable {  // the model is only read before the engine runs it
    let model: MixtralModel
    let tokenizer: Tokenizer
    let engine: InferenceEngine
    let context: ServerContext

    init(apiKey: String? = nil, maxConcurrency: Int = 4) throws {
        model = try MixtralModel(directory: demoModelDirectory, kernels: .reference())
        tokenizer = try Tokenizer(path: demoModelDirectory + "/tokenizer.json")
        engine = InferenceEngine(model: model, maxConcurrency: maxConcurrency, cacheMemoryLimit: nil)
        let template = try ChatTemplate.load(directory: demoModelDirectory, modelType: "mixtral")
        context = ServerContext(engine: engine, tokenizer: tokenizer, template: template, modelID: "demo",
                                eosTokenIds: model.eosTokenIds, apiKey: apiKey)
    }

    deinit { engine.shutdown() }

    func test(_ body: @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        try await Application(router: makeRouter(context)).test(.router, body)
    }

    /// What `duet generate` prints after the prompt: greedy ids through the plain generation loop.
    func greedyContinuation(_ prompt: String, maxTokens: Int) throws -> String {
        let ids = try tokenizer.encode(prompt)
        let result = try generate(model: model, prompt: ids, options: GenerationOptions(maxTokens: maxTokens))
        let before = try tokenizer.decode(ids, skipSpecialTokens: true)
        let all = try tokenizer.decode(ids + result.ids, skipSpecialTokens: true)
        return String(all.dropFirst(before.count))
    }
}

func post(_ client: some TestClientProtocol, _ path: String, _ json: String, key: String? = nil) async throws -> (Int, String) {
    var headers: HTTPFields = [.contentType: "application/json"]
    if let key { headers[.authorization] = "Bearer \(key)" }
    return try await client.execute(uri: path, method: .post, headers: headers, body: ByteBuffer(string: json)) { response in
        (Int(response.status.code), String(buffer: response.body))
    }
}

func object(_ text: String) throws -> [String: Any] {
    try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
}

/// The JSON payloads of a server-sent event stream, and whether it ended with [DONE].
func events(_ body: String) throws -> (chunks: [[String: Any]], done: Bool) {
    let payloads = body.components(separatedBy: "\n\n").filter { !$0.isEmpty }.map { String($0.dropFirst("data: ".count)) }
    return (try payloads.filter { $0 != "[DONE]" }.map(object), payloads.last == "[DONE]")
}

@Suite(.serialized) struct ServerRouteTests {
    @Test func greedyCompletionWholeAndStreamedEqualTheGenerationLoop() async throws {
        let f = try ServerFixture()
        let expected = try f.greedyContinuation("In the beginning", maxTokens: 16)
        try await f.test { client in
            let request = #"{"model": "demo", "prompt": "In the beginning", "max_tokens": 16, "temperature": 0"#
            let (status, body) = try await post(client, "/v1/completions", request + "}")
            #expect(status == 200)
            let whole = try object(body)
            let choice = try #require((whole["choices"] as? [[String: Any]])?.first)
            #expect(choice["text"] as? String == expected)
            #expect(choice["finish_reason"] as? String == "length")
            #expect((whole["usage"] as? [String: Any])?["completion_tokens"] as? Int == 16)

            let (_, streamed) = try await post(client, "/v1/completions", request + #", "stream": true}"#)
            let (chunks, done) = try events(streamed)
            #expect(done)
            let text = chunks.compactMap { ($0["choices"] as? [[String: Any]])?.first?["text"] as? String }.joined()
            #expect(text == expected)
        }
    }

    /// Sampled chat with n = 2 and a seed: the streamed choices, reassembled, equal the whole ones.
    @Test func sampledChatStreamedEqualsWhole() async throws {
        let f = try ServerFixture()
        try await f.test { client in
            let request = #"{"model": "demo", "messages": [{"role": "user", "content": "Who made the light?"}], "max_tokens": 12, "temperature": 0.9, "seed": 5, "n": 2"#
            let (_, body) = try await post(client, "/v1/chat/completions", request + "}")
            let choices = try #require(try object(body)["choices"] as? [[String: Any]])
            let whole = choices.map { ($0["message"] as? [String: Any])?["content"] as? String ?? "?" }
            #expect(whole.count == 2 && whole[0] != whole[1])
            let (_, streamed) = try await post(client, "/v1/chat/completions", request + #", "stream": true}"#)
            var parts = ["", ""]
            var roles = 0
            for chunk in try events(streamed).chunks {
                for c in chunk["choices"] as? [[String: Any]] ?? [] {
                    let delta = c["delta"] as? [String: Any] ?? [:]
                    if delta["role"] as? String == "assistant" { roles += 1 }
                    parts[c["index"] as! Int] += delta["content"] as? String ?? ""
                }
            }
            #expect(parts == whole)
            #expect(roles == 2)
        }
    }

    @Test func stopStringsEndTheText() async throws {
        let f = try ServerFixture()
        let full = try f.greedyContinuation("In the beginning", maxTokens: 24)
        let stop = " the LORD"
        let cut = try #require(full.firstRange(of: stop))
        try await f.test { client in
            for stream in [false, true] {
                let (_, body) = try await post(client, "/v1/completions",
                    #"{"model": "demo", "prompt": "In the beginning", "max_tokens": 24, "temperature": 0, "stop": ["\#(stop)", "zzz"], "stream": \#(stream)}"#)
                let chunks = stream ? try events(body).chunks : [try object(body)]
                let choices = chunks.flatMap { $0["choices"] as? [[String: Any]] ?? [] }
                #expect(choices.compactMap { $0["text"] as? String }.joined() == String(full[..<cut.lowerBound]))
                #expect(choices.last?["finish_reason"] as? String == "stop")
            }
        }
    }

    /// Each bad request gets 400 with an OpenAI error body naming the field.
    @Test(arguments: [
        (#"{"model": "demo", "prompt": "a", "temperature": 3}"#, "temperature"),
        (#"{"model": "demo", "prompt": "a", "temperature": "warm"}"#, "temperature"),
        (#"{"model": "demo", "prompt": "a", "top_p": 0}"#, "top_p"),
        (#"{"model": "demo", "prompt": "a", "max_tokens": -1}"#, "max_tokens"),
        (#"{"model": "demo", "prompt": "a", "max_tokens": 1.5}"#, "max_tokens"),
        (#"{"model": "demo", "prompt": "a", "n": 0}"#, "n"),
        (#"{"model": "demo", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
        (#"{"model": "demo", "prompt": "a", "stop": 7}"#, "stop"),
        (#"{"model": "demo", "prompt": "a", "logprobs": 9}"#, "logprobs"),
        (#"{"model": "demo", "prompt": [1, 99999999]}"#, "prompt"),
        (#"{"model": "demo", "prompt": {"text": "a"}}"#, "prompt"),
        (#"{"model": "demo"}"#, "prompt"),
        (#"{"model": "other", "prompt": "a"}"#, "model"),
        (#"{"prompt": "a"}"#, "model"),
        (#"{"model": "demo", "prompt": "a", "presence_penalty": 1}"#, "presence_penalty"),
        (#"{"model": "demo", "prompt": "a", "max_tokens": 5000}"#, "max_tokens"),
    ])
    func badCompletionRequestsNameTheField(body: String, param: String) async throws {
        let f = try ServerFixture()
        try await f.test { client in
            let (status, text) = try await post(client, "/v1/completions", body)
            #expect(status == 400)
            let error = try #require(try object(text)["error"] as? [String: Any])
            #expect(error["param"] as? String == param, "\(text)")
            #expect(error["type"] as? String == "invalid_request_error")
        }
    }

    @Test(arguments: [
        (#"{"model": "demo", "messages": []}"#, "messages"),
        (#"{"model": "demo", "messages": [{"content": "hi"}]}"#, "messages.0.role"),
        (#"{"model": "demo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#, "messages.0.content"),
        (#"{"model": "demo", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}"#, "messages"),
        (#"{"model": "demo", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}"#, "top_logprobs"),
        (#"{"model": "demo", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "max_completion_tokens": 1}"#, "max_tokens"),
    ])
    func badChatRequestsNameTheField(body: String, param: String) async throws {
        let f = try ServerFixture()
        try await f.test { client in
            let (status, text) = try await post(client, "/v1/chat/completions", body)
            #expect(status == 400)
            #expect((try object(text)["error"] as? [String: Any])?["param"] as? String == param, "\(text)")
        }
    }

    @Test func malformedJSONAndUnknownRoutes() async throws {
        let f = try ServerFixture()
        try await f.test { client in
            let (status, text) = try await post(client, "/v1/completions", #"{"model": "demo", "prompt": "#)
            #expect(status == 400)
            #expect(((try object(text)["error"] as? [String: Any])?["message"] as? String)?.contains("not valid JSON") == true)
            let (missing, _) = try await post(client, "/v1/embeddings", "{}")
            #expect(missing == 404)
        }
    }

    @Test func theAPIKeyGuardsV1Only() async throws {
        let f = try ServerFixture(apiKey: "sesame")
        try await f.test { client in
            let body = #"{"model": "demo", "prompt": "a", "max_tokens": 1}"#
            #expect(try await post(client, "/v1/completions", body).0 == 401)
            #expect(try await post(client, "/v1/completions", body, key: "wrong").0 == 401)
            #expect(try await post(client, "/v1/completions", body, key: "sesame").0 == 200)
            let health = try await client.execute(uri: "/health", method: .get) { Int($0.status.code) }
            #expect(health == 200)
            let models = try await client.execute(uri: "/v1/models", method: .get) { Int($0.status.code) }
            #expect(models == 401)
        }
    }

    @Test func metricsCountRequestsAndTokens() async throws {
        let f = try ServerFixture()
        try await f.test { client in
            _ = try await post(client, "/v1/completions", #"{"model": "demo", "prompt": "a", "max_tokens": 3, "temperature": 0}"#)
            _ = try await post(client, "/v1/completions", #"{"model": "demo", "prompt": "a", "n": 99}"#)
            let text = try await client.execute(uri: "/metrics", method: .get) { String(buffer: $0.body) }
            #expect(text.contains(#"duet_requests_total{route="/v1/completions",status="200"} 1"#))
            #expect(text.contains(#"duet_requests_total{route="/v1/completions",status="400"} 1"#))
            #expect(text.contains("duet_generated_tokens_total 3"))
            #expect(text.contains("duet_expert_hit_rate 0"))
        }
    }

    /// Concurrent requests share steps but each gets its own greedy answer.
    @Test func concurrentRequestsGetTheirOwnAnswers() async throws {
        let f = try ServerFixture(maxConcurrency: 3)
        let prompts = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are", "Thou shalt", "For God so loved"]
        let expected = try prompts.map { try f.greedyContinuation($0, maxTokens: 8) }
        try await f.test { client in
            let answers = try await withThrowingTaskGroup(of: (Int, String).self) { group in
                for (i, p) in prompts.enumerated() {
                    group.addTask {
                        let (_, body) = try await post(client, "/v1/completions", #"{"model": "demo", "prompt": "\#(p)", "max_tokens": 8, "temperature": 0}"#)
                        return (i, (try object(body)["choices"] as? [[String: Any]])?.first?["text"] as? String ?? "?")
                    }
                }
                var out = [String](repeating: "", count: prompts.count)
                for try await (i, text) in group { out[i] = text }
                return out
            }
            #expect(answers == expected)
        }
    }
}

@Suite struct EngineTests {
    /// Cancelling a request stops its sequence: its stream ends without a finish, nothing
    /// stays active, and no more tokens are generated. (The engine may run ahead of a slow
    /// consumer, so the count is compared before and after, not with a fixed bound.)
    @Test func cancellingAHandleStopsItsSequence() async throws {
        let f = try ServerFixture()
        let handle = f.engine.submit([.init(prompt: [1, 2, 3], options: GenerationOptions(maxTokens: 2000, stopTokenIds: []))])
        var seen = 0, finished = false
        for await event in handle.events {
            if case .token = event.event { seen += 1 }
            if case .finished = event.event { finished = true }
            if seen == 3 { handle.cancel() }
        }
        #expect(!finished)
        try await Task.sleep(for: .milliseconds(300))
        let settled = f.engine.load
        #expect(settled.active == 0 && settled.queued == 0)
        #expect(settled.generatedTokens < 2000)
        try await Task.sleep(for: .milliseconds(300))
        #expect(f.engine.load.generatedTokens == settled.generatedTokens)
    }
}

@Suite struct ChoiceTextTests {
    let tokenizer: Tokenizer
    init() throws { tokenizer = try Tokenizer(path: demoModelDirectory + "/tokenizer.json") }

    /// Pieces joined equal the plain decode; a stop string split over tokens is cut out,
    /// and text that might start it is held back until it cannot.
    @Test func stopStringsAcrossTokens() throws {
        let ids = try tokenizer.encode("And the LORD said unto Moses", addSpecialTokens: false)
        func run(_ stops: [String]) throws -> (String, Bool, [String]) {
            var text = try ChoiceText(tokenizer: tokenizer, stops: stops)
            var pieces = try ids.map { try text.push($0) }
            pieces.append(try text.finish())
            return (pieces.joined(), text.stopped, pieces)
        }
        let whole = try tokenizer.decode(ids)
        #expect(try run([]).0 == whole)
        let (cut, stopped, _) = try run(["LORD s"])
        #expect(cut == "And the ")
        #expect(stopped)
        let (never, neverStopped, pieces) = try run(["LORD x"])
        #expect(never == whole && !neverStopped)
        #expect(pieces.contains { $0.hasPrefix("LORD") })  // "LORD" was held until " said" ruled the stop out
    }
}
