/* Next-token sampling from fp32 logits: greedy, or temperature + top-p (nucleus) + top-k with
 * a seeded PRNG, so that a request with a seed is reproducible.
 *
 * PRNG: xoshiro256** (Blackman & Vigna), its 256-bit state seeded from the 64-bit seed through
 * splitmix64; a uniform double in [0, 1) is the top 53 bits of one output times 2^-53. */
#ifndef EPD_SAMPLER_H
#define EPD_SAMPLER_H

#include "model_err.h"

#include <stdint.h>

typedef struct epd_rng {
    uint64_t s[4];
} epd_rng_t;

void epd_rng_seed(epd_rng_t *r, uint64_t seed);
uint64_t epd_rng_next(epd_rng_t *r);
double epd_rng_uniform(epd_rng_t *r); /* [0, 1) */

typedef struct epd_sampling {
    float temperature; /* 0: greedy (argmax, the lowest id on ties) */
    float top_p;       /* (0, 1]: keep the most likely tokens whose mass reaches top_p */
    int top_k;         /* 0: off; else keep the k most likely tokens */
} epd_sampling_t;

typedef struct epd_sampler {
    epd_sampling_t p;
    epd_rng_t rng;
    int vocab;
    int32_t *order; /* [vocab] scratch */
    double *prob;   /* [vocab] scratch */
} epd_sampler_t;

/* Checks the parameters (temperature >= 0 and finite, top_p in (0, 1], top_k >= 0); errors name
 * the parameter. */
int epd_sampler_init(epd_sampler_t *s, const epd_sampling_t *p, uint64_t seed, int vocab,
                     epd_err_t *err);
void epd_sampler_fini(epd_sampler_t *s);
/* The next token for logits[vocab]. */
int32_t epd_sampler_pick(epd_sampler_t *s, const float *logits);
/* argmax with ties to the lowest id (NaN never wins). */
int32_t epd_argmax(const float *logits, int n);

#endif /* EPD_SAMPLER_H */
