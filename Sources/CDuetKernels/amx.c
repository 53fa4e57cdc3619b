// AMX-BF16 kernels. The weights are the A operand, read in place: a tile is 16 weight rows
// x 32 k (64 bytes per row, row stride = the matrix's). The activations are the B operand,
// packed once per call into the VNNI layout, so no weight is ever repacked or copied.
// C tiles hold [16 rows][16 tokens] fp32.
#include "duet_kernels.h"
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

size_t duet_amx_packed_floats(size_t K, size_t T) { return ceil_div(K, 32) * ceil_div(T, 16) * 512; }

static inline uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// xp[kb][tg] is one 1 KB tile: [pair kp (16)][token t (16)][2].
void duet_amx_pack_activations(const float *x, size_t ldx, size_t K, size_t T, uint16_t *xp) {
    duet_amx_pack_activations_range(x, ldx, K, T, xp, 0, ceil_div(K, 32));
}

void duet_amx_pack_activations_range(const float *x, size_t ldx, size_t K, size_t T, uint16_t *xp, size_t kb0, size_t kb1) {
    size_t TG = ceil_div(T, 16);
    for (size_t kb = kb0; kb < kb1; kb++)
        for (size_t tg = 0; tg < TG; tg++) {
            uint16_t *tile = xp + (kb * TG + tg) * 512;
            for (size_t kp = 0; kp < 16; kp++)
                for (size_t t = 0; t < 16; t++)
                    for (size_t j = 0; j < 2; j++) {
                        size_t k = kb * 32 + kp * 2 + j, tok = tg * 16 + t;
                        tile[(kp * 16 + t) * 2 + j] = (k < K && tok < T) ? to_bf16(x[tok * ldx + k]) : 0;
                    }
        }
}

AMX static void configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

// y[t][r] for r in [r, r + 32) (two A tiles) or [r, r + 16) (one), over the 32-aligned part
// of K. Token groups go two at a time (four C tiles).
AMX static void rows_block(const uint16_t *W, size_t ldw, size_t KB, const uint16_t *xp, size_t T,
                           float *y, size_t ldy, size_t r, int two_row_tiles) {
    size_t TG = ceil_div(T, 16);
    float c[4][16][16];
    size_t stride = ldw * 2;
    for (size_t tg = 0; tg < TG; tg += 2) {
        int two_token_tiles = tg + 1 < TG;
        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
        for (size_t kb = 0; kb < KB; kb++) {
            const uint16_t *a = W + r * ldw + kb * 32;
            const uint16_t *b = xp + (kb * TG + tg) * 512;
            _tile_loadd(0, a, stride);
            _tile_loadd(2, b, 64);
            _tile_dpbf16ps(4, 0, 2);
            if (two_token_tiles) {
                _tile_loadd(3, b + 512, 64);
                _tile_dpbf16ps(5, 0, 3);
            }
            if (two_row_tiles) {
                _tile_loadd(1, a + 16 * ldw, stride);
                _tile_dpbf16ps(6, 1, 2);
                if (two_token_tiles) _tile_dpbf16ps(7, 1, 3);
            }
        }
        _tile_stored(4, c[0], 64);
        _tile_stored(5, c[1], 64);
        _tile_stored(6, c[2], 64);
        _tile_stored(7, c[3], 64);
        for (int rt = 0; rt < (two_row_tiles ? 2 : 1); rt++)
            for (int tt = 0; tt < (two_token_tiles ? 2 : 1); tt++)
                for (size_t i = 0; i < 16; i++)
                    for (size_t j = 0; j < 16; j++) {
                        size_t tok = (tg + tt) * 16 + j;
                        if (tok < T) y[tok * ldy + r + rt * 16 + i] = c[rt * 2 + tt][i][j];
                    }
    }
}

// Adds the K tail (k >= Kfull) and computes rows that do not fill a 16-row tile, from the
// packed (bf16) activations, so every row sees the same rounded inputs.
static void scalar_rows(const uint16_t *W, size_t ldw, size_t k0, size_t K, const uint16_t *xp, size_t T,
                        float *y, size_t ldy, size_t r0, size_t r1, int accumulate) {
    size_t TG = ceil_div(T, 16);
    for (size_t r = r0; r < r1; r++)
        for (size_t t = 0; t < T; t++) {
            float s = 0;
            for (size_t k = k0; k < K; k++) {
                size_t kb = k / 32, kp = (k % 32) / 2, j = k % 2, tg = t / 16, tt = t % 16;
                uint32_t wx = (uint32_t)W[r * ldw + k] << 16, xx = (uint32_t)xp[(kb * TG + tg) * 512 + (kp * 16 + tt) * 2 + j] << 16;
                float wf, xf;
                memcpy(&wf, &wx, 4);
                memcpy(&xf, &xx, 4);
                s += wf * xf;
            }
            if (accumulate) y[t * ldy + r] += s; else y[t * ldy + r] = s;
        }
}

AMX void duet_matmul_bf16_amx(const uint16_t *W, size_t ldw, size_t K, const uint16_t *xp, size_t T,
                              float *y, size_t ldy, size_t r0, size_t r1) {
    size_t KB = K / 32, Kfull = KB * 32;
    size_t r = r0;
    if (KB > 0) {
        configure();
        for (; r + 32 <= r1; r += 32) rows_block(W, ldw, KB, xp, T, y, ldy, r, 1);
        for (; r + 16 <= r1; r += 16) rows_block(W, ldw, KB, xp, T, y, ldy, r, 0);
        _tile_release();
    }
    if (r < r1) scalar_rows(W, ldw, 0, K, xp, T, y, ldy, r, r1, 0);
    if (Kfull < K && r > r0) scalar_rows(W, ldw, Kfull, K, xp, T, y, ldy, r0, r, 1);
}

AMX void duet_gate_up_bf16_amx(const uint16_t *W1, const uint16_t *W3, size_t ldw, size_t K, const uint16_t *xp,
                               size_t T, float *h, size_t ldh, size_t r0, size_t r1) {
    // Gate into h, up into a [T][32] scratch, 32 rows at a time; then h = silu(h) * up.
    float *up = (float *)malloc(sizeof(float) * 32 * (T ? T : 1));
    for (size_t r = r0; r < r1; r += 32) {
        size_t n = r1 - r < 32 ? r1 - r : 32;
        duet_matmul_bf16_amx(W1, ldw, K, xp, T, h, ldh, r, r + n);
        duet_matmul_bf16_amx(W3 + r * ldw, ldw, K, xp, T, up, 32, 0, n);
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < n; i++) {
                float g = h[t * ldh + r + i];
                h[t * ldh + r + i] = g / (1.0f + expf(-g)) * up[t * 32 + i];
            }
    }
    free(up);
}

AMX double duet_peak_amx(size_t iterations) {
    static uint16_t ones[16 * 32];
    for (int i = 0; i < 16 * 32; i++) ones[i] = 0x3F80;  // 1.0 in bf16
    configure();
    _tile_loadd(0, ones, 64);
    _tile_loadd(1, ones, 64);
    _tile_loadd(2, ones, 64);
    _tile_loadd(3, ones, 64);
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    for (size_t n = 0; n < iterations; n++) {
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
    }
    float c[16][16];
    _tile_stored(4, c, 64);
    _tile_release();
    volatile float sink = c[0][0];
    (void)sink;
    return (double)iterations * 4 * 16 * 16 * 32 * 2;
}
