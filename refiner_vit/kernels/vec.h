/* Shared by the kernels: a 16-float vector (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones)
 * and unaligned, optionally partial, loads and stores. */
#ifndef REFINER_VEC_H
#define REFINER_VEC_H
#include <string.h>

#define VW 16

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

/* The first count (<= VW) floats at p, zeros after them. */
static inline vec load_first(const float *p, long count) {
    if (count == VW) return load(p);
    vec v = {0};
    memcpy(&v, p, count * sizeof(float));
    return v;
}

/* Stores the first count (<= VW) lanes of v at p (a whole vector store when count == VW: a memcpy of variable
 * length would be a loop of scalar moves). */
static inline void store_first(float *p, vec v, long count) {
    if (count == VW)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, count * sizeof(float));
}

#endif
