/* The released refiner's training passes on the CPU (refiner_vit/layers/released.py), fp32, with the BatchNorms'
 * batch statistics folded into per-channel factors. Over a stack of HEADS attention maps x (NCHW, contiguous):
 *
 *   forward:  f = relu6(W1 x + b1)          expansion and first BatchNorm (W1 = scale1 W, b1 = shift1)
 *             z = depthwise(f)               KSIZE x KSIZE, zero "same" padding, per expanded map
 *             s = relu6(a2 z + c2)           second BatchNorm (a2 = scale2, c2 = shift2)
 *             r = R s                        reduction
 *   backward, from u = dL/dr:
 *             g2 = (R^T u) [0 < a2 z + c2 < 6]
 *             gz = a2 g2 + slope z + offset  the second BatchNorm's backward; slope and offset come from sum g2 and
 *                                            sum g2 z, which an earlier pass takes
 *             g1 = depthwise^T(gz) [0 < f < 6]
 *             gx = W1^T g1                   the first BatchNorm's remaining terms are H x H, the caller adds them
 *
 * autograd (or torch's operators) would write several stacks of the EXPANDED-channel maps and read them back. Here
 * every pass recomputes the expanded rows an output row needs into a small ring that stays in cache (expand_rows.h),
 * so memory sees reads of x and u and, at most, a write of gx. The batch-wide sums a pass gives are what the next
 * one needs:
 *
 *   input_moments:   sum x', sum x' x'^T, x' = x - shift (the first BatchNorm's statistics follow: the expansion is
 *                                                        linear; the shift keeps the float sums small)
 *   conv_stats:      sum z, sum z^2                     (the second BatchNorm's statistics; the forward's r is the
 *                                                        folded inference kernel's, with these factors)
 *   backward_stats:  sum g2, sum g2 z, sum u s^T        (R's gradient)
 *   backward_input:  sum gz f (shifted: K's gradient), sum g1, sum g1 x^T, and gx
 *
 * Sums are kept per thread in vector accumulators, added into doubles every FLUSH_ROWS rows (few terms per float
 * sum), and the threads' doubles are added in thread order after the parallel region (deterministic for a given
 * thread count). Threads split the (batch, query row) rows; an output row's halo rows are recomputed, never shared.
 *
 * Weights arrive in the order the loops read them: expand_w[c][e], dw_w[di][dj][e], reduce_w[e][o]. */
#include "expand_rows.h"

#define TAPS (KSIZE * KSIZE)
#define FLUSH_ROWS 16
/* Register tile of the batched outer products sum_j a[i][j] b[k][j]: TILE_A x TILE_B accumulators and one vector of
 * each operand row in registers. */
#define TILE_A 4
#define TILE_B (NREGS >= 32 ? 4 : 2)

typedef struct {
    const float *x, *u;               /* input maps, the reduced maps' gradient: (batch, HEADS, n, m) */
    const float *expand_w, *expand_b; /* W1, b1 */
    const float *dw_w;                /* K */
    const float *scale2, *shift2;     /* a2, c2 */
    const float *reduce_w;            /* R */
    const float *slope, *offset;      /* gz = a2 g2 + slope z + offset */
    float *gx;                        /* W1^T g1, (batch, HEADS, n, m); NULL: not wanted */
    long n, m;
    float shift;                      /* input_moments: subtracted from x */
} problem;

/* Lane sums of count vector accumulators added to total, the accumulators zeroed. */
static void flush(vec *acc, double *total, long count) {
    for (long k = 0; k < count; k++) {
        total[k] += sum_lanes(acc[k]);
        acc[k] = (vec){0};
    }
}

/* acc[i][k] += sum over nvec vectors of a[i] * b[k], for the TA x TB tile at (i0, k0); rows stride floats apart. */
static inline __attribute__((always_inline)) void outer_tile(vec *acc, long nb, const float *a, const float *b,
                                                             long stride, long nvec, int i0, int k0, int ta,
                                                             int tb) {
    vec t[TILE_A][TILE_B];
#pragma GCC unroll 4
    for (int i = 0; i < ta; i++)
#pragma GCC unroll 4
        for (int k = 0; k < tb; k++) t[i][k] = acc[(long)(i0 + i) * nb + k0 + k];
    for (long v = 0; v < nvec; v++) {
        vec av[TILE_A], bv[TILE_B];
#pragma GCC unroll 4
        for (int i = 0; i < ta; i++) av[i] = load(a + (i0 + i) * stride + v * VW);
#pragma GCC unroll 4
        for (int k = 0; k < tb; k++) bv[k] = load(b + (k0 + k) * stride + v * VW);
#pragma GCC unroll 4
        for (int i = 0; i < ta; i++)
#pragma GCC unroll 4
            for (int k = 0; k < tb; k++) t[i][k] += av[i] * bv[k];
    }
#pragma GCC unroll 4
    for (int i = 0; i < ta; i++)
#pragma GCC unroll 4
        for (int k = 0; k < tb; k++) acc[(long)(i0 + i) * nb + k0 + k] = t[i][k];
}

/* acc (na x nb vectors) += the lane-wise products of a's na rows and b's nb rows, summed over nvec vectors: one
 * row's share of a batch-wide a b^T, reduced across lanes only when flushed. */
static void outer_accumulate(vec *acc, const float *a, int na, const float *b, int nb, long stride, long nvec) {
    int i = 0;
    for (; i + TILE_A <= na; i += TILE_A) {
        int k = 0;
        for (; k + TILE_B <= nb; k += TILE_B) outer_tile(acc, nb, a, b, stride, nvec, i, k, TILE_A, TILE_B);
        for (; k < nb; k++) outer_tile(acc, nb, a, b, stride, nvec, i, k, TILE_A, 1);
    }
    for (; i < na; i++)
        for (int k = 0; k < nb; k++) outer_tile(acc, nb, a, b, stride, nvec, i, k, 1, 1);
}

/* Register block of row_product: MM_OUT x MM_VECS accumulators, MM_VECS input vectors and a broadcast weight fit in
 * the registers, so each broadcast weight serves MM_VECS vectors and each loaded vector MM_OUT weights (with one
 * accumulator per output vector, every FMA would need a load of its own: the passes were load-bound, with AVX2
 * the more). */
#define MM_OUT (NREGS >= 32 ? 6 : 3)
#define MM_VECS (NREGS >= 32 ? 4 : 3)

static inline __attribute__((always_inline)) void row_product_block(const float *w, int nin, const float *in,
                                                                    long stride, float *out, int o0, int ob,
                                                                    long v0, int vb) {
    vec acc[MM_OUT][MM_VECS];
#pragma GCC unroll 8
    for (int o = 0; o < ob; o++)
#pragma GCC unroll 8
        for (int v = 0; v < vb; v++) acc[o][v] = (vec){0};
#pragma GCC unroll 64
    for (int i = 0; i < nin; i++) {
        vec iv[MM_VECS];
#pragma GCC unroll 8
        for (int v = 0; v < vb; v++) iv[v] = load(in + i * stride + (v0 + v) * VW);
#pragma GCC unroll 8
        for (int o = 0; o < ob; o++) {
            vec weight = splat(w[(long)(o0 + o) * nin + i]);
#pragma GCC unroll 8
            for (int v = 0; v < vb; v++) acc[o][v] += weight * iv[v];
        }
    }
#pragma GCC unroll 8
    for (int o = 0; o < ob; o++)
#pragma GCC unroll 8
        for (int v = 0; v < vb; v++) memcpy(out + (o0 + o) * stride + (v0 + v) * VW, &acc[o][v], sizeof(vec));
}

/* out[o] = sum_i w[o][i] in[i] for nout rows of one query row's nvec column vectors (rows stride floats apart, in
 * and out): R^T u and W1^T g1. Inlined with constant nout and nin. */
static inline __attribute__((always_inline)) void row_product(const float *w, int nout, int nin, const float *in,
                                                              long stride, float *out, long nvec) {
    int o0 = 0;
    for (; o0 + MM_OUT <= nout; o0 += MM_OUT) {
        long v0 = 0;
        for (; v0 + MM_VECS <= nvec; v0 += MM_VECS) row_product_block(w, nin, in, stride, out, o0, MM_OUT, v0, MM_VECS);
        for (; v0 < nvec; v0++) row_product_block(w, nin, in, stride, out, o0, MM_OUT, v0, 1);
    }
    for (; o0 < nout; o0++)
        for (long v0 = 0; v0 < nvec; v0++) row_product_block(w, nin, in, stride, out, o0, 1, v0, 1);
}

/* Expanded map e's depthwise kernel, each tap broadcast: loaded once per map and row, not once per vector. */
static inline __attribute__((always_inline)) void load_taps(const float *dw_w, int e, vec *taps) {
#pragma GCC unroll 64
    for (int d = 0; d < TAPS; d++) taps[d] = splat(dw_w[d * EXPANDED + e]);
}

/* z at offset `at` (a map's rows, then a padded column: output column at - PAD ...) from the KSIZE rows around it. */
static inline __attribute__((always_inline)) vec depthwise(const vec *taps, const float *const *rows, long at) {
    vec z = {0};
#pragma GCC unroll 16
    for (int di = 0; di < KSIZE; di++)
#pragma GCC unroll 16
        for (int dj = 0; dj < KSIZE; dj++) z += taps[di * KSIZE + dj] * load(rows[di] + at + dj);
    return z;
}

/* Row `row` of the HEADS maps of one batch element (n x m each) into HEADS buffer rows of stride floats (whole
 * vectors), zeros after the m values; all zeros outside the map. Vector moves: a memset or memcpy of variable
 * length is a library call, per head and row. */
static void copy_row(const float *maps, long n, long m, long row, long stride, float *dst) {
    if (row < 0 || row >= n) {
        memset(dst, 0, HEADS * stride * sizeof(float));
        return;
    }
    for (int c = 0; c < HEADS; c++) {
        const float *src = maps + (c * n + row) * m;
        float *d = dst + c * stride;
        long j = 0;
        for (; j + VW <= m; j += VW) memcpy(d + j, src + j, sizeof(vec));
        if (j < m) {
            vec tail = load_first(src + j, m - j);
            memcpy(d + j, &tail, sizeof tail);
            j += VW;
        }
        for (; j < stride; j += VW) memset(d + j, 0, sizeof(vec));
    }
}

/* The first m floats of HEADS buffer rows of stride floats to dst, dst + plane, ...: a row of HEADS maps, the
 * reverse of copy_row (vector moves: a memcpy of variable length is a library call). */
static void store_row(const float *src, long stride, long m, long plane, float *dst) {
    for (int c = 0; c < HEADS; c++) {
        float *d = dst + c * plane;
        long j = 0;
        for (; j + VW <= m; j += VW) memcpy(d + j, src + c * stride + j, sizeof(vec));
        if (j < m) store_first(d + j, load(src + c * stride + j), m - j);
    }
}

/* The parts of a pass's thread: its vector accumulators, their double totals, and scratch rows. */
typedef struct {
    vec *acc;
    double *total;
    long count; /* accumulators */
    float *scratch;
} thread_state;

static int thread_state_init(thread_state *t, long count, double *total, size_t scratch_floats) {
    t->count = count;
    t->total = total;
    t->acc = aligned_alloc(64, aligned_size(count * sizeof(vec)));
    t->scratch = aligned_alloc(64, aligned_size(scratch_floats * sizeof(float)));
    if (t->acc == NULL || t->scratch == NULL) {
        free(t->acc);
        free(t->scratch);
        return 1;
    }
    memset(t->acc, 0, count * sizeof(vec));
    return 0;
}

static void thread_state_free(thread_state *t) {
    flush(t->acc, t->total, t->count);
    free(t->acc);
    free(t->scratch);
}

/* The rows [begin, end) of batch element b that a thread given global rows [row_begin, row_end) owns. */
#define FOR_BATCH(b, i0, i1, n, row_begin, row_end)                                                                \
    for (long b = (row_begin) / (n), i0, i1; b * (n) < (row_end) &&                                                \
         (i0 = (row_begin) > b * (n) ? (row_begin) - b * (n) : 0,                                                  \
         i1 = (row_end) < (b + 1) * (n) ? (row_end) - b * (n) : (n), 1); b++)

/* ---- input_moments: accumulators sum x' [HEADS], sum x' x'^T [HEADS][HEADS] ------------------------------------- */

static int input_moments_rows(const problem *p, long row_begin, long row_end, double *total) {
    long n = p->n, m = p->m, plane = n * m, nvec = (m + VW - 1) / VW, ustride = nvec * VW;
    float shift = p->shift;
    thread_state t;
    if (thread_state_init(&t, HEADS + HEADS * HEADS, total, HEADS * ustride)) return 1;
    vec *sum = t.acc, *moments = t.acc + HEADS;
    float *buf = t.scratch;
    long rows_done = 0;
    FOR_BATCH(b, i0, i1, n, row_begin, row_end) {
        const float *xb = p->x + b * HEADS * plane;
        for (long i = i0; i < i1; i++) {
            copy_row(xb, n, m, i, ustride, buf);
            for (int c = 0; c < HEADS; c++) {
                float *row = buf + c * ustride;
                for (long j = 0; j < m; j++) row[j] -= shift;
                for (long v = 0; v < nvec; v++) sum[c] += load(row + v * VW);
            }
            outer_accumulate(moments, buf, HEADS, buf, HEADS, ustride, nvec);
            if (++rows_done % FLUSH_ROWS == 0) flush(t.acc, t.total, t.count);
        }
    }
    thread_state_free(&t);
    return 0;
}

/* ---- conv_stats: accumulators sum z [EXPANDED], sum z^2 [EXPANDED] ---------------------------------------------- */

static int conv_stats_rows(const problem *p, long row_begin, long row_end, double *total) {
    long n = p->n, m = p->m, stride = expanded_stride(m), plane = n * m, nvec = (m + VW - 1) / VW;
    thread_state t;
    if (thread_state_init(&t, 2 * EXPANDED, total, padded_rows_floats(KSIZE * EXPANDED, stride))) return 1;
    ring expanded = ring_init(t.scratch, KSIZE, stride);
    vec *sum = t.acc, *squares = t.acc + EXPANDED;
    long last = m - (nvec - 1) * VW; /* values in the row's last vector */
    long rows_done = 0;
    FOR_BATCH(b, i0, i1, n, row_begin, row_end) {
        const float *xb = p->x + b * HEADS * plane;
        ring_reset(&expanded);
        for (long i = i0; i < i1; i++) {
            const float *rows[KSIZE];
            for (int di = 0; di < KSIZE; di++)
                rows[di] = ring_row(&expanded, i + di - PAD, xb, n, m, stride, p->expand_w, p->expand_b);
            for (int e = 0; e < EXPANDED; e++) {
                vec taps[TAPS], s = {0}, q = {0};
                load_taps(p->dw_w, e, taps);
                for (long v = 0; v < nvec; v++) {
                    vec z = depthwise(taps, rows, e * stride + v * VW);
                    if (v == nvec - 1) z = keep_first(z, last);
                    s += z;
                    q += z * z;
                }
                sum[e] += s;
                squares[e] += q;
            }
            if (++rows_done % FLUSH_ROWS == 0) flush(t.acc, t.total, t.count);
        }
    }
    thread_state_free(&t);
    return 0;
}

/* ---- backward_stats: sum g2 [EXPANDED], sum g2 z [EXPANDED], sum u s^T [HEADS][EXPANDED] ------------------------ */

/* g2 = gs [0 < y < 6] with y = a2 z + c2, the second BatchNorm's output before its ReLU6: the gradient at that
 * BatchNorm's output, from gs = (R^T u)'s vector. */
static inline vec second_grad(vec gs, vec y) {
    return (vec)((ivec)gs & ((y > 0.f) & (y < 6.f)));
}

/* Expanded map e over a row's nvec column vectors, from the depthwise input rows and gs = (R^T u)'s row e: adds
 * sum g2 and sum g2 z to sum2 and dotz, and stores s = relu6(y) in srow. */
static void stats_row(const problem *p, const float *const *rows, long stride, int e, const float *gs, long nvec,
                      vec *sum2, vec *dotz, float *srow) {
    vec taps[TAPS], a2 = splat(p->scale2[e]), c2 = splat(p->shift2[e]), s2 = {0}, dz = {0};
    load_taps(p->dw_w, e, taps);
    for (long v = 0; v < nvec; v++) {
        vec z = depthwise(taps, rows, e * stride + v * VW), y = a2 * z + c2;
        vec g2 = second_grad(load(gs + v * VW), y);
        s2 += g2;
        dz += g2 * z;
        vec s = relu6(y);
        memcpy(srow + v * VW, &s, sizeof s);
    }
    *sum2 += s2;
    *dotz += dz;
}

static int backward_stats_rows(const problem *p, long row_begin, long row_end, double *total) {
    long n = p->n, m = p->m, stride = expanded_stride(m), plane = n * m, nvec = (m + VW - 1) / VW;
    long ustride = nvec * VW;
    thread_state t;
    size_t ring_floats = padded_rows_floats(KSIZE * EXPANDED, stride);
    if (thread_state_init(&t, 2 * EXPANDED + HEADS * EXPANDED, total,
                          ring_floats + (HEADS + 2 * EXPANDED) * ustride))
        return 1;
    ring expanded = ring_init(t.scratch, KSIZE, stride);
    float *ubuf = t.scratch + ring_floats, *srow = ubuf + HEADS * ustride, *gs = srow + EXPANDED * ustride;
    vec *sum2 = t.acc, *dotz = t.acc + EXPANDED, *grad_reduce = t.acc + 2 * EXPANDED;
    long rows_done = 0;
    FOR_BATCH(b, i0, i1, n, row_begin, row_end) {
        const float *xb = p->x + b * HEADS * plane, *ub = p->u + b * HEADS * plane;
        ring_reset(&expanded);
        for (long i = i0; i < i1; i++) {
            const float *rows[KSIZE];
            for (int di = 0; di < KSIZE; di++)
                rows[di] = ring_row(&expanded, i + di - PAD, xb, n, m, stride, p->expand_w, p->expand_b);
            copy_row(ub, n, m, i, ustride, ubuf); /* zeros past m: the columns there add nothing */
            row_product(p->reduce_w, EXPANDED, HEADS, ubuf, ustride, gs, nvec);
            for (int e = 0; e < EXPANDED; e++)
                stats_row(p, rows, stride, e, gs + e * ustride, nvec, sum2 + e, dotz + e, srow + e * ustride);
            outer_accumulate(grad_reduce, ubuf, HEADS, srow, EXPANDED, ustride, nvec);
            if (++rows_done % FLUSH_ROWS == 0) flush(t.acc, t.total, t.count);
        }
    }
    thread_state_free(&t);
    return 0;
}

/* ---- backward_input: sum gz f shifted [EXPANDED][TAPS], sum g1 [EXPANDED], sum g1 x^T [EXPANDED][HEADS]; gx ---- */

/* gz's row g (zeros outside the map and past m, PAD zeros each side, like an expanded row) from the expanded rows
 * g - PAD ... g + PAD and u's row g (ubuf); gs: scratch for R^T u's row. */
static void gz_row(const problem *p, const float *const *rows, long stride, const float *ubuf, long ustride,
                   long nvec, float *gs, float *dst) {
    long last = p->m - (nvec - 1) * VW; /* values in the row's last vector */
    row_product(p->reduce_w, EXPANDED, HEADS, ubuf, ustride, gs, nvec);
    for (int e = 0; e < EXPANDED; e++) {
        vec taps[TAPS], a2 = splat(p->scale2[e]), c2 = splat(p->shift2[e]);
        vec slope = splat(p->slope[e]), offset = splat(p->offset[e]);
        load_taps(p->dw_w, e, taps);
        for (long v = 0; v < nvec; v++) {
            vec z = depthwise(taps, rows, e * stride + v * VW);
            vec g2 = second_grad(load(gs + e * ustride + v * VW), a2 * z + c2);
            vec gz = a2 * g2 + slope * z + offset;
            if (v == nvec - 1) gz = keep_first(gz, last);
            memcpy(dst + e * stride + PAD + v * VW, &gz, sizeof gz);
        }
    }
}

/* K's gradient from gz's row g and the expanded rows g - PAD ... g + PAD: acc[e][di][dj] += sum_j gz[e][j]
 * f(g + di - PAD)[e][j + dj - PAD]. */
static void kernel_grad_row(const float *gz, const float *const *rows, long stride, long nvec, vec *acc) {
    for (int e = 0; e < EXPANDED; e++) {
        vec k[TAPS];
#pragma GCC unroll 64
        for (int d = 0; d < TAPS; d++) k[d] = acc[e * TAPS + d];
        for (long v = 0; v < nvec; v++) {
            vec g = load(gz + e * stride + PAD + v * VW);
#pragma GCC unroll 16
            for (int di = 0; di < KSIZE; di++)
#pragma GCC unroll 16
                for (int dj = 0; dj < KSIZE; dj++)
                    k[di * KSIZE + dj] += g * load(rows[di] + e * stride + v * VW + dj);
        }
#pragma GCC unroll 64
        for (int d = 0; d < TAPS; d++) acc[e * TAPS + d] = k[d];
    }
}

/* g1's row i (into g1row) from gz's rows i - PAD ... i + PAD and the expanded row i; its sums, and gx's row i
 * (gxbuf: scratch for it). */
static void input_row(const problem *p, const float *const *gz, const float *frow, long stride, long ustride,
                      long nvec, vec *sum1, float *g1row, float *gxbuf, float *gxrow, long plane) {
    for (int e = 0; e < EXPANDED; e++) {
        vec taps[TAPS], s1 = {0};
#pragma GCC unroll 64
        for (int d = 0; d < TAPS; d++) taps[d] = splat(p->dw_w[(TAPS - 1 - d) * EXPANDED + e]); /* transposed: flipped */
        for (long v = 0; v < nvec; v++) {
            vec gf = depthwise(taps, gz, e * stride + v * VW);
            vec f = load(frow + e * stride + PAD + v * VW);
            vec g1 = (vec)((ivec)gf & ((f > 0.f) & (f < 6.f))); /* zero past m, where f is zero */
            s1 += g1;
            memcpy(g1row + e * ustride + v * VW, &g1, sizeof g1);
        }
        sum1[e] += s1;
    }
    if (gxrow == NULL) return;
    row_product(p->expand_w, HEADS, EXPANDED, g1row, ustride, gxbuf, nvec);
    store_row(gxbuf, ustride, p->m, plane, gxrow);
}

static int backward_input_rows(const problem *p, long row_begin, long row_end, double *total) {
    long n = p->n, m = p->m, stride = expanded_stride(m), plane = n * m, nvec = (m + VW - 1) / VW;
    long ustride = nvec * VW, fslots = 2 * KSIZE - 1;
    thread_state t;
    size_t ring_floats = padded_rows_floats(fslots * EXPANDED, stride);
    size_t gz_floats = padded_rows_floats(KSIZE * EXPANDED, stride);
    size_t scratch = ring_floats + gz_floats + (2 * HEADS + 2 * EXPANDED) * ustride;
    if (thread_state_init(&t, EXPANDED * TAPS + EXPANDED + EXPANDED * HEADS, total, scratch)) return 1;
    ring expanded = ring_init(t.scratch, (int)fslots, stride); /* rows i - 2 PAD ... i + 2 PAD */
    float *gz_rows = zeroed_rows(t.scratch + ring_floats, KSIZE * EXPANDED, stride); /* as expanded rows */
    float *buf = t.scratch + ring_floats + gz_floats, *g1row = buf + HEADS * ustride;
    float *gs = g1row + EXPANDED * ustride, *gxbuf = gs + EXPANDED * ustride;
    long gz_held[KSIZE];
    vec *grad_kernel = t.acc, *sum1 = t.acc + EXPANDED * TAPS, *products = sum1 + EXPANDED;
    long rows_done = 0;
    FOR_BATCH(b, i0, i1, n, row_begin, row_end) {
        const float *xb = p->x + b * HEADS * plane, *ub = p->u + b * HEADS * plane;
        ring_reset(&expanded);
        for (int s = 0; s < KSIZE; s++) gz_held[s] = -(1L << 40);
        for (long i = i0; i < i1; i++) {
            const float *gz[KSIZE]; /* gz's rows i - PAD ... i + PAD */
            for (int di = 0; di < KSIZE; di++) {
                long g = i + di - PAD, slot = ((g % KSIZE) + KSIZE) % KSIZE;
                float *dst = gz_rows + slot * EXPANDED * stride;
                gz[di] = dst;
                if (gz_held[slot] == g) continue;
                gz_held[slot] = g;
                if (g < 0 || g >= n) {
                    memset(dst, 0, EXPANDED * stride * sizeof(float));
                    continue;
                }
                const float *rows[KSIZE];
                for (int dk = 0; dk < KSIZE; dk++)
                    rows[dk] = ring_row(&expanded, g + dk - PAD, xb, n, m, stride, p->expand_w, p->expand_b);
                copy_row(ub, n, m, g, ustride, buf);
                gz_row(p, rows, stride, buf, ustride, nvec, gs, dst);
                if (g >= i0 && g < i1) kernel_grad_row(dst, rows, stride, nvec, grad_kernel); /* this thread's rows */
            }
            const float *frow = ring_row(&expanded, i, xb, n, m, stride, p->expand_w, p->expand_b);
            float *gxrow = p->gx == NULL ? NULL : p->gx + b * HEADS * plane + i * m;
            input_row(p, gz, frow, stride, ustride, nvec, sum1, g1row, gxbuf, gxrow, plane);
            copy_row(xb, n, m, i, ustride, buf);
            outer_accumulate(products, g1row, EXPANDED, buf, HEADS, ustride, nvec);
            if (++rows_done % FLUSH_ROWS == 0) flush(t.acc, t.total, t.count);
        }
    }
    thread_state_free(&t);
    return 0;
}

/* ---- entry points ------------------------------------------------------------------------------------------------ */

typedef int (*rows_pass)(const problem *, long, long, double *);

/* Runs pass over all rows on torch's threads; out (count doubles) gets the sums. Returns 0, or 1 when a thread could
 * not allocate its buffers. */
static int run(rows_pass pass, const problem *p, long batch, double *out, long count) {
    long rows = batch * p->n;
    int threads = omp_get_max_threads(), failed = 0;
    double *totals = calloc((size_t)threads * count, sizeof(double));
    if (totals == NULL) return 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        failed |= pass(p, rows * t / nt, rows * (t + 1) / nt, totals + t * count);
    }
    for (long k = 0; k < count; k++) {
        double sum = 0.;
        for (int t = 0; t < threads; t++) sum += totals[t * count + k];
        out[k] = sum;
    }
    free(totals);
    return failed;
}

int input_moments(const float *x, float shift, double *out, long batch, long n, long m) {
    problem p = {.x = x, .n = n, .m = m, .shift = shift};
    return run(input_moments_rows, &p, batch, out, HEADS + HEADS * HEADS);
}

int conv_stats(const float *x, const float *expand_w, const float *expand_b, const float *dw_w, double *out,
               long batch, long n, long m) {
    problem p = {x, NULL, expand_w, expand_b, dw_w, NULL, NULL, NULL, NULL, NULL, NULL, n, m};
    return run(conv_stats_rows, &p, batch, out, 2 * EXPANDED);
}

int backward_stats(const float *x, const float *u, const float *expand_w, const float *expand_b, const float *dw_w,
                   const float *scale2, const float *shift2, const float *reduce_w, double *out, long batch, long n,
                   long m) {
    problem p = {x, u, expand_w, expand_b, dw_w, scale2, shift2, reduce_w, NULL, NULL, NULL, n, m};
    return run(backward_stats_rows, &p, batch, out, 2 * EXPANDED + HEADS * EXPANDED);
}

int backward_input(const float *x, const float *u, const float *expand_w, const float *expand_b, const float *dw_w,
                   const float *scale2, const float *shift2, const float *reduce_w, const float *slope,
                   const float *offset, float *gx, double *out, long batch, long n, long m) {
    problem p = {x, u, expand_w, expand_b, dw_w, scale2, shift2, reduce_w, slope, offset, gx, n, m};
    return run(backward_input_rows, &p, batch, out, EXPANDED * TAPS + EXPANDED + EXPANDED * HEADS);
}
