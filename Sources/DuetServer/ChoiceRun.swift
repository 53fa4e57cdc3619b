import DuetRuntime
import DuetTokenizer

/// The choices of one request as the engine's events arrive: text pieces, token counts,
/// log-probabilities and finish reasons. Streamed and whole answers are both built from
/// the pieces `apply` returns.
struct ChoiceRun {
    struct Choice {
        var text: ChoiceText
        var tokens = 0
        var finish: String?
        var logprobs: [(id: Int32, logprob: TokenLogprob)] = []
    }

    /// New text of one choice, the token that released it (when log-probabilities are
    /// asked for), and the finish reason on the last piece.
    struct Piece {
        var choice: Int
        var text: String
        var token: (id: Int32, logprob: TokenLogprob)?
        var finish: String?
    }

    private(set) var choices: [Choice]
    /// Why the engine failed the request (nil: it did not).
    private(set) var failure: String?

    init(plan: Handlers.Plan, tokenizer: Tokenizer) throws {
        choices = try plan.contexts.map { Choice(text: try ChoiceText(tokenizer: tokenizer, stops: plan.stops, context: $0)) }
    }

    var completionTokens: Int { choices.reduce(0) { $0 + $1.tokens } }

    mutating func apply(_ e: InferenceEngine.Event, _ handle: InferenceEngine.Handle) throws -> [Piece] {
        let i = e.choice
        guard choices.indices.contains(i), choices[i].finish == nil else {
            if case .failed(let error) = e.event, failure == nil { failure = error.description }
            return []
        }
        switch e.event {
        case .token(let id, let logprob):
            choices[i].tokens += 1
            let text = try choices[i].text.push(id)
            let token = logprob.map { (id, $0) }
            if let token { choices[i].logprobs.append(token) }
            if choices[i].text.stopped {
                // A stop string: the choice ends here; the engine stops generating it.
                choices[i].finish = "stop"
                handle.cancel(choice: i)
            }
            return [Piece(choice: i, text: text, token: token, finish: choices[i].finish)]
        case .finished(let result):
            let text = try choices[i].text.finish()
            choices[i].finish = result.finishReason == .stop ? "stop" : "length"
            return [Piece(choice: i, text: text, token: nil, finish: choices[i].finish)]
        case .failed(let error):
            failure = failure ?? error.description
            choices[i].finish = "error"
            return []
        }
    }

    // MARK: log-probabilities in the API's two shapes

    private func tokenText(_ id: Int32, _ tokenizer: Tokenizer) -> String {
        (try? tokenizer.decode([id])) ?? ""
    }

    func chatEntry(_ token: (id: Int32, logprob: TokenLogprob), tokenizer: Tokenizer) -> ChatLogprobs.Entry {
        let text = tokenText(token.id, tokenizer)
        return ChatLogprobs.Entry(token: text, logprob: token.logprob.logprob, bytes: Array(text.utf8),
                                  topLogprobs: token.logprob.top.map { alt in
                                      let t = tokenText(alt.id, tokenizer)
                                      return .init(token: t, logprob: alt.logprob, bytes: Array(t.utf8))
                                  })
    }

    func chatLogprobs(_ i: Int, tokenizer: Tokenizer) -> ChatLogprobs {
        ChatLogprobs(content: choices[i].logprobs.map { chatEntry($0, tokenizer: tokenizer) })
    }

    func completionLogprobs(_ i: Int, tokenizer: Tokenizer, offset: Int) -> CompletionLogprobs {
        completionLogprobs(of: choices[i].logprobs, tokenizer: tokenizer, offset: offset)
    }

    /// `text_offset` counts UTF-8 bytes from the start of the choice's text (after any echo).
    func completionLogprobs(of tokens: [(id: Int32, logprob: TokenLogprob)], tokenizer: Tokenizer, offset: Int) -> CompletionLogprobs {
        var out = CompletionLogprobs()
        var position = offset
        for token in tokens {
            let text = tokenText(token.id, tokenizer)
            out.tokens.append(text)
            out.tokenLogprobs.append(token.logprob.logprob)
            var top: [String: Double] = [:]
            for alt in token.logprob.top {
                let t = tokenText(alt.id, tokenizer)
                top[t] = max(top[t] ?? -.infinity, alt.logprob)  // two ids may decode alike
            }
            out.topLogprobs.append(top)
            out.textOffset.append(position)
            position += text.utf8.count
        }
        return out
    }
}
