#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetFormats

/// HF transformers' outputs on a golden checkpoint, as scripts/make_goldens.py writes them
/// (fp32 on the stored weights): read by the model tests and by `duet selftest --gpu`.
public struct HFGolden: Decodable, Sendable {
    public struct Case: Decodable, Sendable {
        /// Prompt ids.
        public let prompt: [Int32]
        /// Last prompt position's logits `[vocab]`.
        public let prefill_logits: [Float]
        /// Logits of each greedy decode step `[decode_steps, vocab]`.
        public let decode_logits: [Float]
        public let decode_steps: Int
        /// HF's greedy continuation.
        public let greedy: [Int32]
        /// Top-1 minus top-2 logit at each greedy step.
        public let margins: [Float]
    }
    public let cases: [Case]

    /// Reads `file` (a `*.golden.json`).
    public static func load(file: String) throws -> HFGolden {
        try JSONDecoder().decode(HFGolden.self, from: Data(readSmallFile(file)))
    }
}
