/* Naive LL / HT references shared by the op tests (tests/transport's test_ll and test_ht,
 * tests/transport_mp's test_mp_ops): one case struct, the routing generator, and checks by which
 * each rank recomputes, from every rank's inputs, what its experts must receive and what its
 * combines must return, bit for bit. Part of the ep_test_harness library. */
#ifndef EP_TEST_OP_REF_H
#define EP_TEST_OP_REF_H

#include "check.h"
#include "harness.h"

#include <stdint.h>
#include <stdio.h>

/* A case of the op tests; each test reads the fields of the modes it runs. */
struct op_case {
    int R, E, H, k;
    int ll_M, ht_M; /* per-rank token bounds of LL and HT; 0 where a mode does not run */
    int fp8;        /* 0: bf16 only, 1: fp8 only, 2: random per op */
    int hook;       /* 0: never, 1: always, 2: random per op and rank */
    int steps;      /* iterations of the test's step pattern */
    int squeeze;    /* HT: rank 0 passes too small an output once */
    uint64_t seed;
};

/* The seed of stream b of a case seeded a. */
uint64_t rng_mix(uint64_t a, uint64_t b);
/* Routing of T tokens: k distinct experts or -1 per token, some tokens with no expert at all;
 * weights wlo + [0, 1) * wspan. */
void gen_routing(rng_t *r, const struct op_case *c, int T, int32_t *idx, float *w, float wlo,
                 float wspan);

/* A cmocka test of one fixed case, for a suite's table of tests: runner is the suite's
 * `void runner(void **state)` that runs the case *state. */
#define OP_CASE_TEST(test_name, runner, ...)                                                       \
    {                                                                                              \
        .name = #test_name, .test_func = (runner), .initial_state = &(struct op_case)              \
        {                                                                                          \
            __VA_ARGS__                                                                            \
        }                                                                                          \
    }

/* One rank's checks: the case, the rank, the op being checked (for messages) and how many
 * checks failed. */
struct op_ctx {
    const struct op_case *c;
    int rank, failures;
    uint64_t op;
};

/* Counts a failed check of the op (the "step" of the message), printing the first few. */
#define OP_CHECK(cx, cond, ...)                                                                    \
    TEST_CHECK((cx)->rank, (int)(cx)->op, (cx)->failures++, cond, __VA_ARGS__)

/* An ep_* call that must succeed; on failure sets rc and jumps to `out` (the caller's struct
 * op_ctx is `cx`). */
#define OPCHECK(g, call)                                                                           \
    do {                                                                                           \
        ep_status_t st_ = (call);                                                                  \
        if (st_ != EP_OK) {                                                                        \
            fprintf(stderr, "rank %d op %llu: %s failed: %s: %s\n", cx.rank,                       \
                    (unsigned long long)cx.op, #call, ep_strerror(st_), ep_group_last_error(g));   \
            rc = 1;                                                                                \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

/* One rank's inputs to one LL op (every rank generates every rank's inputs). */
struct ll_in {
    int T;
    uint16_t *x;    /* [M][H] bf16 */
    int32_t *idx;   /* [M][k] */
    float *w;       /* [M][k] */
    uint8_t *q;     /* [M][H] reference fp8 of x */
    float *qs;      /* [M][H/128] reference scales */
    uint8_t *qmode; /* [M] 0: not quantised yet, else 1 + round_scale */
};
/* Buffers for ll_M tokens; 0 when out of memory (free with ll_in_free either way). */
int ll_in_alloc(const struct op_case *c, struct ll_in *in);
void ll_in_free(struct ll_in *in);
/* The test's own per-128-channel quantisation of token t: scale = max(amax, 1e-4) / 448,
 * rounded up to a power of two with round_scale; q = e4m3(x / scale), RNE, saturating. */
void ref_quant_token(const struct op_case *c, struct ll_in *in, int t, int round_scale);

/* One LL op in flight on this rank. */
struct ll_op {
    struct ll_in *in; /* [R] */
    int fp8, round_scale;
    ep_ll_dispatch_out_t out;
    ep_ll_handle_t *handle;
    ep_hook_t *hook;
    uint16_t *y;   /* [L][S][H] expert outputs */
    uint16_t *res; /* [M][H] combine result */
};

/* Expert output for (source rank, token, global expert, channel): a bf16 hash with exponent in
 * [-emax, emax]. */
uint16_t ref_ll_y(int s, int t, int e, int h, int emax);
/* Rows, sources, scales, ranges and counts this rank's experts received. */
void check_ll_dispatch(struct op_ctx *cx, struct ll_op *o);
/* Expert outputs from what the dispatch says each row is (checked above). */
void make_ll_y(struct op_ctx *cx, struct ll_op *o, int emax);
/* out[t][h] = bf16(sum over slots j in order, skipping -1, of w[t][j] * y): fp32 products and
 * sums, never fused, rounded once (the contract of weighted_sum_ref.h). */
void check_ll_combine(struct op_ctx *cx, struct ll_op *o, int emax);

/* One rank's inputs to one HT op. */
struct ht_in {
    int T, fp8, align, no_weights;
    uint8_t *x, *x2; /* [M][H] fp8 or [M][H] bf16; x2: the cached dispatch's data */
    float *xs, *xs2; /* [M][H/128] */
    int32_t *idx;    /* [M][k] */
    float *w;        /* [M][k] */
};
/* Buffers for ht_M tokens; 0 when out of memory (free with ht_in_free either way). */
int ht_in_alloc(const struct op_case *c, struct ht_in *in);
void ht_in_free(struct ht_in *in);
/* Whether a token routed by idx[k] goes to rank r. */
int ht_in_rank(const struct op_case *c, const int32_t *idx, int r);
/* HT row that rank r sends back for (source rank s, token t, channel h): a bf16 hash with
 * exponent in [-emax, emax]. */
uint16_t ref_ht_y(int r, int s, int t, int h, int emax);
void check_ht_layout(struct op_ctx *cx, const struct ht_in *in, const ep_ht_layout_t *lay);
/* Received rows of data set 1 or 2; with full also ids, weights and per-expert counts. */
void check_ht_dispatch(struct op_ctx *cx, const struct ht_in *all, const ep_ht_dispatch_out_t *o,
                       int set, int full);
/* The combine's input: row n (from rank s, token t) carries ref_ht_y(me, s, t), for at most
 * capacity rows. */
void make_ht_y(struct op_ctx *cx, const struct ht_in *all, int capacity, uint16_t *y, int emax);
/* out[t] is the sum of the copies in rank order, fp32, rounded once. */
void check_ht_combine(struct op_ctx *cx, const struct ht_in *mine, const uint16_t *res, int emax);

#endif /* EP_TEST_OP_REF_H */
