import ArgumentParser
import DuetFormats
import DuetTokenizer

/// Where a tokenizer comes from: a model directory or a tokenizer.json.
struct TokenizerSource: ParsableArguments {
    @Option(name: .long, help: "Model directory holding tokenizer.json.")
    var model: String?

    @Option(name: .long, help: "A tokenizer.json file.")
    var tokenizer: String?

    func validate() throws {
        guard (model == nil) != (tokenizer == nil) else { throw ValidationError("give exactly one of --model and --tokenizer") }
    }

    func load() throws -> Tokenizer {
        try Tokenizer(path: tokenizer ?? joinPath(model!, "tokenizer.json"))
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the token ids of a text (or, with --decode, the text of ids), as HF tokenizers would.")

    @OptionGroup var source: TokenizerSource

    @Option(name: .long, help: "The text (with --decode: comma-separated ids).")
    var text: String?

    @Option(name: .long, help: "Read the text from a file.")
    var file: String?

    @Flag(name: .long, help: "Turn ids back into text.")
    var decode = false

    @Flag(name: .long, help: "Do not add special tokens (BOS/EOS) when encoding; drop them when decoding.")
    var noSpecialTokens = false

    @Flag(name: .long, help: "Print one JSON object: {\"ids\": [...]} (with --decode: {\"text\": ...}).")
    var json = false

    func validate() throws {
        guard (text == nil) != (file == nil) else { throw ValidationError("give exactly one of --text and --file") }
    }

    func run() throws {
        let tokenizer = try source.load()
        let input = try text ?? String(decoding: readSmallFile(file!), as: UTF8.self)
        if decode {
            let ids = try parseIds(input, option: "--text")
            let out = try tokenizer.decode(ids, skipSpecialTokens: noSpecialTokens)
            if json { try Console.json(["text": out]) } else { Console.out(out + "\n") }
            return
        }
        let ids = try tokenizer.encode(input, addSpecialTokens: !noSpecialTokens)
        if json { try Console.json(["ids": ids]) } else { Console.out(ids.map(String.init).joined(separator: " ") + "\n") }
    }
}

/// "1, 2,3" -> [1, 2, 3]; a clear error otherwise.
func parseIds(_ s: String, option: String) throws -> [Int32] {
    let parts = s.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\n" })
    let ids = parts.map { Int32($0) }
    guard !ids.isEmpty, ids.allSatisfy({ $0 != nil && $0! >= 0 }) else {
        throw ValidationError("\(option) must be comma-separated non-negative token ids, got '\(s.prefix(80))'")
    }
    return ids.map { $0! }
}
