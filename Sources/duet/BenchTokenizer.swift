import ArgumentParser
import DuetCore
import DuetFormats
import DuetTokenizer
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct BenchTokenizer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenizer",
        abstract: "Encode speed on one core, document by document, beside HF tokenizers' figure.")

    @Option(name: .long, help: "tokenizer.json (or .json.gz).")
    var tokenizer: String

    @Option(name: .long, help: "Corpus text, split into documents at blank lines (scripts/fetch_corpus.sh).")
    var corpus: String = ".corpus/kjv.txt"

    @Option(name: .long, help: "JSON list of extra documents (the golden strings).")
    var strings: String = "Tests/Fixtures/tokenizers/strings.json"

    @Option(name: .long, help: "HF tokenizers' figure, from scripts/bench_tokenizer_hf.py.")
    var reference: String?

    @Option(name: .long, help: "Passes; the best is reported.")
    var repeats = 3

    @Flag(name: .long, help: "Print only the JSON row.")
    var json = false

    func run() throws {
        let loadStart = ContinuousClock.now
        let tok = try loadTokenizer(tokenizer)
        let loadSeconds = secondsSince(loadStart)
        let docs = try documents()
        let bytes = docs.reduce(0) { $0 + $1.utf8.count }
        var best = Double.infinity, tokens = 0
        for _ in 0..<max(1, repeats) {
            let start = ContinuousClock.now
            var n = 0
            for d in docs { n += try tok.encode(d).count }
            best = min(best, secondsSince(start))
            tokens = n
        }
        var row = Row(tokenizer: tokenizer, documents: docs.count, bytes: bytes, tokens: tokens, seconds: best,
                      mbPerSecond: Double(bytes) / best / 1e6, tokensPerSecond: Double(tokens) / best, loadSeconds: loadSeconds)
        if let reference {
            let hf = try JSONDecoder().decode(Reference.self, from: Data(readSmallFile(reference)))
            guard hf.bytes == bytes else {
                throw CLIError("\(reference) measured a different corpus (\(hf.bytes) bytes, here \(bytes))")
            }
            row.hfMBPerSecond = hf.mb_per_s
            row.ratioToHF = row.mbPerSecond / hf.mb_per_s
            row.hfTokens = hf.tokens
        }
        try Console.json(row)
        if !json {
            Console.out("""
                documents \(docs.count), \(fixed(Double(bytes) / 1e6, 2)) MB, \(tokens) tokens (HF: \(row.hfTokens.map(String.init) ?? "-"))
                duet   \(fixed(row.mbPerSecond, 2)) MB/s  \(fixed(row.tokensPerSecond / 1e6, 3)) M tok/s  (load \(fixed(loadSeconds, 2)) s)
                hf     \(row.hfMBPerSecond.map { fixed($0, 2) } ?? "-") MB/s  ratio duet/hf \(row.ratioToHF.map { fixed($0, 2) } ?? "-")\n
                """)
        }
    }

    private func documents() throws -> [String] {
        let extra = try JSONDecoder().decode([String].self, from: Data(readSmallFile(strings)))
        let text = try readSmallFile(corpus)
        var docs = extra
        var start = 0, i = 0
        while i + 1 < text.count {  // split at "\n\n", dropping empty documents (as the HF script)
            if text[i] == 0x0A && text[i + 1] == 0x0A {
                if i > start { docs.append(String(decoding: text[start..<i], as: UTF8.self)) }
                start = i + 2
                i += 2
            } else {
                i += 1
            }
        }
        if start < text.count { docs.append(String(decoding: text[start...], as: UTF8.self)) }
        return docs
    }

    struct Reference: Decodable {
        let bytes: Int
        let tokens: Int
        let mb_per_s: Double
    }

    struct Row: Encodable {
        var bench = "tokenizer"
        var tokenizer: String
        var documents: Int
        var bytes: Int
        var tokens: Int
        var seconds: Double
        var mbPerSecond: Double
        var tokensPerSecond: Double
        var loadSeconds: Double
        var hfMBPerSecond: Double?
        var ratioToHF: Double?
        var hfTokens: Int?
        enum CodingKeys: String, CodingKey {
            case bench, tokenizer, documents, bytes, tokens, seconds
            case mbPerSecond = "mb_per_s", tokensPerSecond = "tokens_per_s", loadSeconds = "load_s"
            case hfMBPerSecond = "hf_mb_per_s", ratioToHF = "ratio_to_hf", hfTokens = "hf_tokens"
        }
    }
}

/// tokenizer.json, or a gzipped one (decompressed through the system's gzip).
func loadTokenizer(_ path: String) throws -> Tokenizer {
    guard path.hasSuffix(".gz") else { return try Tokenizer(path: path) }
    guard let bytes = gunzipFile(path) else {
        throw CLIError("could not decompress \(path) with gzip")
    }
    return try Tokenizer(json: bytes, file: path)
}
