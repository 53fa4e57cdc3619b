#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetFormats
import DuetTestSupport
import DuetTokenizer
import Testing

/// Small tokenizers built and trained with HF tokenizers (scripts/make_tokenizer_goldens.py),
/// covering what the real vocabularies do not: Metaspace, Digits, NFKC, Lowercase, Strip,
/// unk fusing, added-token flags (lstrip, rstrip, single_word, normalized), every Split
/// behavior, regex fallbacks, string-form merges.
struct ComponentGolden: Decodable {
    struct Case: Decodable {
        let string: Int
        let ids: [Int32]
        let decoded: String
        let decoded_skip_special: String
    }
    let cases: [String: [Case]]
}

private let componentNames = ["metaspace", "string-merges", "split-removed", "split-previous", "split-next",
                              "split-contiguous-inverted", "digits-bytelevel"]

@Suite struct ComponentTests {
    static let golden: ComponentGolden = try! JSONDecoder().decode(
        ComponentGolden.self, from: Data(fixtureBytes("tokenizers/components.golden.json.gz")))

    @Test(arguments: componentNames)
    func matchesHFTokenizers(name: String) throws {
        let tokenizer = try Tokenizer(path: fixture("tokenizers/components/\(name).json"))
        let cases = try #require(Self.golden.cases[name])
        #expect(cases.count > 250)
        var failures: [String] = []
        for c in cases {
            let s = Fixtures.strings[c.string]
            let ids = try tokenizer.encode(s)
            if ids != c.ids { failures.append("encode \(s.debugDescription.prefix(60)): \(ids.prefix(10)) vs HF \(c.ids.prefix(10))") }
            if try tokenizer.decode(c.ids) != c.decoded { failures.append("decode \(s.debugDescription.prefix(60))") }
            if try tokenizer.decode(c.ids, skipSpecialTokens: true) != c.decoded_skip_special {
                failures.append("decode(skip) \(s.debugDescription.prefix(60))")
            }
        }
        #expect(failures.isEmpty, "\(failures.count): \(failures.prefix(4))")
    }
}

/// Components Duet does not implement are refused by name, never run wrongly.
@Suite struct UnsupportedComponentTests {
    /// A minimal tokenizer.json with one component set.
    private func load(replacing key: String, with value: String) throws -> Tokenizer {
        var parts = ["normalizer": "null", "pre_tokenizer": "null", "post_processor": "null", "decoder": "null",
                     "model": #"{"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}"#]
        parts[key] = value
        let body = parts.sorted { $0.key < $1.key }.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ")
        return try Tokenizer(json: Array("{\"added_tokens\": [], \(body)}".utf8), file: "t.json")
    }

    @Test func minimalDocumentLoads() throws {
        #expect(try load(replacing: "decoder", with: "null").encode("abba") == [2, 1, 0])
    }

    @Test func unigramModel() throws {
        #expect(throws: TokenizerError.unsupported(file: "t.json", component: "model", detail: "'Unigram' (supported: BPE)")) {
            _ = try load(replacing: "model", with: #"{"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]}"#)
        }
    }

    @Test func precompiledNormalizer() throws {
        #expect(throws: TokenizerError.unsupported(
            file: "t.json", component: "normalizer",
            detail: "'Precompiled' (supported: Prepend, Replace, NFC, NFKC, Lowercase, Strip, Sequence)")) {
            _ = try load(replacing: "normalizer", with: #"{"type": "Precompiled", "precompiled_charsmap": "AAAA"}"#)
        }
    }

    @Test func whitespacePreTokenizer() throws {
        #expect(throws: TokenizerError.unsupported(
            file: "t.json", component: "pre_tokenizer",
            detail: "'BertPreTokenizer' (supported: Split, Digits, Metaspace, ByteLevel, Sequence)")) {
            _ = try load(replacing: "pre_tokenizer", with: #"{"type": "BertPreTokenizer"}"#)
        }
    }

    @Test func robertaProcessing() throws {
        #expect(throws: TokenizerError.unsupported(
            file: "t.json", component: "post_processor", detail: "'RobertaProcessing' (supported: TemplateProcessing, ByteLevel, Sequence)")) {
            _ = try load(replacing: "post_processor", with: #"{"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}"#)
        }
    }

    @Test func wordPieceDecoder() throws {
        #expect(throws: TokenizerError.unsupported(
            file: "t.json", component: "decoder",
            detail: "'WordPiece' (supported: Replace, ByteFallback, Fuse, Strip, Metaspace, ByteLevel, Sequence)")) {
            _ = try load(replacing: "decoder", with: ###"{"type": "WordPiece", "prefix": "##", "cleanup": true}"###)
        }
    }

    @Test func malformedFileAndMissingFile() throws {
        #expect(throws: TokenizerError.fileNotFound(path: "/nonexistent/tokenizer.json")) {
            _ = try Tokenizer(path: "/nonexistent/tokenizer.json")
        }
        #expect(throws: TokenizerError.malformed(file: "t.json", reason: "not valid JSON")) {
            _ = try Tokenizer(json: Array("{\"model\": ".utf8), file: "t.json")
        }
        #expect(throws: TokenizerError.malformed(file: "t.json", reason: "missing key 'model' at the top level")) {
            _ = try Tokenizer(json: Array("{\"added_tokens\": []}".utf8), file: "t.json")
        }
    }

    @Test func unknownIdIsAnError() throws {
        let t = try Tokenizer(path: fixture("tokenizers/components/metaspace.json"))
        #expect(throws: TokenizerError.unknownTokenId(100_000)) { _ = try t.decode([5, 100_000]) }
    }
}
