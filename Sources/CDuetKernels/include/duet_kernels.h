// CPU kernels Swift cannot express: AVX-512 with run-time dispatch, AMX-BF16 tiles, streaming
// reads for the bandwidth benchmark. Every function is safe to call only when
// duet_cpu_features() reports the features it needs. No intrinsics in this header.
#ifndef DUET_KERNELS_H
#define DUET_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define DUET_CPU_AVX512 1u      // AVX-512 F + BW + VL, enabled by the OS
#define DUET_CPU_AVX512_BF16 2u
#define DUET_CPU_AMX_BF16 4u    // AMX-TILE + AMX-BF16 in CPUID, OS-enabled, permission granted
#define DUET_CPU_AVX512_VNNI 8u // vpdpbusd on 512-bit registers

/// Features this CPU and OS offer (AMX permission is requested once, here).
uint32_t duet_cpu_features(void);

// Keeps large heap allocations (activations of long prompts) in the heap instead of fresh
// mmap'ed pages per allocation (glibc; 1 where it took effect).
int duet_reuse_large_allocations(void);

/// y[t][r] = sum_k W[r][k] * x[t][k] for rows r in [r0, r1), tokens t in [0, T).
/// W: bf16 [rows][ldw] (row stride ldw elements), x: fp32 [T][ldx], y: fp32 [T][ldy].
void duet_matmul_bf16_avx512(const uint16_t *W, size_t ldw, size_t K, const float *x, size_t ldx,
                             size_t T, float *y, size_t ldy, size_t r0, size_t r1);

/// Same for fp32 weights.
void duet_matmul_f32_avx512(const float *W, size_t ldw, size_t K, const float *x, size_t ldx,
                            size_t T, float *y, size_t ldy, size_t r0, size_t r1);

/// SwiGLU's first half in one pass over both matrices: h[t][r] = silu(W1[r].x[t]) * (W3[r].x[t]).
void duet_gate_up_bf16_avx512(const uint16_t *W1, const uint16_t *W3, size_t ldw, size_t K,
                              const float *x, size_t ldx, size_t T, float *h, size_t ldh, size_t r0, size_t r1);

/// AMX-BF16: activations packed once per call into the tile (VNNI) layout:
/// xp[kp][t][2] for kp in [0, ceil(K/32)*16), t in [0, Tpad) with Tpad = ceil(T/16)*16 (zero padded).
size_t duet_amx_packed_floats(size_t K, size_t T);  // size of xp in uint16 elements
void duet_amx_pack_activations(const float *x, size_t ldx, size_t K, size_t T, uint16_t *xp);
/// The same for k-blocks [kb0, kb1) only (32 k each), so packing can run in parallel.
void duet_amx_pack_activations_range(const float *x, size_t ldx, size_t K, size_t T, uint16_t *xp, size_t kb0, size_t kb1);

/// y[t][r] for rows [r0, r1) with AMX tiles over packed activations (weights read in place:
/// 16 rows x 32 k per tile). r1 - r0 need not be a multiple of 16, nor K of 32.
void duet_matmul_bf16_amx(const uint16_t *W, size_t ldw, size_t K, const uint16_t *xp, size_t T,
                          float *y, size_t ldy, size_t r0, size_t r1);

/// h[t][r] = silu(W1.x) * (W3.x) with AMX.
void duet_gate_up_bf16_amx(const uint16_t *W1, const uint16_t *W3, size_t ldw, size_t K, const uint16_t *xp,
                           size_t T, float *h, size_t ldh, size_t r0, size_t r1);

/// Quantized weights (q8, q4), packed by quantize.swift in blocks of 16 rows x 32 k (one
/// "group": one f16 scale per row and group, symmetric, stored with an offset so they are
/// unsigned: q8 byte = q + 128, q4 nibble = q + 8):
///   q8: W[rb][g][j][r][i] = row 16rb + r, k = 32g + 4j + i          (512 bytes per block)
///   q4: W[rb][g][j][r][i] low nibble: k = 32g + 8j + i, high: +4     (256 bytes per block)
///   scales[rb][g][r] (f16 bits), rb < Np/16, g < Kp/32 (rows and k zero-padded).
/// Activations are quantized per token and group: xq[t][Kp] int8, xs[t][g] its scale, and
/// xc[t][g] = xs * offset * sum(xq over the group), the offset's correction (offset 128 for
/// q8, 8 for q4), so y = sum_g ws * (xs * dot(wu, xq) - xc).
/// y[t][16rb + r] for row blocks [rb0, rb1), rows < N written; y has row stride ldy.
void duet_matmul_q8_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                         const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1);
void duet_matmul_q4_vnni(const uint8_t *W, const uint16_t *scales, size_t Kp, const int8_t *xq, const float *xs,
                         const float *xc, size_t T, float *y, size_t ldy, size_t N, size_t rb0, size_t rb1);

/// Reads [p, p + bytes) (64-byte aligned) with AVX-512 loads in `streams` (4, 8 or 16)
/// independent streams, each a contiguous slice; returns a value that depends on every byte
/// read (so the reads cannot be removed). Reads (bytes / streams rounded down to 256) * streams
/// bytes. mode 0: plain loads, 1: with software prefetch ahead, 2: non-temporal loads.
uint64_t duet_read_bandwidth(const void *p, size_t bytes, int mode, int streams);

/// A spin-wait hint (x86 `pause`).
void duet_cpu_relax(void);

/// Sequentially consistent atomics on plain memory (the thread pool's padded slots).
int64_t duet_atomic_load(const int64_t *p);
void duet_atomic_store(int64_t *p, int64_t v);
int64_t duet_atomic_fetch_add(int64_t *p, int64_t v);

/// Register-only loops for a path's compute peak: the flops they did. AVX-512: 24
/// independent fp32 FMA chains; AMX: four tdpbf16ps per iteration on resident tiles.
double duet_peak_avx512(size_t iterations);
double duet_peak_amx(size_t iterations);
/// VNNI: 16 independent vpdpbusd chains; returns int8 ops (2 per multiply-add).
double duet_peak_vnni(size_t iterations);

#endif
