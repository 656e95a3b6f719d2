/* LL dispatch/combine of the cpu backend against a naive reference over all ranks' inputs:
 * random shapes, fp8 and bf16, hook and no hook, both LL buffers in alternation, long runs. */
#include "op_ref.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Exponent range of the expert outputs. */
#define Y_EMAX 3

static void gen_inputs(const struct op_case *c, uint64_t op, int s, struct ll_in *in)
{
    rng_t r = {rng_mix(c->seed, op * 64 + (uint64_t)s)};
    in->T = rng_int(&r, 0, 4) == 0 ? 0 : rng_int(&r, 0, c->ll_M);
    for (int t = 0; t < in->T; t++) {
        int emin = rng_int(&r, -12, 2);
        for (int h = 0; h < c->H; h++)
            in->x[(size_t)t * c->H + h] = rand_bf16(&r, emin, emin + 6);
        in->qmode[t] = 0;
        /* the token's routing, drawn right after its data */
        gen_routing(&r, c, 1, in->idx + (size_t)t * c->k, in->w + (size_t)t * c->k, -0.5f, 2.0f);
    }
}

static int ll_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const struct op_case *c = arg;
    struct op_ctx cx = {c, rank, 0, 0};
    int R = c->R, L = c->E / R, rc = 0;
    size_t S = (size_t)c->ll_M * R;
    ep_group_t *g = NULL;
    struct ll_in in[2][EP_MAX_RANKS];
    struct ll_op op[2];
    memset(in, 0, sizeof in);
    memset(op, 0, sizeof op);
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < R; s++)
            if (!ll_in_alloc(c, &in[a][s])) return 1;
        op[a].in = in[a];
        op[a].y = malloc((size_t)L * S * c->H * 2);
        op[a].res = malloc((size_t)c->ll_M * c->H * 2 + 2);
    }

    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.num_experts = c->E;
    cfg.hidden = c->H;
    cfg.num_topk = c->k;
    cfg.ll_max_tokens = c->ll_M;
    cfg.timeout_ms = 30000;
    OPCHECK(NULL, ep_group_create(&cfg, bs, &g));
    rng_t pr = {rng_mix(c->seed, 999)};                   /* the pattern: same on every rank */
    rng_t hr = {rng_mix(c->seed, 1000 + (uint64_t)rank)}; /* hook choices: per rank */
    uint64_t opid = 0;
    for (int it = 0; it < c->steps; it++) {
        int nops = rng_int(&pr, 1, 2); /* 1: d c; 2: dA dB cA cB */
        for (int a = 0; a < nops; a++) {
            struct ll_op *o = &op[a];
            for (int s = 0; s < R; s++)
                gen_inputs(c, opid, s, &o->in[s]);
            cx.op = opid++;
            o->fp8 = c->fp8 == 2 ? rng_int(&pr, 0, 1) : c->fp8;
            o->round_scale = o->fp8 ? rng_int(&pr, 0, 1) : 0;
            int hook = c->hook == 2 ? rng_int(&hr, 0, 1) : c->hook;
            struct ll_in *mine = &o->in[rank];
            ep_ll_dispatch_args_t da = {.x = mine->x,
                                        .num_tokens = mine->T,
                                        .topk_idx = mine->idx,
                                        .topk_weights = mine->w,
                                        .use_fp8 = o->fp8,
                                        .round_scale = o->round_scale,
                                        .use_hook = hook};
            o->hook = NULL;
            OPCHECK(g, ep_ll_dispatch(g, &da, &o->out, &o->handle, &o->hook));
            if (!hook && o->hook) OP_CHECK(&cx, 0, "dispatch without hook returned a hook");
        }
        for (int a = 0; a < nops; a++)
            if (op[a].hook) OPCHECK(g, ep_hook_run(op[a].hook));
        for (int a = 0; a < nops; a++) {
            check_ll_dispatch(&cx, &op[a]);
            make_ll_y(&cx, &op[a], Y_EMAX);
        }
        for (int a = 0; a < nops; a++) {
            struct ll_op *o = &op[a];
            struct ll_in *mine = &o->in[rank];
            int hook = c->hook == 2 ? rng_int(&hr, 0, 1) : c->hook;
            ep_ll_combine_args_t ca = {.handle = o->handle,
                                       .expert_y = o->y,
                                       .topk_idx = mine->idx,
                                       .topk_weights = mine->w,
                                       .out = o->res,
                                       .use_hook = hook};
            o->hook = NULL;
            OPCHECK(g, ep_ll_combine(g, &ca, &o->hook));
        }
        for (int a = 0; a < nops; a++)
            if (op[a].hook) OPCHECK(g, ep_hook_run(op[a].hook));
        for (int a = 0; a < nops; a++)
            check_ll_combine(&cx, &op[a], Y_EMAX);
    }
out:
    ep_group_destroy(g);
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < R; s++)
            ll_in_free(&in[a][s]);
        free(op[a].y);
        free(op[a].res);
    }
    return rc || cx.failures;
}

static void run_case(const struct op_case *c)
{
    printf("LL case: R=%d E=%d H=%d k=%d M=%d fp8=%d hook=%d iters=%d\n", c->R, c->E, c->H, c->k,
           c->ll_M, c->fp8, c->hook, c->steps);
    assert_int_equal(run_ranks(c->R, ll_rank, (void *)c), 0);
}

static void ll_random_shapes(void **state)
{
    (void)state;
    rng_t r = {31};
    for (int i = 0; i < 14; i++) {
        struct op_case c = {0};
        c.R = rng_int(&r, 1, 8);
        int Lmin = (8 + c.R - 1) / c.R, Lmax = 288 / c.R;
        c.E = c.R * rng_int(&r, Lmin, Lmax);
        c.fp8 = rng_int(&r, 0, 2);
        c.H = c.fp8 ? 128 * rng_int(&r, 1, 56)
                    : rng_int(&r, 1, 56) * 128 + (rng_int(&r, 0, 1) ? 0 : 40);
        if (c.H > 7168) c.H = 7168;
        c.k = rng_int(&r, 1, c.E < 8 ? c.E : 8);
        /* Keep rows x hidden modest so the naive checks stay quick. */
        int mmax = (int)(200000 / ((long)c.H * c.R));
        c.ll_M = rng_int(&r, 1, mmax < 1 ? 1 : mmax > 64 ? 64 : mmax);
        c.hook = rng_int(&r, 0, 2);
        c.steps = 3;
        c.seed = rng_next(&r);
        run_case(&c);
    }
}

/* The fixed cases of the table in main. */
static void fixed_case(void **state)
{
    run_case(*state);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ll_random_shapes),
        OP_CASE_TEST(ll_deepep_shape, fixed_case, .R = 2, .E = 288, .H = 7168, .k = 8, .ll_M = 128,
                     .fp8 = 2, .hook = 2, .steps = 2, .seed = 77),
        OP_CASE_TEST(ll_hundreds_of_steps, fixed_case, .R = 4, .E = 32, .H = 128, .k = 4,
                     .ll_M = 12, .fp8 = 2, .hook = 2, .steps = 300, .seed = 5),
        OP_CASE_TEST(ll_eight_ranks_top8, fixed_case, .R = 8, .E = 256, .H = 256, .k = 8,
                     .ll_M = 24, .fp8 = 2, .hook = 2, .steps = 20, .seed = 6),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
