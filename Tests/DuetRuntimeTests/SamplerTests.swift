#if canImport(Glibc)
import Glibc
#endif
import DuetRuntime
import Testing

@Suite struct SamplerTests {
    let logits: [Float] = [2.0, 1.0, 0.5, -1.0, 3.0, 0.0]

    @Test func greedyIsArgmax() {
        var s = Sampler(SamplingOptions())
        #expect(s.sample(logits) == 4)
        var k1 = Sampler(SamplingOptions(temperature: 1.5, topK: 1, seed: 9))
        #expect(k1.sample(logits) == 4)
    }

    @Test func sameSeedSameTokensOtherSeedOtherTokens() {
        func draw(_ seed: UInt64) -> [Int32] {
            var s = Sampler(SamplingOptions(temperature: 1, seed: seed))
            return (0..<64).map { _ in s.sample(logits) }
        }
        #expect(draw(42) == draw(42))
        #expect(draw(42) != draw(43))
    }

    /// Frequencies over many draws match softmax(logits / T), computed here independently.
    @Test func frequenciesFollowTemperatureSoftmax() {
        let t: Float = 0.7, n = 40_000
        var s = Sampler(SamplingOptions(temperature: t, seed: 1))
        var counts = [Int](repeating: 0, count: logits.count)
        for _ in 0..<n { counts[Int(s.sample(logits))] += 1 }
        let weights = logits.map { exp(Double($0 / t)) }
        let total = weights.reduce(0, +)
        for i in logits.indices {
            let p = weights[i] / total
            let sigma = (p * (1 - p) / Double(n)).squareRoot()
            #expect(abs(Double(counts[i]) / Double(n) - p) < 5 * sigma + 1e-4, "token \(i)")
        }
    }

    @Test func topKKeepsOnlyTheKBest() {
        var s = Sampler(SamplingOptions(temperature: 5, topK: 2, seed: 3))
        let seen = Set((0..<2000).map { _ in s.sample(logits) })
        #expect(seen == [4, 0])
    }

    /// probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps the first two (0.5 < 0.7 <= 0.8).
    @Test func topPKeepsTheSmallestNucleus() {
        let probs: [Double] = [0.05, 0.5, 0.15, 0.3]
        let l = probs.map { Float(log($0)) }
        var s = Sampler(SamplingOptions(temperature: 1, topP: 0.7, seed: 5))
        var counts = [Int32: Int]()
        for _ in 0..<5000 { counts[s.sample(l), default: 0] += 1 }
        #expect(Set(counts.keys) == [1, 3])
        // Renormalised 0.5 / 0.8 = 0.625.
        #expect(abs(Double(counts[1]!) / 5000 - 0.625) < 0.03)
    }
}
