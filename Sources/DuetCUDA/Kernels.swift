import DuetCPU

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

    // Whether a row of D floats at each of these pointers can be read as float4s.
    __device__ __forceinline__ bool rows_vec4(int D, const void* a, const void* b, const void* c) {
        return (D & 3) == 0 && ((((unsigned long long)a) | ((unsigned long long)b) | ((unsigned long long)c)) & 15) == 0;
    }

    // y = w * row / sqrt(mean(row^2) + eps) for one row of D, by one block (up to 1024
    // threads; enough that each reads one or two float4s: a single-token step is latency-bound,
    // not bandwidth-bound). vec: float4 loads, element i4 of the row owned by thread i4 mod
    // blockDim (add_rms_norm relies on the same ownership).
    __device__ void rms_norm_row(const float* row, const float* w, float* y, int D, float eps, bool vec) {
        float s = 0.f;
        if (vec) {
            for (int i = threadIdx.x; i < (D >> 2); i += blockDim.x) {
                float4 v = ((const float4*)row)[i];
                s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
        } else {
            for (int i = threadIdx.x; i < D; i += blockDim.x) s += row[i] * row[i];
        }
        __shared__ float part[32];
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
        if (vec) {
            for (int i = threadIdx.x; i < (D >> 2); i += blockDim.x) {
                float4 v = ((const float4*)row)[i], g = ((const float4*)w)[i];
                ((float4*)y)[i] = make_float4(g.x * (v.x * scale), g.y * (v.y * scale), g.z * (v.z * scale), g.w * (v.w * scale));
            }
        } else {
            for (int i = threadIdx.x; i < D; i += blockDim.x) y[i] = w[i] * (row[i] * scale);
        }
    }

    // y[t, :] = w * x[t, :] / sqrt(mean(x[t, :]^2) + eps). One block per row.
    __global__ void rms_norm(const float* x, const float* w, float* y, int D, float eps) {
        const float* row = x + (long)blockIdx.x * D;
        float* out = y + (long)blockIdx.x * D;
        rms_norm_row(row, w, out, D, eps, rows_vec4(D, row, w, out));
    }

    // x[t, :] += a[t, :], then y[t, :] = RMSNorm(x[t, :]) * w: a residual add and the next
    // norm in one launch, with the same arithmetic as add_inplace then rms_norm (each thread
    // reads back only the elements it added, so no barrier is needed in between).
    __device__ void add_rms_norm_row(float* row, const float* add, const float* w, float* out, int D, float eps) {
        bool vec = rows_vec4(D, row, w, out) && rows_vec4(D, add, add, add);
        if (vec) {
            for (int i = threadIdx.x; i < (D >> 2); i += blockDim.x) {
                float4 r = ((float4*)row)[i], b = ((const float4*)add)[i];
                ((float4*)row)[i] = make_float4(r.x + b.x, r.y + b.y, r.z + b.z, r.w + b.w);
            }
        } else {
            for (int i = threadIdx.x; i < D; i += blockDim.x) row[i] += add[i];
        }
        rms_norm_row(row, w, out, D, eps, vec);
    }
    __global__ void add_rms_norm(float* x, const float* a, const float* w, float* y, int D, float eps) {
        long o = (long)blockIdx.x * D;
        add_rms_norm_row(x + o, a + o, w, y + o, D, eps);
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
    __global__ void embed_bf16(const unsigned short* __restrict__ table, const int* __restrict__ ids, float* __restrict__ y, int D) {
        const unsigned short* row = table + (long)ids[blockIdx.x] * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) y[(long)blockIdx.x * D + i] = bf16_to_float(row[i]);
    }

    // HF rotate-half rotary embedding of one head vector at position pos: dst = rope(src)
    // (dst may be src). inv_freq [d/2] is computed on the host (as the CPU path) so both use
    // the same values.
    __device__ void rope_head(const float* src, float* dst, const float* inv_freq, int d, int pos) {
        int half = d >> 1;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float angle = (float)pos * inv_freq[i];
            float c = cosf(angle), s = sinf(angle);
            float a = src[i], b = src[i + half];
            dst[i] = a * c - b * s;
            dst[i + half] = b * c + a * s;
        }
    }

    // One step's rotary embedding and KV cache writes in one launch. Block (t, j): j < H
    // rotates query head j in place; H <= j < H + Hkv rotates key head j - H straight into the
    // key cache at position start + t; the rest copy value head j - H - Hkv into the value
    // cache (the selftest checks it against DuetCPU's Rope.apply). start_at non-null: the
    // first position is read from there (a captured decode step serves every position).
    // places non-null: token t is one sequence's next token (beams, a batch), at position
    // places[2t + 1] of the cache region that starts places[2t] * slot_floats floats in.
    __global__ void rope_store(float* q, const float* k, const float* v, float* keys, float* values,
                               const float* inv_freq, int H, int Hkv, int d, int start, const int* start_at,
                               const int* places, long slot_floats) {
        if (start_at) start = *start_at;
        int t = blockIdx.x, j = blockIdx.y, pos = start + t;
        if (places) {
            pos = places[2 * t + 1];
            keys += (long)places[2 * t] * slot_floats;
            values += (long)places[2 * t] * slot_floats;
        }
        if (j < H) {
            float* head = q + ((long)t * H + j) * d;
            rope_head(head, head, inv_freq, d, pos);
        } else if (j < H + Hkv) {
            rope_head(k + ((long)t * Hkv + (j - H)) * d, keys + ((long)pos * Hkv + (j - H)) * d, inv_freq, d, pos);
        } else {
            const float* src = v + ((long)t * Hkv + (j - H - Hkv)) * d;
            float* dst = values + ((long)pos * Hkv + (j - H - Hkv)) * d;
            for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
        }
    }

    // Causal GQA attention of T queries at positions start..start+T-1 over a contiguous cache
    // keys/values [positions, Hkv, d]; query t attends to max(0, p - window + 1) .. p
    // (window <= 0: no window). One block per (t, h); scores in dynamic shared memory.
    // start_at non-null: start is read from there; places non-null: query t is at position
    // places[2t + 1] of its own sequence's region (both as rope_store).
    __global__ void attention(const float* q, const float* keys, const float* values, float* out,
                              int start, int H, int Hkv, int d, int window, const int* start_at,
                              const int* places, long slot_floats) {
        extern __shared__ float scores[];
        __shared__ float red[32];
        __shared__ float4 partial[8][32];
        if (start_at) start = *start_at;
        int t = blockIdx.x, h = blockIdx.y, p = start + t, kvh = h / (H / Hkv);
        if (places) {
            p = places[2 * t + 1];
            keys += (long)places[2 * t] * slot_floats;
            values += (long)places[2 * t] * slot_floats;
        }
        int first = window > 0 ? max(0, p - window + 1) : 0, n = p - first + 1;
        const float* qv = q + ((long)t * H + h) * d;
        float scale = rsqrtf((float)d);
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
        // d % 4 == 0 and d <= 128 (vec): lane L holds dimensions 4L..4L+3 as a float4, so a
        // warp reads a key row in one coalesced load; each warp scores four keys per pass, and
        // in the value pass accumulates its keys' rows, the warps' sums meeting at the end.
        bool vec = (d & 3) == 0 && d <= 128 && warps <= 8 && ((((unsigned long long)q) | ((unsigned long long)keys) | ((unsigned long long)values)) & 15) == 0;
        long stride = (long)Hkv * d;
        const float* kbase = keys + (long)first * stride + (long)kvh * d;
        const float* vbase = values + (long)first * stride + (long)kvh * d;
        bool active = 4 * lane < d;
        float4 q4 = vec && active ? ((const float4*)qv)[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
        if (vec) {
            for (int j0 = warp * 4; j0 < n; j0 += 4 * warps) {
                float s[4];
                #pragma unroll
                for (int u = 0; u < 4; u++) {
                    float4 kv = active && j0 + u < n ? ((const float4*)(kbase + (long)(j0 + u) * stride))[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
                    s[u] = q4.x * kv.x + q4.y * kv.y + q4.z * kv.z + q4.w * kv.w;
                }
                #pragma unroll
                for (int u = 0; u < 4; u++) s[u] = warp_sum(s[u]);
                if (lane < 4 && j0 + lane < n) scores[j0 + lane] = (lane == 0 ? s[0] : lane == 1 ? s[1] : lane == 2 ? s[2] : s[3]) * scale;
            }
        } else {
            // One warp per key: the lanes read the key row together (coalesced), then sum.
            for (int j = warp; j < n; j += warps) {
                const float* k = keys + ((long)(first + j) * Hkv + kvh) * d;
                float s = 0.f;
                for (int i = lane; i < d; i += 32) s += qv[i] * k[i];
                s = warp_sum(s);
                if (lane == 0) scores[j] = s * scale;
            }
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
        if (vec) {
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            if (active) {
                #pragma unroll 4
                for (int j = warp; j < n; j += warps) {
                    float4 v = ((const float4*)(vbase + (long)j * stride))[lane];
                    float pj = scores[j];
                    acc.x += pj * v.x; acc.y += pj * v.y; acc.z += pj * v.z; acc.w += pj * v.w;
                }
            }
            partial[warp][lane] = acc;
            __syncthreads();
            if (warp == 0 && active) {
                float4 sum = partial[0][lane];
                for (int w = 1; w < warps; w++) {
                    float4 b = partial[w][lane];
                    sum.x += b.x; sum.y += b.y; sum.z += b.z; sum.w += b.w;
                }
                ((float4*)o)[lane] = make_float4(sum.x / total, sum.y / total, sum.z / total, sum.w / total);
            }
            return;
        }
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float acc = 0.f;
            for (int j = 0; j < n; j++) acc += scores[j] * values[((long)(first + j) * Hkv + kvh) * d + i];
            o[i] = acc / total;
        }
    }

    // The same attention for many queries, tiled (flash-attention style, fp32): a block takes
    // 32 consecutive queries of one head and walks their keys in tiles of 32 staged in shared
    // memory, keeping each query's running max and sum (online softmax), so no [T, positions]
    // score matrix exists and work grows with the causal triangle only. Warp w owns queries
    // 8w..8w+7 of the tile; in a key tile lane j scores key j, and each lane accumulates the
    // output dimensions lane + 32c. Requires d <= 128 and d % 4 == 0. Grid (ceil(T/32), H),
    // the longest query tiles first; 128 threads.
    // Positions k0..k0+31 of head kvh of a cache [positions, Hkv, d] into a shared tile
    // [32][33] of float4 (zeros past `last` and past d), by all the block's threads.
    __device__ __forceinline__ void stage_kv_tile(float4 (*tile)[33], const float* cache, int k0, int last, int Hkv, int kvh, int d) {
        for (int i = threadIdx.x; i < 32 * 32; i += blockDim.x) {
            int r = i >> 5, c = i & 31;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (k0 + r <= last && c < (d >> 2)) v = ((const float4*)(cache + ((long)(k0 + r) * Hkv + kvh) * d))[c];
            tile[r][c] = v;
        }
    }
    __global__ void attention_tiled(const float* q, const float* keys, const float* values, float* out,
                                    int T, int start, int H, int Hkv, int d, int window) {
        __shared__ float4 Qs[32][32];   // [query][d / 4]
        __shared__ float4 KV[32][33];   // [key][d / 4], padded: a tile's keys, then its values
        const float NEG = __int_as_float(0xff800000);
        int tiles = (T + 31) >> 5, tile = tiles - 1 - blockIdx.x;
        int h = blockIdx.y, kvh = h / (H / Hkv), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        int t0 = tile * 32, d4 = d >> 2;
        float scale = rsqrtf((float)d);
        for (int i = threadIdx.x; i < 32 * 32; i += blockDim.x) {
            int r = i >> 5, c = i & 31;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t0 + r < T && c < d4) v = ((const float4*)(q + ((long)(t0 + r) * H + h) * d))[c];
            Qs[r][c] = v;
        }
        float m[8], l[8], o[8][4];
        #pragma unroll
        for (int i = 0; i < 8; i++) { m[i] = NEG; l[i] = 0.f; o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f; }
        int lastPos = start + min(T, t0 + 32) - 1;
        int firstKey = window > 0 ? max(0, start + t0 - window + 1) : 0;
        for (int k0 = firstKey & ~31; k0 <= lastPos; k0 += 32) {
            __syncthreads();  // the previous tile's values are no longer read (and Qs is staged)
            stage_kv_tile(KV, keys, k0, lastPos, Hkv, kvh, d);
            __syncthreads();
            float sc[8];
            #pragma unroll
            for (int i = 0; i < 8; i++) sc[i] = 0.f;
            for (int c = 0; c < d4; c++) {
                float4 kv = KV[lane][c];
                #pragma unroll
                for (int i = 0; i < 8; i++) {
                    float4 qv = Qs[warp * 8 + i][c];
                    sc[i] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                }
            }
            int key = k0 + lane;
            float p[8];
            #pragma unroll
            for (int i = 0; i < 8; i++) {
                int t = t0 + warp * 8 + i, pos = start + t;
                bool valid = t < T && key <= pos && (window <= 0 || key > pos - window);
                float s = valid ? sc[i] * scale : NEG;
                float tileMax = s;
                for (int off = 16; off > 0; off >>= 1) tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffff, tileMax, off));
                float mNew = fmaxf(m[i], tileMax);
                p[i] = valid ? expf(s - mNew) : 0.f;
                float corr = m[i] == NEG ? 0.f : expf(m[i] - mNew);
                l[i] = l[i] * corr + warp_sum(p[i]);
                o[i][0] *= corr; o[i][1] *= corr; o[i][2] *= corr; o[i][3] *= corr;
                m[i] = mNew;
            }
            __syncthreads();  // keys read by every warp
            stage_kv_tile(KV, values, k0, lastPos, Hkv, kvh, d);
            __syncthreads();
            const float* V = (const float*)KV;  // row stride 132 floats
            for (int j = 0; j < 32; j++) {
                float v0 = V[j * 132 + lane], v1 = V[j * 132 + lane + 32], v2 = V[j * 132 + lane + 64], v3 = V[j * 132 + lane + 96];
                #pragma unroll
                for (int i = 0; i < 8; i++) {
                    float pj = __shfl_sync(0xffffffff, p[i], j);
                    o[i][0] += pj * v0; o[i][1] += pj * v1; o[i][2] += pj * v2; o[i][3] += pj * v3;
                }
            }
        }
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            int t = t0 + warp * 8 + i;
            if (t >= T) continue;
            float* dst = out + ((long)t * H + h) * d;
            float inv = 1.f / l[i];
            #pragma unroll
            for (int c = 0; c < 4; c++) if (lane + 32 * c < d) dst[lane + 32 * c] = o[i][c] * inv;
        }
    }

    // Router: softmax over E logits per token, top-k (ties to the lower id), renormalised
    // weights. One thread per token (E is small).
    __device__ void topk_row(const float* __restrict__ l, int* __restrict__ experts, float* __restrict__ weights, int E, int k);
    __global__ void route_topk(const float* logits, int* experts, float* weights, int T, int E, int k) {
        int t = blockIdx.x * blockDim.x + threadIdx.x;
        if (t < T) topk_row(logits + (long)t * E, experts + t * k, weights + t * k, E, k);
    }
    // Two selection passes (E x k comparisons, cheap) so that ids and weights are only stored,
    // never read back from global memory: the first sums the kept probabilities, the second
    // stores each choice with its weight divided by that sum.
    __device__ void topk_row(const float* __restrict__ l, int* __restrict__ experts, float* __restrict__ weights, int E, int k) {
        float m = __int_as_float(0xff800000);
        for (int e = 0; e < E; e++) m = fmaxf(m, l[e]);
        float z = 0.f;
        for (int e = 0; e < E; e++) z += expf(l[e] - m);
        float kept = 0.f;
        for (int pass = 0; pass < 2; pass++) {
            unsigned long long taken = 0ull;
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int e = 0; e < E; e++) if (!((taken >> e) & 1ull) && (best < 0 || l[e] > l[best])) best = e;
                taken |= 1ull << best;
                float w = expf(l[best] - m) / z;
                if (pass == 0) {
                    kept += w;
                } else {
                    experts[j] = best;
                    weights[j] = w / kept;
                }
            }
        }
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

    // x[i] += y[i].
    __global__ void add_inplace(float* x, const float* y, long n) {
        long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
        if (i < n) x[i] += y[i];
    }

    // Eight bf16 weights (16 bytes) against eight floats, in the order every bf16 GEMV sums.
    // The decode GEMVs read weights with streaming loads (__ldcs: evict first), so the
    // activation vector they re-read for every row stays in L1.
    __device__ __forceinline__ float dot8_bf16(uint4 p, float4 a, float4 b) {
        return __uint_as_float(p.x << 16) * a.x + __uint_as_float(p.x & 0xffff0000u) * a.y
             + __uint_as_float(p.y << 16) * a.z + __uint_as_float(p.y & 0xffff0000u) * a.w
             + __uint_as_float(p.z << 16) * b.x + __uint_as_float(p.z & 0xffff0000u) * b.y
             + __uint_as_float(p.w << 16) * b.z + __uint_as_float(p.w & 0xffff0000u) * b.w;
    }

    // The dot of one bf16 row with one fp32 vector, this lane's share (a warp sums the shares).
    // 16-byte loads where K is a multiple of 8 and both are 16-byte aligned.
    __device__ float row_dot_bf16(const unsigned short* row, const float* x, int K, int lane) {
        float acc = 0;
        if ((K & 7) == 0 && ((((unsigned long long)row) | ((unsigned long long)x)) & 15) == 0) {
            const uint4* row8 = (const uint4*)row;
            const float4* x4 = (const float4*)x;
            #pragma unroll 8
            for (int i = lane; i < (K >> 3); i += 32) acc += dot8_bf16(__ldcs(row8 + i), x4[2 * i], x4[2 * i + 1]);
        } else {
            for (int k = lane; k < K; k += 32) acc += bf16_to_float(row[k]) * x[k];
        }
        return acc;
    }

    // Two rows' dots at once (this lane's shares), their loads interleaved so twice as many
    // bytes are in flight: rows a and b against xa and xb (the same vector for gate and up).
    __device__ void row_dot2_bf16(const unsigned short* ra, const unsigned short* rb, const float* xa, const float* xb,
                                  int K, int lane, float* outA, float* outB) {
        unsigned long long all = ((unsigned long long)ra) | ((unsigned long long)rb) | ((unsigned long long)xa) | ((unsigned long long)xb);
        if ((K & 7) != 0 || (all & 15) != 0) {
            *outA = row_dot_bf16(ra, xa, K, lane);
            *outB = row_dot_bf16(rb, xb, K, lane);
            return;
        }
        const uint4 *a8 = (const uint4*)ra, *b8 = (const uint4*)rb;
        const float4 *xa4 = (const float4*)xa, *xb4 = (const float4*)xb;
        float a = 0.f, b = 0.f;
        if (xa == xb) {
            #pragma unroll 4
            for (int i = lane; i < (K >> 3); i += 32) {
                uint4 p = __ldcs(a8 + i), q = __ldcs(b8 + i);
                float4 x0 = xa4[2 * i], x1 = xa4[2 * i + 1];
                a += dot8_bf16(p, x0, x1);
                b += dot8_bf16(q, x0, x1);
            }
        } else {
            #pragma unroll 4
            for (int i = lane; i < (K >> 3); i += 32) {
                uint4 p = __ldcs(a8 + i), q = __ldcs(b8 + i);
                a += dot8_bf16(p, xa4[2 * i], xa4[2 * i + 1]);
                b += dot8_bf16(q, xb4[2 * i], xb4[2 * i + 1]);
            }
        }
        *outA = a;
        *outB = b;
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
        float g, u;
        row_dot2_bf16((const unsigned short*)w1s[e] + (long)r * D, (const unsigned short*)w3s[e] + (long)r * D, xt, xt, D, lane, &g, &u);
        g = warp_sum(g);
        u = warp_sum(u);
        if (lane == 0) h[(long)a * F + r] = g / (1.0f + expf(-g)) * u;
    }

    // x[t, r] += sum_j weights[t, j] * (W2[e_j] r . h[t * k + j]): the experts' weighted sum,
    // in the router's order, added to the residual stream. Grid: (ceil(D / warps), T).
    __global__ void moe_down_bf16(const unsigned long long* w2s, const int* ids, const float* weights, const float* h,
                                  float* x, int D, int F, int k) {
        int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        int t = blockIdx.y, lane = threadIdx.x & 31;
        if (r >= D) return;
        // Two experts per pass (their loads in flight together), summed in the router's order.
        float acc = 0;
        for (int j = 0; j < k; j += 2) {
            int a = t * k + j;
            if (j + 1 < k) {
                float p0, p1;
                row_dot2_bf16((const unsigned short*)w2s[ids[a]] + (long)r * F, (const unsigned short*)w2s[ids[a + 1]] + (long)r * F,
                              h + (long)a * F, h + (long)(a + 1) * F, F, lane, &p0, &p1);
                acc += weights[a] * warp_sum(p0);
                acc += weights[a + 1] * warp_sum(p1);
            } else {
                acc += weights[a] * warp_sum(row_dot_bf16((const unsigned short*)w2s[ids[a]] + (long)r * F, h + (long)a * F, F, lane));
            }
        }
        if (lane == 0) x[(long)t * D + r] += acc;
    }

    // Quantized weights in Duet's packed layout (DuetCPU/Quantized.swift): per block of 16 rows
    // and group of 32 k, q8 stores 8 sub-blocks of 64 bytes (sub-block j: k 4j..4j+3, row r's
    // 4 bytes at 4r), q4 4 sub-blocks of 64 bytes (sub-block j: k 8j..8j+7, row r's 4 bytes at
    // 4r, byte b holding k 8j+b in its low and 8j+4+b in its high nibble); levels stored offset
    // (q8 +128, q4 +8); f16 scales [row blocks][groups][16].

    // Four x values from k0 (zero past K): one 16-byte load where the row allows it.
    __device__ __forceinline__ float4 load_x4(const float* xt, int k0, int K, bool vec) {
        if (vec && k0 + 3 < K) return *(const float4*)(xt + k0);
        float4 v;
        v.x = k0 < K ? xt[k0] : 0.f; v.y = k0 + 1 < K ? xt[k0 + 1] : 0.f;
        v.z = k0 + 2 < K ? xt[k0 + 2] : 0.f; v.w = k0 + 3 < K ? xt[k0 + 3] : 0.f;
        return v;
    }
    __device__ __forceinline__ float f16_to_float(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
    // Byte i of w minus `offset` as a float: the byte placed in the mantissa of 2^23, then one
    // subtraction of 2^23 + offset (exact) — no integer-to-float conversion, which runs at a
    // quarter of the FMA rate.
    __device__ __forceinline__ float level_f(unsigned int w, int i, float offset) {
        return __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7650 + i)) - (8388608.f + offset);
    }

    // The lanes of a warp that share lane & 3 hold partial sums of the same four rows: sum them.
    __device__ __forceinline__ float quad_rows_sum(float v) {
        v += __shfl_xor_sync(0xffffffff, v, 4);
        v += __shfl_xor_sync(0xffffffff, v, 8);
        return v + __shfl_xor_sync(0xffffffff, v, 16);
    }

    }  // extern "C": the quantized GEMV is a template over its tokens per pass

    // y[t, n] = sum_k W[n, k] x[t, k] for a quantized W [N, K] (G groups of 32 per padded row),
    // x fp32 [T, K]: exactly the CPU reference path's sum over dequantized weights (in another
    // order). One block of 8 warps per 16-row block; a "step" is 512 bytes of levels (q8: one
    // group, q4: two), warp w takes steps 4w..4w+3, then 32 further on, and so on: its four
    // 16-byte loads per lane (and their scales) are issued before any of them is used. q8:
    // lane L holds rows 4(L&3)..+3 at k 4(L>>2)..+3 of its group; q4: rows 4(L&3)..+3 at k
    // 8((L&15)>>2)..+7 of group 2s + (L>>4). The partial sums of each row and token meet
    // across lanes (shuffles) and warps (shared memory). Groups past G get scale 0. TT tokens
    // per pass over the weights: accumulators are 4 x TT registers, so one token (decode)
    // keeps the kernel small enough for full occupancy, which hides the memory latency.
    #define QSTEPS 4
    template <int TT, int Q4>
    __device__ void gemv_quant(const unsigned char* W, const unsigned short* S, const float* x, float* y,
                               int N, int K, int G, int T) {
        __shared__ float part[8][16][TT];
        int rb = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = (lane & 3) * 4;
        bool vec = (K & 3) == 0 && (((unsigned long long)x) & 15) == 0;
        int steps = Q4 ? (G + 1) / 2 : G;
        const unsigned char* Wb = W + (long)rb * G * (Q4 ? 256 : 512);
        const unsigned short* Sb = S + (long)rb * G * 16;
        for (int t0 = 0; t0 < T; t0 += TT) {
            int tt = T - t0 < TT ? T - t0 : TT;
            float acc[4][TT];
            #pragma unroll
            for (int r = 0; r < 4; r++) {
                #pragma unroll
                for (int j = 0; j < TT; j++) acc[r][j] = 0.f;
            }
            for (int s0 = warp * QSTEPS; s0 < steps; s0 += 8 * QSTEPS) {
                uint4 qv[QSTEPS];
                uint2 sv[QSTEPS];
                #pragma unroll
                for (int u = 0; u < QSTEPS; u++) {
                    int st = s0 + u, g = Q4 ? 2 * st + (lane >> 4) : st;
                    if (st < steps && g < G) {
                        qv[u] = ((const uint4*)(Wb + (long)st * 512))[lane];
                        sv[u] = *(const uint2*)(Sb + (long)g * 16 + r0);
                    } else {
                        qv[u] = make_uint4(0, 0, 0, 0);
                        sv[u] = make_uint2(0, 0);  // scale 0: contributes nothing
                    }
                }
                #pragma unroll
                for (int u = 0; u < QSTEPS; u++) {
                    int st = s0 + u, g = Q4 ? 2 * st + (lane >> 4) : st;
                    int k0 = Q4 ? g * 32 + 8 * ((lane & 15) >> 2) : g * 32 + 4 * (lane >> 2);
                    float4 a[TT], b[TT];
                    #pragma unroll
                    for (int j = 0; j < TT; j++) {
                        const float* xt = x + (long)(t0 + (j < tt ? j : 0)) * K;
                        a[j] = load_x4(xt, k0, K, vec);
                        if (Q4) b[j] = load_x4(xt, k0 + 4, K, vec);
                    }
                    unsigned int rowsq[4] = {qv[u].x, qv[u].y, qv[u].z, qv[u].w};
                    unsigned int scales2[2] = {sv[u].x, sv[u].y};
                    #pragma unroll
                    for (int r = 0; r < 4; r++) {
                        float scale = f16_to_float((unsigned short)(scales2[r >> 1] >> (16 * (r & 1))));
                        if (!Q4) {
                            float w0 = level_f(rowsq[r], 0, 128.f), w1 = level_f(rowsq[r], 1, 128.f);
                            float w2 = level_f(rowsq[r], 2, 128.f), w3 = level_f(rowsq[r], 3, 128.f);
                            #pragma unroll
                            for (int j = 0; j < TT; j++) acc[r][j] += scale * (w0 * a[j].x + w1 * a[j].y + w2 * a[j].z + w3 * a[j].w);
                        } else {
                            unsigned int lo = rowsq[r] & 0x0f0f0f0fu, hi = (rowsq[r] >> 4) & 0x0f0f0f0fu;
                            float w0 = level_f(lo, 0, 8.f), w1 = level_f(lo, 1, 8.f), w2 = level_f(lo, 2, 8.f), w3 = level_f(lo, 3, 8.f);
                            float w4 = level_f(hi, 0, 8.f), w5 = level_f(hi, 1, 8.f), w6 = level_f(hi, 2, 8.f), w7 = level_f(hi, 3, 8.f);
                            #pragma unroll
                            for (int j = 0; j < TT; j++)
                                acc[r][j] += scale * (w0 * a[j].x + w1 * a[j].y + w2 * a[j].z + w3 * a[j].w
                                                    + w4 * b[j].x + w5 * b[j].y + w6 * b[j].z + w7 * b[j].w);
                        }
                    }
                }
            }
            #pragma unroll
            for (int r = 0; r < 4; r++) {
                #pragma unroll
                for (int j = 0; j < TT; j++) {
                    float v = quad_rows_sum(acc[r][j]);
                    if (lane < 4) part[warp][r0 + r][j] = v;
                }
            }
            __syncthreads();
            if (threadIdx.x < 16 * tt) {
                int row = threadIdx.x & 15, j = threadIdx.x >> 4, n = rb * 16 + row;
                float v = 0.f;
                for (int w8 = 0; w8 < 8; w8++) v += part[w8][row][j];
                if (n < N) y[(long)(t0 + j) * N + n] = v;
            }
            __syncthreads();
        }
    }

    extern "C" {
    #define GEMV_QUANT(name, TT, Q4) \
        __global__ void __launch_bounds__(256) name(const unsigned char* W, const unsigned short* S, const float* x, float* y, \
                                                    int N, int K, int G, int T) { gemv_quant<TT, Q4>(W, S, x, y, N, K, G, T); }
    GEMV_QUANT(gemv_q8_t1, 1, 0)
    GEMV_QUANT(gemv_q8_t2, 2, 0)
    GEMV_QUANT(gemv_q8_t4, 4, 0)
    GEMV_QUANT(gemv_q8_t8, 8, 0)
    GEMV_QUANT(gemv_q4_t1, 1, 1)
    GEMV_QUANT(gemv_q4_t2, 2, 1)
    GEMV_QUANT(gemv_q4_t4, 4, 1)
    GEMV_QUANT(gemv_q4_t8, 8, 1)

    // out bf16 [N, K] = the dequantized W (level x scale in fp32, rounded to nearest even),
    // for cuBLAS. One thread per 16 bytes of levels, read as the GEMV reads them (a warp: one
    // q8 block or two q4 blocks, 512 contiguous bytes); each writes its 4 rows' k range.
    __device__ __forceinline__ unsigned short to_bf16(float v) {
        unsigned int b = __float_as_uint(v);
        return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
    __global__ void dequant_bf16(const unsigned char* W, const unsigned short* S, unsigned short* out, int N, int K, int G, int q4) {
        long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
        int perBlock = q4 ? 16 : 32;  // 16-byte pieces per (row block, group)
        long pieces = (long)((N + 15) >> 4) * G * perBlock;
        if (i >= pieces) return;
        int L = (int)(i % perBlock);
        long block = i / perBlock;  // rb * G + g
        int g = (int)(block % G), rb = (int)(block / G), r0 = (L & 3) * 4;
        uint4 q = ((const uint4*)(W + block * (q4 ? 256 : 512)))[L];
        unsigned int rowsq[4] = {q.x, q.y, q.z, q.w};
        for (int r = 0; r < 4; r++) {
            int n = rb * 16 + r0 + r;
            if (n >= N) break;
            float scale = f16_to_float(S[block * 16 + r0 + r]);
            unsigned short* dst = out + (long)n * K;
            // One 8- (q8) or 16-byte (q4) store per row where the row allows it.
            if (!q4) {
                int k0 = g * 32 + 4 * (L >> 2);
                unsigned short v[4];
                for (int j = 0; j < 4; j++) v[j] = to_bf16(level_f(rowsq[r], j, 128.f) * scale);
                if ((K & 3) == 0 && k0 + 3 < K) *(uint2*)(dst + k0) = make_uint2(v[0] | ((unsigned int)v[1] << 16), v[2] | ((unsigned int)v[3] << 16));
                else for (int j = 0; j < 4; j++) if (k0 + j < K) dst[k0 + j] = v[j];
            } else {
                int k0 = g * 32 + 8 * (L >> 2);
                unsigned int lo = rowsq[r] & 0x0f0f0f0fu, hi = (rowsq[r] >> 4) & 0x0f0f0f0fu;
                unsigned short v[8];
                for (int j = 0; j < 4; j++) { v[j] = to_bf16(level_f(lo, j, 8.f) * scale); v[4 + j] = to_bf16(level_f(hi, j, 8.f) * scale); }
                if ((K & 7) == 0 && k0 + 7 < K)
                    *(uint4*)(dst + k0) = make_uint4(v[0] | ((unsigned int)v[1] << 16), v[2] | ((unsigned int)v[3] << 16),
                                                     v[4] | ((unsigned int)v[5] << 16), v[6] | ((unsigned int)v[7] << 16));
                else for (int j = 0; j < 8; j++) if (k0 + j < K) dst[k0 + j] = v[j];
            }
        }
    }

    // y[t, n] = sum_k W[n, k] * x[t, k], W bf16 [N, K], x fp32 [T, K]. One warp per output row,
    // every token of the row in the same warp (the weights are read once for all T <= 8).
    // Where K is a multiple of 8 and both operands are 16-byte aligned, each lane loads 8 weights
    // (16 bytes) at a time, so a warp reads 512 contiguous bytes per load instead of 64.
    __device__ void gemv_bf16_row(const unsigned short* W, const float* x, float* y, int n, int N, int K, int T) {
        int lane = threadIdx.x & 31;
        const unsigned short* row = W + (long)n * K;
        bool wide = (K & 7) == 0 && ((((unsigned long long)W) | ((unsigned long long)x)) & 15) == 0;
        if (T == 1) {  // decode: more loads in flight per lane (same sums)
            float v = warp_sum(row_dot_bf16(row, x, K, lane));
            if (lane == 0) y[n] = v;
            return;
        }
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
    __global__ void gemv_bf16(const unsigned short* W, const float* x, float* y, int N, int K, int T) {
        int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        if (n < N) gemv_bf16_row(W, x, y, n, N, K, T);
    }

    // add_rms_norm, the router and its top-k in one launch (the MoE's whole prologue for a
    // few tokens; bf16 router [E, D], E <= 32): block t adds a[t] into x[t] and norms it into
    // h[t] as add_rms_norm (same block size, same sums), then its warps compute the logits
    // as gemv_bf16 does from the h row the block just wrote, and one thread routes as route_topk.
    __global__ void add_norm_router_topk_bf16(float* x, const float* a, const float* w, float* h, const unsigned short* R,
                                              float* logits, int* experts, float* weights, int D, float eps, int E, int k) {
        __shared__ float staged[32];
        int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        long o = (long)t * D;
        add_rms_norm_row(x + o, a + o, w, h + o, D, eps);
        __syncthreads();  // the block's writes of h[t] are visible to all its threads
        for (int e = warp; e < E; e += blockDim.x >> 5) {
            float v = warp_sum(row_dot_bf16(R + (long)e * D, h + o, D, lane));
            if (lane == 0) { logits[(long)t * E + e] = v; staged[e] = v; }
        }
        __syncthreads();
        if (threadIdx.x == 0) topk_row(staged, experts + t * k, weights + t * k, E, k);
    }

    // Three GEMVs over the same x in one launch (attention's q, k and v projections): warp
    // row r < N0 is W0's row r, then W1's, then W2's; each as gemv_bf16 computes it.
    __global__ void gemv3_bf16(const unsigned short* W0, const unsigned short* W1, const unsigned short* W2, const float* x,
                               float* y0, float* y1, float* y2, int N0, int N1, int N2, int K, int T) {
        int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        if (r < N0) gemv_bf16_row(W0, x, y0, r, N0, K, T);
        else if (r < N0 + N1) gemv_bf16_row(W1, x, y1, r - N0, N1, K, T);
        else if (r < N0 + N1 + N2) gemv_bf16_row(W2, x, y2, r - N0 - N1, N2, K, T);
    }
    }
    """
}

/// Where each token of a step goes when every token is a different sequence's next one
/// (beams, a batch) and the KV cache holds one region of `regionFloats` floats per sequence:
/// token t at position `table[2t + 1]` of region `table[2t]` (Int32 pairs on the device).
public struct SequencePlaces {
    public var table: DeviceBuffer
    public var regionFloats: Int
    /// The largest position + 1 (what the longest query attends over).
    public var positions: Int
    public init(table: DeviceBuffer, regionFloats: Int, positions: Int) {
        self.table = table
        self.regionFloats = regionFloats
        self.positions = positions
    }
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
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (Self.rowThreads(D), 1, 1), arguments: a.pointers)
    }

    /// Threads of a block that works on one row of D floats: one float4 each where possible
    /// (a one-token step is latency-bound: few loads per thread, all in flight at once).
    static func rowThreads(_ D: Int) -> UInt32 { UInt32(min(1024, max(32, ((D + 3) / 4 + 31) / 32 * 32))) }

    /// x `[T, D]` += a, then y = RMSNorm(x) with weight `[D]` (one launch).
    public func addRMSNorm(_ x: DeviceBuffer, adding a: DeviceBuffer, weight: DeviceBuffer, _ y: DeviceBuffer, tokens T: Int, dim D: Int, eps: Float) throws(CUDAError) {
        let f = try gpu.function("add_rms_norm", in: KernelSource.common)
        let args = KernelArguments()
        args.add(x); args.add(a); args.add(weight); args.add(y); args.add(Int32(D)); args.add(eps)
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (Self.rowThreads(D), 1, 1), arguments: args.pointers)
    }

    /// Rotates q `[T, H, d]` in place and k `[T, Hkv, d]` into the key cache, and copies v
    /// into the value cache, at positions `start..<start+T` (one launch; caches `[P, Hkv, d]`).
    /// `startAt` (one Int32 on the device), when given, holds the first position instead of
    /// `start` (a captured decode step). `places`, when given: token t goes to its own
    /// sequence's region and position instead (`start` unused; caches `[regions, P, Hkv, d]`).
    public func ropeStore(q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, inverseFrequencies: DeviceBuffer,
                          tokens T: Int, heads H: Int, kvHeads Hkv: Int, headDim d: Int, start: Int, startAt: DeviceBuffer? = nil,
                          places: SequencePlaces? = nil) throws(CUDAError) {
        let f = try gpu.function("rope_store", in: KernelSource.common)
        let a = KernelArguments()
        a.add(q); a.add(k); a.add(v); a.add(keys); a.add(values); a.add(inverseFrequencies)
        a.add(Int32(H)); a.add(Int32(Hkv)); a.add(Int32(d)); a.add(Int32(start)); a.add(startAt?.pointer ?? 0)
        a.add(places?.table.pointer ?? 0); a.add(Int64(places?.regionFloats ?? 0))
        try gpu.launch(f, grid: (UInt32(T), UInt32(H + 2 * Hkv), 1), block: (64, 1, 1), arguments: a.pointers)
    }

    /// Three bf16 GEMVs over the same x `[T, K]` in one launch: y_i `[T, N_i]` = x W_i^T.
    public func gemv3BF16(_ x: DeviceBuffer, _ w: (DeviceBuffer, DeviceBuffer, DeviceBuffer), _ y: (DeviceBuffer, DeviceBuffer, DeviceBuffer),
                          rows N: (Int, Int, Int), cols K: Int, tokens T: Int) throws(CUDAError) {
        let f = try gpu.function("gemv3_bf16", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w.0); a.add(w.1); a.add(w.2); a.add(x); a.add(y.0); a.add(y.1); a.add(y.2)
        a.add(Int32(N.0)); a.add(Int32(N.1)); a.add(Int32(N.2)); a.add(Int32(K)); a.add(Int32(T))
        try gpu.launch(f, grid: (UInt32((N.0 + N.1 + N.2 + 7) / 8), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// g = silu(g) * u, n elements.
    public func siluMultiply(_ g: DeviceBuffer, _ u: DeviceBuffer, count n: Int) throws(CUDAError) {
        let f = try gpu.function("silu_mul", in: KernelSource.common)
        let a = KernelArguments()
        a.add(g); a.add(u); a.add(Int32(n))
        try gpu.launch(f, grid: (UInt32((n + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
    }

    /// From this many queries (prompts) attention runs tiled: keys staged once per 32 queries,
    /// no score buffer (the one-block-per-query kernel re-reads every key for every query).
    public static let tiledAttentionMinTokens = 16
    /// Shared memory a kernel may use without opting in: the per-query kernel's score limit.
    static let scoreSharedBytes = 48 * 1024

    /// Causal GQA attention of `T` queries (positions `start...`) over a contiguous cache
    /// `[start + T, Hkv, d]`. window nil: full causal. `startAt` (one Int32 on the device),
    /// when given, holds the first position, and `start` is then the largest it may be (the
    /// kernel and its shared memory are chosen for that; a captured decode step).
    public func attention(queries q: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, out: DeviceBuffer,
                          tokens T: Int, start: Int, startAt: DeviceBuffer? = nil,
                          heads H: Int, kvHeads: Int, headDim d: Int, window: Int?) throws(CUDAError) {
        // The per-query kernel keeps all scores in shared memory (48 KiB: 12288 positions);
        // longer caches take the tiled kernel for decode too.
        if T >= Self.tiledAttentionMinTokens || (start + T) * 4 > Self.scoreSharedBytes, d <= 128, d % 4 == 0 {
            guard startAt == nil else { throw .unavailable("the tiled attention kernel takes its start from the host") }
            let f = try gpu.function("attention_tiled", in: KernelSource.common)
            let a = KernelArguments()
            a.add(q); a.add(keys); a.add(values); a.add(out)
            a.add(Int32(T)); a.add(Int32(start)); a.add(Int32(H)); a.add(Int32(kvHeads)); a.add(Int32(d)); a.add(Int32(window ?? 0))
            return try gpu.launch(f, grid: (UInt32((T + 31) / 32), UInt32(H), 1), block: (128, 1, 1), arguments: a.pointers)
        }
        try perQueryAttention(queries: q, keys: keys, values: values, out: out, tokens: T, start: start, startAt: startAt, places: nil,
                              positions: start + T, heads: H, kvHeads: kvHeads, headDim: d, window: window)
    }

    /// Attention of one query per sequence (beams, a batch) over each one's own region of the
    /// caches `[regions, P, Hkv, d]`, in one launch: query t at `places`' position t. Up to
    /// `attentionPlacesMaxPositions` positions (the per-query kernel's scores in shared memory).
    public func attention(queries q: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, out: DeviceBuffer, places: SequencePlaces,
                          tokens T: Int, heads H: Int, kvHeads: Int, headDim d: Int, window: Int?) throws(CUDAError) {
        guard places.positions <= Self.attentionPlacesMaxPositions else {
            throw .unavailable("one launch attends over at most \(Self.attentionPlacesMaxPositions) positions per sequence")
        }
        try perQueryAttention(queries: q, keys: keys, values: values, out: out, tokens: T, start: 0, startAt: nil, places: places,
                              positions: places.positions, heads: H, kvHeads: kvHeads, headDim: d, window: window)
    }

    /// The per-query kernel's most positions (its scores live in shared memory).
    public static let attentionPlacesMaxPositions = scoreSharedBytes / 4

    /// One block per (query, head), all `positions` scores of a query in shared memory.
    private func perQueryAttention(queries q: DeviceBuffer, keys: DeviceBuffer, values: DeviceBuffer, out: DeviceBuffer, tokens T: Int,
                                   start: Int, startAt: DeviceBuffer?, places: SequencePlaces?, positions: Int,
                                   heads H: Int, kvHeads: Int, headDim d: Int, window: Int?) throws(CUDAError) {
        let f = try gpu.function("attention", in: KernelSource.common)
        let a = KernelArguments()
        a.add(q); a.add(keys); a.add(values); a.add(out)
        a.add(Int32(start)); a.add(Int32(H)); a.add(Int32(kvHeads)); a.add(Int32(d)); a.add(Int32(window ?? 0)); a.add(startAt?.pointer ?? 0)
        a.add(places?.table.pointer ?? 0); a.add(Int64(places?.regionFloats ?? 0))
        try gpu.launch(f, grid: (UInt32(T), UInt32(H), 1), block: (256, 1, 1), sharedBytes: UInt32(positions * 4), arguments: a.pointers)
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
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (UInt32(min(1024, (D + 31) / 32 * 32)), 1, 1), arguments: a.pointers)
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

    /// out `[T, D]` += weights[i] * y[i] at row indices[i], for experts' output rows `y`
    /// `[Σ groups, D]` one expert after another (`groups`: each one's row count): one launch
    /// per expert, in order, so no launch adds into a token's row twice and every token's
    /// sum is taken in expert order.
    public func scatterAddExpertRows(_ out: DeviceBuffer, _ y: DeviceBuffer, indices: DeviceBuffer, weights: DeviceBuffer,
                                     groups: [Int], dim D: Int) throws(CUDAError) {
        var row = 0
        for m in groups where m > 0 {
            try scatterAddRows(out, y.view(offset: row * D * 4, bytes: m * D * 4), indices: indices.view(offset: row * 4, bytes: m * 4),
                               weights: weights.view(offset: row * 4, bytes: m * 4), rows: m, dim: D)
            row += m
        }
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

    /// x `[T, D]` += a, h = RMSNorm(x) with weight `[D]` (as `addRMSNorm`), then the router's
    /// logits `[T, E]` = h R^T (bf16 R `[E, D]`, E <= 32) and their top-k (as `routeTopK`): one launch.
    public func addNormRouterTopK(_ x: DeviceBuffer, adding a: DeviceBuffer, weight: DeviceBuffer, _ h: DeviceBuffer, eps: Float,
                                  router r: DeviceBuffer, logits: DeviceBuffer, experts: DeviceBuffer, weights: DeviceBuffer,
                                  tokens T: Int, experts E: Int, dim D: Int, k: Int) throws(CUDAError) {
        guard E <= 32 else { throw .unavailable("add_norm_router_topk_bf16 takes at most 32 experts") }
        let f = try gpu.function("add_norm_router_topk_bf16", in: KernelSource.common)
        let args = KernelArguments()
        args.add(x); args.add(a); args.add(weight); args.add(h); args.add(r); args.add(logits); args.add(experts); args.add(weights)
        args.add(Int32(D)); args.add(eps); args.add(Int32(E)); args.add(Int32(k))
        try gpu.launch(f, grid: (UInt32(T), 1, 1), block: (Self.rowThreads(D), 1, 1), arguments: args.pointers)
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

    /// y `[T, N]` = x `[T, K]` @ W^T for a quantized W `[N, K]` at `w` (packed levels, then
    /// scales: `QuantizedMatrix`'s layout). Few tokens: the quantized GEMV kernel (fp32 sums
    /// of the dequantized weights, as the CPU reference path); from `gpu.gemmMinTokens` with
    /// `scratch` (bf16 `[N, K]`): W dequantized to bf16 there, then the cuBLAS GEMM.
    public func matmulQuantized(_ x: DeviceBuffer, _ w: DeviceBuffer, format: QuantFormat, _ y: DeviceBuffer,
                                rows N: Int, cols K: Int, tokens T: Int, scratch: DeviceBuffer? = nil) throws(CUDAError) {
        let (paddedRows, paddedCols) = QuantizedMatrix.paddedShape(rows: N, cols: K)
        let G = paddedCols / QuantFormat.groupSize, levelBytes = paddedRows / 16 * G * format.blockBytes
        let scales = w.view(offset: levelBytes, bytes: paddedRows * G * 2)
        if T >= gpu.gemmMinTokens, let blas = gpu.blas, let scratch, scratch.bytes >= N * K * 2 {
            let f = try gpu.function("dequant_bf16", in: KernelSource.common)
            let a = KernelArguments()
            a.add(w); a.add(scales); a.add(scratch); a.add(Int32(N)); a.add(Int32(K)); a.add(Int32(G)); a.add(Int32(format == .q4 ? 1 : 0))
            let pieces = paddedRows / 16 * G * (format == .q4 ? 16 : 32)
            try gpu.launch(f, grid: (UInt32((pieces + 255) / 256), 1, 1), block: (256, 1, 1), arguments: a.pointers)
            return try gemmBF16(blas, x, scratch, y, rows: N, cols: K, tokens: T)
        }
        // Tokens per pass over the weights: the fewest passes, then the smallest kernel.
        let perPass = T >= 8 ? 8 : T >= 4 ? 4 : T >= 2 ? 2 : 1
        let f = try gpu.function("gemv_\(format.rawValue)_t\(perPass)", in: KernelSource.common)
        let a = KernelArguments()
        a.add(w); a.add(scales); a.add(x); a.add(y); a.add(Int32(N)); a.add(Int32(K)); a.add(Int32(G)); a.add(Int32(T))
        try gpu.launch(f, grid: (UInt32(paddedRows / 16), 1, 1), block: (256, 1, 1), arguments: a.pointers)
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
        try gpu.countLaunch()
        guard status == 0 else { throw .call("cublasGemmEx", code: status, name: "cuBLAS status \(status)") }
    }
}
