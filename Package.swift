// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "Duet",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "duet", targets: ["duet"]),
        .library(name: "DuetRuntime", targets: ["DuetRuntime"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Tensors, dtypes, errors: the vocabulary every other module speaks.
        .target(name: "DuetCore", dependencies: ["CDuetKernels"]),
        // mmap, safetensors (single and sharded), HF config.json.
        .target(name: "DuetFormats", dependencies: ["DuetCore"]),
        // HF tokenizer.json: normalizers, pre-tokenizers, BPE, post-processors, decoders.
        .target(name: "DuetTokenizer", dependencies: ["DuetCore", "DuetFormats"]),
        // C with AVX-512 / AMX intrinsics, chosen at run time (Swift cannot emit AMX).
        .target(name: "CDuetKernels"),
        // CPU kernels: matmul over stored-dtype weights, expert FFN, norms, rope, attention, routing.
        .target(name: "DuetCPU", dependencies: ["DuetCore", "CDuetKernels"]),
        // CUDA through dlopen (driver API, NVRTC): builds without CUDA, uses it where present.
        // One file per model family.
        .target(name: "DuetModels", dependencies: ["DuetCore", "DuetFormats", "DuetCPU"]),
        .target(name: "DuetCUDA", dependencies: ["DuetCore", "DuetFormats", "DuetCPU", "DuetModels", "DuetRuntime"]),
        // KV cache, samplers, the generation loop.
        .target(name: "DuetRuntime", dependencies: ["DuetCore", "DuetModels"]),
        // The OpenAI-compatible HTTP server: routes, validation, continuous batching, metrics.
        .target(name: "DuetServer", dependencies: [
            "DuetRuntime", "DuetModels", "DuetTokenizer", "DuetCore",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .executableTarget(name: "duet", dependencies: [
            "DuetRuntime", "DuetModels", "DuetFormats", "DuetTokenizer", "DuetCUDA", "DuetServer",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Fixture paths, temporary directories, error metrics shared by the test targets.
        .target(name: "DuetTestSupport", dependencies: ["DuetFormats"], path: "Tests/DuetTestSupport"),
        .testTarget(name: "DuetFormatsTests", dependencies: ["DuetFormats", "DuetTestSupport"]),
        .testTarget(name: "DuetTokenizerTests", dependencies: ["DuetTokenizer", "DuetTestSupport"]),
        .testTarget(name: "DuetCPUTests", dependencies: ["DuetCPU", "DuetTestSupport"]),
        .testTarget(name: "DuetCUDATests", dependencies: ["DuetCUDA", "DuetTestSupport"]),
        .testTarget(name: "DuetModelsTests", dependencies: ["DuetModels", "DuetRuntime", "DuetTestSupport"]),
        .testTarget(name: "DuetRuntimeTests", dependencies: ["DuetRuntime", "DuetModels", "DuetTestSupport"]),
        .testTarget(name: "DuetServerTests", dependencies: [
            "DuetServer", "DuetTestSupport", .product(name: "HummingbirdTesting", package: "hummingbird"),
        ]),
    ]
)
