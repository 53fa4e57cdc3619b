#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCPU
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

@Suite(.serialized) struct BeamSearchTests {
    @Test func equalsHFBeamSearch() throws {
        let golden = try JSONDecoder().decode(HFBeamGolden.self, from: Data(fixtureBytes("beam.golden.json")))
        #expect(golden.cases.count == 10)
        var models: [String: MixtralModel] = [:]
        for c in golden.cases {
            let model = try models[c.model] ?? MixtralModel(directory: fixture(c.model), kernels: .reference())
            models[c.model] = model
            let options = BeamSearchOptions(width: c.num_beams, maxNewTokens: c.max_new_tokens, lengthPenalty: c.length_penalty,
                                            earlyStopping: c.early_stopping ? .always : .heuristic, stopTokenIds: [c.eos_token_id])
            let result = try beamSearch(model: model, prompt: c.prompt, options: options)
            let label = "\(c.model) W=\(c.num_beams) eos=\(c.eos_token_id) lp=\(c.length_penalty)"
            #expect(result.map(\.ids) == c.sequences, "\(label)")
            #expect(result.count == c.sequences_scores.count, "\(label)")
            for (r, s) in zip(result, c.sequences_scores) { #expect(abs(r.score - s) < 1e-4, "\(label): \(r.score) vs \(s)") }
        }
    }

    @Test func widthOneIsGreedy() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference())
        let beam = try beamSearch(model: model, prompt: [1, 17, 250], options: BeamSearchOptions(width: 1, maxNewTokens: 8, stopTokenIds: []))
        let greedy = try generate(model: model, prompt: [1, 17, 250], options: GenerationOptions(maxTokens: 8, stopTokenIds: []))
        #expect(beam.map(\.ids) == [greedy.ids])
        #expect(abs(beam[0].score - greedy.logProbability / 8) < 1e-7)  // float32 exp inside logSumExp
    }
}
