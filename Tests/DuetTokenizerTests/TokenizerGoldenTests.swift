#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetFormats
import DuetTestSupport
import DuetTokenizer
import Testing

/// HF tokenizers' output on the golden strings (scripts/make_tokenizer_goldens.py).
struct TokenizerGolden: Decodable {
    struct Case: Decodable {
        let ids: [Int32]
        let decoded: String
        let decoded_skip_special: String
    }
    let cases: [Case]
}

enum Fixtures {
    static let strings: [String] = try! JSONDecoder().decode(
        [String].self, from: Data(readSmallFile(fixture("tokenizers/strings.json"))))

    static func golden(_ name: String) throws -> TokenizerGolden {
        try JSONDecoder().decode(TokenizerGolden.self, from: Data(fixtureBytes("tokenizers/\(name).golden.json.gz")))
    }

    /// Mixtral's tokenizer ships with the demo model, which uses it.
    static let mixtral: Tokenizer = try! Tokenizer(path: demoModelDirectory + "/tokenizer.json")
    /// Qwen's tokenizer.json is stored gzipped (19 MB raw).
    static let qwen: Tokenizer = {
        let path = fixture("tokenizers/qwen/tokenizer.json.gz")
        return try! Tokenizer(json: gunzip(path)!, file: path)
    }()
}

private func check(_ tokenizer: Tokenizer, _ golden: TokenizerGolden) throws {
    let strings = Fixtures.strings
    #expect(strings.count >= 1000)
    #expect(golden.cases.count == strings.count)
    var idMismatches: [String] = [], decodeMismatches: [String] = [], streamMismatches: [String] = []
    for (s, c) in zip(strings, golden.cases) {
        let ids = try tokenizer.encode(s)
        if ids != c.ids { idMismatches.append("\(s.debugDescription.prefix(80)): \(ids.prefix(12)) vs HF \(c.ids.prefix(12))") }
        if try tokenizer.decode(c.ids) != c.decoded || tokenizer.decode(c.ids, skipSpecialTokens: true) != c.decoded_skip_special {
            decodeMismatches.append(s.debugDescription)
        }
        var stream = try StreamingDecoder(tokenizer: tokenizer)
        var text = ""
        for id in c.ids { text += try stream.step(id) ?? "" }
        text += try stream.finish()
        if text != c.decoded { streamMismatches.append("\(s.debugDescription.prefix(60)): \(text.debugDescription.prefix(60))") }
    }
    #expect(idMismatches.isEmpty, "\(idMismatches.count) strings: \(idMismatches.prefix(5))")
    #expect(decodeMismatches.isEmpty, "\(decodeMismatches.count) strings: \(decodeMismatches.prefix(5))")
    #expect(streamMismatches.isEmpty, "\(streamMismatches.count) strings: \(streamMismatches.prefix(5))")
}

@Suite(.serialized) struct TokenizerGoldenTests {
    @Test func mixtralMatchesHFTokenizers() throws {
        try check(Fixtures.mixtral, try Fixtures.golden("mixtral"))
    }

    @Test func qwenMatchesHFTokenizers() throws {
        try check(Fixtures.qwen, try Fixtures.golden("qwen"))
    }

    /// Where HF round-trips a string (decode(encode(s)) == s), so does Duet.
    @Test func roundTripWhereTheReferenceDoes() throws {
        for (name, tokenizer) in [("mixtral", Fixtures.mixtral), ("qwen", Fixtures.qwen)] {
            let golden = try Fixtures.golden(name)
            var roundTrips = 0, failures: [String] = []
            for (s, c) in zip(Fixtures.strings, golden.cases) where c.decoded_skip_special == s {
                roundTrips += 1
                if try tokenizer.decode(tokenizer.encode(s), skipSpecialTokens: true) != s { failures.append(s) }
            }
            #expect(roundTrips > 900, "\(name): only \(roundTrips) reference round trips")
            #expect(failures.isEmpty, "\(name): \(failures.prefix(3))")
        }
    }
}
