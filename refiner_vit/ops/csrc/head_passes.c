/* Per-head passes over stacks of attention maps (fp32, (batch, heads, plane) contiguous), each one pass over memory
 * where torch's operators take one per term:
 *
 *   head_sums:   out[p][h] = sum over the batch and the plane of x_p * y_p (y_p NULL: of x_p), for pairs p
 *   head_affine: out = constant[h] + sum_t factor_t[h] * x_t, out possibly one of the x_t
 *
 * The released refiner's closed-form tail (refiner_vit/layers/released.py) is made of these: its BatchNorm
 * statistics are per-head sums of products of the reduced maps, the input maps and the upstream gradient, and its
 * outputs and gradients are per-head affine combinations of them. Both walk a plane in chunks that stay in L1, so
 * each stack is read once whatever the number of terms. Sums are taken in float vectors over a chunk and added
 * into doubles per chunk, the threads' doubles added in thread order (deterministic for a given thread count). */
#include <stdlib.h>

#include "vec.h"

#define CHUNK 1024 /* floats of each stack per step: a few stacks' chunks stay in L1 */
#define MAX_STACKS 8

/* sum a[j] * b[j] (b NULL: sum a[j]) over count floats: vector lanes for whole vectors, then the rest. */
static double dot(const float *a, const float *b, long count) {
    long full = count / VW * VW;
    vec acc = {0};
    float rest = 0.f;
    if (b == NULL) {
        for (long j = 0; j < full; j += VW) acc += load(a + j);
        for (long j = full; j < count; j++) rest += a[j];
    } else {
        for (long j = 0; j < full; j += VW) acc += load(a + j) * load(b + j);
        for (long j = full; j < count; j++) rest += a[j] * b[j];
    }
    return (double)sum_lanes(acc) + rest;
}

/* The pairs' sums over planes [begin, end) of the batch * heads planes, added to total[pair][head]. */
static void sums_planes(int pairs, const float *const *x, const float *const *y, long heads, long plane, long begin,
                        long end, double *total) {
    for (long q = begin; q < end; q++)
        for (long j0 = 0; j0 < plane; j0 += CHUNK) {
            long count = plane - j0 < CHUNK ? plane - j0 : CHUNK, at = q * plane + j0;
            for (int p = 0; p < pairs; p++)
                total[p * heads + q % heads] += dot(x[p] + at, y[p] ? y[p] + at : NULL, count);
        }
}

int head_sums(int pairs, const float *const *x, const float *const *y, double *out, long batch, long heads,
              long plane) {
    if (pairs > MAX_STACKS) return 1;
    int threads = omp_get_max_threads();
    long planes = batch * heads, count = pairs * heads;
    double *totals = calloc((size_t)threads * count, sizeof(double));
    if (totals == NULL) return 1;
#pragma omp parallel num_threads(threads)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        sums_planes(pairs, x, y, heads, plane, planes * t / nt, planes * (t + 1) / nt, totals + t * count);
    }
    for (long k = 0; k < count; k++) {
        double sum = 0.;
        for (int t = 0; t < threads; t++) sum += totals[t * count + k];
        out[k] = sum;
    }
    free(totals);
    return 0;
}

int head_affine(int terms, const float *const *x, const float *const *factor, const float *constant, float *out,
                long batch, long heads, long plane) {
    if (terms > MAX_STACKS) return 1;
    long planes = batch * heads;
#pragma omp parallel for schedule(static)
    for (long q = 0; q < planes; q++) {
        long h = q % heads;
        float buf[CHUNK] __attribute__((aligned(64)));
        for (long j0 = 0; j0 < plane; j0 += CHUNK) {
            long count = plane - j0 < CHUNK ? plane - j0 : CHUNK;
            float c = constant[h];
            for (long j = 0; j < count; j++) buf[j] = c;
            for (int t = 0; t < terms; t++) {
                const float *a = x[t] + q * plane + j0;
                float f = factor[t][h];
                for (long j = 0; j < count; j++) buf[j] += f * a[j];
            }
            memcpy(out + q * plane + j0, buf, count * sizeof(float));
        }
    }
    return 0;
}
