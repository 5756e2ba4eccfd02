/* Attention probabilities on the CPU (refiner_vit.ops.probs), per head, and their backward (at the end):
 *
 *   out = softmax(scale * q k^T) + alpha * prev          (prev optional)
 *
 * torch computes this as a batched matmul that writes the logits, a softmax that reads and writes them and an add
 * that reads two stacks of maps and writes a third: six passes over B x H maps of n x n floats, after copying q and
 * k out of the qkv projection's output. Here the logits of a few query rows are computed into a buffer that stays
 * in L1, normalised and accumulated there, so memory sees one read of prev and one write of out; q and k are read
 * in place (any strides, the last one 1). k is first transposed into a padded per-thread buffer, so that a query
 * row's logits are FMAs of a broadcast q value with contiguous vectors of keys. */
#include <math.h>
#include <stdlib.h>

#include "vec.h"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<features of q and k per head>"
#endif

/* A block of ROWS query rows x KVECS key vectors: its accumulators, KVECS keys and a broadcast q value fit in the
 * registers (6 x 4 with AVX-512, 6 x 2 with AVX2: the fastest of the blocks tried on the machines of
 * docs/performance.md). -DROWS=.. -DKVECS=.. override them. */
#if !defined(ROWS) || !defined(KVECS)
#define ROWS 6
#define KVECS ((NREGS - 4) / ROWS)
#endif

/* exp for x <= 0 (NaN stays NaN), as Cephes' expf: 2^k * p(r) with k = round(x / ln2), |r| <= ln2 / 2 and p of
 * degree 7; 0 below the smallest normal result, as torch's softmax gives there. Adding 1.5 * 2^23 rounds to an
 * integer and leaves k in the low bits, so 2^k is those bits shifted into the exponent field. */
static inline vec exp_nonpositive(vec x) {
    const float low = -87.3f, round = 12582912.f;
    ivec keep = ~(x < low); /* NaN compares false: kept */
    x = (vec)(((ivec)x & keep) | ((ivec)splat(low) & ~keep));
    vec shifted = x * 1.44269504088896341f + round;
    vec k = shifted - round;
    vec r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    vec two_k = (vec)(((ivec)shifted + 127) << 23);
    return (vec)((ivec)(p * two_k) & keep);
}

/* scale * logits of `rows` query rows (q, row stride qs) against key vectors v0 ... v0 + nv - 1 of kt (HEAD_DIM
 * rows of kstride floats), into dst (rows of dstride floats), and their lane-wise maxima into top[r] unless top is
 * NULL. Inlined with constant rows, nv and top, so that the accumulators live in registers. */
static inline __attribute__((always_inline)) void logits_block(const float *q, long qs, int rows, const float *kt,
                                                               long kstride, long v0, int nv, float scale,
                                                               float *dst, long dstride, vec *top) {
    vec acc[ROWS][KVECS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) acc[r][v] = (vec){0};
    for (int d = 0; d < HEAD_DIM; d++) {
        vec keys[KVECS];
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) keys[v] = load(kt + d * kstride + (v0 + v) * VW);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            vec qd = splat(q[r * qs + d]);
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++) acc[r][v] += qd * keys[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) {
            vec scaled = acc[r][v] * scale;
            memcpy(dst + r * dstride + (v0 + v) * VW, &scaled, sizeof scaled);
            if (top) top[r] = max_nan(top[r], scaled);
        }
}

/* Logits of `rows` query rows into dst (rows of kvecs * VW floats), and each row's maximum into top. The keys'
 * zero padding gives logits 0 in the last vector: those lanes are set to -inf (weight 0) before it joins the
 * maximum. */
static inline __attribute__((always_inline)) void logits_rows(const float *q, long qs, int rows, const float *kt,
                                                              long n, long kvecs, float scale, float *dst,
                                                              float *top) {
    long v0 = 0, width = kvecs * VW;
    vec tops[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) tops[r] = splat(-INFINITY);
    for (; v0 + KVECS < kvecs; v0 += KVECS)
        logits_block(q, qs, rows, kt, width, v0, KVECS, scale, dst, width, tops);
    for (; v0 < kvecs - 1; v0++) logits_block(q, qs, rows, kt, width, v0, 1, scale, dst, width, tops);
    logits_block(q, qs, rows, kt, width, v0, 1, scale, dst, width, NULL);
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        for (long j = n; j < width; j++) dst[r * width + j] = -INFINITY;
        top[r] = max_lanes(max_nan(tops[r], load(dst + r * width + v0 * VW)));
    }
}

/* One row of logits (n valid, then -inf up to kvecs * VW) with maximum m -> out = softmax(logits) + alpha * prev. */
static void normalise_row(float *logits, long n, long kvecs, float m, const float *prev, float alpha, float *out) {
    vec sum = {0};
    for (long v = 0; v < kvecs; v++) {
        vec e = exp_nonpositive(load(logits + v * VW) - m);
        memcpy(logits + v * VW, &e, sizeof e);
        sum += e;
    }
    float inv = 1.f / sum_lanes(sum);
    for (long j0 = 0; j0 < n; j0 += VW) {
        long count = n - j0 < VW ? n - j0 : VW;
        vec p = load(logits + j0) * inv;
        if (prev) p += alpha * load_first(prev + j0, count);
        store_first(out + j0, p, count);
    }
}

static void head_probs(const float *q, long qs, const float *k, long ks, long n, float scale, const float *prev,
                       float alpha, float *out, float *kt, float *logits) {
    long kvecs = (n + VW - 1) / VW, width = kvecs * VW;
    for (long j = 0; j < width; j++)
        for (int d = 0; d < HEAD_DIM; d++) kt[d * width + j] = j < n ? k[j * ks + d] : 0.f;
    long i = 0;
    float top[ROWS];
    for (; i + ROWS <= n; i += ROWS) {
        logits_rows(q + i * qs, qs, ROWS, kt, n, kvecs, scale, logits, top);
        for (int r = 0; r < ROWS; r++)
            normalise_row(logits + r * width, n, kvecs, top[r], prev ? prev + (i + r) * n : NULL, alpha,
                          out + (i + r) * n);
    }
    for (; i < n; i++) {
        logits_rows(q + i * qs, qs, 1, kt, n, kvecs, scale, logits, top);
        normalise_row(logits, n, kvecs, top[0], prev ? prev + i * n : NULL, alpha, out + i * n);
    }
}

/* out (batch, heads, n, n), contiguous, from q and k (batch, heads, n, HEAD_DIM) with the given strides, and prev
 * (contiguous, like out) or NULL. Returns 0, or 1 when a thread could not allocate its buffers. */
int attention_probs(const float *q, long q_batch, long q_head, long q_row, const float *k, long k_batch,
                    long k_head, long k_row, const float *prev, float scale, float alpha, float *out, long batch,
                    long heads, long n) {
    long width = (n + VW - 1) / VW * VW, plane = n * n;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *kt = malloc((HEAD_DIM + ROWS) * width * sizeof(float)), *logits = kt + HEAD_DIM * width;
        failed |= kt == NULL;
#pragma omp for schedule(static) /* every thread reaches the loop; one without buffers leaves its heads undone */
        for (long bh = 0; bh < batch * heads; bh++) {
            long b = bh / heads, h = bh % heads;
            if (kt != NULL)
                head_probs(q + b * q_batch + h * q_head, q_row, k + b * k_batch + h * k_head, k_row, n, scale,
                           prev ? prev + bh * plane : NULL, alpha, out + bh * plane, kt, logits);
        }
        free(kt);
    }
    return failed;
}

/* Backward of out = softmax(logits) + alpha * prev over rows of n maps' values (grad, out, prev contiguous, prev
 * NULL without it): with p = out - alpha * prev (the softmax, recovered from the output),
 *
 *   grad_logits = p (grad - sum_j grad p),   grad_prev = alpha * grad (grad_prev NULL: not wanted)
 *
 * one read of each input and one write of each output per row, where torch's operators take three passes over the
 * maps (the softmax's recovery, its backward, the scaled gradient). */
void attention_probs_backward(const float *grad, const float *out, const float *prev, float alpha,
                              float *grad_logits, float *grad_prev, long rows, long n) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *g = grad + r * n, *o = out + r * n, *pv = prev ? prev + r * n : NULL;
        float *gl = grad_logits + r * n, *gp = grad_prev ? grad_prev + r * n : NULL;
        vec acc = {0};
        for (long j0 = 0; j0 < n; j0 += VW) {
            long count = n - j0 < VW ? n - j0 : VW;
            vec p = load_first(o + j0, count);
            if (pv) p -= alpha * load_first(pv + j0, count);
            acc += load_first(g + j0, count) * p;
        }
        vec dot = splat(sum_lanes(acc));
        for (long j0 = 0; j0 < n; j0 += VW) {
            long count = n - j0 < VW ? n - j0 : VW;
            vec p = load_first(o + j0, count), gv = load_first(g + j0, count);
            if (pv) p -= alpha * load_first(pv + j0, count);
            store_first(gl + j0, p * (gv - dot), count);
            if (gp) store_first(gp + j0, alpha * gv, count);
        }
    }
}
