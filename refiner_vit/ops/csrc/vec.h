/* Shared by the kernels: OpenMP (or its one-thread stand-in), a vector of VW floats sized to the machine's vector
 * registers, how many of them the register file holds, unaligned and partial loads and stores, lane reductions
 * (GCC/Clang vector extensions).
 *
 * VW is 16 floats (one register) with AVX-512 and 8 otherwise: one AVX2 register, two NEON ones. NREGS is the
 * number of such vectors that fit in the register file (32 with AVX-512, 16 with AVX2, 16 pairs of NEON registers);
 * the kernels size their register blocks from it so that accumulators never spill. */
#ifndef REFINER_VEC_H
#define REFINER_VEC_H
#include <string.h>

/* Threads split the work with OpenMP: the library links the runtime torch has already loaded, so its threads are
 * torch's. Built without OpenMP (a compiler without its runtime), the kernels run on one thread. */
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

#ifdef __AVX512F__
#define VW 16
#define NREGS 32
#else
#define VW 8
#define NREGS 16
#endif

typedef float vec __attribute__((vector_size(VW * sizeof(float))));
/* Lane-wise comparison results (all bits set where true), and the bits of a vec for masking. */
typedef int ivec __attribute__((vector_size(VW * sizeof(int))));

/* x in every lane: one broadcast (x - 0 is x for every x, so the subtraction folds away; x + 0 would not, as
 * -0 + 0 is +0). */
static inline vec splat(float x) {
    return x - (vec){0};
}

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* A row's last, partial vector: with AVX-512, masked loads and stores (masked-off lanes are neither read nor
 * written). A memcpy of variable length there compiles to `rep movs`, whose start-up of tens of cycles, paid per
 * map and row, cost the training passes 10-30 % (docs/performance.md). With 8-float vectors the memcpy measured as
 * fast as AVX2's masked moves (whose stores are slow on some AMD cores): it stays. */
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __mmask16 first_lanes(long count) { return (__mmask16)((1u << count) - 1); }
#endif

/* The first count (<= VW) floats at p, zeros after them. */
static inline vec load_first(const float *p, long count) {
    if (count == VW) return load(p);
#if defined(__AVX512F__)
    return (vec)_mm512_maskz_loadu_ps(first_lanes(count), p);
#else
    vec v = {0};
    memcpy(&v, p, count * sizeof(float));
    return v;
#endif
}

/* v with the lanes from count (<= VW) on set to zero. */
static inline vec keep_first(vec v, long count) {
    if (count == VW) return v;
#if defined(__AVX512F__)
    return (vec)_mm512_maskz_mov_ps(first_lanes(count), (__m512)v);
#else
    ivec lane, keep;
    for (int l = 0; l < VW; l++) lane[l] = l;
    keep = lane < (int)count;
    return (vec)((ivec)v & keep);
#endif
}

/* Stores the first count (<= VW) lanes of v at p. */
static inline void store_first(float *p, vec v, long count) {
    if (count == VW) {
        memcpy(p, &v, sizeof v);
        return;
    }
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, first_lanes(count), (__m512)v);
#else
    memcpy(p, &v, count * sizeof(float));
#endif
}

/* The largest of n, n / 2, ..., n / 6 that divides n and is at most limit, else 1: how many of n items (heads) one
 * register block takes when the items are processed in equal groups. */
#define DIVISOR_AT_MOST(n, limit)                                                                                    \
    ((n) <= (limit)                          ? (n)                                                                   \
     : (n) % 2 == 0 && (n) / 2 <= (limit) ? (n) / 2                                                               \
     : (n) % 3 == 0 && (n) / 3 <= (limit) ? (n) / 3                                                               \
     : (n) % 4 == 0 && (n) / 4 <= (limit) ? (n) / 4                                                               \
     : (n) % 5 == 0 && (n) / 5 <= (limit) ? (n) / 5                                                               \
     : (n) % 6 == 0 && (n) / 6 <= (limit) ? (n) / 6                                                               \
                                           : 1)

/* v, held in a register. A compiler may fold a vector that several FMAs use into each of them as a memory operand
 * (GCC does so in the convolution's weight gradient with AVX-512, registers to spare): a load per FMA, and the loop is
 * bound by loads rather than FMAs. An empty asm statement with v as an in-out register operand forces one load and
 * emits no instruction (x86-64; elsewhere v as it is). */
static inline vec in_register(vec v) {
#if defined(__x86_64__)
    __asm__("" : "+v"(v));
#endif
    return v;
}

/* a where a >= b, else b, lane-wise; NaN in either gives NaN (as torch's max and clamp propagate it). */
static inline vec max_nan(vec a, vec b) {
    ivec take_b = (b > a) | (b != b);
    return (vec)(((ivec)b & take_b) | ((ivec)a & ~take_b));
}

static inline float sum_lanes(vec v) {
    float total = 0.f;
    for (int l = 0; l < VW; l++) total += v[l];
    return total;
}

static inline float max_lanes(vec v) {
    float top = v[0];
    for (int l = 1; l < VW; l++) top = (v[l] > top || v[l] != v[l]) ? v[l] : top;
    return top;
}

#endif
