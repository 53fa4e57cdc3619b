import CDuetKernels
import DuetCore

/// Expert weight formats smaller than bf16: symmetric integers with one f16 scale per row
/// and group of 32 weights along k.
///   q8: int8 in [-127, 127], 8.5 bits per weight with the scales;
///   q4: int4 in [-7, 7], 4.5 bits per weight.
/// Stored with an offset so the levels are unsigned (what AVX512-VNNI multiplies): q8 byte =
/// q + 128, q4 nibble = q + 8, packed in blocks of 16 rows x 32 k (layout: duet_kernels.h).
public enum QuantFormat: String, Sendable, CaseIterable, Codable {
    case q8, q4

    public static let groupSize = 32
    /// Rows per packed block (one AVX-512 register of int32 lanes).
    public static let rowBlock = 16

    public var maxLevel: Int32 { self == .q8 ? 127 : 7 }
    public var offset: Int32 { self == .q8 ? 128 : 8 }
    /// Bytes of one packed block (16 rows x 32 k).
    public var blockBytes: Int { self == .q8 ? 512 : 256 }
    /// Stored bits per weight, scales included.
    public var bitsPerWeight: Double { Double(blockBytes * 8 + 16 * 16) / Double(16 * 32) }
}

/// A `[rows, cols]` matrix quantized to a `QuantFormat`, in the packed layout the kernels
/// read. Rows are zero-padded to a multiple of 16 and columns to a multiple of 32.
/// Immutable after quantization, so shared freely between threads.
public final class QuantizedMatrix: @unchecked Sendable {
    public let format: QuantFormat
    public let rows: Int
    public let cols: Int
    public let paddedRows: Int
    public let paddedCols: Int
    /// Packed levels: `paddedRows * paddedCols * bits / 8` bytes.
    public let levels: UnsafeRawPointer
    /// f16 scales `[paddedRows / 16][paddedCols / 32][16]`.
    public let scales: UnsafePointer<UInt16>
    /// Keeps the memory alive (an owned buffer or an mmap'ed cache file).
    private let owner: AnyObject

    public var groups: Int { paddedCols / QuantFormat.groupSize }
    public var levelBytes: Int { paddedRows / 16 * groups * format.blockBytes }
    public var scaleBytes: Int { paddedRows * groups * 2 }
    /// Bytes a full pass over the matrix reads: levels and scales.
    public var byteCount: Int { levelBytes + scaleBytes }

    /// Bytes a `[rows, cols]` matrix takes in `format` (levels and scales).
    public static func byteCount(format: QuantFormat, rows: Int, cols: Int) -> Int {
        let (r, c) = paddedShape(rows: rows, cols: cols)
        return r / 16 * (c / QuantFormat.groupSize) * format.blockBytes + r * (c / QuantFormat.groupSize) * 2
    }

    public static func paddedShape(rows: Int, cols: Int) -> (rows: Int, cols: Int) {
        ((rows + 15) / 16 * 16, (cols + 31) / 32 * 32)
    }

    /// Over memory someone else owns (a cache file): levels then scales, as `byteCount` says.
    public init(format: QuantFormat, rows: Int, cols: Int, data: UnsafeRawPointer, owner: AnyObject) {
        self.format = format
        self.rows = rows
        self.cols = cols
        (paddedRows, paddedCols) = Self.paddedShape(rows: rows, cols: cols)
        levels = data
        scales = (data + paddedRows / 16 * (paddedCols / 32) * format.blockBytes).assumingMemoryBound(to: UInt16.self)
        self.owner = owner
    }

    /// Quantizes `w` (any stored dtype): per row and group, scale = max|w| / maxLevel rounded
    /// to f16, level = round(w / scale) clamped. Error per weight: at most scale / 2 +
    /// max|w| * 2^-11 (the f16 rounding of the scale).
    /// `pool`: quantize blocks of 16 rows in parallel (each row owns its bytes and scales).
    public convenience init(quantizing w: WeightMatrix, format: QuantFormat, pool: ThreadPool? = nil) {
        let (pr, pc) = Self.paddedShape(rows: w.rows, cols: w.cols)
        let bytes = pr / 16 * (pc / 32) * format.blockBytes + pr * (pc / 32) * 2
        let buffer = AlignedBuffer(bytes: bytes)
        self.init(format: format, rows: w.rows, cols: w.cols, data: UnsafeRawPointer(buffer.pointer), owner: buffer)
        let out = Unchecked(buffer.pointer)
        let quantizeBlock = { (block: Int) in
            let row = UnsafeMutablePointer<Float>.allocate(capacity: pc)
            defer { row.deallocate() }
            row.initialize(repeating: 0, count: pc)
            for r in (block * 16)..<min(w.rows, block * 16 + 16) {
                w.loadRow(r, into: row)
                self.quantizeRow(row, r, into: out.value)
            }
        }
        if let pool { pool.parallelFor(pr / 16, quantizeBlock) } else { for b in 0..<(pr / 16) { quantizeBlock(b) } }
    }

    /// Writes row `r`'s levels and scales into the packed buffer at `base`.
    private func quantizeRow(_ row: UnsafePointer<Float>, _ r: Int, into base: UnsafeMutableRawPointer) {
        let G = groups, block = r / 16, lane = r % 16
        let scaleOut = (base + levelBytes).assumingMemoryBound(to: UInt16.self)
        let levelOut = base.assumingMemoryBound(to: UInt8.self)
        let maxLevel = Float(format.maxLevel)
        for g in 0..<G {
            var amax: Float = 0
            for i in 0..<32 { amax = max(amax, abs(row[g * 32 + i])) }
            let scaleBits = Float16(amax / maxLevel).bitPattern
            scaleOut[(block * G + g) * 16 + lane] = scaleBits
            let scale = f16ToFloat(scaleBits)
            let blockBase = levelOut + (block * G + g) * format.blockBytes
            for i in 0..<32 {
                let q = scale > 0 ? Int32(max(-maxLevel, min(maxLevel, (row[g * 32 + i] / scale).rounded()))) : 0
                let u = UInt8(q + format.offset)
                switch format {
                case .q8:
                    blockBase[(i / 4) * 64 + lane * 4 + i % 4] = u
                case .q4:
                    let j = i / 8, within = i % 8, byte = j * 64 + lane * 4 + within % 4
                    if within < 4 { blockBase[byte] = (blockBase[byte] & 0xF0) | u }
                    else { blockBase[byte] = (blockBase[byte] & 0x0F) | (u << 4) }
                }
            }
        }
    }

    /// The signed level of weight (r, k).
    @inline(__always)
    public func level(_ r: Int, _ k: Int) -> Int32 {
        let g = k / 32, i = k % 32, lane = r % 16
        let blockBase = levels.assumingMemoryBound(to: UInt8.self) + (r / 16 * groups + g) * format.blockBytes
        switch format {
        case .q8:
            return Int32(blockBase[(i / 4) * 64 + lane * 4 + i % 4]) - 128
        case .q4:
            let j = i / 8, within = i % 8, byte = blockBase[j * 64 + lane * 4 + within % 4]
            return Int32(within < 4 ? byte & 0x0F : byte >> 4) - 8
        }
    }

    /// The scale of row r's group g.
    @inline(__always)
    public func scale(_ r: Int, group g: Int) -> Float {
        f16ToFloat(scales[(r / 16 * groups + g) * 16 + r % 16])
    }

    /// Row `r` dequantized into `out[0..<cols]`.
    public func dequantizeRow(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        for k in 0..<cols { out[k] = Float(level(r, k)) * scale(r, group: k / 32) }
    }
}

/// Zero-filled whole pages, freed with their owner, so the buffer can be page-locked for DMA (cuMemHostRegister works
/// on pages) without sharing a page with other heap data that may be registered or freed
/// separately. From 4 MiB on (a full-size expert matrix) transparent huge pages, as the
/// stored weights get, so the kernels' streams do not miss the TLB every 4 KiB.
final class AlignedBuffer {
    let pointer: UnsafeMutableRawPointer
    private let pages: HugePageBuffer?
    init(bytes: Int) {
        if bytes >= 4 << 20 {
            pages = HugePageBuffer(byteCount: bytes)  // fresh anonymous memory: zero
            pointer = pages!.base
            return
        }
        pages = nil
        let rounded = (max(bytes, 1) + 4095) / 4096 * 4096
        pointer = UnsafeMutableRawPointer.allocate(byteCount: rounded, alignment: 4096)
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: rounded)
    }
    deinit { if pages == nil { pointer.deallocate() } }
}

/// Activations quantized per token and group of 32 for the integer kernels: levels in
/// [-127, 127], a scale per group, and the correction for the weights' offset.
/// Shapes: levels `[T, Kp]`, scales and corrections `[T, Kp / 32]`.
public struct QuantizedActivations {
    public let tokens: Int
    public let paddedCols: Int
    public var levels: [Int8]
    public var scales: [Float]
    public var corrections: [Float]

    /// x `[T, K]` (K <= Kp; the padding is zero).
    public init(_ x: UnsafePointer<Float>, tokens T: Int, cols K: Int, paddedCols Kp: Int, offset: Int32) {
        tokens = T
        paddedCols = Kp
        let G = Kp / 32
        levels = [Int8](repeating: 0, count: T * Kp)
        scales = [Float](repeating: 0, count: T * G)
        corrections = [Float](repeating: 0, count: T * G)
        for t in 0..<T {
            let row = x + t * K
            for g in 0..<G {
                let k0 = g * 32, k1 = min(K, k0 + 32)
                var amax: Float = 0
                for k in k0..<max(k0, k1) { amax = max(amax, abs(row[k])) }
                let scale = amax / 127
                var sum: Int32 = 0
                if scale > 0 {
                    for k in k0..<max(k0, k1) {
                        let q = Int8(max(-127, min(127, (row[k] / scale).rounded())))
                        levels[t * Kp + k] = q
                        sum += Int32(q)
                    }
                }
                scales[t * G + g] = scale
                corrections[t * G + g] = scale * Float(offset) * Float(sum)
            }
        }
    }
}

/// A SwiGLU expert's three matrices quantized alike.
public struct QuantizedExpert: Sendable {
    public let gate: QuantizedMatrix  // w1 [F, D]
    public let up: QuantizedMatrix    // w3 [F, D]
    public let down: QuantizedMatrix  // w2 [D, F]
    public init(gate: QuantizedMatrix, up: QuantizedMatrix, down: QuantizedMatrix) {
        self.gate = gate
        self.up = up
        self.down = down
    }
    public var byteCount: Int { gate.byteCount + up.byteCount + down.byteCount }

    /// Quantizes experts in parallel, one expert per task.
    public static func quantizing(_ experts: [(gate: WeightMatrix, up: WeightMatrix, down: WeightMatrix)], format: QuantFormat,
                                  pool: ThreadPool) -> [QuantizedExpert] {
        let slots = UnsafeMutableBufferPointer<QuantizedExpert?>.allocate(capacity: experts.count)
        slots.initialize(repeating: nil)
        defer { slots.deallocate() }
        let ps = Unchecked(slots.baseAddress!)
        pool.parallelFor(experts.count) { i in
            let e = experts[i]
            ps.value[i] = QuantizedExpert(gate: QuantizedMatrix(quantizing: e.gate, format: format),
                                          up: QuantizedMatrix(quantizing: e.up, format: format),
                                          down: QuantizedMatrix(quantizing: e.down, format: format))
        }
        return slots.map { $0! }
    }
}

extension CPUKernels {
    /// The path a quantized matmul takes: VNNI where the CPU has it and the path allows
    /// AVX-512 (auto, avx512, amx: AMX-INT8 is not used), else the portable integer loop;
    /// `reference` computes in fp32 on dequantized weights and unquantized activations.
    public var quantizedPath: KernelPath {
        switch path {
        case .reference: .reference
        case .portable: .portable
        default: features.vnni ? .avx512 : .portable
        }
    }

    /// `out = x @ w^T` with quantized weights. x `[T, K]`, w `[N, K]`, out `[T, N]`.
    public func matmul(_ x: UnsafePointer<Float>, _ w: QuantizedMatrix, _ out: UnsafeMutablePointer<Float>, tokens T: Int) {
        let N = w.rows
        if quantizedPath == .reference {
            let block = rowBlock(N), px = Unchecked(x), po = Unchecked(out)
            pool.parallelFor((N + block - 1) / block) { b in
                let row = UnsafeMutablePointer<Float>.allocate(capacity: w.cols)
                defer { row.deallocate() }
                for n in (b * block)..<min(N, (b + 1) * block) {
                    w.dequantizeRow(n, into: row)
                    for t in 0..<T { po.value[t * N + n] = referenceDot(px.value + t * w.cols, row, w.cols) }
                }
            }
            return
        }
        let xq = QuantizedActivations(x, tokens: T, cols: w.cols, paddedCols: w.paddedCols, offset: w.format.offset)
        matmul(xq, w, out, tokens: T)
    }

    /// The integer kernels over activations quantized once.
    func matmul(_ xq: QuantizedActivations, _ w: QuantizedMatrix, _ out: UnsafeMutablePointer<Float>, tokens T: Int) {
        matmuls(xq, [(w, out)], tokens: T)
    }

    /// Several matmuls over the same activations (gate and up) in one parallel section, so
    /// the threads wait for each other once.
    func matmuls(_ xq: QuantizedActivations, _ jobs: [(w: QuantizedMatrix, out: UnsafeMutablePointer<Float>)], tokens T: Int) {
        // (job, first row block, end row block) per task, about tasksPerThread per thread overall.
        let totalBlocks = jobs.reduce(0) { $0 + $1.w.paddedRows / 16 }
        let perTask = max(1, (totalBlocks + pool.threadCount * tasksPerThread - 1) / (pool.threadCount * tasksPerThread))
        var tasks: [(job: Int, rb0: Int, rb1: Int)] = []
        for (j, job) in jobs.enumerated() {
            let blocks = job.w.paddedRows / 16
            for rb in stride(from: 0, to: blocks, by: perTask) { tasks.append((j, rb, min(blocks, rb + perTask))) }
        }
        let vnni = quantizedPath == .avx512
        let outs = jobs.map { Unchecked($0.out) }
        xq.levels.withUnsafeBufferPointer { levels in
            xq.scales.withUnsafeBufferPointer { scales in
                xq.corrections.withUnsafeBufferPointer { corrections in
                    let pl = Unchecked(levels.baseAddress!), ps = Unchecked(scales.baseAddress!), pc = Unchecked(corrections.baseAddress!)
                    pool.parallelFor(tasks.count) { i in
                        let task = tasks[i], w = jobs[task.job].w, out = outs[task.job].value, N = w.rows
                        if vnni {
                            let kernel = w.format == .q8 ? duet_matmul_q8_vnni : duet_matmul_q4_vnni
                            kernel(w.levels.assumingMemoryBound(to: UInt8.self), w.scales, w.paddedCols, pl.value, ps.value, pc.value,
                                   T, out, N, N, task.rb0, task.rb1)
                        } else {
                            portableQuantizedRows(w, pl.value, ps.value, pc.value, tokens: T, out, rows: (task.rb0 * 16)..<min(N, task.rb1 * 16))
                        }
                    }
                }
            }
        }
    }

    /// SwiGLU expert with quantized weights: `y = w2(silu(w1 x) * w3 x)`. x `[T, D]`, y `[T, D]`.
    public func expertFFN(_ x: UnsafePointer<Float>, _ expert: QuantizedExpert, _ y: UnsafeMutablePointer<Float>, tokens T: Int) {
        let F = expert.gate.rows
        let h = UnsafeMutablePointer<Float>.allocate(capacity: T * F), u = UnsafeMutablePointer<Float>.allocate(capacity: T * F)
        defer { h.deallocate(); u.deallocate() }
        if quantizedPath == .reference {
            matmul(x, expert.gate, h, tokens: T)
            matmul(x, expert.up, u, tokens: T)
        } else {
            let xq = QuantizedActivations(x, tokens: T, cols: expert.gate.cols, paddedCols: expert.gate.paddedCols, offset: expert.gate.format.offset)
            matmuls(xq, [(expert.gate, h), (expert.up, u)], tokens: T)
        }
        siluMultiply(h, u, count: T * F)
        matmul(h, expert.down, y, tokens: T)
    }
}

/// The integer algorithm of the VNNI kernel in plain Swift: per row and group, the dot of
/// unsigned levels with activation levels, scaled and corrected.
func portableQuantizedRows(_ w: QuantizedMatrix, _ xq: UnsafePointer<Int8>, _ xs: UnsafePointer<Float>, _ xc: UnsafePointer<Float>,
                           tokens T: Int, _ out: UnsafeMutablePointer<Float>, rows: Range<Int>) {
    let G = w.groups, Kp = w.paddedCols, N = w.rows
    var unsigned = [Int32](repeating: 0, count: Kp)
    for n in rows {
        for k in 0..<Kp { unsigned[k] = w.level(n, k) + w.format.offset }
        for t in 0..<T {
            var acc: Float = 0
            for g in 0..<G {
                var dot: Int32 = 0
                for i in (g * 32)..<(g * 32 + 32) { dot &+= unsigned[i] * Int32(xq[t * Kp + i]) }
                acc += w.scale(n, group: g) * (xs[t * G + g] * Float(dot) - xc[t * G + g])
            }
            out[t * N + n] = acc
        }
    }
}
