import DuetCore
import DuetModels
import DuetRuntime
import DuetTestSupport
import Testing

@Suite struct ChatSessionTests {
    /// A second turn answered from the kept cache equals a fresh generation over the whole
    /// conversation, and only the new tokens are prefilled.
    @Test func keptCacheGivesTheSameAnswerAsAFreshPrefill() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        let session = ChatSession(model: model)
        let options = GenerationOptions(maxTokens: 6, stopTokenIds: [])
        var sampler = Sampler(SamplingOptions())
        let turn1: [Int32] = [1, 9, 99, 199, 299]
        let first = try session.respond(to: turn1, options: options, sampler: &sampler)
        #expect(first.ids == (try generate(model: model, prompt: turn1, options: options)).ids)
        #expect(session.cachedIds == turn1 + first.ids.dropLast())

        // The next prompt: turn 1, the answer, and a new user turn.
        let turn2 = turn1 + first.ids + [5, 6, 7]
        let second = try session.respond(to: turn2, options: options, sampler: &sampler)
        #expect(second.timings.promptTokens == 4)  // the answer's last id + 3 new ones
        #expect(second.ids == (try generate(model: model, prompt: turn2, options: options)).ids)

        // A prompt that diverges early re-prefills from the divergence, and reset forgets all.
        let other: [Int32] = [1, 9, 500, 501]
        let third = try session.respond(to: other, options: options, sampler: &sampler)
        #expect(third.timings.promptTokens == 2)
        #expect(third.ids == (try generate(model: model, prompt: other, options: options)).ids)
        session.reset()
        #expect(session.cachedIds.isEmpty)
    }
}
