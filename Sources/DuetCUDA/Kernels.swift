/// CUDA C kernels, kept as Swift strings so a copied binary carries them; compiled by NVRTC
/// for the device at first use.
enum KernelSource {
    static let common = """
    extern "C" {
    __device__ __forceinline__ float bf16_to_float(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
    __device__ __forceinline__ float warp_sum(float v) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        return v;
    }

    // y[t, :] = w * x[t, :] / sqrt(mean(x[t, :]^2) + eps). One block of 256 threads per row.
    __global__ void rms_norm(const float* x, const float* w, float* y, int D, float eps) {
        const float* row = x + (long)blockIdx.x * D;
        float s = 0.f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) s += row[i] * row[i];
        __shared__ float part[8];
        s = warp_sum(s);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
            v = warp_sum(v);
            if (threadIdx.x == 0) part[0] = v;
        }
        __syncthreads();
        float scale = rsqrtf(part[0] / D + eps);
        for (int i = threadIdx.x; i < D; i += blockDim.x) y[(long)blockIdx.x * D + i] = w[i] * (row[i] * scale);
    }

    // g[i] = silu(g[i]) * u[i].
    __global__ void silu_mul(float* g, const float* u, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) { float v = g[i]; g[i] = v / (1.f + __expf(-v)) * u[i]; }
    }

    // Reads n float4s and writes one value per block so nothing can be skipped: the HBM
    // read ceiling (bytes read only).
    __global__ void read_bandwidth(const float4* p, long n, float* sink) {
        float s = 0.f;
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
            float4 v = p[i];
            s += v.x + v.y + v.z + v.w;
        }
        s = warp_sum(s);
        if ((threadIdx.x & 31) == 0 && s == 12345.678f) sink[0] = s;  // practically never taken
    }

    // y[t, :] = table[ids[t], :] (bf16 rows widened to fp32).
    __global__ void embed_bf16(const unsigned short* table, const int* ids, float* y, int D) {
        const unsigned short* row = table + (long)ids[blockIdx.x] * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) y[(long)blockIdx.x * D + i] = bf16_to_float(row[i]);
    }

    // Rotary embedding, HF rotate-half: x [T, heads, d], token t at position start + t.
    // inv_freq [d/2] is computed on the host (as the CPU path) so both use the same values.
    __global__ void rope(float* x, const float* inv_freq, int heads, int d, int start) {
        int t = blockIdx.x, h = blockIdx.y, half = d >> 1;
        float* v = x + ((long)t * heads + h) * d;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float angle = (float)(start + t) * inv_freq[i];
            float c = cosf(angle), s = sinf(angle);
            float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }

    // Causal GQA attention of T queries at positions start..start+T-1 over a contiguous cache
    // keys/values [positions, Hkv, d]; query t attends to max(0, p - window + 1) .. p
    // (window <= 0: no window). One block per (t, h); scores in dynamic shared memory.
    __global__ void attention(const float* q, const float* keys, const float* values, float* out,
                              int start, int H, int Hkv, int d, int window) {
        extern __shared__ float scores[];
        __shared__ float red[32];
        int t = blockIdx.x, h = blockIdx.y, p = start + t, kvh = h / (H / Hkv);
        int first = window > 0 ? max(0, p - window + 1) : 0, n = p - first + 1;
        const float* qv = q + ((long)t * H + h) * d;
        float scale = rsqrtf((float)d);
        // One warp per key: the lanes read the key row together (coalesced), then sum.
        int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int j = threadIdx.x >> 5; j < n; j += warps) {
            const float* k = keys + ((long)(first + j) * Hkv + kvh) * d;
            float s = 0.f;
            for (int i = lane; i < d; i += 32) s += qv[i] * k[i];
            s = warp_sum(s);
            if (lane == 0) scores[j] = s * scale;
        }
        __syncthreads();
        float m = __int_as_float(0xff800000);
        for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
        __syncthreads();
        m = __int_as_float(0xff800000);
        for (int w = 0; w < (blockDim.x >> 5); w++) m = fmaxf(m, red[w]);
        __syncthreads();
        float total = 0.f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) { float e = expf(scores[j] - m); scores[j] = e; total += e; }
        total = warp_sum(total);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = total;
        __syncthreads();
        total = 0.f;
        for (int w = 0; w < (blockDim.x >> 5); w++) total += red[w];
        float* o = out + ((long)t * H + h) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float acc = 0.f;
            for (int j = 0; j < n; j++) acc += scores[j] * values[((long)(first + j) * Hkv + kvh) * d + i];
            o[i] = acc / total;
        }
    }

    // Router: softmax over E logits per token, top-k (ties to the lower id), renormalised
    // weights. One thread per token (E is small).
    __global__ void route_topk(const float* logits, int* experts, float* weights, int T, int E, int k) {
        int t = blockIdx.x * blockDim.x + threadIdx.x;
        if (t >= T) return;
        const float* l = logits + (long)t * E;
        float m = __int_as_float(0xff800000);
        for (int e = 0; e < E; e++) m = fmaxf(m, l[e]);
        float z = 0.f;
        for (int e = 0; e < E; e++) z += expf(l[e] - m);
        unsigned long long taken = 0ull;
        float kept = 0.f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) if (!((taken >> e) & 1ull) && (best < 0 || l[e] > l[best])) best = e;
            taken |= 1ull << best;
            experts[t * k + j] = best;
            weights[t * k + j] = expf(l[best] - m) / z;
            kept += weights[t * k + j];
        }
        for (int j = 0; j < k; j++) weights[t * k + j] /= kept;
    }

    // y[t, n] = sum_k W[n, k] * x[t, k] for fp32 weights (same scheme as gemv_bf16).
    __global__ void gemv_f32(const float* W, const float* x, float* y, int N, int K, int T) {
        int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        int lane = threadIdx.x & 31;
        if (n >= N) return;
        const float* row = W + (long)n * K;
        for (int t0 = 0; t0 < T; t0 += 8) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int tt = T - t0 < 8 ? T - t0 : 8;
            for (int k = lane; k < K; k += 32) {
                float w = row[k];
                for (int j = 0; j < tt; j++) acc[j] += w * x[(long)(t0 + j) * K + k];
            }
            for (int j = 0; j < tt; j++) {
                float v = warp_sum(acc[j]);
                if (lane == 0) y[(long)(t0 + j) * N + n] = v;
            }
        }
    }

    // out[i, :] = x[idx[i], :] (rows of D floats).
    __global__ void gather_rows(const float* x, const int* idx, float* out, int D) {
        const float* src = x + (long)idx[blockIdx.x] * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) out[(long)blockIdx.x * D + i] = src[i];
    }

    // out[idx[i], :] += w[i] * y[i, :] (each idx at most once per launch).
    __global__ void scatter_add_rows(float* out, const float* y, const int* idx, const float* w, int D) {
        float* dst = out + (long)idx[blockIdx.x] * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] += w[blockIdx.x] * y[(long)blockIdx.x * D + i];
    }

    // dst[offset + i] = src[i].
    __global__ void copy_floats(float* dst, const float* src, long offset, long n) {
        long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
        if (i < n) dst[offset + i] = src[i];
    }

    // x[i] += y[i].
    __global__ void add_inplace(float* x, const float* y, long n) {
        long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
        if (i < n) x[i] += y[i];
    }

    // The dot of one bf16 row with one fp32 vector, this lane's share (a warp sums the shares).
    // 16-byte loads where K is a multiple of 8 and both are 16-byte aligned.
    __device__ float row_dot_bf16(const unsigned short* row, const float* x, int K, int lane) {
        float acc = 0;
        if ((K & 7) == 0 && ((((unsigned long long)row) | ((unsigned long long)x)) & 15) == 0) {
            const uint4* row8 = (const uint4*)row;
            const float4* x4 = (const float4*)x;
            #pragma unroll 4
            for (int i = lane; i < (K >> 3); i += 32) {
                uint4 p = row8[i];
                float4 a = x4[2 * i], b = x4[2 * i + 1];
                acc += __uint_as_float(p.x << 16) * a.x + __uint_as_float(p.x & 0xffff0000u) * a.y
                     + __uint_as_float(p.y << 16) * a.z + __uint_as_float(p.y & 0xffff0000u) * a.w
                     + __uint_as_float(p.z << 16) * b.x + __uint_as_float(p.z & 0xffff0000u) * b.y
                     + __uint_as_float(p.w << 16) * b.z + __uint_as_float(p.w & 0xffff0000u) * b.w;
            }
        } else {
            for (int k = lane; k < K; k += 32) acc += bf16_to_float(row[k]) * x[k];
        }
        return acc;
    }

    // y = x rounded to bf16 (round to nearest even), n elements.
    __global__ void f32_to_bf16(const float* x, unsigned short* y, long n) {
        long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n) return;
        unsigned int b = __float_as_uint(x[i]);
        y[i] = (b & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b >> 16) | 0x40) : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }

    // Decode-time MoE without a host round trip: the router's choices stay on the device and
    // the kernels find each expert's weights through per-layer pointer tables.
    // h[a, r] = silu(W1[e] r . x[t]) * (W3[e] r . x[t]) for assignment a = t * k + j, e = ids[a].
    // Grid: (ceil(F / warps), T * k); one warp per row.
    __global__ void moe_gate_up_bf16(const unsigned long long* w1s, const unsigned long long* w3s, const int* ids,
                                     const float* x, float* h, int F, int D, int k) {
        int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        int a = blockIdx.y, lane = threadIdx.x & 31;
        if (r >= F) return;
        int e = ids[a];
        const float* xt = x + (long)(a / k) * D;
        float g = warp_sum(row_dot_bf16((const unsigned short*)w1s[e] + (long)r * D, xt, D, lane));
        float u = warp_sum(row_dot_bf16((const unsigned short*)w3s[e] + (long)r * D, xt, D, lane));
        if (lane == 0) h[(long)a * F + r] = g / (1.0f + expf(-g)) * u;
    }

    // x[t, r] += sum_j weights[t, j] * (W2[e_j] r . h[t * k + j]): the experts' weighted sum,
    // in the router's order, added to the residual stream. Grid: (ceil(D / warps), T).
    __global__ void moe_down_bf16(const unsigned long long* w2s, const int* ids, const float* weights, const float* h,
                                  float* x, int D, int F, int k) {
        int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        int t = blockIdx.y, lane = threadIdx.x & 31;
        if (r >= D) return;
        float acc = 0;
        for (int j = 0; j < k; j++) {
            int a = t * k + j;
            float part = warp_sum(row_dot_bf16((const unsigned short*)w2s[ids[a]] + (long)r * F, h + (long)a * F, F, lane));
            acc += weights[a] * part;
        }
        if (lane == 0) x[(long)t * D + r] += acc;
    }

    // y[t, n] = sum_k W[n, k] * x[t, k], W bf16 [N, K], x fp32 [T, K]. One warp per output row,
    // every token of the row in the same warp (the weights are read once for all T <= 8).
    // Where K is a multiple of 8 and both operands are 16-byte aligned, each lane loads 8 weights
    // (16 bytes) at a time, so a warp reads 512 contiguous bytes per load instead of 64.
    __global__ void gemv_bf16(const unsigned short* W, const float* x, float* y, int N, int K, int T) {
        int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        int lane = threadIdx.x & 31;
        if (n >= N) return;
        const unsigned short* row = W + (long)n * K;
        bool wide = (K & 7) == 0 && ((((unsigned long long)W) | ((unsigned long long)x)) & 15) == 0;
        for (int t0 = 0; t0 < T; t0 += 8) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int tt = T - t0 < 8 ? T - t0 : 8;
            if (wide) {
                const uint4* row8 = (const uint4*)row;
                #pragma unroll 4
                for (int i = lane; i < (K >> 3); i += 32) {
                    uint4 p = row8[i];
                    float w0 = __uint_as_float(p.x << 16), w1 = __uint_as_float(p.x & 0xffff0000u);
                    float w2 = __uint_as_float(p.y << 16), w3 = __uint_as_float(p.y & 0xffff0000u);
                    float w4 = __uint_as_float(p.z << 16), w5 = __uint_as_float(p.z & 0xffff0000u);
                    float w6 = __uint_as_float(p.w << 16), w7 = __uint_as_float(p.w & 0xffff0000u);
                    for (int j = 0; j < tt; j++) {
                        const float4* xv = (const float4*)(x + (long)(t0 + j) * K) + 2 * i;
                        float4 a = xv[0], b = xv[1];
                        acc[j] += w0 * a.x + w1 * a.y + w2 * a.z + w3 * a.w + w4 * b.x + w5 * b.y + w6 * b.z + w7 * b.w;
                    }
                }
            } else {
                for (int k = lane; k < K; k += 32) {
                    float w = bf16_to_float(row[k]);
                    for (int j = 0; j < tt; j++) acc[j] += w * x[(long)(t0 + j) * K + k];
                }
            }
            for (int j = 0; j < tt; j++) {
                float v = warp_sum(acc[j]);
                if (lane == 0) y[(long)(t0 + j) * N + n] = v;
            }
        }
    }
    }
    """
}

/// Packs kernel arguments: each value in its own small allocation, as cuLaunchKernel wants.
final class KernelArguments {
    private(set) var pointers: [UnsafeMutableRawPointer?] = []
    func add<T>(_ value: T) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment)
        p.storeBytes(of: value, as: T.self)
        pointers.append(p)
    }
    func add(_ buffer: DeviceBuffer) { add(buffer.pointer) }
    deinit { for p in pointers { p?.deallocate() } }
}

/// The CUDA ops, each the same computation as its CPU twin in DuetCPU.
public struct GPUOps {
    public let gpu: GPU
    public init(gpu: GPU) { self.gpu = gpu }

    /// y `[T, D]` = RMSNorm(x `[T, D]`) with weight `[D]`.
    public func rmsNorm(_ x: DeviceBuffer, weight: DeviceBuffer, _ y: DeviceBuffer, tokens T: Int, dim D: Int, eps: Float) throws(CUDAError) {
        let f = try gpu.function("rms_norm", in: KernelSource.common)
        let a = KernelArguments()
        a.add(x); a.add(weight); a.add(y); a.add(Int32(D)); a.add(eps)
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// g = silu(g) * u, n elements.
    public func siluMultiply(_ g: DeviceBuffer, _ u: DeviceBuffer, count n: Int) throws(CUDAError) {
        let f = try gpu.function("silu_mul", in: KernelSource.common)
        let a = KernelArguments()
        a.add(g); a.add(u); a.add(Int32(n))
        try gpu.launch(f, grid: (UInt32((n + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// Rotates x `[T, heads, d]` in place at positions `start..<start+T`.
    public func rope(_ x: DeviceBuffer, inverseFrequencies: DeviceBuffer, tokens T: Int, heads: Int, headDim d: Int, start: Int) throws(CUDAError) {
        let f = try gpu.function("rope", in: KernelSource.common)
        let a = KernelArguments()
        a.add(x); a.add(inverseFrequencies); a.add(Int32(heads)); a.add(Int32(d)); a.add(Int32(start))
        try gpu.launch(f, grid: (UInt32(T), UInt32(heads), 1), block: (64, 1, 1), arguments: a.pointers)
    }

    /// Causal GQA attention of `T` queries (positions `start...`) over a contiguous cache
    /// `[start + T, Hkv, d]`. window nil: full causal.
    public func attention(queries q: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, out: DeviceBuffer,
                          tokens T: Int, start: Int, heads H: Int, kvHeads: Int, headDim d: Int, window: Int?) throws(CUDAError) {
        let f = try gpu.function("attention", in: KernelSource.common)
        let a = KernelArguments()
        a.add(q); a.add(keys); a.add(values); a.add(out)
        a.add(Int32(start)); a.add(Int32(H)); a.add(Int32(kvHeads)); a.add(Int32(d)); a.add(Int32(window ?? 0))
        let positions = start + T
        try gpu.launch(f, grid: (UInt32(T), UInt32(H), 1), block: (128, 1, 1), sharedBytes: UInt32(positions * 4), arguments: a.pointers)
    }

    /// Top-k experts and renormalised weights of router logits `[T, E]` (as DuetCPU.routeTopK).
    public func routeTopK(_ logits: DeviceBuffer, experts: DeviceBuffer, weights: DeviceBuffer, tokens T: Int, experts E: Int, k: Int) throws(CUDAError) {
        let f = try gpu.function("route_topk", in: KernelSource.common)
        let a = KernelArguments()
        a.add(logits); a.add(experts); a.add(weights); a.add(Int32(T)); a.add(Int32(E)); a.add(Int32(k))
        try gpu.launch(f, grid: (UInt32((T + 127) / 128), 1, 1), block: (128, 1, 1), arguments: a.pointers)
    }

    /// x += y, n elements.
    public func add(_ x: DeviceBuffer, _ y: DeviceBuffer, count n: Int) throws(CUDAError) {
        let f = try gpu.function("add_inplace", in: KernelSource.common)
        let a = KernelArguments()
        a.add(x); a.add(y); a.add(Int64(n))
        try gpu.launch(f, grid: (UInt32((n + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// Rows `ids` of a bf16 table `[V, D]` into y `[T, D]` fp32.
    public func embedBF16(_ table: DeviceBuffer, ids: DeviceBuffer, _ y: DeviceBuffer, tokens T: Int, dim D: Int) throws(CUDAError) {
        let f = try gpu.function("embed_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(table); a.add(ids); a.add(y); a.add(Int32(D))
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// Bytes per second a read-only kernel streams from `bytes` of device memory (best of `repeats`).
    public func readBandwidth(bytes: Int, repeats: Int = 5) throws(CUDAError) -> Double {
        let f = try gpu.function("read_bandwidth", in: KernelSource.common)
        let buffer = try gpu.allocate(bytes, category: "workspace"), sink = try gpu.allocate(4, category: "workspace")
        let a = KernelArguments()
        a.add(buffer); a.add(Int64(bytes / 16)); a.add(sink)
        var best = Double.infinity
        for _ in 0...repeats {  // the first pass warms up
            let start = ContinuousClock.now
            try gpu.launch(f, grid: (132 * 8, 1, 1), block: (512, 1, 1), arguments: a.pointers)
            try gpu.synchronize()
            let d = ContinuousClock.now - start
            best = min(best, Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18)
        }
        return Double(bytes / 16 * 16) / best
    }

    /// y `[T, N]` = x `[T, K]` @ W^T, W fp32 `[N, K]`.
    public func matmulF32(_ x: DeviceBuffer, _ w: DeviceBuffer, _ y: DeviceBuffer, rows N: Int, cols K: Int, tokens T: Int) throws(CUDAError) {
        let f = try gpu.function("gemv_f32", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w); a.add(x); a.add(y); a.add(Int32(N)); a.add(Int32(K)); a.add(Int32(T))
        try gpu.launch(f, grid: (UInt32((N + 7) / 8), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    public func gatherRows(_ x: DeviceBuffer, indices: DeviceBuffer, _ out: DeviceBuffer, rows M: Int, dim D: Int) throws(CUDAError) {
        let f = try gpu.function("gather_rows", in: KernelSource.common)
        let a = KernelArguments()
        a.add(x); a.add(indices); a.add(out); a.add(Int32(D))
        try gpu.launch(f, grid: (UInt32(M), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    public func scatterAddRows(_ out: DeviceBuffer, _ y: DeviceBuffer, indices: DeviceBuffer, weights: DeviceBuffer, rows M: Int, dim D: Int) throws(CUDAError) {
        let f = try gpu.function("scatter_add_rows", in: KernelSource.common)
        let a = KernelArguments()
        a.add(out); a.add(y); a.add(indices); a.add(weights); a.add(Int32(D))
        try gpu.launch(f, grid: (UInt32(M), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// dst[offset..<offset+n] = src[0..<n] (floats).
    public func copy(_ src: DeviceBuffer, into dst: DeviceBuffer, offset: Int, count n: Int) throws(CUDAError) {
        let f = try gpu.function("copy_floats", in: KernelSource.common)
        let a = KernelArguments()
        a.add(dst); a.add(src); a.add(Int64(offset)); a.add(Int64(n))
        try gpu.launch(f, grid: (UInt32((n + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// h `[T * k, F]` = silu(W1 x) * (W3 x) for each token's k chosen experts (`ids` `[T, k]`
    /// on the device); `w1s`, `w3s`: the layer's expert pointer tables `[E]`.
    public func moeGateUp(w1s: DeviceBuffer, w3s: DeviceBuffer, ids: DeviceBuffer, x: DeviceBuffer, h: DeviceBuffer,
                          tokens T: Int, k: Int, rows F: Int, cols D: Int) throws(CUDAError) {
        let f = try gpu.function("moe_gate_up_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w1s); a.add(w3s); a.add(ids); a.add(x); a.add(h); a.add(Int32(F)); a.add(Int32(D)); a.add(Int32(k))
        try gpu.launch(f, grid: (UInt32((F + 7) / 8), UInt32(T * k), 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// x `[T, D]` += the k experts' down projections of h, weighted by the router's weights `[T, k]`.
    public func moeDownAdd(w2s: DeviceBuffer, ids: DeviceBuffer, weights: DeviceBuffer, h: DeviceBuffer, x: DeviceBuffer,
                           tokens T: Int, k: Int, rows D: Int, cols F: Int) throws(CUDAError) {
        let f = try gpu.function("moe_down_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w2s); a.add(ids); a.add(weights); a.add(h); a.add(x); a.add(Int32(D)); a.add(Int32(F)); a.add(Int32(k))
        try gpu.launch(f, grid: (UInt32((D + 7) / 8), UInt32(T), 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// y `[T, N]` = x `[T, K]` @ W^T, W bf16 `[N, K]`: the GEMV kernel for few tokens, a cuBLAS
    /// GEMM on x rounded to bf16 (fp32 accumulation) from `gpu.gemmMinTokens` tokens up.
    public func matmulBF16(_ x: DeviceBuffer, _ w: DeviceBuffer, _ y: DeviceBuffer, rows N: Int, cols K: Int, tokens T: Int) throws(CUDAError) {
        if T >= gpu.gemmMinTokens, let blas = gpu.blas {
            return try gemmBF16(blas, x, w, y, rows: N, cols: K, tokens: T)
        }
        try gemvBF16(x, w, y, rows: N, cols: K, tokens: T)
    }

    /// The GEMV kernel alone (every token count).
    public func gemvBF16(_ x: DeviceBuffer, _ w: DeviceBuffer, _ y: DeviceBuffer, rows N: Int, cols K: Int, tokens T: Int) throws(CUDAError) {
        let f = try gpu.function("gemv_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w); a.add(x); a.add(y); a.add(Int32(N)); a.add(Int32(K)); a.add(Int32(T))
        try gpu.launch(f, grid: (UInt32((N + 7) / 8), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// Row-major y `[T, N]` = x `[T, K]` W^T is column-major y' `[N, T]` = W'^T x' with W' = the
    /// row-major W read as column-major `[K, N]`: GemmEx(transa = T, m = N, n = T, k = K).
    private func gemmBF16(_ blas: (library: CUBLAS, handle: OpaquePointer?), _ x: DeviceBuffer, _ w: DeviceBuffer, _ y: DeviceBuffer,
                          rows N: Int, cols K: Int, tokens T: Int) throws(CUDAError) {
        let xb = try gpu.allocate(T * K * 2, category: GPU.workspace)  // x in bf16
        let f = try gpu.function("f32_to_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(x); a.add(xb); a.add(Int64(T * K))
        try gpu.launch(f, grid: (UInt32((T * K + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
        var alpha: Float = 1, beta: Float = 0
        let status = blas.library.gemmEx(blas.handle, CUBLAS.opT, CUBLAS.opN, Int32(N), Int32(T), Int32(K), &alpha,
                                         w.pointer, CUBLAS.r16BF, Int32(K), xb.pointer, CUBLAS.r16BF, Int32(K), &beta,
                                         y.pointer, CUBLAS.r32F, Int32(N), CUBLAS.compute32F, CUBLAS.defaultAlgo)
        gpu.countLaunch()
        guard status == 0 else { throw .call("cublasGemmEx", code: status, name: "cuBLAS status \(status)") }
    }
}
