/// Turns ids into text one at a time for streaming output, emitting only complete UTF-8:
/// a character split across byte-fallback or byte-level tokens is held back until its
/// last byte arrives. Same algorithm as HF's `DecodeStream`: decode a short window of
/// recent ids and emit what it adds beyond the window's prefix, so decoders that look at
/// the first token (Strip, Metaspace) behave as in a whole decode.
public struct StreamingDecoder {
    public let tokenizer: Tokenizer
    public let skipSpecialTokens: Bool
    private var ids: [Int32] = []
    private var prefix = ""
    private var prefixIndex = 0

    /// `context`: ids already shown (the prompt), so the first emitted text is what the new
    /// ids add to it (" of", with its space) rather than a fresh decode ("of").
    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = false, context: [Int32] = []) throws(TokenizerError) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
        if !context.isEmpty {
            ids = context
            prefix = try tokenizer.decode(context, skipSpecialTokens: skipSpecialTokens)
            prefixIndex = context.count
        }
    }

    /// The text `id` completes, or nil while a character is still incomplete.
    public mutating func step(_ id: Int32) throws(TokenizerError) -> String? {
        ids.append(id)
        let text = try tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens)
        // (Scalars, not Characters: U+FFFD after a prepended mark such as U+06DD is one grapheme.)
        guard text.utf8.count > prefix.utf8.count, text.unicodeScalars.last != "\u{FFFD}", text.utf8.starts(with: prefix.utf8) else {
            return nil
        }
        let new = String(decoding: text.utf8.dropFirst(prefix.utf8.count), as: UTF8.self)
        let newPrefixIndex = ids.count - prefixIndex
        ids.removeFirst(prefixIndex)
        prefix = try tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens)
        prefixIndex = newPrefixIndex
        return new
    }

    /// What is still held back (bytes that never became a complete character), at the end.
    public mutating func finish() throws(TokenizerError) -> String {
        let text = try tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens)
        defer { ids = []; prefix = ""; prefixIndex = 0 }
        guard text.utf8.count > prefix.utf8.count, text.utf8.starts(with: prefix.utf8) else { return "" }
        return String(decoding: text.utf8.dropFirst(prefix.utf8.count), as: UTF8.self)
    }
}
