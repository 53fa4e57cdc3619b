// Quantized-weight kernels with AVX512-VNNI (vpdpbusd: unsigned weight bytes x signed
// activation bytes, four products summed into each int32 lane). The packed layout puts 16
// rows in the 16 lanes, so one broadcast of 4 activation bytes feeds 16 rows at once and
// no horizontal sums are needed. Layout and math: duet_kernels.h.
#include "duet_kernels.h"
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) static inline
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

enum { TILE = 4 };  // tokens per pass over a row block's weights

TARGET __m512i bcast4(const int8_t *p) { return _mm512_set1_epi32(*(const int32_t *)p); }

TARGET void store_rows(float *y, size_t ldy, size_t t, size_t row0, size_t N, __m512 v) {
    if (row0 + 16 <= N) _mm512_storeu_ps(y + t * ldy + row0, v);
    else _mm512_mask_storeu_ps(y + t * ldy + row0, (__mmask16)((1u << (N - row0)) - 1), v);
}

// Group g of row block rb for TT tokens: integer dots, then scaled into facc.
#define Q_BLOCK(DOTS)                                                                              \
    for (size_t t0 = 0; t0 < T; t0 += TILE) {                                                      \
        const int TT = (int)(T - t0 < TILE ? T - t0 : TILE);                                       \
        __m512 facc[TILE];                                                                         \
        for (int j = 0; j < TILE; j++) facc[j] = _mm512_setzero_ps();                               \
        for (size_t g = 0; g < G; g++) {                                                           \
            __m512i iacc[TILE];                                                                    \
            for (int j = 0; j < TILE; j++) iacc[j] = _mm512_setzero_si512();                        \
            const uint8_t *wg = W + (rb * G + g) * BLOCK;                                          \
            DOTS                                                                                   \
            __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + (rb * G + g) * 16))); \
            for (int j = 0; j < TT; j++) {                                                         \
                size_t t = t0 + j;                                                                 \
                __m512 d = _mm512_fmsub_ps(_mm512_set1_ps(xs[t * G + g]), _mm512_cvtepi32_ps(iacc[j]), \
                                           _mm512_set1_ps(xc[t * G + g]));                         \
                facc[j] = _mm512_fmadd_ps(ws, d, facc[j]);                                          \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; j < TT; j++) store_rows(y, ldy, t0 + j, rb * 16, N, facc[j]);              \
    }

KERNEL void duet_matmul_q8_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                                const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1) {
    const size_t G = Kp / 32, BLOCK = 512;
    for (size_t rb = rb0; rb < rb1; rb++) {
        Q_BLOCK(
            for (int q = 0; q < 8; q++) {
                __m512i w = _mm512_loadu_si512(wg + q * 64);
                for (int j = 0; j < TT; j++)
                    iacc[j] = _mm512_dpbusd_epi32(iacc[j], w, bcast4(xq + (t0 + j) * Kp + g * 32 + q * 4));
            })
    }
}

KERNEL void duet_matmul_q4_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                                const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1) {
    const size_t G = Kp / 32, BLOCK = 256;
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (size_t rb = rb0; rb < rb1; rb++) {
        Q_BLOCK(
            for (int q = 0; q < 4; q++) {
                __m512i packed = _mm512_loadu_si512(wg + q * 64);
                __m512i lo = _mm512_and_si512(packed, low);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                for (int j = 0; j < TT; j++) {
                    const int8_t *a = xq + (t0 + j) * Kp + g * 32 + q * 8;
                    iacc[j] = _mm512_dpbusd_epi32(iacc[j], lo, bcast4(a));
                    iacc[j] = _mm512_dpbusd_epi32(iacc[j], hi, bcast4(a + 4));
                }
            })
    }
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
