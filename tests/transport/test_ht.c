/* HT layout, dispatch, cached dispatch and combine of the cpu backend against a naive
 * reference over all ranks' inputs: random shapes, fp8 and bf16, alignment, NULL weights,
 * too small an output, long runs. */
#include "op_ref.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Exponent range of the rows sent back to the combine. */
#define Y_EMAX 4

static void gen(const struct op_case *c, uint64_t step, int s, struct ht_in *in)
{
    rng_t pr = {rng_mix(c->seed, step)}; /* shared by all ranks: the step's modes */
    rng_t r = {rng_mix(c->seed, step * 64 + (uint64_t)s + 1000)};
    in->fp8 = c->H % 128 == 0 ? rng_int(&pr, 0, 1) : 0;
    static const int aligns[] = {0, 1, 4, 8};
    in->align = aligns[rng_int(&r, 0, 3)];
    in->no_weights = rng_int(&r, 0, 5) == 0;
    in->T = rng_int(&r, 0, 4) == 0 ? 0 : rng_int(&r, 0, c->ht_M);
    size_t row = in->fp8 ? (size_t)c->H : 2 * (size_t)c->H;
    for (int t = 0; t < in->T; t++) {
        for (size_t b = 0; b < row; b++) {
            in->x[(size_t)t * row + b] = (uint8_t)rng_next(&r);
            in->x2[(size_t)t * row + b] = (uint8_t)rng_next(&r);
        }
        for (int b = 0; b < c->H / 128; b++) {
            in->xs[(size_t)t * (c->H / 128) + b] = rng_float(&r);
            in->xs2[(size_t)t * (c->H / 128) + b] = rng_float(&r);
        }
        /* the token's routing, drawn right after its data */
        gen_routing(&r, c, 1, in->idx + (size_t)t * c->k, in->w + (size_t)t * c->k, 0.0f, 1.0f);
    }
}

static int ht_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const struct op_case *c = arg;
    struct op_ctx cx = {c, rank, 0, 0};
    int R = c->R, L = c->E / R, H = c->H, k = c->k, M = c->ht_M, rc = 0;
    size_t N = (size_t)M * R;
    ep_group_t *g = NULL;
    struct ht_in in[EP_MAX_RANKS];
    memset(in, 0, sizeof in);
    for (int s = 0; s < R; s++)
        ht_in_alloc(c, &in[s]);
    ep_ht_layout_t lay = {malloc(4 * (size_t)R), malloc(4 * (size_t)c->E),
                          malloc((size_t)M * R + 1)};
    ep_ht_dispatch_out_t o = {.capacity = (int)N};
    o.recv_x = malloc(N * H * 2 + 1);
    o.recv_scales = malloc(N * (H / 128) * 4 + 4);
    o.recv_topk_idx = malloc(N * k * 4);
    o.recv_topk_weights = malloc(N * k * 4);
    o.num_recv_per_expert = malloc(4 * (size_t)L);
    uint16_t *y = malloc(N * H * 2 + 2), *res = malloc((size_t)M * H * 2 + 2);
    ep_ht_handle_t *hd = NULL;

    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.num_experts = c->E;
    cfg.hidden = H;
    cfg.num_topk = k;
    cfg.ht_max_tokens = M;
    cfg.timeout_ms = 30000;
    OPCHECK(NULL, ep_group_create(&cfg, bs, &g));
    OP_CHECK(&cx, ep_ht_max_recv_tokens(g) == (int)N, "ep_ht_max_recv_tokens %d",
             ep_ht_max_recv_tokens(g));
    for (int it = 0; it < c->steps; it++) {
        cx.op = (uint64_t)it;
        for (int s = 0; s < R; s++)
            gen(c, (uint64_t)it, s, &in[s]);
        struct ht_in *mine = &in[rank];
        OPCHECK(g, ep_get_dispatch_layout(g, mine->idx, mine->T, &lay, NULL));
        check_ht_layout(&cx, mine, &lay);
        ep_ht_dispatch_args_t a = {.x = mine->x,
                                   .x_scales = mine->xs,
                                   .use_fp8 = mine->fp8,
                                   .num_tokens = mine->T,
                                   .topk_idx = mine->idx,
                                   .topk_weights = mine->no_weights ? NULL : mine->w,
                                   .expert_alignment = mine->align};
        if (c->squeeze && it == 1) {
            /* Rank 0 passes too small an output: it fails with a message naming the capacity,
             * the others complete the step; the ops after it still work. */
            int want = 0;
            for (int s = 0; s < R; s++)
                for (int t = 0; t < in[s].T; t++)
                    want += ht_in_rank(c, in[s].idx + (size_t)t * k, rank);
            ep_ht_dispatch_out_t small = o;
            if (rank == 0 && want > 0) small.capacity = want - 1;
            ep_status_t st = ep_ht_dispatch(g, &a, &small, &hd);
            if (rank == 0 && want > 0) {
                OP_CHECK(&cx, st == EP_ERR_INVALID, "too small an output gave %d", st);
                OP_CHECK(&cx, strstr(ep_group_last_error(g), "capacity") != NULL, "message: %s",
                         ep_group_last_error(g));
            } else {
                OPCHECK(g, st);
                check_ht_dispatch(&cx, in, &small, 1, 1);
                ep_ht_handle_destroy(hd);
            }
            hd = NULL;
            continue;
        }
        OPCHECK(g, ep_ht_dispatch(g, &a, &o, &hd));
        check_ht_dispatch(&cx, in, &o, 1, 1);
        ep_ht_dispatch_args_t a2 = a;
        a2.x = mine->x2;
        a2.x_scales = mine->xs2;
        OPCHECK(g, ep_ht_dispatch_cached(g, hd, &a2, &o));
        check_ht_dispatch(&cx, in, &o, 2, 0);
        /* Combine: row n (from rank s, token t) carries y(me, s, t). */
        make_ht_y(&cx, in, o.capacity, y, Y_EMAX);
        OPCHECK(g, ep_ht_combine(g, hd, y, res, NULL));
        check_ht_combine(&cx, mine, res, Y_EMAX);
        ep_ht_handle_destroy(hd);
        hd = NULL;
    }
out:
    ep_ht_handle_destroy(hd);
    ep_group_destroy(g);
    for (int s = 0; s < R; s++)
        ht_in_free(&in[s]);
    free(lay.num_tokens_per_rank);
    free(lay.num_tokens_per_expert);
    free(lay.is_token_in_rank);
    free(o.recv_x);
    free(o.recv_scales);
    free(o.recv_topk_idx);
    free(o.recv_topk_weights);
    free(o.num_recv_per_expert);
    free(y);
    free(res);
    return rc || cx.failures;
}

static void run_case(const struct op_case *c)
{
    printf("HT case: R=%d E=%d H=%d k=%d M=%d iters=%d\n", c->R, c->E, c->H, c->k, c->ht_M,
           c->steps);
    assert_int_equal(run_ranks(c->R, ht_rank, (void *)c), 0);
}

static void ht_random_shapes(void **state)
{
    (void)state;
    rng_t r = {41};
    for (int i = 0; i < 14; i++) {
        struct op_case c = {0};
        c.R = rng_int(&r, 1, 8);
        int Lmin = (8 + c.R - 1) / c.R, Lmax = 288 / c.R;
        c.E = c.R * rng_int(&r, Lmin, Lmax);
        c.H = rng_int(&r, 1, 56) * 128 + (rng_int(&r, 0, 3) ? 0 : 24);
        if (c.H > 7168) c.H = 7168;
        c.k = rng_int(&r, 1, c.E < 8 ? c.E : 8);
        int mmax = (int)(300000 / ((long)c.H * c.R));
        c.ht_M = rng_int(&r, 1, mmax < 1 ? 1 : mmax > 256 ? 256 : mmax);
        c.steps = 3;
        c.squeeze = rng_int(&r, 0, 1);
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
        cmocka_unit_test(ht_random_shapes),
        OP_CASE_TEST(ht_deepep_shape, fixed_case, .R = 2, .E = 256, .H = 7168, .k = 8, .ht_M = 512,
                     .steps = 2, .seed = 9),
        OP_CASE_TEST(ht_many_steps, fixed_case, .R = 4, .E = 64, .H = 128, .k = 6, .ht_M = 40,
                     .steps = 150, .squeeze = 1, .seed = 10),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
