/* The released refiner's expanded rows, shared by its folded inference kernel and its training kernels:
 *
 *   f = relu6(expand(x) + b)
 *
 * one query row at a time, over a stack of HEADS attention maps (fp32, NCHW, contiguous) and EXPANDED expanded maps,
 * into a padded row buffer that the depthwise KSIZE x KSIZE convolution reads without bounds checks. A kernel keeps
 * the rows one output row needs in a small ring (see ring_row), so the expanded maps never reach memory.
 *
 * Weights arrive in the order the loops read them: expand_w[c][e]. */
#ifndef REFINER_EXPAND_ROWS_H
#define REFINER_EXPAND_ROWS_H
#include <stdlib.h>

#include "vec.h"

#if !defined(HEADS) || !defined(EXPANDED) || !defined(KSIZE)
#error "compile with -DHEADS=<heads> -DEXPANDED=<expanded maps> -DKSIZE=<odd kernel size>"
#endif
#define PAD (KSIZE / 2)
/* Column vectors per block: a block's HEADS x COLS accumulators, its COLS expanded vectors, a broadcast weight and
 * a loaded vector stay in registers, and every weight broadcast serves COLS vectors. */
#define COLS ((HEADS + 1) * 2 + 2 <= NREGS ? 2 : 1)

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* min(max(v, 0), 6) lane-wise, NaN kept as torch's clamp keeps it. x86's max and min return their second operand
 * when one is NaN; elsewhere compare masks do it, as C's vector extensions have no lane-wise select. */
static inline vec relu6(vec v) {
#if defined(__AVX512F__)
    return (vec)_mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(_mm512_setzero_ps(), (__m512)v));
#elif defined(__AVX__)
    return (vec)_mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(_mm256_setzero_ps(), (__m256)v));
#else
    vec six = splat(6.f);
    v = (vec)((ivec)v & ((v > 0.f) | (v != v)));
    ivec high = v > six;
    return (vec)(((ivec)six & high) | ((ivec)v & ~high));
#endif
}

/* Rounds a byte count up to whole vectors' worth of 64 bytes (aligned_alloc's size must be a multiple). */
static inline size_t aligned_size(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* An expanded row in memory: LEAD floats (PAD zeros at their end), m values, zeros up to a whole number of vectors,
 * LEAD zeros; so every block of columns, the last one included, reads its KSIZE taps without bounds checks. LEAD is
 * PAD rounded up to whole vectors, so that in a 64-byte aligned buffer of such rows the values start aligned: the
 * loads of whole vectors of values (the centre tap, gradients, stores of new rows) never split a cache line (the
 * training passes 2-7 % faster on the Xeon of docs/performance.md, no slower elsewhere). Kernels index a row from
 * PAD floats before its first value (padded_rows), so that its column j is at PAD + j and its taps at j + dj. */
#define LEAD ((PAD + VW - 1) / VW * VW)

static inline long expanded_stride(long m) { return (m + VW - 1) / VW * VW + 2 * LEAD; }

/* Floats to allocate (64-byte aligned) for `rows` expanded rows of stride floats. */
static inline size_t padded_rows_floats(long rows, long stride) { return (size_t)(rows * stride + LEAD); }

/* The indexing pointer of the first of the rows at aligned memory `base`: PAD floats before its first value. */
static inline float *padded_rows(float *base) { return base + (LEAD - PAD); }

/* Columns j0 ... of the expanded row: cols vectors, the last holding `last` values. Inlined with a constant cols. */
static inline __attribute__((always_inline)) void expand_block(const float *xrow, long plane, long j0, int cols,
                                                               long last, long stride, const float *expand_w,
                                                               const float *expand_b, float *dst) {
    vec xv[HEADS][COLS];
#pragma GCC unroll 64
    for (int c = 0; c < HEADS; c++)
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++)
            xv[c][v] = load_first(xrow + c * plane + j0 + v * VW, v == cols - 1 ? last : VW);
    for (int e = 0; e < EXPANDED; e++) {
        vec acc[COLS];
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) acc[v] = splat(expand_b[e]);
#pragma GCC unroll 64
        for (int c = 0; c < HEADS; c++) {
            vec weight = splat(expand_w[c * EXPANDED + e]);
#pragma GCC unroll 4
            for (int v = 0; v < cols; v++) acc[v] += weight * xv[c][v];
        }
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) {
            vec f = keep_first(relu6(acc[v]), v == cols - 1 ? last : VW);
            memcpy(dst + e * stride + PAD + j0 + v * VW, &f, sizeof f);
        }
    }
}

/* Expanded row `row` of one batch element xb (HEADS maps of n x m) into dst: EXPANDED rows of stride floats, each
 * laid out as described above, the zeros being the depthwise convolution's padding; all zeros outside the map. Only
 * the values and the zeros up to whole vectors are written: the padding around them stays as zeroed_rows left it. */
static void expand_row(const float *xb, long n, long m, long row, long stride, const float *expand_w,
                       const float *expand_b, float *dst) {
    if (row < 0 || row >= n) {
        memset(dst, 0, EXPANDED * stride * sizeof(float));
        return;
    }
    long j0 = 0;
    for (; j0 + COLS * VW <= m; j0 += COLS * VW)
        expand_block(xb + row * m, n * m, j0, COLS, VW, stride, expand_w, expand_b, dst);
    for (; j0 < m; j0 += VW)
        expand_block(xb + row * m, n * m, j0, 1, m - j0 < VW ? m - j0 : VW, stride, expand_w, expand_b, dst);
}

/* A ring of `slots` expanded rows of one batch element: which row each slot holds (none at first). */
typedef struct {
    float *rows;
    long held[4 * KSIZE];
    int slots;
} ring;

/* The indexing pointer of `rows` rows of stride floats laid out as expanded rows over (64-byte aligned) memory of
 * padded_rows_floats(rows, stride) floats, zeroed here once: the rows' padding, which the kernels never write (they
 * write a row's values and the zeros up to whole vectors; zeroing each row before writing it cost a training pass
 * 5-10 %). */
static float *zeroed_rows(float *memory, long rows, long stride) {
    memset(memory, 0, padded_rows_floats(rows, stride) * sizeof(float));
    return padded_rows(memory);
}

/* A ring of `slots` expanded rows over memory as zeroed_rows takes it. */
static ring ring_init(float *memory, int slots, long stride) {
    ring r = {zeroed_rows(memory, slots * EXPANDED, stride), {0}, slots};
    return r;
}

static void ring_reset(ring *r) {
    for (int s = 0; s < r->slots; s++) r->held[s] = -(1L << 40); /* no row */
}

/* Expanded row `row` of xb, from the ring, computed into its slot when the slot holds another row. */
static inline float *ring_row(ring *r, long row, const float *xb, long n, long m, long stride, const float *expand_w,
                              const float *expand_b) {
    long slot = ((row % r->slots) + r->slots) % r->slots;
    float *dst = r->rows + slot * EXPANDED * stride;
    if (r->held[slot] != row) {
        expand_row(xb, n, m, row, stride, expand_w, expand_b, dst);
        r->held[slot] = row;
    }
    return dst;
}

#endif
