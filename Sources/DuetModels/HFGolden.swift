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

    /// The same prompts and step counts with `sequence`'s outputs as the reference instead of
    /// HF's: its prefill logits, its greedy continuation (its own tokens fed back), its margins
    /// and its logits after the recorded decode steps. For models HF cannot run (quantized
    /// experts), checked against Duet's CPU reference path. `sequence()` starts a sequence and
    /// returns its forward step.
    public func recomputed(_ sequence: () throws -> ([Int32]) throws -> [Float]) throws -> HFGolden {
        HFGolden(cases: try cases.map { c in
            let forward = try sequence()
            var logits = try forward(c.prompt)
            let prefill = logits
            var greedy: [Int32] = [], margins: [Float] = [], decode: [Float] = []
            for step in 0..<c.greedy.count {
                let sorted = logits.indices.sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
                greedy.append(Int32(sorted[0]))
                margins.append(logits[sorted[0]] - logits[sorted[1]])
                if step == c.decode_steps { decode = logits }
                if step + 1 < c.greedy.count { logits = try forward([greedy[step]]) }
            }
            return Case(prompt: c.prompt, prefill_logits: prefill, decode_logits: decode, decode_steps: c.decode_steps, greedy: greedy, margins: margins)
        })
    }

    /// Reads `file` (a `*.golden.json`).
    public static func load(file: String) throws -> HFGolden {
        try JSONDecoder().decode(HFGolden.self, from: Data(readSmallFile(file)))
    }
}

/// HF transformers' generate(num_beams=W, do_sample=False, num_return_sequences=W) on the
/// golden checkpoints (scripts/make_beam_goldens.py, fp32 on the stored weights): read by the
/// beam search tests and by `duet selftest --gpu`.
public struct HFBeamGolden: Decodable, Sendable {
    public struct Case: Decodable, Sendable {
        public let model: String
        public let prompt: [Int32]
        public let num_beams: Int
        public let max_new_tokens: Int
        public let length_penalty: Double
        public let early_stopping: Bool
        public let eos_token_id: Int
        public let sequences: [[Int32]]
        public let sequences_scores: [Double]
    }
    public let cases: [Case]

    public static func load(file: String) throws -> HFBeamGolden {
        try JSONDecoder().decode(HFBeamGolden.self, from: Data(readSmallFile(file)))
    }
}
