import DuetCPU
import DuetCore
import DuetFormats
import DuetModels
import DuetTestSupport
import Testing

/// Whole models with quantized experts: against HF's fp32 goldens (the quantization error
/// the formats promise), the integer paths against each other, and the on-disk cache.
@Suite(.serialized) struct QuantizedModelTests {
    /// Prefill logits of every golden prompt with q8 / q4 experts stay within the formats'
    /// error of HF's fp32 logits, and q8's greedy tokens follow HF's where the margin is wide.
    @Test(arguments: ["mixtral-tiny-a", "mixtral-tiny-b"], QuantFormat.allCases)
    func quantizedLogitsStayNearTheGoldens(name: String, format: QuantFormat) throws {
        let golden = try HFGolden.load(file: fixture("\(name).golden.json"))
        let model = try MixtralModel(directory: fixture(name), kernels: try CPUKernels(.auto, pool: ThreadPool(threads: 2)))
        try model.quantizeExperts(format, cacheDirectory: nil)
        var worst = 0.0
        for c in golden.cases {
            let logits = try model.forward(c.prompt, cache: model.makeCache(), allLogits: false)
            worst = max(worst, relativeL2Error(logits, c.prefill_logits))
        }
        // Measured: q8 ~0.3-0.6%, q4 ~5-8% on these random-weight models.
        #expect(worst < (format == .q8 ? 0.02 : 0.15), "\(name) \(format): worst relative L2 \(worst)")
        #expect(worst > 1e-5, "the experts really are quantized")
    }

    /// The VNNI and portable integer paths compute the same numbers for a whole model. (The
    /// reference path, fp32 activations on dequantized weights, is compared per kernel in
    /// DuetCPUTests: on a whole random model, activation rounding can flip a near-tied
    /// router choice, so whole-model logits are no test for it.)
    @Test(.enabled(if: CPUFeatures.current.vnni, "needs AVX512-VNNI"))
    func vnniAndPortablePathsAgree() throws {
        let prompt: [Int32] = [1, 600, 2, 33, 77, 5]
        func logits(_ path: KernelPath) throws -> [Float] {
            let model = try MixtralModel(directory: fixture("mixtral-tiny-b"), kernels: try CPUKernels(path, pool: ThreadPool(threads: 2)))
            try model.quantizeExperts(.q8, cacheDirectory: nil)
            return try model.forward(prompt, cache: model.makeCache(), allLogits: true)
        }
        #expect(relativeL2Error(try logits(.avx512), try logits(.portable)) < 1e-5)
    }

    /// The second start maps the cached experts: same numbers, no quantizing. A damaged cache
    /// file is a clear error naming it.
    @Test func theCacheIsReusedAndCheckedBeforeUse() throws {
        let cache = makeTemporaryDirectory()
        let model = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference())
        let first = try model.quantizeExperts(.q4, cacheDirectory: cache)
        #expect(!first.fromCache)
        let path = try #require(first.cachePath)
        #expect(fileExists(path))
        let fresh = try model.forward([1, 2, 3], cache: model.makeCache(), allLogits: false)

        let again = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference())
        let second = try again.quantizeExperts(.q4, cacheDirectory: cache)
        #expect(second.fromCache && second.cachePath == path && second.bytes == first.bytes)
        #expect(try again.forward([1, 2, 3], cache: again.makeCache(), allLogits: false) == fresh)

        // Another format gets its own file.
        let q8 = try again.quantizeExperts(.q8, cacheDirectory: cache)
        #expect(!q8.fromCache && q8.cachePath != path)

        var bytes = try readSmallFile(path)
        bytes.replaceSubrange(0..<8, with: Array("NOTDUETQ".utf8))
        try writeFile(bytes, to: path)
        let damaged = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference())
        #expect {
            try damaged.quantizeExperts(.q4, cacheDirectory: cache)
        } throws: { error in
            "\(error)".contains(path) && "\(error)".contains("not a Duet quantized-experts file")
        }
    }
}
