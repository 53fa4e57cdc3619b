import ArgumentParser
import DuetCPU
import DuetCUDA
import DuetCore

/// `duet bench gpu-matmul`: the expert matmul kernels alone on the GPU — bf16 and the q8/q4
/// packed formats at Mixtral's expert shapes — each figure next to the HBM read ceiling
/// measured in the same run (bytes of weights read per call / a read-only kernel's bandwidth).
struct BenchGPUMatmul: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gpu-matmul",
        abstract: "GPU expert matmul kernels (bf16 GEMV, q8/q4 GEMV, dequantize + cuBLAS) against the HBM read ceiling.")

    @Option(name: .long, parsing: .upToNextOption, help: "Token counts.")
    var tokens: [Int] = [1, 2, 4, 8, 16, 64]
    @Option(name: .long, help: "Expert hidden size D (w1, w3: [F, D]; w2: [D, F]).")
    var hidden = 4096
    @Option(name: .long, help: "Expert FFN size F.")
    var ffn = 14336
    @Option(name: .long, help: "Calls timed per figure.")
    var repeats = 50
    @Flag(name: .long, help: "Print only JSON rows.")
    var json = false

    struct Row: Encodable {
        var bench = "gpu-matmul"
        var device: String
        var format: String
        var rows: Int
        var cols: Int
        var tokens: Int
        var kernel: String
        var microseconds: Double
        var weightBytes: Int
        var gbps: Double
        var hbmGbps: Double
        var fraction: Double
    }

    func run() throws {
        let gpu = try GPU()
        let ops = GPUOps(gpu: gpu)
        let hbm = try ops.readBandwidth(bytes: 4 << 30)
        let maxT = tokens.max() ?? 1, width = max(hidden, ffn)
        let x = try gpu.upload(KernelSelfTest.random(maxT * width, seed: 1), category: "workspace")
        let y = try gpu.allocate(maxT * width * 4, category: "workspace")
        let scratch = try gpu.allocate(hidden * ffn * 2, category: "workspace")
        var rows: [Row] = []
        for (N, K) in [(ffn, hidden), (hidden, ffn)] {
            let bf16 = KernelSelfTest.random(N * K, seed: UInt64(N)).map(floatToBF16)
            let w = try gpu.upload(array: bf16, category: "weights")
            for T in tokens {
                let s = try gpu.time(repeats: repeats) { () throws(CUDAError) in try ops.matmulBF16(x, w, y, rows: N, cols: K, tokens: T) }
                rows.append(row(gpu, "bf16", N, K, T, kernel: T >= gpu.gemmMinTokens ? "cuBLAS" : "gemv", seconds: s, bytes: N * K * 2, hbm: hbm))
            }
            for format in QuantFormat.allCases {
                let q = bf16.withUnsafeBytes { raw in
                    QuantizedMatrix(quantizing: WeightMatrix(TensorView(name: "w", dtype: .bf16, shape: [N, K], base: raw.baseAddress!, owner: nil)), format: format)
                }
                let wq = try gpu.upload(bytes: UnsafeRawBufferPointer(start: q.levels, count: q.byteCount), category: "weights")
                for T in tokens {
                    let s = try gpu.time(repeats: repeats) { () throws(CUDAError) in
                        try ops.matmulQuantized(x, wq, format: format, y, rows: N, cols: K, tokens: T, scratch: scratch)
                    }
                    rows.append(row(gpu, format.rawValue, N, K, T, kernel: T >= gpu.gemmMinTokens ? "dequantize+cuBLAS" : "gemv", seconds: s, bytes: q.byteCount, hbm: hbm))
                }
            }
        }
        for r in rows { try Console.json(r) }
        if !json {
            Console.out("HBM read ceiling (read-only kernel over 4 GiB): \(fixed(hbm / 1e9, 0)) GB/s\n")
            Console.out("format rows   cols   T    kernel             us       GB/s    of ceiling\n")
            for r in rows {
                Console.out("\(r.format.padding(6)) \(String(r.rows).padding(6)) \(String(r.cols).padding(6)) \(String(r.tokens).padding(4)) \(r.kernel.padding(18)) "
                    + "\(fixed(r.microseconds, 1).padding(8)) \(fixed(r.gbps, 0).padding(7)) \(fixed(r.fraction, 2))\n")
            }
        }
    }

    private func row(_ gpu: GPU, _ format: String, _ N: Int, _ K: Int, _ T: Int, kernel: String, seconds: Double, bytes: Int, hbm: Double) -> Row {
        let gbps = Double(bytes) / seconds / 1e9
        return Row(device: gpu.name, format: format, rows: N, cols: K, tokens: T, kernel: kernel, microseconds: seconds * 1e6,
                   weightBytes: bytes, gbps: gbps, hbmGbps: hbm / 1e9, fraction: gbps / (hbm / 1e9))
    }
}
