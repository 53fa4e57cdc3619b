#if canImport(Glibc)
import Glibc
#endif
import DuetCore
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

@Suite struct GenerationTests {
    let model: MixtralModel

    init() throws { model = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference()) }

    @Test func stopsOnAStopId() throws {
        let free = try generate(model: model, prompt: [1, 17], options: GenerationOptions(maxTokens: 6, stopTokenIds: []))
        let stop = free.ids[2]
        let stopped = try generate(model: model, prompt: [1, 17], options: GenerationOptions(maxTokens: 6, stopTokenIds: [Int(stop)]))
        let first = free.ids.firstIndex(of: stop)!
        #expect(stopped.ids == Array(free.ids[...first]))
        #expect(stopped.finishReason == .stop)
        #expect(free.finishReason == .length && free.ids.count == 6)
    }

    @Test func sampledGenerationIsReproducible() throws {
        let options = GenerationOptions(maxTokens: 12, sampling: SamplingOptions(temperature: 1, topP: 0.9, seed: 7), stopTokenIds: [])
        let a = try generate(model: model, prompt: [1, 5, 9], options: options)
        let b = try generate(model: model, prompt: [1, 5, 9], options: options)
        #expect(a.ids == b.ids)
        #expect(a.logProbability == b.logProbability && a.logProbability < 0)
    }

    @Test func stopsAtTheContextLimit() throws {
        let prompt = [Int32](repeating: 3, count: 250)  // max_position_embeddings 256
        let r = try generate(model: model, prompt: prompt, options: GenerationOptions(maxTokens: 20, stopTokenIds: []))
        #expect(r.finishReason == .context)
        #expect(r.ids.count == 7)  // positions 250...255 hold 6 fed tokens; the 7th is predicted at 255
    }

    /// The score is the sum of log-softmax of the chosen ids, recomputed here from raw logits.
    @Test func scoreIsTheSumOfLogProbabilities() throws {
        let r = try generate(model: model, prompt: [1, 2, 3], options: GenerationOptions(maxTokens: 4, stopTokenIds: []))
        let cache = model.makeCache()
        var logits = try model.forward([1, 2, 3], cache: cache, allLogits: false)
        var expected = 0.0
        for id in r.ids {
            let m = Double(logits.max()!)
            let lse = m + log(logits.reduce(0.0) { $0 + exp(Double($1) - m) })
            expected += Double(logits[Int(id)]) - lse
            logits = try model.forward([id], cache: cache, allLogits: false)
        }
        // logSumExp evaluates exp in float32 (relative error < 1e-7, the precision of HF's
        // float32 log_softmax); summed in float64.
        #expect(abs(r.logProbability - expected) < 1e-6)
    }
}
