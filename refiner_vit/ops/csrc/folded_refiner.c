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
#include "expand_rows.h"

typedef struct {
    const float *expand_w, *expand_b, *dw_w, *dw_b, *reduce_w, *reduce_b, *scale;
} weights;

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
    long stride = expanded_stride(m), plane = n * m;
    float *memory = aligned_alloc(64, aligned_size(padded_rows_floats(KSIZE * EXPANDED, stride) * sizeof(float)));
    if (memory == NULL) return 1;
    ring expanded = ring_init(memory, KSIZE, stride); /* rows i - PAD ... i + PAD */
    for (long b = row_begin / n; b * n < row_end; b++) {
        long i0 = row_begin > b * n ? row_begin - b * n : 0, i1 = row_end < (b + 1) * n ? row_end - b * n : n;
        const float *xb = x + b * HEADS * plane;
        ring_reset(&expanded);
        for (long i = i0; i < i1; i++) {
            const float *rows[KSIZE];
            for (int di = 0; di < KSIZE; di++)
                rows[di] = ring_row(&expanded, i + di - PAD, xb, n, m, stride, w->expand_w, w->expand_b);
            float *outb = out + b * HEADS * plane;
            long j0 = 0;
            for (; j0 + COLS * VW <= m; j0 += COLS * VW)
                output_block(xb, plane, m, i, j0, COLS, VW, rows, stride, w, outb);
            for (; j0 < m; j0 += VW)
                output_block(xb, plane, m, i, j0, 1, m - j0 < VW ? m - j0 : VW, rows, stride, w, outb);
        }
    }
    free(memory);
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
