/* BatchNorm (batch statistics) followed by ReLU, in training, on the CPU: the conv stem's three normalisations
 * (refiner_vit.layers.conv_stem), over channels-last maps (fp32, rows of CHANNELS contiguous floats):
 *
 *   forward:   y = max(a x + b, 0)                   a = weight / std, b = bias - mean a, from the batch's
 *                                                    per-channel sums of x - shift and their squares
 *   backward:  gy = g [y > 0]
 *              gx = k gy + s x + t                   per channel, from the batch's sums of gy and gy (x - shift)
 *
 * torch runs BatchNorm and ReLU as separate operators, and each of its passes over these large maps (64 channels of
 * 112 x 112 at 224 pixels) runs at about 40 % of a copy's bandwidth: forward a statistics pass, a normalising pass
 * and the ReLU, backward the ReLU's mask, a sums pass and the input gradient. Here each of the four passes reads
 * what it must once: statistics (x), output (x -> y), backward sums (g, y, x), input gradient (g, y, x -> gx).
 *
 * Sums are kept per thread in vector accumulators, added into doubles every FLUSH_ROWS rows, and the threads'
 * doubles added in thread order (deterministic for a given thread count). */
#include <stdlib.h>

#include "vec.h"

#ifndef CHANNELS
#error "compile with -DCHANNELS=<channels>"
#endif
#define NVEC ((CHANNELS + VW - 1) / VW)
#define LAST (CHANNELS - (NVEC - 1) * VW) /* floats in a row's last vector */
#define FLUSH_ROWS 64

/* A row's vector v: whole, or the first LAST floats and zeros. */
static inline vec row_load(const float *row, int v) {
    return v == NVEC - 1 ? load_first(row + v * VW, LAST) : load(row + v * VW);
}

static inline void row_store(float *row, int v, vec value) {
    if (v == NVEC - 1)
        store_first(row + v * VW, value, LAST);
    else
        memcpy(row + v * VW, &value, sizeof value);
}

/* max(v, 0) lane-wise, NaN kept (as torch's relu keeps it). */
static inline vec relu(vec v) {
    return (vec)((ivec)v & ((v > 0.f) | (v != v)));
}

/* g where y > 0, else 0 (as torch's threshold_backward: NaN in y gives 0). */
static inline vec relu_grad(vec g, vec y) {
    return (vec)((ivec)g & (y > 0.f));
}

/* Per-channel constants as vectors. */
static void load_channels(const float *values, vec *out) {
    for (int v = 0; v < NVEC; v++) out[v] = row_load(values, v);
}

typedef void (*sums_rows)(const float *const *in, const vec *shift, long begin, long end, vec *acc);

/* sum_r (x - shift) and sum_r (x - shift)^2 over rows [begin, end). */
static void stats_rows(const float *const *in, const vec *shift, long begin, long end, vec *acc) {
    const float *x = in[0];
    for (long r = begin; r < end; r++)
#pragma GCC unroll 16
        for (int v = 0; v < NVEC; v++) {
            vec d = row_load(x + r * CHANNELS, v) - shift[v];
            acc[v] += d;
            acc[NVEC + v] += d * d;
        }
}

/* sum_r gy and sum_r gy (x - shift) over rows [begin, end), gy = g [y > 0]. */
static void backward_sums_rows(const float *const *in, const vec *shift, long begin, long end, vec *acc) {
    const float *g = in[0], *y = in[1], *x = in[2];
    for (long r = begin; r < end; r++)
#pragma GCC unroll 16
        for (int v = 0; v < NVEC; v++) {
            long at = r * CHANNELS;
            vec gy = relu_grad(row_load(g + at, v), row_load(y + at, v));
            acc[v] += gy;
            acc[NVEC + v] += gy * (row_load(x + at, v) - shift[v]);
        }
}

/* The sums of `pass` over all rows on torch's threads into out (2 CHANNELS doubles). Returns 0, or 1 when a thread
 * could not allocate. */
static int run_sums(sums_rows pass, const float *const *in, const float *shift_values, double *out, long rows) {
    int threads = omp_get_max_threads(), failed = 0;
    double *totals = calloc((size_t)threads * 2 * CHANNELS, sizeof(double));
    if (totals == NULL) return 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        long begin = rows * t / nt, end = rows * (t + 1) / nt;
        double *total = totals + t * 2 * CHANNELS;
        vec shift[NVEC], acc[2 * NVEC];
        load_channels(shift_values, shift);
        for (long r0 = begin; r0 < end; r0 += FLUSH_ROWS) {
            for (int k = 0; k < 2 * NVEC; k++) acc[k] = (vec){0};
            pass(in, shift, r0, r0 + FLUSH_ROWS < end ? r0 + FLUSH_ROWS : end, acc);
            for (int k = 0; k < 2; k++)
                for (int c = 0; c < CHANNELS; c++) total[k * CHANNELS + c] += acc[k * NVEC + c / VW][c % VW];
        }
    }
    for (long k = 0; k < 2 * CHANNELS; k++) {
        double sum = 0.;
        for (int t = 0; t < threads; t++) sum += totals[t * 2 * CHANNELS + k];
        out[k] = sum;
    }
    free(totals);
    return failed;
}

/* out[c] = sum of x - shift[c], out[CHANNELS + c] = sum of (x - shift[c])^2, over the rows. */
int batch_norm_stats(const float *x, const float *shift, double *out, long rows) {
    const float *in[] = {x};
    return run_sums(stats_rows, in, shift, out, rows);
}

/* out[c] = sum of gy, out[CHANNELS + c] = sum of gy (x - shift[c]), gy = g [y > 0], over the rows. */
int batch_norm_relu_backward_sums(const float *g, const float *y, const float *x, const float *shift, double *out,
                                  long rows) {
    const float *in[] = {g, y, x};
    return run_sums(backward_sums_rows, in, shift, out, rows);
}

/* y = max(a x + b, 0). */
void batch_norm_relu_forward(const float *x, const float *a, const float *b, float *y, long rows) {
#pragma omp parallel
    {
        vec av[NVEC], bv[NVEC];
        load_channels(a, av);
        load_channels(b, bv);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++)
#pragma GCC unroll 16
            for (int v = 0; v < NVEC; v++)
                row_store(y + r * CHANNELS, v, relu(av[v] * row_load(x + r * CHANNELS, v) + bv[v]));
    }
}

/* gx = k g [y > 0] + s x + t. */
void batch_norm_relu_backward_input(const float *g, const float *y, const float *x, const float *k, const float *s,
                                    const float *t, float *gx, long rows) {
#pragma omp parallel
    {
        vec kv[NVEC], sv[NVEC], tv[NVEC];
        load_channels(k, kv);
        load_channels(s, sv);
        load_channels(t, tv);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++)
#pragma GCC unroll 16
            for (int v = 0; v < NVEC; v++) {
                long at = r * CHANNELS;
                vec gy = relu_grad(row_load(g + at, v), row_load(y + at, v));
                row_store(gx + at, v, kv[v] * gy + sv[v] * row_load(x + at, v) + tv[v]);
            }
    }
}
