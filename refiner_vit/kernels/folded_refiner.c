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
#include <omp.h>
#include <stdlib.h>

#include "vec.h"

#if !defined(HEADS) || !defined(EXPANDED) || !defined(KSIZE)
#error "compile with -DHEADS=<heads> -DEXPANDED=<expanded maps> -DKSIZE=<odd kernel size>"
#endif
#define PAD (KSIZE / 2)
/* Expanded maps computed together (independent FMA chains): the largest divisor of EXPANDED up to 8. */
#define EGROUP (EXPANDED % 8 == 0 ? 8 : EXPANDED % 6 == 0 ? 6 : EXPANDED % 4 == 0 ? 4 : EXPANDED % 3 == 0 ? 3 : EXPANDED % 2 == 0 ? 2 : 1)

typedef struct {
    const float *expand_w, *expand_b, *dw_w, *dw_b, *reduce_w, *reduce_b, *scale;
} weights;

typedef int mask __attribute__((vector_size(VW * sizeof(int))));

/* min(max(v, 0), 6) lane-wise, NaN kept as torch's clamp keeps it; with compare masks, as C's vector extensions
 * have no lane-wise select. */
static inline vec relu6(vec v) {
    vec six = splat(6.f);
    v = (vec)((mask)v & ((v > 0.f) | (v != v)));
    mask high = v > six;
    return (vec)(((mask)six & high) | ((mask)v & ~high));
}

/* v[g] = values[g] in every lane, for the EGROUP maps of a group. */
static inline void set_group(vec *v, const float *values) {
#pragma GCC unroll 16
    for (int g = 0; g < EGROUP; g++) v[g] = splat(values[g]);
}

/* Expanded row `row` of one batch element xb (HEADS maps of n x m) into dst: EXPANDED rows of stride floats, each
 * PAD zeros, m values, zeros (the depthwise convolution's padding); all zeros outside the map. */
static void expand_row(const float *xb, long n, long m, long row, long stride, const weights *w, float *dst) {
    memset(dst, 0, EXPANDED * stride * sizeof(float));
    if (row < 0 || row >= n) return;
    for (long j0 = 0; j0 < m; j0 += VW) {
        long count = m - j0 < VW ? m - j0 : VW;
        vec xv[HEADS];
#pragma GCC unroll 64
        for (int c = 0; c < HEADS; c++) xv[c] = load_first(xb + (c * n + row) * m + j0, count);
        for (int e0 = 0; e0 < EXPANDED; e0 += EGROUP) {
            vec acc[EGROUP];
            set_group(acc, w->expand_b + e0);
#pragma GCC unroll 64
            for (int c = 0; c < HEADS; c++)
#pragma GCC unroll 16
                for (int g = 0; g < EGROUP; g++) acc[g] += w->expand_w[c * EXPANDED + e0 + g] * xv[c];
#pragma GCC unroll 16
            for (int g = 0; g < EGROUP; g++) store_first(dst + (e0 + g) * stride + PAD + j0, relu6(acc[g]), count);
        }
    }
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
            for (long j0 = 0; j0 < m; j0 += VW) {
                long count = m - j0 < VW ? m - j0 : VW;
                vec acc[HEADS];
#pragma GCC unroll 64
                for (int o = 0; o < HEADS; o++) {
                    vec shortcut = load_first(xb + (o * n + i) * m + j0, count);
                    acc[o] = w->reduce_b[o] + (w->scale ? w->scale[o] * shortcut : (vec){0});
                }
                for (int e0 = 0; e0 < EXPANDED; e0 += EGROUP) {
                    vec d[EGROUP];
                    set_group(d, w->dw_b + e0);
#pragma GCC unroll 16
                    for (int di = 0; di < KSIZE; di++)
#pragma GCC unroll 16
                        for (int dj = 0; dj < KSIZE; dj++)
#pragma GCC unroll 16
                            for (int g = 0; g < EGROUP; g++)
                                d[g] += w->dw_w[(di * KSIZE + dj) * EXPANDED + e0 + g] *
                                        load(rows[di] + (e0 + g) * stride + j0 + dj);
#pragma GCC unroll 16
                    for (int g = 0; g < EGROUP; g++) {
                        vec dv = relu6(d[g]);
#pragma GCC unroll 64
                        for (int o = 0; o < HEADS; o++) acc[o] += w->reduce_w[(e0 + g) * HEADS + o] * dv;
                    }
                }
#pragma GCC unroll 64
                for (int o = 0; o < HEADS; o++) store_first(out + b * HEADS * plane + (o * n + i) * m + j0, acc[o], count);
            }
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
