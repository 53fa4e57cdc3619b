import DuetCore
import DuetFormats
import DuetModels
import DuetTestSupport
import Testing

/// A copy of golden checkpoint A whose config.json is `json`.
private func checkpoint(config json: String) throws -> String {
    let dir = makeTemporaryDirectory()
    try copyDirectory(fixture("mixtral-tiny-a"), to: dir)
    try writeFile(Array(json.utf8), to: dir + "/config.json")
    return dir
}

private let baseConfig = """
    {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
     "vocab_size": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "max_position_embeddings": 256,
     "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 1000000.0}
    """

@Suite struct ConfigurationTests {
    @Test func transformers5ConfigWithRopeParameters() throws {
        let path = fixture("mixtral-tiny-b/config.json")
        let c = try ConfigFile.decode(MixtralConfiguration.self, path: path)
        try c.validate(file: path)
        #expect(c.hiddenSize == 96 && c.intermediateSize == 64 && c.numHiddenLayers == 3)
        #expect(c.numAttentionHeads == 4 && c.numKeyValueHeads == 2 && c.headDim == 32)
        #expect(c.numLocalExperts == 8 && c.numExpertsPerToken == 2)
        #expect(c.ropeTheta == 10000 && c.rmsNormEps == 1e-6 && c.slidingWindow == 8)
        #expect(c.vocabSize == 640 && c.maxPositionEmbeddings == 256 && !c.tieWordEmbeddings)
        #expect(c.bosTokenId == 1 && c.eosTokenIds == [2])
    }

    @Test func hubStyleConfigWithTopLevelRopeTheta() throws {
        let dir = try checkpoint(config: baseConfig)
        let c = try ConfigFile.decode(MixtralConfiguration.self, path: dir + "/config.json")
        #expect(c.ropeTheta == 1e6 && c.headDim == 16 && c.slidingWindow == nil && c.tieWordEmbeddings)
        // Same weights and geometry as the golden: same logits.
        let a = try MixtralModel(directory: dir, kernels: .reference()).forward([1, 2, 3], cache: KVCache(layers: 2, kvHeads: 2, headDim: 16), allLogits: false)
        let b = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference()).forward([1, 2, 3], cache: KVCache(layers: 2, kvHeads: 2, headDim: 16), allLogits: false)
        #expect(a == b)
    }

    @Test func eosListAndGenerationConfig() throws {
        let dir = try checkpoint(config: baseConfig.replacing("\"eos_token_id\": 2", with: "\"eos_token_id\": [2, 7]"))
        try writeFile(Array(#"{"eos_token_id": [7, 9]}"#.utf8), to: dir + "/generation_config.json")
        #expect(try MixtralModel(directory: dir, kernels: .reference()).eosTokenIds == [2, 7, 9])
    }

    @Test func unknownModelTypeListsSupportedTypes() throws {
        let dir = try checkpoint(config: baseConfig.replacing("\"mixtral\"", with: "\"llama\""))
        #expect(throws: ConfigError.unsupportedModelType(file: dir + "/config.json", modelType: "llama", supported: ["mixtral"])) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
        #expect(ConfigError.unsupportedModelType(file: "c", modelType: "llama", supported: ["mixtral"]).description
            == "c: model_type 'llama' is not supported; supported: mixtral")
    }

    @Test func missingFieldIsNamed() throws {
        let dir = try checkpoint(config: baseConfig.replacing("\"hidden_size\": 64,", with: ""))
        #expect(throws: ConfigError.malformed(file: dir + "/config.json", reason: "missing key 'hidden_size' at the top level")) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
    }

    @Test func malformedJSON() throws {
        let dir = try checkpoint(config: "{\"model_type\": \"mixtral\",")
        #expect(throws: ConfigError.self) { _ = try ModelRegistry.load(directory: dir, kernels: .reference()) }
    }

    @Test func missingConfig() throws {
        let dir = makeTemporaryDirectory()
        #expect(throws: ConfigError.fileNotFound(path: dir + "/config.json")) { _ = try ModelRegistry.load(directory: dir, kernels: .reference()) }
    }

    @Test func inconsistentHeadsAreRejected() throws {
        let dir = try checkpoint(config: baseConfig.replacing("\"num_key_value_heads\": 2", with: "\"num_key_value_heads\": 3"))
        #expect(throws: ConfigError.invalid(file: dir + "/config.json", field: "num_attention_heads",
                                            reason: "(4) must be a multiple of num_key_value_heads (3)")) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
    }

    @Test func unsupportedRopeScalingIsRejected() throws {
        let dir = try checkpoint(config: baseConfig.replacing("\"rope_theta\": 1000000.0", with: "\"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 10000.0, \"factor\": 4.0}"))
        #expect(throws: ConfigError.invalid(file: dir + "/config.json", field: "rope_type",
                                            reason: "'yarn' is not supported (only default rope)")) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
    }
}

@Suite struct WeightLoadingTests {
    /// Golden A rewritten with `edit` applied to its tensor list.
    private func editedCheckpoint(_ edit: (inout [SafeTensorsWriter.Tensor]) -> Void) throws -> String {
        let dir = makeTemporaryDirectory()
        try copyDirectory(fixture("mixtral-tiny-a"), to: dir)
        let st = try SafeTensorsFile(path: dir + "/model.safetensors")
        var tensors = try st.entries.keys.sorted().map { name in
            let t = try st.tensor(name)
            return SafeTensorsWriter.Tensor(name: name, dtype: t.dtype.rawValue, shape: t.shape,
                                            bytes: Array(UnsafeRawBufferPointer(start: t.base, count: t.byteCount)))
        }
        edit(&tensors)
        try SafeTensorsWriter.write(tensors, to: dir + "/model.safetensors")
        return dir
    }

    @Test func rewrittenCheckpointStillMatches() throws {
        let dir = try editedCheckpoint { _ in }
        let a = try MixtralModel(directory: dir, kernels: .reference()).forward([1, 5], cache: KVCache(layers: 2, kvHeads: 2, headDim: 16), allLogits: false)
        let b = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference()).forward([1, 5], cache: KVCache(layers: 2, kvHeads: 2, headDim: 16), allLogits: false)
        #expect(a == b)
    }

    @Test func missingExpertTensorIsNamed() throws {
        let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
        let dir = try editedCheckpoint { $0.removeAll { $0.name == name } }
        #expect(throws: CheckpointError.missingTensor(tensor: name, checkpoint: dir)) { _ = try ModelRegistry.load(directory: dir, kernels: .reference()) }
    }

    @Test func wrongShapeIsNamed() throws {
        let name = "model.layers.0.self_attn.k_proj.weight"
        let dir = try editedCheckpoint { tensors in
            let i = tensors.firstIndex { $0.name == name }!
            tensors[i].shape = [64, 32]  // stored [32, 64]
        }
        #expect(throws: CheckpointError.wrongShape(tensor: name, file: dir + "/model.safetensors", expected: [32, 64], actual: [64, 32])) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
    }

    @Test func unsupportedDTypeIsNamed() throws {
        let name = "model.norm.weight"
        let dir = try editedCheckpoint { tensors in
            let i = tensors.firstIndex { $0.name == name }!
            tensors[i].dtype = "I32"
        }
        #expect(throws: CheckpointError.unsupportedDType(file: dir + "/model.safetensors", tensor: name, dtype: "I32")) {
            _ = try ModelRegistry.load(directory: dir, kernels: .reference())
        }
    }

    @Test func forwardRejectsBadInput() throws {
        let model = try MixtralModel(directory: fixture("mixtral-tiny-a"), kernels: .reference())
        #expect(throws: ModelError.tokenOutOfRange(id: 512, vocabSize: 512)) {
            _ = try model.forward([1, 512], cache: model.makeCache(), allLogits: false)
        }
        #expect(throws: ModelError.emptyInput) { _ = try model.forward([], cache: model.makeCache(), allLogits: false) }
        #expect(throws: ModelError.contextFull(needed: 257, limit: 256)) {
            _ = try model.forward([Int32](repeating: 1, count: 257), cache: model.makeCache(), allLogits: false)
        }
    }
}
