#include "duet_kernels.h"
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t xgetbv0(void) {
    uint32_t a, d;
    __asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
    return ((uint64_t)d << 32) | a;
}

static uint32_t detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0;  // OSXSAVE
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    unsigned b7 = b, c7 = c, d7 = d;
    uint32_t f = 0;
    uint64_t xcr0 = xgetbv0();
    int avx512 = ((b7 >> 16) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1);  // F, BW, VL
    if (avx512 && (xcr0 & 0xE6) == 0xE6) f |= DUET_CPU_AVX512;
    if ((f & DUET_CPU_AVX512) && ((c7 >> 11) & 1)) f |= DUET_CPU_AVX512_VNNI;
    if ((f & DUET_CPU_AVX512) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1)) f |= DUET_CPU_AVX512_BF16;
    if ((f & DUET_CPU_AVX512) && ((d7 >> 24) & 1) && ((d7 >> 22) & 1)) {
        // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
        if (syscall(SYS_arch_prctl, 0x1023, 18) == 0 && (xgetbv0() & 0x60000) == 0x60000) f |= DUET_CPU_AMX_BF16;
    }
    return f;
}

uint32_t duet_cpu_features(void) {
    static volatile uint32_t cached = 0xFFFFFFFFu;
    if (cached == 0xFFFFFFFFu) cached = detect();  // idempotent: a race computes the same value
    return cached;
}

void duet_cpu_relax(void) { __builtin_ia32_pause(); }

int64_t duet_atomic_load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
void duet_atomic_store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
int64_t duet_atomic_fetch_add(int64_t *p, int64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

#if defined(__GLIBC__)
#include <malloc.h>
#endif

// glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh
// mmap'ed pages and unmaps them on free, so a 50 MiB activation array made every layer pays
// a page fault per 4 KiB on first touch. Raising the threshold (and the trim threshold)
// keeps such arrays in the heap, reused without faults. Returns 1 where it took effect.
int duet_reuse_large_allocations(void) {
#if defined(__GLIBC__)
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
    return 0;
#endif
}
