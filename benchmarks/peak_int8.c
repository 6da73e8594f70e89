/* Peak int8 multiply-accumulate rate of this CPU's best exact dot product (issue 34), compiled and run by
 * benchmarks/peak_int8.py: independent chains of the instruction on registers only, one thread per core.
 *
 *   peak_int8 THREADS ITERATIONS   ->   "<instruction> <MACs per iteration of one thread> <seconds>"
 *
 * x86: vpdpbusd zmm (AVX-512 VNNI, 64 MACs), vpdpbusd ymm (AVX-VNNI, 32), else AVX2's vpmaddubsw + vpmaddwd +
 * vpaddd (32 MACs in 3 instructions, as int8 engines do without VNNI); aarch64: sdot (16 MACs).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS 12 /* independent accumulators: more than latency x throughput of every instruction here */
/* The chains as separate variables, each instruction as inline assembly: the accumulators stay in registers, with
 * no copies between them (an array of them, or the intrinsics, made GCC add loads, stores or moves). */
#define EACH_CHAIN(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define KERNEL(type, zero, step)                             \
    type total = zero;                                       \
    EACH_CHAIN(DECLARE)                                      \
    for (long i = 0; i < iterations; i++) { EACH_CHAIN(step) } \
    EACH_CHAIN(ADD)
#define DECLARE(k) __typeof__(total) acc##k = total;
#define ADD(k) total = ADD_VECTORS(total, acc##k);

static long iterations;
static volatile int32_t sink;
static volatile int8_t seed_a = 3, seed_b = 5;

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void *vpdpbusd_zmm(void *unused) {
    __m512i a = _mm512_set1_epi8(seed_a), b = _mm512_set1_epi8(seed_b);
#define ADD_VECTORS _mm512_add_epi32
#define STEP(k) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc##k) : "v"(a), "v"(b));
    KERNEL(__m512i, _mm512_setzero_si512(), STEP)
#undef STEP
#undef ADD_VECTORS
    sink = _mm512_reduce_add_epi32(total);
    return unused;
}

__attribute__((target("avx2,avxvnni"))) static void *vpdpbusd_ymm(void *unused) {
    __m256i a = _mm256_set1_epi8(seed_a), b = _mm256_set1_epi8(seed_b);
#define ADD_VECTORS _mm256_add_epi32
#define STEP(k) __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc##k) : "x"(a), "x"(b));
    KERNEL(__m256i, _mm256_setzero_si256(), STEP)
#undef STEP
    sink = _mm256_extract_epi32(total, 0);
    return unused;
}

__attribute__((target("avx2"))) static void *vpmaddubsw_ymm(void *unused) {
    __m256i a = _mm256_set1_epi8(seed_a), b = _mm256_set1_epi8(seed_b), ones = _mm256_set1_epi16(1);
#define STEP(k)                                                                                    \
    {                                                                                              \
        __m256i pairs;                                                                             \
        __asm__("vpmaddubsw %2, %1, %0" : "=x"(pairs) : "x"(a), "x"(b));                           \
        __asm__("vpmaddwd %1, %0, %0\n\tvpaddd %0, %2, %2" : "+x"(pairs), "+x"(ones), "+x"(acc##k)); \
    }
    KERNEL(__m256i, _mm256_setzero_si256(), STEP)
#undef STEP
#undef ADD_VECTORS
    sink = _mm256_extract_epi32(total, 0);
    return unused;
}

static const char *choose(void *(**kernel)(void *), int *macs) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        *kernel = vpdpbusd_zmm, *macs = 64;
        return "vpdpbusd-zmm";
    }
    if (__builtin_cpu_supports("avxvnni")) {
        *kernel = vpdpbusd_ymm, *macs = 32;
        return "vpdpbusd-ymm";
    }
    if (__builtin_cpu_supports("avx2")) {
        *kernel = vpmaddubsw_ymm, *macs = 32;
        return "vpmaddubsw+vpmaddwd-ymm";
    }
    return NULL;
}
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

__attribute__((target("arch=armv8.2-a+dotprod"))) static void *sdot(void *unused) {
    int8x16_t a = vdupq_n_s8(seed_a), b = vdupq_n_s8(seed_b);
#define ADD_VECTORS vaddq_s32
#define STEP(k) __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc##k) : "w"(a), "w"(b));
    KERNEL(int32x4_t, vdupq_n_s32(0), STEP)
#undef STEP
#undef ADD_VECTORS
    sink = vaddvq_s32(total);
    return unused;
}

static const char *choose(void *(**kernel)(void *), int *macs) {
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)) return NULL;
    *kernel = sdot, *macs = 16;
    return "sdot";
}
#else
static const char *choose(void *(**kernel)(void *), int *macs) { return NULL; }
#endif

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS ITERATIONS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    iterations = atol(argv[2]);
    void *(*kernel)(void *) = NULL;
    int macs = 0;
    const char *name = choose(&kernel, &macs);
    if (name == NULL) {
        fprintf(stderr, "this CPU has none of the int8 dot products measured here (AVX-512 VNNI, AVX-VNNI, AVX2, sdot)\n");
        return 3;
    }
    pthread_t pool[64];
    if (threads < 1 || threads > 64) return 2;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int t = 0; t < threads; t++) pthread_create(&pool[t], NULL, kernel, NULL);
    for (int t = 0; t < threads; t++) pthread_join(pool[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("%s %d %.9f\n", name, macs * CHAINS, (end.tv_sec - start.tv_sec) + 1e-9 * (end.tv_nsec - start.tv_nsec));
    return 0;
}
