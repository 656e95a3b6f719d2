/* LL and HT ops of the cpu backend over the tcp wire, one forked process per rank, against a
 * naive reference that every process computes for its own rank from all ranks' inputs (each
 * process generates every rank's inputs from the shared seed). Random shapes, fp8 (with and
 * without round_scale) and bf16, hook and no hook, both LL buffers in alternation, HT layout,
 * dispatch with alignment, cached dispatch and combine, tens of steps per world; bit-exact. */
#include "op_ref.h"
#include "fork_world.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Exponent ranges of the LL expert outputs and the HT rows sent back: wide enough that a sum
 * rounds differently in another slot order (LL), and spanning more than fp32's 24 bits of
 * mantissa, so that a sum of copies rounds and its order shows (HT). */
#define LL_Y_EMAX 12
#define HT_Y_EMAX 16

/* ---- inputs, identical in every process ------------------------------------------------- */

/* Token count of rank s for op `op`: 0..max, and always 0 on one rank of every R + 1 ops. */
static int gen_tokens(rng_t *r, const struct op_case *c, uint64_t op, int s, int max)
{
    if ((uint64_t)s == op % (uint64_t)(c->R + 1)) return 0;
    return rng_int(r, 0, 3) == 0 ? 0 : rng_int(r, 0, max);
}

static void gen_ll(const struct op_case *c, uint64_t op, int s, struct ll_in *in)
{
    rng_t r = {rng_mix(c->seed, op * 64 + (uint64_t)s)};
    in->T = gen_tokens(&r, c, op, s, c->ll_M);
    for (int t = 0; t < in->T; t++) {
        int emin = rng_int(&r, -12, 2);
        for (int h = 0; h < c->H; h++)
            in->x[(size_t)t * c->H + h] = rand_bf16(&r, emin, emin + 6);
        in->qmode[t] = 0;
    }
    gen_routing(&r, c, in->T, in->idx, in->w, -0.5f, 2.0f);
}

static void gen_ht(const struct op_case *c, uint64_t op, int s, struct ht_in *in)
{
    rng_t pr = {rng_mix(c->seed, op * 64 + 63)}; /* the op's format: the same for every rank */
    rng_t r = {rng_mix(c->seed, op * 64 + (uint64_t)s)};
    in->fp8 = c->fp8 == 2 ? rng_int(&pr, 0, 1) : c->fp8;
    static const int aligns[] = {0, 1, 4, 8};
    in->align = aligns[rng_int(&r, 0, 3)];
    in->no_weights = rng_int(&r, 0, 5) == 0;
    in->T = gen_tokens(&r, c, op, s, c->ht_M);
    size_t row = in->fp8 ? (size_t)c->H : 2 * (size_t)c->H, nsc = (size_t)c->H / 128;
    for (size_t i = 0; i < (size_t)in->T * row; i += 8) {
        uint64_t v = rng_next(&r), v2 = rng_next(&r);
        for (size_t j = 0; j < 8 && i + j < (size_t)in->T * row; j++) {
            in->x[i + j] = (uint8_t)(v >> (8 * j));
            in->x2[i + j] = (uint8_t)(v2 >> (8 * j));
        }
    }
    for (size_t i = 0; i < (size_t)in->T * nsc; i++) {
        in->xs[i] = rng_float(&r);
        in->xs2[i] = rng_float(&r);
    }
    gen_routing(&r, c, in->T, in->idx, in->w, 0.0f, 1.0f);
}

/* ---- one rank ------------------------------------------------------------------------------ */

struct rank_state {
    struct ll_in ll[2][EP_MAX_RANKS]; /* inputs of LL ops A and B */
    struct ll_op op[2];
    struct ht_in ht[EP_MAX_RANKS];
    ep_ht_layout_t lay;
    ep_ht_dispatch_out_t ho;
    uint16_t *hy, *hres; /* HT combine input [N][H] and result [M][H] */
};

static int alloc_state(const struct op_case *c, struct rank_state *st)
{
    size_t H = (size_t)c->H, k = (size_t)c->k, R = (size_t)c->R, L = (size_t)(c->E / c->R);
    size_t M = (size_t)c->ll_M, S = M * R, N = (size_t)c->ht_M * R, HM = (size_t)c->ht_M;
    int ok = 1;
    for (int a = 0; a < 2; a++) {
        for (size_t s = 0; s < R; s++)
            ok &= ll_in_alloc(c, &st->ll[a][s]);
        st->op[a].in = st->ll[a];
        ok &= (st->op[a].y = malloc(L * S * H * 2 + 2)) != NULL;
        ok &= (st->op[a].res = malloc(M * H * 2 + 2)) != NULL;
    }
    for (size_t s = 0; s < R; s++)
        ok &= ht_in_alloc(c, &st->ht[s]);
    ok &= (st->lay.num_tokens_per_rank = malloc(4 * R)) != NULL;
    ok &= (st->lay.num_tokens_per_expert = malloc(4 * (size_t)c->E)) != NULL;
    ok &= (st->lay.is_token_in_rank = malloc(HM * R + 1)) != NULL;
    st->ho.capacity = (int)N;
    ok &= (st->ho.recv_x = malloc(N * H * 2 + 1)) != NULL;
    ok &= (st->ho.recv_scales = malloc(N * (H / 128) * 4 + 4)) != NULL;
    ok &= (st->ho.recv_topk_idx = malloc(N * k * 4 + 4)) != NULL;
    ok &= (st->ho.recv_topk_weights = malloc(N * k * 4 + 4)) != NULL;
    ok &= (st->ho.num_recv_per_expert = malloc(4 * L)) != NULL;
    ok &= (st->hy = malloc(N * H * 2 + 2)) != NULL;
    ok &= (st->hres = malloc(HM * H * 2 + 2)) != NULL;
    return ok;
}

static void free_state(const struct op_case *c, struct rank_state *st)
{
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < c->R; s++)
            ll_in_free(&st->ll[a][s]);
        free(st->op[a].y);
        free(st->op[a].res);
    }
    for (int s = 0; s < c->R; s++)
        ht_in_free(&st->ht[s]);
    free(st->lay.num_tokens_per_rank);
    free(st->lay.num_tokens_per_expert);
    free(st->lay.is_token_in_rank);
    free(st->ho.recv_x);
    free(st->ho.recv_scales);
    free(st->ho.recv_topk_idx);
    free(st->ho.recv_topk_weights);
    free(st->ho.num_recv_per_expert);
    free(st->hy);
    free(st->hres);
}

/* One LL step: nops (1 or 2) dispatches, their hooks, the checks, then as many combines. */
static int ll_step(struct op_ctx *pcx, ep_group_t *g, struct rank_state *st, int nops, rng_t *pr,
                   rng_t *hr, uint64_t *opid)
{
    struct op_ctx cx = *pcx;
    const struct op_case *c = cx.c;
    int rc = 0;
    for (int a = 0; a < nops; a++) {
        struct ll_op *o = &st->op[a];
        for (int s = 0; s < c->R; s++)
            gen_ll(c, *opid, s, &o->in[s]);
        cx.op = (*opid)++;
        o->fp8 = c->fp8 == 2 ? rng_int(pr, 0, 1) : c->fp8;
        o->round_scale = o->fp8 ? rng_int(pr, 0, 1) : 0;
        int hook = c->hook == 2 ? rng_int(hr, 0, 1) : c->hook;
        struct ll_in *mine = &o->in[cx.rank];
        ep_ll_dispatch_args_t da = {.x = mine->x,
                                    .num_tokens = mine->T,
                                    .topk_idx = mine->idx,
                                    .topk_weights = mine->w,
                                    .use_fp8 = o->fp8,
                                    .round_scale = o->round_scale,
                                    .use_hook = hook};
        o->hook = NULL;
        OPCHECK(g, ep_ll_dispatch(g, &da, &o->out, &o->handle, &o->hook));
        OP_CHECK(&cx, !hook == !o->hook, "dispatch with use_hook %d returned hook %p", hook,
                 (void *)o->hook);
    }
    for (int a = 0; a < nops; a++)
        if (st->op[a].hook) OPCHECK(g, ep_hook_run(st->op[a].hook));
    for (int a = 0; a < nops; a++) {
        check_ll_dispatch(&cx, &st->op[a]);
        make_ll_y(&cx, &st->op[a], LL_Y_EMAX);
    }
    for (int a = 0; a < nops; a++) {
        struct ll_op *o = &st->op[a];
        struct ll_in *mine = &o->in[cx.rank];
        int hook = c->hook == 2 ? rng_int(hr, 0, 1) : c->hook;
        ep_ll_combine_args_t ca = {.handle = o->handle,
                                   .expert_y = o->y,
                                   .topk_idx = mine->idx,
                                   .topk_weights = mine->w,
                                   .out = o->res,
                                   .use_hook = hook};
        o->hook = NULL;
        OPCHECK(g, ep_ll_combine(g, &ca, &o->hook));
        OP_CHECK(&cx, !hook == !o->hook, "combine with use_hook %d returned hook %p", hook,
                 (void *)o->hook);
    }
    for (int a = 0; a < nops; a++)
        if (st->op[a].hook) OPCHECK(g, ep_hook_run(st->op[a].hook));
    for (int a = 0; a < nops; a++)
        check_ll_combine(&cx, &st->op[a], LL_Y_EMAX);
out:
    pcx->failures = cx.failures;
    return rc;
}

/* One HT step: layout, dispatch, cached dispatch of a second data set, combine. */
static int ht_step(struct op_ctx *pcx, ep_group_t *g, struct rank_state *st, uint64_t *opid)
{
    struct op_ctx cx = *pcx;
    const struct op_case *c = cx.c;
    int R = c->R, rc = 0;
    ep_ht_handle_t *hd = NULL;
    for (int s = 0; s < R; s++)
        gen_ht(c, *opid, s, &st->ht[s]);
    cx.op = (*opid)++;
    struct ht_in *mine = &st->ht[cx.rank];
    OPCHECK(g, ep_get_dispatch_layout(g, mine->idx, mine->T, &st->lay, NULL));
    check_ht_layout(&cx, mine, &st->lay);
    ep_ht_dispatch_args_t a = {.x = mine->x,
                               .x_scales = mine->fp8 ? mine->xs : NULL,
                               .use_fp8 = mine->fp8,
                               .num_tokens = mine->T,
                               .topk_idx = mine->idx,
                               .topk_weights = mine->no_weights ? NULL : mine->w,
                               .expert_alignment = mine->align};
    OPCHECK(g, ep_ht_dispatch(g, &a, &st->ho, &hd));
    check_ht_dispatch(&cx, st->ht, &st->ho, 1, 1);
    ep_ht_dispatch_args_t a2 = a;
    a2.x = mine->x2;
    a2.x_scales = mine->fp8 ? mine->xs2 : NULL;
    OPCHECK(g, ep_ht_dispatch_cached(g, hd, &a2, &st->ho));
    check_ht_dispatch(&cx, st->ht, &st->ho, 2, 0);
    /* Row n (from rank s, token t) carries ref_ht_y(me, s, t); out[t] is the sum of the copies in
     * rank order, fp32, rounded once. */
    make_ht_y(&cx, st->ht, st->ho.capacity, st->hy, HT_Y_EMAX);
    OPCHECK(g, ep_ht_combine(g, hd, st->hy, st->hres, NULL));
    check_ht_combine(&cx, mine, st->hres, HT_Y_EMAX);
out:
    ep_ht_handle_destroy(hd);
    pcx->failures = cx.failures;
    return rc;
}

static int ops_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    const struct op_case *c = arg;
    struct op_ctx cx = {c, rank, 0, 0};
    struct rank_state *st = calloc(1, sizeof *st);
    ep_group_t *g = NULL;
    int rc = 0;
    if (!st || !alloc_state(c, st)) {
        fprintf(stderr, "rank %d: out of memory for the test's buffers\n", rank);
        rc = 1;
        goto out;
    }
    if (nranks != c->R) {
        fprintf(stderr, "rank %d: world of %d ranks for a case of %d\n", rank, nranks, c->R);
        rc = 1;
        goto out;
    }
    ep_config_t cfg;
    world_ep_config(&cfg, c->E, c->H, c->k, c->ll_M, c->ht_M, 10000);
    OPCHECK(NULL, ep_group_create(&cfg, bs, &g));
    OP_CHECK(&cx, ep_group_rank(g) == rank && ep_group_size(g) == nranks,
             "group says rank %d of %d", ep_group_rank(g), ep_group_size(g));
    if (c->ht_M)
        OP_CHECK(&cx, ep_ht_max_recv_tokens(g) == c->ht_M * nranks, "ep_ht_max_recv_tokens %d",
                 ep_ht_max_recv_tokens(g));
    rng_t pr = {rng_mix(c->seed, 999)}; /* the step pattern: the same everywhere */
    rng_t hr = {rng_mix(c->seed, 1000 + (uint64_t)rank)}; /* hook choices: per rank */
    uint64_t opid = 0;
    for (int step = 0; step < c->steps && !rc; step++) {
        /* 0: HT step; 1: LL d c; 2: LL dA dB cA cB */
        int kind = !c->ll_M ? 0 : !c->ht_M ? rng_int(&pr, 1, 2) : rng_int(&pr, 0, 2);
        rc = kind ? ll_step(&cx, g, st, kind, &pr, &hr, &opid) : ht_step(&cx, g, st, &opid);
    }
out:
    ep_group_destroy(g);
    if (st) free_state(c, st);
    free(st);
    if (cx.failures) fprintf(stderr, "rank %d: %d check(s) failed\n", rank, cx.failures);
    return rc || cx.failures;
}

/* ---- cases --------------------------------------------------------------------------------- */

static void run_case(const struct op_case *c)
{
    int status[EP_MAX_RANKS];
    printf("case: R=%d E=%d H=%d k=%d ll_M=%d ht_M=%d fp8=%d hook=%d steps=%d\n", c->R, c->E, c->H,
           c->k, c->ll_M, c->ht_M, c->fp8, c->hook, c->steps);
    uint64_t t0 = world_now_ms();
    int failed = world_run_ep(c->R, ops_rank, (void *)c, 20000, status);
    for (int r = 0; r < c->R; r++)
        if (status[r]) fprintf(stderr, "rank %d ended with status %d\n", r, status[r]);
    printf("  %llu ms\n", (unsigned long long)(world_now_ms() - t0));
    assert_int_equal(failed, 0);
}

/* A random shape for R ranks: E in 8..64, H in 128..2048 (fp8 cases: a multiple of 128), top-k
 * 1..8, small token bounds so that the naive references stay quick. */
static struct op_case random_case(int R, uint64_t seed, int steps)
{
    rng_t r = {seed};
    struct op_case c = {.R = R, .steps = steps, .seed = rng_next(&r)};
    int Lmin = (8 + R - 1) / R, Lmax = 64 / R;
    c.E = R * rng_int(&r, Lmin, Lmax);
    c.fp8 = rng_int(&r, 0, 3) ? 2 : 0;
    c.H = 128 * rng_int(&r, 1, 16) + (c.fp8 ? 0 : 8 * rng_int(&r, 0, 15));
    if (c.H > 2048) c.H = 2048;
    c.k = rng_int(&r, 1, c.E < 8 ? c.E : 8);
    int budget = 64 * 1024 / (c.H * R / 128 + 1); /* rows x hidden per rank kept modest */
    c.ll_M = rng_int(&r, 1, budget < 32 ? budget : 32);
    c.ht_M = rng_int(&r, 1, budget < 64 ? budget : 64);
    c.hook = 2;
    return c;
}

/* Several random shapes with R ranks, tens of steps each. */
static void random_shapes(int R, uint64_t seed)
{
    rng_t r = {seed};
    for (int i = 0; i < 3; i++) {
        struct op_case c = random_case(R, rng_next(&r), 30);
        run_case(&c);
    }
}

static void two_ranks(void **state)
{
    (void)state;
    random_shapes(2, 21);
}

static void three_ranks(void **state)
{
    (void)state;
    random_shapes(3, 31);
}

static void four_ranks(void **state)
{
    (void)state;
    random_shapes(4, 41);
}

/* The fixed cases of the table in main. */
static void fixed_case(void **state)
{
    run_case(*state);
}

int main(void)
{
    ref_bf16_table(); /* tabulated once, before the ranks fork */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(two_ranks),
        cmocka_unit_test(three_ranks),
        cmocka_unit_test(four_ranks),
        /* Fixed extremes: the largest hidden with top-8 and fp8 on every op, and a bf16 hidden
         * that is not a multiple of 128 with top-1. */
        OP_CASE_TEST(wide_rows_fp8, fixed_case, .R = 2, .E = 16, .H = 2048, .k = 8, .ll_M = 12,
                     .ht_M = 16, .fp8 = 1, .hook = 2, .steps = 12, .seed = 51),
        OP_CASE_TEST(odd_hidden_bf16, fixed_case, .R = 3, .E = 9, .H = 200, .k = 1, .ll_M = 20,
                     .ht_M = 30, .fp8 = 0, .hook = 1, .steps = 20, .seed = 61),
        OP_CASE_TEST(four_ranks_64_experts, fixed_case, .R = 4, .E = 64, .H = 256, .k = 8,
                     .ll_M = 16, .ht_M = 24, .fp8 = 2, .hook = 2, .steps = 30, .seed = 71),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
