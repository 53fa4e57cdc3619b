import DuetTokenizer

/// One choice's generated ids turned into text pieces as they come: complete UTF-8 only
/// (`StreamingDecoder`), and `stop` strings cut out — text that could be the start of a
/// stop string is held back until it is known not to be. Streamed and whole responses are
/// both the concatenation of these pieces, so they agree by construction.
struct ChoiceText {
    private var decoder: StreamingDecoder
    private let stops: [String]
    /// Decoded text not handed out yet: it may begin a stop string.
    private var held = ""
    /// A stop string was found; nothing more comes out.
    private(set) var stopped = false
    /// Every piece handed out so far, joined.
    private(set) var text = ""

    /// `context`: ids the text continues (a completion's prompt), so the first piece carries
    /// the spacing it has after them.
    init(tokenizer: Tokenizer, stops: [String], context: [Int32] = []) throws(TokenizerError) {
        decoder = try StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true, context: context)
        self.stops = stops.filter { !$0.isEmpty }
    }

    /// The text `id` releases (possibly empty).
    mutating func push(_ id: Int32) throws(TokenizerError) -> String {
        guard !stopped else { return "" }
        return release(held + (try decoder.step(id) ?? ""), final: false)
    }

    /// What is left at the end of the sequence.
    mutating func finish() throws(TokenizerError) -> String {
        guard !stopped else { return "" }
        return release(held + (try decoder.finish()), final: true)
    }

    private mutating func release(_ pending: String, final: Bool) -> String {
        held = ""
        // The earliest stop string ends the text just before it.
        var cut: String.Index? = nil
        for stop in stops {
            if let r = pending.firstRange(of: stop), cut == nil || r.lowerBound < cut! { cut = r.lowerBound }
        }
        if let cut {
            stopped = true
            return emit(String(pending[..<cut]))
        }
        guard !final else { return emit(pending) }
        // Hold back the longest tail that some stop string starts with.
        let keep = longestStopPrefixSuffix(pending)
        held = String(pending.suffix(keep))
        return emit(String(pending.dropLast(keep)))
    }

    /// Length (in Characters) of the longest suffix of `s` that is a proper prefix of a stop string.
    private func longestStopPrefixSuffix(_ s: String) -> Int {
        var best = 0
        for stop in stops {
            var n = min(stop.count - 1, s.count)
            while n > best {
                if stop.hasPrefix(s.suffix(n)) { best = n; break }
                n -= 1
            }
        }
        return best
    }

    private mutating func emit(_ piece: String) -> String {
        text += piece
        return piece
    }
}
