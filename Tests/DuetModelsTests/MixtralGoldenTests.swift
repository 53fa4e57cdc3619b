#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore
import DuetFormats
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

/// HF transformers' outputs, written by scripts/make_goldens.py (fp32 on the stored weights).
struct Golden: Decodable {
    struct Case: Decodable {
        let prompt: [Int32]
        let prefill_logits: [Float]
        let decode_logits: [Float]
        let decode_steps: Int
        let greedy: [Int32]
        let margins: [Float]
    }
    let model: String
    let cases: [Case]

    static func load(_ name: String) throws -> Golden {
        try JSONDecoder().decode(Golden.self, from: Data(readSmallFile(fixture("\(name).golden.json"))))
    }
}

private let goldenModels = ["mixtral-tiny-a", "mixtral-tiny-b"]

/// The fp32 reference path against HF transformers.
@Suite(.serialized) struct MixtralGoldenTests {
    @Test(arguments: goldenModels)
    func prefillAndDecodeLogitsMatchHF(name: String) throws {
        let golden = try Golden.load(name)
        let model = try MixtralModel(directory: fixture(name))
        for c in golden.cases {
            let cache = model.makeCache()
            let prefill = try model.forward(c.prompt, cache: cache, allLogits: false)
            #expect(relativeL2Error(prefill, c.prefill_logits) < 1e-4, "prefill logits, prompt \(c.prompt)")
            // Feed HF's greedy tokens, so the cache holds exactly what HF's did.
            var logits = prefill
            for step in 0..<c.decode_steps {
                logits = try model.forward([c.greedy[step]], cache: cache, allLogits: false)
            }
            #expect(relativeL2Error(logits, c.decode_logits) < 1e-4, "logits after \(c.decode_steps) decode steps, prompt \(c.prompt)")
        }
    }

    @Test(arguments: goldenModels)
    func greedyTokensMatchHF(name: String) throws {
        let golden = try Golden.load(name)
        let model = try MixtralModel(directory: fixture(name))
        for c in golden.cases {
            let result = try generate(model: model, prompt: c.prompt,
                                      options: GenerationOptions(maxTokens: c.greedy.count, stopTokenIds: []))
            #expect(result.ids == c.greedy, "prompt \(c.prompt)")
            #expect(result.finishReason == .length)
        }
    }

    /// One uncached pass over prompt + generated tokens predicts the same tokens as the
    /// cached loop (the KV cache and positions are consistent).
    @Test func allPositionLogitsAgreeWithCachedDecoding() throws {
        let golden = try Golden.load("mixtral-tiny-b")
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"))
        let c = golden.cases[1]
        let sequence = c.prompt + c.greedy.dropLast()
        let logits = try model.forward(sequence, cache: model.makeCache(), allLogits: true)  // [T, V]
        let V = model.vocabSize
        let predicted = (c.prompt.count - 1..<sequence.count).map { t in
            Int32(argmax(Array(logits[(t * V)..<((t + 1) * V)])))
        }
        #expect(predicted == c.greedy)
        let last = Array(logits[((sequence.count - 1) * V)...])
        let lastOnly = try model.forward(sequence, cache: model.makeCache(), allLogits: false)
        #expect(relativeL2Error(last, lastOnly) < 1e-6)
    }
}
