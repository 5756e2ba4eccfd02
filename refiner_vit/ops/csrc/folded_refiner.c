/* The authors' released refiner after BatchNorm folding (refiner_vit.fuse.FoldedRefiner), for inference on the CPU:
 *
 *   y = reduce(relu6(depthwise(relu6(expand(x) + b1)) + b2)) + b3 + scale * x
 *
 * over a stack of HEADS attention maps (fp32, NCHW, contiguous), expand and reduce being 1 x 1 convolutions
 * HEADS -> EXPANDED -> HEADS and depthwise a KSIZE x KSIZE convolution per expanded map with zero "same" padding.
 * torch runs this as three oneDNN convolutions, two clamps and layout conversions, each a pass over EXPANDED large
 * maps. Here an output row needs only KSIZE rows of expanded maps: they are computed once per input row into a
 * small ring of padded rows that stays in cache, and the depthwise convolution, the reduction and the shortcut
 * happen in registers, so the only passes over memory are reading x and writing y.
 *
 * Weights arrive in the order the loops read them: expand_w[c][e], dw_w[di][dj][e], reduce_w[e][o]. */
#include <stdlib.h>

#include "vec.h"

#if !defined(HEADS) || !defined(EXPANDED) || !defined(KSIZE)
#error "compile with -DHEADS=<heads> -DEXPANDED=<expanded maps> -DKSIZE=<odd kernel size>"
#endif
#define PAD (KSIZE / 2)
/* Column vectors per block: a block's HEADS x COLS output accumulators, its COLS expanded vectors, a broadcast weight
 * and a loaded vector stay in registers, and every weight broadcast serves COLS vectors. */
#define COLS ((HEADS + 1) * 2 + 2 <= NREGS ? 2 : 1)

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

typedef struct {
    const float *expand_w, *expand_b, *dw_w, *dw_b, *reduce_w, *reduce_b, *scale;
} weights;

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

/* Columns j0 ... of the expanded row: cols vectors, the last holding `last` values. Inlined with a constant cols. */
static inline __attribute__((always_inline)) void expand_block(const float *xrow, long plane, long j0, int cols,
                                                               long last, long stride, const weights *w,
                                                               float *dst) {
    vec xv[HEADS][COLS];
#pragma GCC unroll 64
    for (int c = 0; c < HEADS; c++)
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++)
            xv[c][v] = load_first(xrow + c * plane + j0 + v * VW, v == cols - 1 ? last : VW);
    for (int e = 0; e < EXPANDED; e++) {
        vec acc[COLS];
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) acc[v] = splat(w->expand_b[e]);
#pragma GCC unroll 64
        for (int c = 0; c < HEADS; c++) {
            vec weight = splat(w->expand_w[c * EXPANDED + e]);
#pragma GCC unroll 4
            for (int v = 0; v < cols; v++) acc[v] += weight * xv[c][v];
        }
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++)
            store_first(dst + e * stride + PAD + j0 + v * VW, relu6(acc[v]), v == cols - 1 ? last : VW);
    }
}

/* Expanded row `row` of one batch element xb (HEADS maps of n x m) into dst: EXPANDED rows of stride floats, each
 * PAD zeros, m values, zeros (the depthwise convolution's padding); all zeros outside the map. */
static void expand_row(const float *xb, long n, long m, long row, long stride, const weights *w, float *dst) {
    memset(dst, 0, EXPANDED * stride * sizeof(float));
    if (row < 0 || row >= n) return;
    long j0 = 0;
    for (; j0 + COLS * VW <= m; j0 += COLS * VW) expand_block(xb + row * m, n * m, j0, COLS, VW, stride, w, dst);
    for (; j0 < m; j0 += VW) expand_block(xb + row * m, n * m, j0, 1, m - j0 < VW ? m - j0 : VW, stride, w, dst);
}

/* Output columns j0 ... of row i: cols vectors, the last holding `last` values. Inlined with a constant cols. */
static inline __attribute__((always_inline)) void output_block(const float *xb, long plane, long m, long i, long j0,
                                                               int cols, long last, const float *const *rows,
                                                               long stride, const weights *w, float *outb) {
    vec acc[HEADS][COLS];
#pragma GCC unroll 64
    for (int o = 0; o < HEADS; o++)
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) {
            vec shortcut = load_first(xb + o * plane + i * m + j0 + v * VW, v == cols - 1 ? last : VW);
            acc[o][v] = splat(w->reduce_b[o]) + (w->scale ? w->scale[o] * shortcut : (vec){0});
        }
    for (int e = 0; e < EXPANDED; e++) {
        vec d[COLS];
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) d[v] = splat(w->dw_b[e]);
#pragma GCC unroll 16
        for (int di = 0; di < KSIZE; di++)
#pragma GCC unroll 16
            for (int dj = 0; dj < KSIZE; dj++) {
                vec weight = splat(w->dw_w[(di * KSIZE + dj) * EXPANDED + e]);
#pragma GCC unroll 4
                for (int v = 0; v < cols; v++) d[v] += weight * load(rows[di] + e * stride + j0 + dj + v * VW);
            }
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++) d[v] = relu6(d[v]);
#pragma GCC unroll 64
        for (int o = 0; o < HEADS; o++) {
            vec weight = splat(w->reduce_w[e * HEADS + o]);
#pragma GCC unroll 4
            for (int v = 0; v < cols; v++) acc[o][v] += weight * d[v];
        }
    }
#pragma GCC unroll 64
    for (int o = 0; o < HEADS; o++)
#pragma GCC unroll 4
        for (int v = 0; v < cols; v++)
            store_first(outb + o * plane + i * m + j0 + v * VW, acc[o][v], v == cols - 1 ? last : VW);
}

static int refine_rows(const float *x, const weights *w, float *out, long n, long m, long row_begin, long row_end) {
    long stride = (m + VW - 1) / VW * VW + 2 * PAD, plane = n * m;
    float *ring = malloc(KSIZE * EXPANDED * stride * sizeof(float)); /* expanded rows i - PAD ... i + PAD */
    long held[KSIZE];                                                /* which row each ring slot holds */
    if (ring == NULL) return 1;
    for (long b = row_begin / n; b * n < row_end; b++) {
        long i0 = row_begin > b * n ? row_begin - b * n : 0, i1 = row_end < (b + 1) * n ? row_end - b * n : n;
        const float *xb = x + b * HEADS * plane;
        for (int s = 0; s < KSIZE; s++) held[s] = -n - KSIZE; /* nothing */
        for (long i = i0; i < i1; i++) {
            const float *rows[KSIZE];
            for (int di = 0; di < KSIZE; di++) {
                long row = i + di - PAD, slot = ((row % KSIZE) + KSIZE) % KSIZE;
                float *dst = ring + slot * EXPANDED * stride;
                if (held[slot] != row) expand_row(xb, n, m, row, stride, w, dst);
                held[slot] = row;
                rows[di] = dst;
            }
            float *outb = out + b * HEADS * plane;
            long j0 = 0;
            for (; j0 + COLS * VW <= m; j0 += COLS * VW)
                output_block(xb, plane, m, i, j0, COLS, VW, rows, stride, w, outb);
            for (; j0 < m; j0 += VW)
                output_block(xb, plane, m, i, j0, 1, m - j0 < VW ? m - j0 : VW, rows, stride, w, outb);
        }
    }
    free(ring);
    return 0;
}
/* y for x of shape (batch, HEADS, n, m); scale may be NULL (no shortcut). Returns 0, or 1 when a thread could not
 * allocate its ring of expanded rows. */
int folded_refiner(const float *x, const float *expand_w, const float *expand_b, const float *dw_w, const float *dw_b,
                   const float *reduce_w, const float *reduce_b, const float *scale, float *out, long batch, long n,
                   long m) {
    weights w = {expand_w, expand_b, dw_w, dw_b, reduce_w, reduce_b, scale};
    long rows = batch * n;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        failed |= refine_rows(x, &w, out, n, m, rows * t / nt, rows * (t + 1) / nt);
    }
    return failed;
}
