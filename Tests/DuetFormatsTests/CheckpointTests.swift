import DuetCore
import DuetFormats
import DuetTestSupport
import Testing

@Suite struct CheckpointTests {
    @Test func singleFileCheckpoint() throws {
        let ckpt = try Checkpoint(directory: fixture("mixtral-tiny-a"))
        #expect(ckpt.files.count == 1)
        #expect(ckpt.tensorNames.count == 40)
        let embed = try ckpt.tensor("model.embed_tokens.weight", shape: [512, 64])
        #expect(embed.dtype == .f32)
        #expect(ckpt.bytesByDType().keys.sorted() == ["F32"])
    }

    @Test func shardedCheckpoint() throws {
        let ckpt = try Checkpoint(directory: fixture("mixtral-tiny-b"))
        #expect(ckpt.files.count == 4)
        #expect(ckpt.tensorNames.count == 96)
        let w2 = try ckpt.matrix("model.layers.2.block_sparse_moe.experts.7.w2.weight", rows: 96, cols: 64)
        #expect(w2.dtype == .bf16)
        #expect(ckpt.bytesByDType() == ["BF16": 1_357_632])
    }

    @Test func directoryWithoutWeights() {
        let dir = makeTemporaryDirectory()
        #expect(throws: CheckpointError.noWeights(directory: dir)) { _ = try Checkpoint(directory: dir) }
    }

    @Test func missingTensorAndWrongShape() throws {
        let dir = fixture("mixtral-tiny-a")
        let ckpt = try Checkpoint(directory: dir)
        #expect(throws: CheckpointError.missingTensor(tensor: "lm_head.weight", checkpoint: dir)) {
            _ = try ckpt.tensor("lm_head.weight")
        }
        #expect(throws: CheckpointError.wrongShape(
            tensor: "model.norm.weight", file: dir + "/model.safetensors", expected: [65], actual: [64])) {
            _ = try ckpt.vector("model.norm.weight", count: 65)
        }
    }

    @Test func indexNamingAMissingShard() throws {
        let dir = makeTemporaryDirectory()
        try copyDirectory(fixture("mixtral-tiny-b"), to: dir)
        try writeFile(Array(#"{"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}"#.utf8),
                      to: dir + "/model.safetensors.index.json")
        #expect(throws: CheckpointError.fileNotFound(path: dir + "/model-00009-of-00009.safetensors")) {
            _ = try Checkpoint(directory: dir)
        }
    }

    @Test func indexPointingAtTheWrongShard() throws {
        let dir = makeTemporaryDirectory()
        try copyDirectory(fixture("mixtral-tiny-b"), to: dir)
        let wrong = try Checkpoint(directory: dir).files.map(\.path).first {
            !(try SafeTensorsFile(path: $0)).entries.keys.contains("model.norm.weight")
        }!
        let shard = String(wrong.split(separator: "/").last!)
        try writeFile(Array("{\"weight_map\": {\"model.norm.weight\": \"\(shard)\"}}".utf8),
                      to: dir + "/model.safetensors.index.json")
        #expect(throws: CheckpointError.shardMissingTensor(
            index: dir + "/model.safetensors.index.json", shard: shard, tensor: "model.norm.weight")) {
            _ = try Checkpoint(directory: dir)
        }
    }

    @Test func malformedIndex() throws {
        let dir = makeTemporaryDirectory()
        try writeFile(Array(#"{"metadata": {}}"#.utf8), to: dir + "/model.safetensors.index.json")
        #expect(throws: CheckpointError.malformedIndex(
            file: dir + "/model.safetensors.index.json", reason: "missing key 'weight_map' at the top level")) {
            _ = try Checkpoint(directory: dir)
        }
    }

    @Test func truncatedShardIsCaughtAtOpen() throws {
        let dir = makeTemporaryDirectory()
        try copyDirectory(fixture("mixtral-tiny-a"), to: dir)
        let path = dir + "/model.safetensors"
        let full = try readSmallFile(path)
        try writeFile(Array(full.prefix(full.count - 100)), to: path)
        #expect(throws: CheckpointError.self) { _ = try Checkpoint(directory: dir) }
        do { _ = try Checkpoint(directory: dir) } catch {
            #expect("\(error)".contains(path))
            guard case .tensorOutOfBounds = error else {
                Issue.record("expected tensorOutOfBounds, got \(error)")
                return
            }
        }
    }
}
