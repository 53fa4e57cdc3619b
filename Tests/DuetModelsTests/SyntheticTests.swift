import DuetCPU
import DuetCore
import DuetModels
import DuetTestSupport
import Testing

@Suite(.serialized) struct SyntheticTests {
    /// Share of top-2 assignments the most popular expert gets, per layer, over 96 tokens.
    private func maxShares(skew: Float) throws -> [Double] {
        let model = try SyntheticWeights.mixtral("tiny", layers: 2, seed: 5, routerSkew: skew, kernels: .reference())
        var counts = [[Int]](repeating: [Int](repeating: 0, count: 8), count: 2)
        model.routingObserver = { layer, choices in
            for c in choices { for e in c.experts { counts[layer][e] += 1 } }
        }
        let tokens = (0..<96).map { Int32(7 + $0 * 331 % 31000) }
        _ = try model.forward(tokens, cache: model.makeCache(), allLogits: false)
        return counts.map { Double($0.max()!) / Double($0.reduce(0, +)) }
    }

    @Test func routerSkewMakesExpertsPopular() throws {
        let uniform = try maxShares(skew: 0), skewed = try maxShares(skew: 4)
        // 2 of 8 experts per token: a uniform router gives each 1/8 of the assignments.
        // (Random router rows alone already favour some experts: 0.30 measured at skew 0.)
        #expect(uniform.allSatisfy { $0 < 0.35 }, "\(uniform)")
        #expect(skewed.allSatisfy { $0 > 0.45 }, "\(skewed)")
        #expect(zip(uniform, skewed).allSatisfy { $1 > $0 + 0.1 })
    }

    @Test func sameSeedSameWeights() throws {
        let a = try SyntheticWeights.mixtral("tiny", layers: 1, seed: 9, kernels: .reference())
        let b = try SyntheticWeights.mixtral("tiny", layers: 1, seed: 9, kernels: .reference())
        let c = try SyntheticWeights.mixtral("tiny", layers: 1, seed: 10, kernels: .reference())
        let la = try a.forward([1, 2, 3], cache: a.makeCache(), allLogits: false)
        let lb = try b.forward([1, 2, 3], cache: b.makeCache(), allLogits: false)
        let lc = try c.forward([1, 2, 3], cache: c.makeCache(), allLogits: false)
        #expect(la == lb)
        #expect(la != lc)
        #expect(la.allSatisfy { $0.isFinite })
    }

    /// Experts generated straight into q8/q4 (the bf16 copies dropped) compute what the bf16
    /// model quantized after loading computes, with the parallel quantizer.
    @Test(arguments: [QuantFormat.q8, .q4])
    func expertsGeneratedQuantizedEqualQuantizingAfterwards(format: QuantFormat) throws {
        let direct = try SyntheticWeights.mixtral("tiny", layers: 2, seed: 3, expertFormat: format, kernels: .reference())
        let later = try SyntheticWeights.mixtral("tiny", layers: 2, seed: 3, kernels: .reference())
        try later.quantizeExperts(format, cacheDirectory: nil)
        #expect(direct.expertFormat == format)
        let a = try direct.forward([5, 6, 7, 8], cache: direct.makeCache(), allLogits: true)
        let b = try later.forward([5, 6, 7, 8], cache: later.makeCache(), allLogits: true)
        #expect(a == b)
        // The stored-dtype expert views carry no weights (one shared zero matrix).
        let stored = direct.layers[1].experts[3].gate
        #expect((0..<stored.cols).allSatisfy { stored.view.base.load(fromByteOffset: 2 * $0, as: UInt16.self) == 0 })
    }

    @Test func badArgumentsAreErrors() {
        #expect(throws: SyntheticError.unknownGeometry("mixtral-9x9b")) {
            _ = try SyntheticWeights.mixtral("mixtral-9x9b", seed: 0, kernels: .reference())
        }
        #expect(throws: SyntheticError.badLayerCount(0)) { _ = try SyntheticWeights.mixtral("tiny", layers: 0, seed: 0, kernels: .reference()) }
        #expect(throws: SyntheticError.badRouterSkew(-1)) { _ = try SyntheticWeights.mixtral("tiny", seed: 0, routerSkew: -1, kernels: .reference()) }
    }
}
