import DuetCUDA
import DuetModels
import DuetTestSupport
import Testing

/// The CUDA checks run where a GPU is (`duet selftest --gpu` on the GPU host); here they
/// must report cleanly that they were skipped, naming why.
@Suite struct GPUTests {
    @Test func checksRunOrSkipCleanly() {
        switch GPUSelfTest.run() {
        case .success(let result):
            #expect(!result.checks.isEmpty)
            for c in result.checks { #expect(c.passed, "\(c.name): \(c.error)") }
            // The whole model on the GPU against HF's goldens.
            let model = (try? GPUSelfTest.modelChecks(goldens: fixturesDirectory)) ?? []
            #expect(model.count == 16)  // and the decode graph's check on the bf16 model
            for c in model { #expect(c.passed, "\(c.name): \(c.error)") }
        case .failure(let error):
            guard case .unavailable(let why) = error else {
                Issue.record("a GPU was found but failed: \(error)")
                return
            }
            #expect(!why.isEmpty)
            print("GPU checks skipped: \(error)")
        }
    }

    /// The dense layout's size as `duet plan` reserves it, against the bf16 golden checkpoint's
    /// own non-expert tensors as loaded (matrices as stored, norms and rope frequencies in
    /// fp32, as the GPU model uploads them), with no KV positions.
    @Test func denseBytesCountTheCheckpointsNonExpertTensors() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: .reference())
        var bytes = model.embed.byteCount + (model.config.tieWordEmbeddings ? 0 : model.lmHead.byteCount) + (model.norm.count + model.rope.inverseFrequencies.count) * 4
        for l in model.layers {
            bytes += [l.q, l.k, l.v, l.o, l.router].reduce(0) { $0 + $1.byteCount } + (l.inputNorm.count + l.postAttentionNorm.count) * 4
        }
        #expect(GPUMixtral.denseBytes(model.config, bytesPerWeight: 2, maxPositions: 0) == bytes)
    }

    @Test func budgetErrorsAreReadable() {
        let e = CUDAError.overBudget(category: "weights", bytes: 2 << 20, used: 0, limit: 1 << 20)
        #expect(e.description == "GPU allocation of 2 MiB for weights exceeds the budget (0 of 1 MiB in use)")
    }
}
