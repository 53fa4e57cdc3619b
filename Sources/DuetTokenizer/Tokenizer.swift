#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetFormats

/// A Hugging Face `tokenizer.json` tokenizer, producing the ids HF tokenizers produces.
///
/// Encode: added/special tokens are cut out of the raw text first (never split), the rest
/// is normalized, pre-tokenized into words, and each word is run through BPE; the
/// post-processor then adds BOS/EOS. Decode maps ids to token strings and runs the
/// decoder chain. Immutable once loaded, so one instance serves every thread.
public final class Tokenizer: Sendable {
    public let addedTokens: [AddedToken]
    let model: BPEModel
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let postProcessor: PostProcessor?
    let decoder: TokenDecoder?
    /// Added tokens matched in the raw text / in the normalized text.
    let rawMatcher: AddedTokenMatcher
    let normalizedMatcher: AddedTokenMatcher
    /// Added token id -> entry.
    let addedById: [Int32: AddedToken]

    /// Loads `path` (tokenizer.json).
    public convenience init(path: String) throws(TokenizerError) {
        let bytes: [UInt8]
        do { bytes = try readSmallFile(path) } catch {
            if case .fileNotFound = error { throw .fileNotFound(path: path) }
            throw .malformed(file: path, reason: error.description)
        }
        try self.init(json: bytes, file: path)
    }

    /// Parses tokenizer.json contents; `file` names it in errors.
    public init(json bytes: [UInt8], file: String) throws(TokenizerError) {
        let doc: TokenizerFile
        do {
            doc = try JSONDecoder().decode(TokenizerFile.self, from: Data(bytes))
        } catch {
            throw .malformed(file: file, reason: describe(error))
        }
        guard let bpe = doc.model else {
            throw .unsupported(file: file, component: "model", detail: "'\(doc.modelType ?? "?")' (supported: BPE)")
        }
        preTokenizer = try PreTokenizer.parse(doc.pre_tokenizer ?? .null, file: file)
        try preTokenizer?.validateByteLevelPlacement(file: file)
        normalizer = try Normalizer.parse(doc.normalizer ?? .null, file: file)
        postProcessor = try PostProcessor.parse(doc.post_processor ?? .null, file: file)
        decoder = try TokenDecoder.parse(doc.decoder ?? .null, file: file)
        model = try BPEModel(bpe, byteLevel: preTokenizer?.isByteLevel ?? false, file: file)
        addedTokens = try doc.added_tokens.map { (t) throws(TokenizerError) -> AddedToken in
            guard t.id >= 0, !t.content.isEmpty else { throw .malformed(file: file, reason: "added token '\(t.content)' id \(t.id)") }
            return AddedToken(id: Int32(t.id), content: t.content, special: t.special ?? false, normalized: t.normalized ?? !(t.special ?? false),
                              singleWord: t.single_word ?? false, lstrip: t.lstrip ?? false, rstrip: t.rstrip ?? false)
        }
        rawMatcher = AddedTokenMatcher(addedTokens.filter { !$0.normalized })
        normalizedMatcher = AddedTokenMatcher(addedTokens.filter { $0.normalized })
        addedById = Dictionary(addedTokens.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
    }

    /// Number of ids (model vocabulary plus added tokens beyond it).
    public var vocabularySize: Int { max(model.tokens.count, (addedTokens.map { Int($0.id) }.max() ?? -1) + 1) }

    /// The id of a token string (model vocabulary or added token).
    public func id(of token: String) -> Int32? {
        if let t = addedTokens.first(where: { $0.content == token }) { return t.id }
        return model.tokens.firstIndex(of: token).map { Int32($0) }
    }

    // MARK: encode

    /// Token ids of `text`; `addSpecialTokens` applies the post-processor (BOS etc.).
    public func encode(_ text: String, addSpecialTokens: Bool = true) throws(TokenizerError) -> [Int32] {
        var ids: [Int32] = []
        for segment in rawMatcher.split(Array(text.utf8), atStart: true) {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let bytes, let atStart):
                let normalized = normalizer?.apply(bytes) ?? bytes
                let startSpan = atStart ? firstCharacterSpan(bytes) : 0
                for inner in normalizedMatcher.split(normalized, atStart: startSpan > 0) {
                    switch inner {
                    case .token(let id): ids.append(id)
                    case .text(let b, let s): try encodeWords(b, startSpan: s ? startSpan : 0, into: &ids)
                    }
                }
            }
        }
        return addSpecialTokens ? (postProcessor?.apply(ids) ?? ids) : ids
    }

    private func encodeWords(_ bytes: [UInt8], startSpan: Int, into ids: inout [Int32]) throws(TokenizerError) {
        var pieces = Pieces(bytes, startSpan: startSpan)
        preTokenizer?.apply(&pieces)
        try pieces.buffer.withUnsafeBufferPointer { (p) throws(TokenizerError) in
            for r in pieces.ranges where !r.isEmpty {
                try model.tokenize(p.baseAddress! + r.lowerBound, r.count, into: &ids)
            }
        }
    }

    /// Bytes of the normalized text that come from the input's first character: what the
    /// normalizer makes of that character alone, or 0 when normalizing drops it (Strip).
    private func firstCharacterSpan(_ bytes: [UInt8]) -> Int {
        guard let lead = bytes.first else { return 0 }
        let first = Array(bytes.prefix(scalarLength(lead)))
        guard let normalizer else { return first.count }
        return normalizer.dropsStart(bytes) ? 0 : normalizer.apply(first).count
    }

    // MARK: decode

    /// The token string of `id`.
    public func token(_ id: Int32) throws(TokenizerError) -> String {
        if let t = addedById[id] { return t.content }
        guard id >= 0, Int(id) < model.tokens.count else { throw .unknownTokenId(id) }
        return model.tokens[Int(id)]
    }

    /// Text of `ids`; special added tokens are dropped when `skipSpecialTokens` is set.
    public func decode(_ ids: some Collection<Int32>, skipSpecialTokens: Bool = false) throws(TokenizerError) -> String {
        var tokens: [[UInt8]] = []
        tokens.reserveCapacity(ids.count)
        for id in ids {
            if skipSpecialTokens, addedById[id]?.special == true { continue }
            tokens.append(Array(try token(id).utf8))
        }
        guard let decoder else {
            return tokens.map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ")
        }
        return String(decoding: decoder.decode(tokens).flatMap { $0 }, as: UTF8.self)
    }
}

/// The parts of tokenizer.json Duet reads; components stay dynamic until parsed.
struct TokenizerFile: Decodable {
    struct Added: Decodable {
        let id: Int
        let content: String
        let single_word: Bool?
        let lstrip: Bool?
        let rstrip: Bool?
        let normalized: Bool?
        let special: Bool?
    }
    let added_tokens: [Added]
    let normalizer: JSONValue?
    let pre_tokenizer: JSONValue?
    let post_processor: JSONValue?
    let decoder: JSONValue?
    /// nil when the model is not BPE (`modelType` says what it is).
    let model: BPEModelFile?
    let modelType: String?

    private struct TypeProbe: Decodable { let type: String? }

    enum CodingKeys: String, CodingKey { case added_tokens, normalizer, pre_tokenizer, post_processor, decoder, model }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        added_tokens = try c.decodeIfPresent([Added].self, forKey: .added_tokens) ?? []
        normalizer = try c.decodeIfPresent(JSONValue.self, forKey: .normalizer)
        pre_tokenizer = try c.decodeIfPresent(JSONValue.self, forKey: .pre_tokenizer)
        post_processor = try c.decodeIfPresent(JSONValue.self, forKey: .post_processor)
        self.decoder = try c.decodeIfPresent(JSONValue.self, forKey: .decoder)
        modelType = try c.decode(TypeProbe.self, forKey: .model).type
        model = modelType == "BPE" || modelType == nil ? try c.decode(BPEModelFile.self, forKey: .model) : nil
    }
}
