import DuetCore
import DuetFormats
import DuetTestSupport
import Testing

/// Writes `contents` to a fresh file and returns its path.
private func file(_ contents: [UInt8], name: String = "model.safetensors") throws -> String {
    let path = makeTemporaryDirectory() + "/" + name
    try writeFile(contents, to: path)
    return path
}

/// A file whose header is `json` verbatim, followed by `dataBytes` bytes.
private func rawFile(header json: String, dataBytes: Int) throws -> String {
    let header = Array(json.utf8)
    var out = withUnsafeBytes(of: UInt64(header.count).littleEndian) { Array($0) }
    out += header + [UInt8](repeating: 7, count: dataBytes)
    return try file(out)
}

private func expectError(_ expected: CheckpointError, _ body: () throws -> Void) {
    #expect(throws: expected) { try body() }
}

@Suite struct SafeTensorsTests {
    @Test func readsEveryDTypeExactly() throws {
        let f32: [Float] = [1.5, -2.25, 3e-3, 1e6]
        let bf16 = f32.map(floatToBF16)
        let f16 = f32.map { Float16($0).bitPattern }
        let path = try file(SafeTensorsWriter.encode([
            .init(name: "a", dtype: "F32", shape: [2, 2], bytes: bytes(of: f32)),
            .init(name: "b", dtype: "BF16", shape: [4], bytes: bf16.withUnsafeBytes { Array($0) }),
            .init(name: "c", dtype: "F16", shape: [1, 4], bytes: f16.withUnsafeBytes { Array($0) }),
        ], metadata: ["format": "pt"]))
        let st = try SafeTensorsFile(path: path)
        #expect(st.metadata == ["format": "pt"])
        #expect(try st.tensor("a").toFloats() == f32)
        #expect(try st.tensor("a").shape == [2, 2])
        // bf16 keeps 8 mantissa bits: compare with the rounding torch does.
        #expect(try st.tensor("b").toFloats() == [1.5, -2.25, 197.0 / 65536, 244.0 * 4096])  // 3e-3 = 196.6/65536, 1e6 = 244.1 * 4096
        #expect(try st.tensor("c").toFloats() == f32.map { Float(Float16($0)) })
        #expect(try st.tensor("c").dtype == .f16)
    }

    @Test func missingFile() {
        expectError(.fileNotFound(path: "/nonexistent/model.safetensors")) {
            _ = try SafeTensorsFile(path: "/nonexistent/model.safetensors")
        }
    }

    @Test func fileShorterThanLengthField() throws {
        let path = try file([1, 2, 3])
        expectError(.truncated(file: path, reason: "3 bytes, shorter than the 8-byte header length")) {
            _ = try SafeTensorsFile(path: path)
        }
    }

    @Test func headerLongerThanFile() throws {
        var bytes = withUnsafeBytes(of: UInt64(1000).littleEndian) { Array($0) }
        bytes += Array("{}".utf8)
        let path = try file(bytes)
        expectError(.truncated(file: path, reason: "header claims 1000 bytes but the file has 2 after the length")) {
            _ = try SafeTensorsFile(path: path)
        }
    }

    @Test func absurdHeaderLength() throws {
        let path = try file(withUnsafeBytes(of: UInt64.max.littleEndian) { Array($0) } + [0])
        #expect(throws: CheckpointError.self) { _ = try SafeTensorsFile(path: path) }
        do { _ = try SafeTensorsFile(path: path) } catch { #expect("\(error)".contains("header length")) }
    }

    @Test func malformedJSON() throws {
        let path = try rawFile(header: "{\"a\": {\"dtype\": \"F32\",", dataBytes: 0)
        expectError(.malformedHeader(file: path, reason: "not valid JSON")) { _ = try SafeTensorsFile(path: path) }
    }

    @Test func entryMissingOffsets() throws {
        let path = try rawFile(header: #"{"w": {"dtype": "F32", "shape": [1]}}"#, dataBytes: 4)
        expectError(.malformedHeader(file: path, reason: "missing key 'data_offsets' at w")) {
            _ = try SafeTensorsFile(path: path)
        }
    }

    @Test func tensorPastEndOfData() throws {
        let path = try rawFile(header: #"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, dataBytes: 12)
        expectError(.tensorOutOfBounds(file: path, tensor: "w", end: 16, dataBytes: 12)) {
            _ = try SafeTensorsFile(path: path)
        }
    }

    @Test func overlappingTensors() throws {
        let path = try rawFile(
            header: #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            dataBytes: 12)
        expectError(.overlappingTensors(file: path, first: "a", second: "b")) { _ = try SafeTensorsFile(path: path) }
    }

    @Test func shapeDisagreesWithByteLength() throws {
        let path = try rawFile(header: #"{"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 8]}}"#, dataBytes: 8)
        expectError(.sizeMismatch(file: path, tensor: "w", shape: [3, 2], dtype: "BF16", bytes: 8)) {
            _ = try SafeTensorsFile(path: path)
        }
    }

    @Test func unknownDTypeIsRejectedAtOpen() throws {
        let path = try rawFile(header: #"{"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}"#, dataBytes: 1)
        expectError(.unsupportedDType(file: path, tensor: "w", dtype: "Q7")) { _ = try SafeTensorsFile(path: path) }
    }

    @Test func knownButUnreadableDTypeNamesTheTensor() throws {
        let path = try file(SafeTensorsWriter.encode([
            .init(name: "position_ids", dtype: "I64", shape: [2], bytes: [UInt8](repeating: 0, count: 16)),
            .init(name: "w", dtype: "F32", shape: [1], bytes: bytes(of: [2])),
        ]))
        let st = try SafeTensorsFile(path: path)  // the file is valid
        #expect(try st.tensor("w").toFloats() == [2])
        expectError(.unsupportedDType(file: path, tensor: "position_ids", dtype: "I64")) { _ = try st.tensor("position_ids") }
        #expect(CheckpointError.unsupportedDType(file: path, tensor: "position_ids", dtype: "I64").description
            .contains("'position_ids' has dtype I64"))
    }

    @Test func errorsNameFileAndTensor() {
        let e = CheckpointError.wrongShape(tensor: "model.norm.weight", file: "/m/model.safetensors", expected: [64], actual: [32])
        #expect(e.description == "/m/model.safetensors: tensor 'model.norm.weight' has shape [32], expected [64]")
    }
}
