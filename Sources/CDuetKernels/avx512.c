// AVX-512 kernels: bf16 (or fp32) weights widened in registers, fp32 activations and
// accumulation. R weight rows x TT tokens per pass; each weight row is one read stream.
#include "duet_kernels.h"
#include <immintrin.h>
#include <math.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl")))

TARGET __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
TARGET __m512 load_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// acc[i][j] = W[r + i] . x[t + j] for i < R, j < TT. R and TT are constants at every call
// site (see DISPATCH), so the loops unroll and the accumulators stay in registers. The main
// loop is unmasked; one masked step takes the K tail.
#define DEFINE_BLOCK(NAME, WT, LOAD)                                                              \
    TARGET void NAME(const WT *W, size_t ldw, size_t K, const float *x, size_t ldx, const int R,   \
                     const int TT, float out[16][4]) {                                            \
        __m512 acc[16][4];                                                                        \
        for (int i = 0; i < R; i++)                                                               \
            for (int j = 0; j < TT; j++) acc[i][j] = _mm512_setzero_ps();                         \
        size_t k = 0;                                                                             \
        for (; k + 16 <= K; k += 16) {                                                            \
            __m512 w[16], xv[4];                                                                  \
            for (int i = 0; i < R; i++) w[i] = LOAD(W + i * ldw + k, (__mmask16)0xFFFF);          \
            for (int j = 0; j < TT; j++) xv[j] = _mm512_loadu_ps(x + j * ldx + k);                \
            for (int i = 0; i < R; i++)                                                           \
                for (int j = 0; j < TT; j++) acc[i][j] = _mm512_fmadd_ps(w[i], xv[j], acc[i][j]); \
        }                                                                                         \
        if (k < K) {                                                                              \
            __mmask16 m = (__mmask16)((1u << (K - k)) - 1);                                       \
            __m512 w[16], xv[4];                                                                  \
            for (int i = 0; i < R; i++) w[i] = LOAD(W + i * ldw + k, m);                          \
            for (int j = 0; j < TT; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + j * ldx + k);        \
            for (int i = 0; i < R; i++)                                                           \
                for (int j = 0; j < TT; j++) acc[i][j] = _mm512_fmadd_ps(w[i], xv[j], acc[i][j]); \
        }                                                                                         \
        for (int i = 0; i < R; i++)                                                               \
            for (int j = 0; j < TT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);             \
    }

DEFINE_BLOCK(block_bf16, uint16_t, load_bf16)
DEFINE_BLOCK(block_f32, float, load_f32)

// Rows per pass: at few tokens more rows, i.e. more concurrent read streams (the GPU
// host's memory system needs ~16 per core to saturate); 16 accumulators otherwise. R is
// 16 only when T == 1 and 8 only when T == 2, so every pass of a row group has TT <= 16 / R.
static inline int rows_for(size_t left, size_t T) {
    int want = T == 1 ? 16 : T == 2 ? 8 : 4;
    return left >= (size_t)want ? want : 1;
}

// Specialise R and TT as constants so the loops above unroll into registers.
#define DISPATCH(BLOCK, R, TT, ...)                                                               \
    switch ((R) * 8 + (TT)) {                                                                     \
    case 16 * 8 + 1: BLOCK(__VA_ARGS__, 16, 1, out); break;                                      \
    case 8 * 8 + 2: BLOCK(__VA_ARGS__, 8, 2, out); break;                                        \
    case 4 * 8 + 4: BLOCK(__VA_ARGS__, 4, 4, out); break;                                        \
    case 4 * 8 + 3: BLOCK(__VA_ARGS__, 4, 3, out); break;                                        \
    case 4 * 8 + 2: BLOCK(__VA_ARGS__, 4, 2, out); break;                                        \
    case 4 * 8 + 1: BLOCK(__VA_ARGS__, 4, 1, out); break;                                        \
    case 1 * 8 + 4: BLOCK(__VA_ARGS__, 1, 4, out); break;                                        \
    case 1 * 8 + 3: BLOCK(__VA_ARGS__, 1, 3, out); break;                                        \
    case 1 * 8 + 2: BLOCK(__VA_ARGS__, 1, 2, out); break;                                        \
    default: BLOCK(__VA_ARGS__, 1, 1, out); break;                                               \
    }

// One driver for both weight types: row groups of R rows, token groups of up to 4.
#define DEFINE_MATMUL(NAME, WT, BLOCK)                                                            \
    KERNEL void NAME(const WT *W, size_t ldw, size_t K, const float *x, size_t ldx, size_t T,     \
                     float *y, size_t ldy, size_t r0, size_t r1) {                                \
        float out[16][4];                                                                         \
        for (size_t r = r0; r < r1;) {                                                            \
            int R = rows_for(r1 - r, T);                                                          \
            for (size_t t = 0; t < T; t += 4) {                                                   \
                int TT = T - t >= 4 ? 4 : (int)(T - t);                                           \
                DISPATCH(BLOCK, R, TT, W + r * ldw, ldw, K, x + t * ldx, ldx)                     \
                for (int i = 0; i < R; i++)                                                       \
                    for (int j = 0; j < TT; j++) y[(t + j) * ldy + r + i] = out[i][j];            \
            }                                                                                     \
            r += R;                                                                               \
        }                                                                                         \
    }

DEFINE_MATMUL(duet_matmul_bf16_avx512, uint16_t, block_bf16)
DEFINE_MATMUL(duet_matmul_f32_avx512, float, block_f32)

static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// g[i][j], u[i][j] for R rows of both matrices and TT tokens (constants at each call site).
TARGET void gate_up_block(const uint16_t *W1, const uint16_t *W3, size_t ldw, size_t K, const float *x, size_t ldx,
                          const int R, const int TT, float g_out[8][4], float u_out[8][4]) {
    __m512 g[8][4], u[8][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++) g[i][j] = u[i][j] = _mm512_setzero_ps();
    for (size_t k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 a[8], b[8], xv[4];
        for (int i = 0; i < R; i++) {
            a[i] = load_bf16(W1 + i * ldw + k, m);
            b[i] = load_bf16(W3 + i * ldw + k, m);
        }
        for (int j = 0; j < TT; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + j * ldx + k);
        for (int i = 0; i < R; i++)
            for (int j = 0; j < TT; j++) {
                g[i][j] = _mm512_fmadd_ps(a[i], xv[j], g[i][j]);
                u[i][j] = _mm512_fmadd_ps(b[i], xv[j], u[i][j]);
            }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++) {
            g_out[i][j] = _mm512_reduce_add_ps(g[i][j]);
            u_out[i][j] = _mm512_reduce_add_ps(u[i][j]);
        }
}

// Gate and up rows side by side (R rows of each: 2R read streams), so both matrices are
// read in one pass: 4 + 4 streams for one token, 2 + 2 rows x 4 tokens (16 accumulators) else.
KERNEL void duet_gate_up_bf16_avx512(const uint16_t *W1, const uint16_t *W3, size_t ldw, size_t K,
                                     const float *x, size_t ldx, size_t T, float *h, size_t ldh, size_t r0, size_t r1) {
    float g[8][4], u[8][4];
    for (size_t r = r0; r < r1;) {
        int want = T == 1 ? 8 : T == 2 ? 4 : 2;
        int R = r1 - r >= (size_t)want ? want : 1;
        for (size_t t = 0; t < T; t += 4) {
            int TT = T - t >= 4 ? 4 : (int)(T - t);
            const uint16_t *a = W1 + r * ldw, *b = W3 + r * ldw;
            const float *xt = x + t * ldx;
            switch (R * 8 + TT) {
            case 8 * 8 + 1: gate_up_block(a, b, ldw, K, xt, ldx, 8, 1, g, u); break;
            case 4 * 8 + 2: gate_up_block(a, b, ldw, K, xt, ldx, 4, 2, g, u); break;
            case 4 * 8 + 1: gate_up_block(a, b, ldw, K, xt, ldx, 4, 1, g, u); break;
            case 2 * 8 + 4: gate_up_block(a, b, ldw, K, xt, ldx, 2, 4, g, u); break;
            case 2 * 8 + 3: gate_up_block(a, b, ldw, K, xt, ldx, 2, 3, g, u); break;
            case 2 * 8 + 2: gate_up_block(a, b, ldw, K, xt, ldx, 2, 2, g, u); break;
            case 2 * 8 + 1: gate_up_block(a, b, ldw, K, xt, ldx, 2, 1, g, u); break;
            case 1 * 8 + 4: gate_up_block(a, b, ldw, K, xt, ldx, 1, 4, g, u); break;
            case 1 * 8 + 3: gate_up_block(a, b, ldw, K, xt, ldx, 1, 3, g, u); break;
            case 1 * 8 + 2: gate_up_block(a, b, ldw, K, xt, ldx, 1, 2, g, u); break;
            default: gate_up_block(a, b, ldw, K, xt, ldx, 1, 1, g, u); break;
            }
            for (int i = 0; i < R; i++)
                for (int j = 0; j < TT; j++) h[(t + j) * ldh + r + i] = silu_mul(g[i][j], u[i][j]);
        }
        r += R;
    }
}

// `streams` equal slices read side by side, one 64-byte line from each per step (specialised
// for 4, 8 and 16 so the pointers stay in registers).
TARGET uint64_t read_streams(const char *base, size_t slice, int mode, const int streams) {
    const char *s[16];
    for (int j = 0; j < streams; j++) s[j] = base + j * slice;
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (size_t i = 0; i < slice; i += 64) {
        for (int j = 0; j < streams; j++) {
            if (mode == 1) _mm_prefetch(s[j] + i + 1024, _MM_HINT_T0);
            __m512i v = mode == 2 ? _mm512_stream_load_si512((void *)(s[j] + i)) : _mm512_load_si512(s[j] + i);
            acc[j & 3] = _mm512_xor_si512(acc[j & 3], v);
        }
    }
    __m512i all = _mm512_xor_si512(_mm512_xor_si512(acc[0], acc[1]), _mm512_xor_si512(acc[2], acc[3]));
    return (uint64_t)_mm512_reduce_add_epi64(all);
}

KERNEL uint64_t duet_read_bandwidth(const void *p, size_t bytes, int mode, int streams) {
    streams = streams >= 16 ? 16 : streams >= 8 ? 8 : 4;
    size_t slice = (bytes / (size_t)streams) & ~(size_t)255;
    const char *base = (const char *)p;  // 64-byte aligned by the caller
    switch (streams) {
    case 16: return read_streams(base, slice, mode, 16);
    case 8: return read_streams(base, slice, mode, 8);
    default: return read_streams(base, slice, mode, 4);
    }
}

KERNEL double duet_peak_avx512(size_t iterations) {
    __m512 a[24];
    __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 24; i++) a[i] = _mm512_set1_ps((float)i);
    for (size_t n = 0; n < iterations; n++)
        for (int i = 0; i < 24; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    __m512 s = a[0];
    for (int i = 1; i < 24; i++) s = _mm512_add_ps(s, a[i]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return (double)iterations * 24 * 16 * 2;
}
