import DuetCUDA
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
            #expect(model.count == 15)
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

    @Test func budgetErrorsAreReadable() {
        let e = CUDAError.overBudget(category: "weights", bytes: 2 << 20, used: 0, limit: 1 << 20)
        #expect(e.description == "GPU allocation of 2 MiB for weights exceeds the budget (0 of 1 MiB in use)")
    }
}
