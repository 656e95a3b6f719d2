/* Next-token sampling, one algorithm for every backend: this plain-C function is the reference
 * twin of the GPU kernel (model/cuda/sample.cu), which follows it step by step, so that a
 * request with a seed gets the same tokens on either. The sums are formed in double: the GPU
 * adds in another order, and with fp32 sums over a 150k vocabulary (relative error ~1e-5, up
 * to V * 2^-24) the two would pick different tokens for a visible fraction of draws; in double
 * they differ only when u falls within ~1e-12 of a boundary (or expf differs by an ulp there).
 *
 * Stateless: the random number of a draw comes from (seed, counter) alone, counter being the
 * index of the token in the completion, so a seeded request is reproducible whatever batch or
 * rank it runs in.
 *
 * Algorithm, for logits x[V]:
 *  1. temperature 0: argmax (the lowest id on ties; NaN never wins). Done. So is a row whose
 *     largest logit is infinite (or all NaN), and a temperature so small that 1/T is inf.
 *  2. p[i] = expf((x[i] - max) * (1.0f / temperature)) in fp32 (NaN logits: 0). Every p is in
 *     [0, 1] and the largest is 1, so thresholds below are searched over the bit patterns of
 *     floats.
 *  3. top_k > 0: tk = the largest float t such that count(p[i] >= t) >= top_k; drop p[i] < tk.
 *  4. top_p < 1: Z = sum of the kept p; tp = the largest float t such that the sum of kept
 *     p[i] >= t reaches (double)top_p * Z; drop p[i] < tp. (Ties at a threshold are kept.)
 *  5. u = epd_sample_uniform(seed, counter) * (sum of the kept p); the token is the first id
 *     whose running sum of kept p (id order) exceeds u (the last kept id if none).
 *     Sums in 4 and 5 are in double (the reference adds in id order).
 * The searches in 3 and 4 are bisections over [0, 0x3f800000] (1.0f) on the float's bits. */
#ifndef EPD_SAMPLE_H
#define EPD_SAMPLE_H

#include "epd_err.h"

#include <stdint.h>

typedef struct epd_sample_params {
    float temperature; /* 0: greedy */
    float top_p;       /* (0, 1] */
    int top_k;         /* 0: off */
    int pad;
    uint64_t seed;
    uint64_t counter; /* index of the token being sampled in its completion */
} epd_sample_params_t;

/* Checks the parameters (temperature finite and >= 0, top_p in (0, 1], top_k >= 0); the
 * message names the parameter. */
int epd_sample_check(const epd_sample_params_t *p, epd_err_t *err);

/* A uniform double in [0, 1) from (seed, counter): splitmix64 of seed ^ (counter * golden
 * ratio), mixed twice, top 53 bits. */
double epd_sample_uniform(uint64_t seed, uint64_t counter);

/* The token for logits[V]. scratch: [V] floats. */
int32_t epd_sample_ref(const float *logits, int V, const epd_sample_params_t *p, float *scratch);

/* argmax, the lowest id on ties; NaN never wins (all NaN: 0). */
int32_t epd_sample_argmax(const float *logits, int V);

#endif /* EPD_SAMPLE_H */
