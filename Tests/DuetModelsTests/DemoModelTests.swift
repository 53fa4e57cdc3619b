#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore
import DuetCPU
import DuetModels
import DuetRuntime
import DuetTestSupport
import DuetTokenizer
import Testing

/// HF transformers' fp32 greedy output on the shipped demo model's stored bf16 weights
/// (scripts/train_demo_moe.py, which trained it).
struct DemoGolden: Decodable {
    struct Case: Decodable {
        let prompt: String
        let prompt_ids: [Int32]
        let prefill_logits: [Float]
        let greedy: [Int32]
        let margins: [Float]
        let text: String
    }
    let cases: [Case]
}

@Suite(.serialized) struct DemoModelTests {
    @Test func greedyOutputMatchesHFOnTheReferencePath() throws {
        let golden = try JSONDecoder().decode(DemoGolden.self, from: Data(fixtureBytes("duet-demo-moe.golden.json.gz")))
        let model = try ModelRegistry.load(directory: demoModelDirectory, kernels: .reference())
        let tokenizer = try Tokenizer(path: demoModelDirectory + "/tokenizer.json")
        #expect(golden.cases.count == 3)
        for c in golden.cases {
            #expect(try tokenizer.encode(c.prompt) == c.prompt_ids, "prompt \(c.prompt)")
            let prefill = try model.forward(c.prompt_ids, cache: model.makeCache(), allLogits: false)
            // The golden keeps 5 decimals: ~1e-6 relative on logits of this size.
            #expect(relativeL2Error(prefill, c.prefill_logits) < 1e-4, "prompt \(c.prompt)")
            let result = try generate(model: model, prompt: c.prompt_ids,
                                      options: GenerationOptions(maxTokens: c.greedy.count, stopTokenIds: []))
            #expect(result.ids == c.greedy, "prompt \(c.prompt)")
            #expect(try tokenizer.decode(result.ids, skipSpecialTokens: true) == c.text)
        }
    }
}

/// The default (fast) kernel path on the demo model: logits close to HF's and, with HF's
/// tokens fed back, the same greedy token wherever HF's top-2 margin exceeds twice the path's
/// logit error (AVX-512 accumulates in fp32 in another order; AMX rounds activations to bf16).
@Suite(.serialized) struct DemoModelFastPathTests {
    @Test func defaultPathAgreesWhereTheMarginAllows() throws {
        let golden = try JSONDecoder().decode(DemoGolden.self, from: Data(fixtureBytes("duet-demo-moe.golden.json.gz")))
        let kernels = try CPUKernels(.auto, pool: ThreadPool(threads: 2))
        let model = try ModelRegistry.load(directory: demoModelDirectory, kernels: kernels)
        let amx = kernels.features.amx
        let (relative, absolute): (Double, Float) = amx ? (2e-2, 0.1) : (1e-4, 2e-3)
        var checked = 0
        for c in golden.cases {
            let cache = model.makeCache()
            var logits = try model.forward(c.prompt_ids, cache: cache, allLogits: false)
            #expect(relativeL2Error(logits, c.prefill_logits) < relative, "prompt \(c.prompt)")
            for (step, token) in c.greedy.enumerated() {
                if c.margins[step] > 2 * absolute {
                    #expect(Int32(argmax(logits)) == token, "\(c.prompt) step \(step) margin \(c.margins[step])")
                    checked += 1
                }
                if step + 1 < c.greedy.count { logits = try model.forward([token], cache: cache, allLogits: false) }
            }
        }
        #expect(checked > 150)  // of 192 steps
    }
}
