#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCore
import DuetCPU
import DuetFormats
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

extension HFGolden {
    static func load(_ name: String) throws -> HFGolden { try load(file: fixture("\(name).golden.json")) }
}

private let goldenModels = ["mixtral-tiny-a", "mixtral-tiny-b"]

/// The fp32 reference path against HF transformers.
@Suite(.serialized) struct MixtralGoldenTests {
    @Test(arguments: goldenModels)
    func prefillAndDecodeLogitsMatchHF(name: String) throws {
        let golden = try HFGolden.load(name)
        let model = try MixtralModel(directory: fixture(name), kernels: .reference())
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
        let golden = try HFGolden.load(name)
        let model = try MixtralModel(directory: fixture(name), kernels: .reference())
        for c in golden.cases {
            let result = try generate(model: model, prompt: c.prompt,
                                      options: GenerationOptions(maxTokens: c.greedy.count, stopTokenIds: []))
            #expect(result.ids == c.greedy, "prompt \(c.prompt)")
            #expect(result.finishReason == .length)
        }
    }

    /// Goldens recomputed from Duet's CPU path (what GPU checks of quantized models compare
    /// against) reproduce HF's: same greedy tokens and margins, logits within 1e-4.
    @Test(arguments: goldenModels)
    func recomputedGoldensReproduceHF(name: String) throws {
        let golden = try HFGolden.load(name)
        let model = try MixtralModel(directory: fixture(name), kernels: .reference())
        let recomputed = try golden.recomputed { () throws -> ([Int32]) throws -> [Float] in
            let cache = model.makeCache()
            return { try model.forward($0, cache: cache, allLogits: false) }
        }
        for (ours, hf) in zip(recomputed.cases, golden.cases) {
            #expect(ours.greedy == hf.greedy && ours.prompt == hf.prompt)
            #expect(relativeL2Error(ours.prefill_logits, hf.prefill_logits) < 1e-4)
            #expect(relativeL2Error(ours.decode_logits, hf.decode_logits) < 1e-4)
            #expect(zip(ours.margins, hf.margins).allSatisfy { abs($0 - $1) < 1e-3 })
        }
    }

    /// One uncached pass over prompt + generated tokens predicts the same tokens as the
    /// cached loop (the KV cache and positions are consistent).
    @Test func allPositionLogitsAgreeWithCachedDecoding() throws {
        let golden = try HFGolden.load("mixtral-tiny-b")
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
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

/// The fast kernel paths against HF: logits within each path's tolerance, and the same
/// greedy token (HF's tokens fed back, teacher-forced) wherever HF's top-2 margin exceeds
/// the path's logit error. Paths this CPU lacks are skipped.
@Suite(.serialized) struct MixtralPathGoldenTests {
    /// (relative L2 on logits, absolute logit error bound for the margin test)
    static func tolerance(_ path: KernelPath) -> (relative: Double, absolute: Float) {
        path == .amx ? (2e-2, 0.05) : (1e-4, 1e-3)
    }

    @Test(arguments: [KernelPath.portable, .avx512, .amx, .auto], goldenModels)
    func logitsAndTokensWithinTolerance(path: KernelPath, name: String) throws {
        guard let kernels = try? CPUKernels(path, pool: ThreadPool(threads: 2)) else { return }
        let golden = try HFGolden.load(name)
        let model = try MixtralModel(directory: fixture(name), kernels: kernels)
        let tol = Self.tolerance(path == .auto && kernels.features.amx ? .amx : path)
        var checked = 0
        for c in golden.cases {
            let cache = model.makeCache()
            var logits = try model.forward(c.prompt, cache: cache, allLogits: false)
            #expect(relativeL2Error(logits, c.prefill_logits) < tol.relative, "\(path) \(name) prefill \(c.prompt)")
            for (step, token) in c.greedy.enumerated() {
                if c.margins[step] > 2 * tol.absolute {
                    #expect(Int32(argmax(logits)) == token, "\(path) \(name) step \(step) margin \(c.margins[step])")
                    checked += 1
                }
                if step == c.decode_steps {
                    #expect(relativeL2Error(logits, c.decode_logits) < tol.relative, "\(path) \(name) decode logits")
                }
                if step + 1 < c.greedy.count { logits = try model.forward([token], cache: cache, allLogits: false) }
            }
        }
        #expect(checked > 50)
    }
}
