/* The refiner's composed convolution on the CPU: a k x k convolution H -> H over a stack of attention maps
 * (fp32, NCHW, contiguous, zero "same" padding), its input gradient and its weight gradient.
 *
 * oneDNN is tuned for many channels over small images; here there are H = 4..16 channels over N x N maps, and
 * its convolution (and even more its backward) runs far below the machine's FMA rate. For a block of output
 * columns these loops keep one vector accumulator per output head in registers and read the k x k taps from a
 * zero-padded copy of the input rows, which stays in L1/L2. HEADS and KSIZE are compile-time constants (one shared library per pair) so the loops over heads
 * and taps unroll. Threads split the (batch, query row) rows with OpenMP: the .so links the libgomp torch has
 * already loaded, so its threads are torch's and do not compete with them.
 *
 * Weights are passed tap-major, wt[c][di][dj][o] = weight[o][c][di][dj], so one input vector meets the
 * HEADS weights it is multiplied with in consecutive memory. */
#include <stdlib.h>

#include "vec.h"

#ifndef HEADS
#error "compile with -DHEADS=<number of heads>"
#endif
#ifndef KSIZE
#error "compile with -DKSIZE=<odd kernel size>"
#endif
#define PAD (KSIZE / 2)
/* Register blocks of the forward: OGROUP output heads x WIDE column vectors of accumulators, at most NREGS - 4 of
 * them (the rest hold an input vector and a broadcast weight), and up to 4 vectors wide for independent FMA chains. */
#define ACCUMULATORS (NREGS - 4)
#define OGROUP DIVISOR_AT_MOST(HEADS, ACCUMULATORS)
#define WIDE_MAX (ACCUMULATORS / OGROUP)
#define WIDE (WIDE_MAX > 4 ? 4 : WIDE_MAX)
#define TAPS (HEADS * KSIZE * KSIZE * HEADS)

/* Row stride of a padded map: PAD zeros, m values, zeros up to a whole number of vectors plus PAD, so that every
 * block of output columns, the last one included, reads its k x (block + 2 PAD) inputs without bounds checks. */
static long padded_stride(long m) { return (m + VW - 1) / VW * VW + 2 * PAD; }

/* Copies rows [lo, hi) of each map of one batch element x (HEADS maps of n x m) into pad, row lo first, each row
 * zero-padded as padded_stride describes; rows outside the map are all zeros. */
static void pad_rows(const float *x, long n, long m, long lo, long hi, float *pad) {
    long stride = padded_stride(m);
    for (int c = 0; c < HEADS; c++)
        for (long row = lo; row < hi; row++) {
            float *dst = pad + (c * (hi - lo) + row - lo) * stride;
            memset(dst, 0, stride * sizeof(float));
            if (row >= 0 && row < n) memcpy(dst + PAD, x + (c * n + row) * m, m * sizeof(float));
        }
}

/* nb vectors of output columns for output heads o0 ... o0 + OGROUP - 1: out[o][v * VW + t] = sum_{c, di, dj}
 * wt[c, di, dj, o] * src(c, di)[v * VW + t + dj], where src(c, di) = in + (c * in_rows + di) * stride; out rows are
 * plane floats apart, and only the first count columns are stored (fewer than nb * VW at the end of a row). */
static inline __attribute__((always_inline)) void conv_block(const float *in, long in_rows, long stride,
                                                           const float *wt, int o0, float *out, long plane, int nb,
                                                           long count) {
    vec acc[WIDE][OGROUP];
    memset(acc, 0, sizeof acc);
    for (int c = 0; c < HEADS; c++) {
        for (int di = 0; di < KSIZE; di++) {
            const float *s = in + (c * in_rows + di) * stride;
            const float *w = wt + (c * KSIZE + di) * KSIZE * HEADS + o0;
#pragma GCC unroll 16
            for (int dj = 0; dj < KSIZE; dj++) {
#pragma GCC unroll 8
                for (int v = 0; v < nb; v++) {
                    vec xv = load(s + v * VW + dj);
#pragma GCC unroll 64
                    for (int o = 0; o < OGROUP; o++) acc[v][o] += w[dj * HEADS + o] * xv;
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int v = 0; v < nb; v++) {
        long stored = count - v * VW < VW ? count - v * VW : VW;
#pragma GCC unroll 64
        for (int o = 0; o < OGROUP; o++) store_first(out + (o0 + o) * plane + v * VW, acc[v][o], stored);
    }
}

static int conv_rows(const float *x, const float *wt, float *out, long n, long m, long row_begin, long row_end) {
    long stride = padded_stride(m), plane = n * m;
    float *pad = malloc(HEADS * (n + 2 * PAD) * stride * sizeof(float));
    if (pad == NULL) return 1;
    for (long b = row_begin / n; b * n < row_end; b++) { /* the rows [i0, i1) of each batch element in range */
        long i0 = row_begin > b * n ? row_begin - b * n : 0, i1 = row_end < (b + 1) * n ? row_end - b * n : n;
        long in_rows = i1 - i0 + 2 * PAD;
        pad_rows(x + b * HEADS * plane, n, m, i0 - PAD, i1 + PAD, pad);
        for (long i = i0; i < i1; i++) {
            const float *in = pad + (i - i0) * stride;
            float *o = out + b * HEADS * plane + i * m;
            for (int o0 = 0; o0 < HEADS; o0 += OGROUP) {
                long j0 = 0;
                for (; j0 + WIDE * VW <= m; j0 += WIDE * VW)
                    conv_block(in + j0, in_rows, stride, wt, o0, o + j0, plane, WIDE, WIDE * VW);
                for (; j0 < m; j0 += VW) conv_block(in + j0, in_rows, stride, wt, o0, o + j0, plane, 1, m - j0);
            }
        }
    }
    free(pad);
    return 0;
}

/* out[b, o, i, j] = sum_{c, di, dj} wt[c, di, dj, o] * x[b, c, i + di - PAD, j + dj - PAD] (zero outside the map),
 * for x and out of shape (batch, HEADS, n, m). The input gradient is this convolution of the output gradient
 * with the kernel transposed over heads and flipped over taps. Returns 0, or 1 when a thread could not allocate. */
int local_conv(const float *x, const float *wt, float *out, long batch, long n, long m) {
    long rows = batch * n;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        failed |= conv_rows(x, wt, out, n, m, rows * t / nt, rows * (t + 1) / nt);
    }
    return failed;
}

/* Output heads per register block of the weight gradient: KSIZE x WGROUP accumulators and WGROUP gradient vectors
 * stay in registers, beside one input vector. */
#define WGROUP DIVISOR_AT_MOST(HEADS, (NREGS - 1) / (KSIZE + 1))

/* Output rows per chunk: their gradient rows (HEADS of them each) stay in L1, beside the input rows, while every
 * (input head, kernel row) sweeps them: about 24 KiB, at most 8 rows (8 rows of 6 maps of 197 floats, 40 KiB, ran
 * 4-12 % slower than 4). */
#define CHUNK_FLOATS (24 * 1024 / 4)
#define CHUNK_MAX 8

/* grad[c, di, dj, o] += sum over rows [row_begin, row_end) and columns j of g[b, o, i, j] * x[b, c, i + di - PAD,
 * j + dj - PAD]. For a chunk of rows, each (input head, kernel row, group of output heads) keeps its KSIZE x group
 * accumulators in registers over the chunk's columns; the vectors are summed across lanes at the end. */
static int weight_grad_rows(const float *x, const float *g, float *grad, long n, long m, long row_begin,
                            long row_end) {
    long stride = padded_stride(m), plane = n * m, gstride = (m + VW - 1) / VW * VW;
    long chunk_rows = CHUNK_FLOATS / (HEADS * gstride);
    chunk_rows = chunk_rows < 1 ? 1 : chunk_rows > CHUNK_MAX ? CHUNK_MAX : chunk_rows;
    size_t gbytes = HEADS * chunk_rows * gstride * sizeof(float); /* a whole number of vectors: aligned_alloc's size */
    float *pad = malloc(HEADS * (n + 2 * PAD) * stride * sizeof(float));
    float *gpad = aligned_alloc(sizeof(vec), gbytes); /* rows of whole, aligned vectors: no load splits a cache line */
    vec *acc = aligned_alloc(sizeof(vec), TAPS * sizeof(vec));
    if (pad == NULL || gpad == NULL || acc == NULL) {
        free(pad);
        free(gpad);
        free(acc);
        return 1;
    }
    memset(acc, 0, TAPS * sizeof(vec));
    memset(gpad, 0, gbytes); /* zeros past column m stay zeros */
    for (long b = row_begin / n; b * n < row_end; b++) { /* the rows [i0, i1) of each batch element in range */
        long i0 = row_begin > b * n ? row_begin - b * n : 0, i1 = row_end < (b + 1) * n ? row_end - b * n : n;
        long in_rows = i1 - i0 + 2 * PAD;
        pad_rows(x + b * HEADS * plane, n, m, i0 - PAD, i1 + PAD, pad);
        for (long chunk = i0; chunk < i1; chunk += chunk_rows) {
            long rows = i1 - chunk < chunk_rows ? i1 - chunk : chunk_rows;
            for (int o = 0; o < HEADS; o++)
                for (long i = 0; i < rows; i++)
                    memcpy(gpad + (o * chunk_rows + i) * gstride, g + b * HEADS * plane + o * plane + (chunk + i) * m,
                           m * sizeof(float));
            for (int c = 0; c < HEADS; c++)
                for (int di = 0; di < KSIZE; di++)
                    for (int o0 = 0; o0 < HEADS; o0 += WGROUP) {
                        vec a[KSIZE][WGROUP];
                        memset(a, 0, sizeof a);
                        for (long i = 0; i < rows; i++) {
                            const float *s = pad + (c * in_rows + chunk - i0 + i + di) * stride;
                            const float *gi = gpad + (o0 * chunk_rows + i) * gstride;
                            for (long j0 = 0; j0 < m; j0 += VW) {
                                vec xv[KSIZE];
#pragma GCC unroll 16
                                for (int dj = 0; dj < KSIZE; dj++) xv[dj] = load(s + j0 + dj);
#pragma GCC unroll 64
                                for (int o = 0; o < WGROUP; o++) {
                                    /* one load of each gradient vector for its KSIZE FMAs (GCC had folded it into
                                     * every one of them: a load per FMA, the loop bound by loads) */
                                    vec gv = in_register(load(gi + o * chunk_rows * gstride + j0));
#pragma GCC unroll 16
                                    for (int dj = 0; dj < KSIZE; dj++) a[dj][o] += gv * xv[dj];
                                }
                            }
                        }
                        vec *total = acc + (c * KSIZE + di) * KSIZE * HEADS + o0;
#pragma GCC unroll 16
                        for (int dj = 0; dj < KSIZE; dj++)
#pragma GCC unroll 64
                            for (int o = 0; o < WGROUP; o++) total[dj * HEADS + o] += a[dj][o];
                    }
        }
    }
    for (int t = 0; t < TAPS; t++)
        for (int l = 0; l < VW; l++) grad[t] += acc[t][l];
    free(pad);
    free(gpad);
    free(acc);
    return 0;
}

/* Weight gradient of local_conv for output gradient g, tap-major like wt. grad holds `slots` zeroed blocks of
 * TAPS floats, one per thread, for the caller to sum. Returns 0, or 1 when a thread could not allocate. */
int local_conv_weight_grad(const float *x, const float *g, float *grad, long batch, long n, long m, int slots) {
    long rows = batch * n;
    int failed = 0;
#pragma omp parallel num_threads(slots) reduction(| : failed)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        failed |= weight_grad_rows(x, g, grad + t * TAPS, n, m, rows * t / nt, rows * (t + 1) / nt);
    }
    return failed;
}
