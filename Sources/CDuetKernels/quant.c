// Quantized-weight kernels with AVX512-VNNI (vpdpbusd: unsigned weight bytes x signed
// activation bytes, four products summed into each int32 lane). The packed layout puts 16
// rows in the 16 lanes, so one broadcast of 4 activation bytes feeds 16 rows at once and
// no horizontal sums are needed. Layout and math: duet_kernels.h.
#include "duet_kernels.h"
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) static inline
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

TARGET __m512i bcast4(const int8_t *p) { return _mm512_set1_epi32(*(const int32_t *)p); }

TARGET void store_rows(float *y, size_t ldy, size_t t, size_t row0, size_t N, __m512 v) {
    if (row0 >= N) return;
    if (row0 + 16 <= N) _mm512_storeu_ps(y + t * ldy + row0, v);
    else _mm512_mask_storeu_ps(y + t * ldy + row0, (__mmask16)((1u << (N - row0)) - 1), v);
}

// RB row blocks (16 rows each, RB independent read streams) x TT tokens over every group.
// Q4: levels are nibbles (256 bytes per block) instead of bytes (512). RB and TT are
// constants at every call site, so the arrays below live in registers.
TARGET void q_pass(const uint8_t *W, const uint16_t *scales, size_t G, const int Q4, const int8_t *xq, size_t Kp,
                   const float *xs, const float *xc, size_t t0, const int TT, size_t rb, const int RB,
                   float *y, size_t ldy, size_t N) {
    const size_t BLOCK = Q4 ? 256 : 512;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 facc[4][4];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < TT; j++) facc[r][j] = _mm512_setzero_ps();
    for (size_t g = 0; g < G; g++) {
        __m512i iacc[4][4];
        for (int r = 0; r < RB; r++)
            for (int j = 0; j < TT; j++) iacc[r][j] = _mm512_setzero_si512();
        if (Q4) {
            for (int q = 0; q < 4; q++) {
                __m512i alo[4], ahi[4];
                for (int j = 0; j < TT; j++) {
                    const int8_t *a = xq + (t0 + j) * Kp + g * 32 + q * 8;
                    alo[j] = bcast4(a);
                    ahi[j] = bcast4(a + 4);
                }
                for (int r = 0; r < RB; r++) {
                    __m512i packed = _mm512_loadu_si512(W + ((rb + r) * G + g) * BLOCK + q * 64);
                    __m512i lo = _mm512_and_si512(packed, low), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                    for (int j = 0; j < TT; j++) {
                        iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], lo, alo[j]);
                        iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], hi, ahi[j]);
                    }
                }
            }
        } else {
            for (int q = 0; q < 8; q++) {
                __m512i a[4];
                for (int j = 0; j < TT; j++) a[j] = bcast4(xq + (t0 + j) * Kp + g * 32 + q * 4);
                for (int r = 0; r < RB; r++) {
                    __m512i w = _mm512_loadu_si512(W + ((rb + r) * G + g) * BLOCK + q * 64);
                    for (int j = 0; j < TT; j++) iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], w, a[j]);
                }
            }
        }
        for (int r = 0; r < RB; r++) {
            __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + ((rb + r) * G + g) * 16)));
            for (int j = 0; j < TT; j++) {
                size_t t = t0 + j;
                __m512 d = _mm512_fmsub_ps(_mm512_set1_ps(xs[t * G + g]), _mm512_cvtepi32_ps(iacc[r][j]), _mm512_set1_ps(xc[t * G + g]));
                facc[r][j] = _mm512_fmadd_ps(ws, d, facc[r][j]);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < TT; j++) store_rows(y, ldy, t0 + j, (rb + r) * 16, N, facc[r][j]);
}

// One token: four row blocks at once (four read streams, four independent chains).
// More tokens: two row blocks x up to four tokens per pass.
#define Q_DISPATCH(Q4)                                                                              \
    const size_t G = Kp / 32;                                                                       \
    size_t rb = rb0;                                                                                \
    if (T == 1) {                                                                                   \
        for (; rb + 4 <= rb1; rb += 4) q_pass(W, scales, G, Q4, xq, Kp, xs, xc, 0, 1, rb, 4, y, ldy, N); \
        for (; rb < rb1; rb++) q_pass(W, scales, G, Q4, xq, Kp, xs, xc, 0, 1, rb, 1, y, ldy, N);   \
        return;                                                                                     \
    }                                                                                               \
    for (; rb < rb1; rb += 2) {                                                                     \
        const int RB = rb + 2 <= rb1 ? 2 : 1;                                                       \
        size_t t0 = 0;                                                                              \
        for (; t0 + 4 <= T; t0 += 4) {                                                              \
            if (RB == 2) q_pass(W, scales, G, Q4, xq, Kp, xs, xc, t0, 4, rb, 2, y, ldy, N);         \
            else q_pass(W, scales, G, Q4, xq, Kp, xs, xc, t0, 4, rb, 1, y, ldy, N);                 \
        }                                                                                           \
        for (; t0 < T; t0++) {                                                                      \
            if (RB == 2) q_pass(W, scales, G, Q4, xq, Kp, xs, xc, t0, 1, rb, 2, y, ldy, N);         \
            else q_pass(W, scales, G, Q4, xq, Kp, xs, xc, t0, 1, rb, 1, y, ldy, N);                 \
        }                                                                                           \
    }

KERNEL void duet_matmul_q8_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                                const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1) {
    Q_DISPATCH(0)
}

KERNEL void duet_matmul_q4_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                                const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1) {
    Q_DISPATCH(1)
}

KERNEL double duet_peak_vnni(size_t iterations) {
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (size_t it = 0; it < iterations; it++) {
        for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        __asm__ volatile("" : "+v"(a));  // keep the loop from being folded
    }
    int sink = 0;
    for (int i = 0; i < 16; i++) sink += _mm512_reduce_add_epi32(acc[i]);
    __asm__ volatile("" ::"r"(sink));
    return (double)iterations * 16 * 64 * 2;
}
