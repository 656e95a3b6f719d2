/* Test harness for libep: ranks as threads with the inproc bootstrap, a seeded generator,
 * and naive number-format references written independently of kernels/numeric_ref.c. The naive
 * LL / HT references of the op tests are in op_ref.h. */
#ifndef EP_TEST_HARNESS_H
#define EP_TEST_HARNESS_H

#include "ep.h"

#include <stddef.h>
#include <stdint.h>

/* splitmix64 */
typedef struct {
    uint64_t s;
} rng_t;
uint64_t rng_next(rng_t *r);
int rng_int(rng_t *r, int lo, int hi); /* uniform in [lo, hi] */
float rng_float(rng_t *r);             /* uniform in [0, 1) */

/* Runs fn(rank, bootstrap, arg) on nranks threads sharing one inproc world; returns the
 * number of ranks whose fn returned nonzero. */
typedef int (*rank_fn)(int rank, const ep_bootstrap_t *bs, void *arg);
int run_ranks(int nranks, rank_fn fn, void *arg);

/* Independent references: value of a bf16 pattern, float -> bf16 by comparing the two
 * neighbours in double precision, fp8 e4m3 value from its fields with pow(), float -> fp8 by
 * searching the table of all finite e4m3 values. */
float ref_bf16_value(uint16_t b);
uint16_t ref_bf16_round(float f);
double ref_fp8_value(uint8_t b); /* NaN for 0x7f / 0xff */
uint8_t ref_fp8_round(float f);  /* RNE, saturating at +-448, NaN -> 0x7f */
/* A random bf16 with exponent in [emin, emax] and random sign and mantissa. */
uint16_t rand_bf16(rng_t *r, int emin, int emax);
/* ref_bf16_value of every pattern, tabulated on first use (a test that forks its ranks calls
 * it before forking, so that they inherit the table). */
const float *ref_bf16_table(void);

#endif /* EP_TEST_HARNESS_H */
