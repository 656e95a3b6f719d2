/* HT layout, dispatch, cached dispatch and combine of the cpu backend against a naive
 * reference over all ranks' inputs: random shapes, fp8 and bf16, alignment, NULL weights,
 * too small an output, long runs. */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

struct ht_case {
    int R, E, H, k, M;
    int iters;
    int squeeze; /* rank 0 passes too small an output once */
    uint64_t seed;
};

struct inputs {
    int T, fp8, align, no_weights;
    uint8_t *x;  /* [M][H] fp8 or [M][H] bf16 (2 bytes each) */
    float *xs;   /* [M][H/128] */
    uint8_t *x2; /* second data set for the cached dispatch */
    float *xs2;
    int32_t *idx; /* [M][k] */
    float *w;     /* [M][k] */
};

static uint64_t mix(uint64_t a, uint64_t b)
{
    rng_t r = {a * 0x100000001b3ull ^ b};
    return rng_next(&r);
}

static void gen(const struct ht_case *c, uint64_t step, int s, struct inputs *in)
{
    rng_t pr = {mix(c->seed, step)}; /* shared by all ranks: the step's modes */
    rng_t r = {mix(c->seed, step * 64 + (uint64_t)s + 1000)};
    in->fp8 = c->H % 128 == 0 ? rng_int(&pr, 0, 1) : 0;
    static const int aligns[] = {0, 1, 4, 8};
    in->align = aligns[rng_int(&r, 0, 3)];
    in->no_weights = rng_int(&r, 0, 5) == 0;
    in->T = rng_int(&r, 0, 4) == 0 ? 0 : rng_int(&r, 0, c->M);
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
        int none = rng_int(&r, 0, 9) == 0;
        for (int j = 0; j < c->k; j++) {
            int32_t e = -1;
            if (!none && rng_int(&r, 0, 6)) {
                for (;;) {
                    e = rng_int(&r, 0, c->E - 1);
                    int dup = 0;
                    for (int i = 0; i < j; i++)
                        dup |= in->idx[(size_t)t * c->k + i] == e;
                    if (!dup) break;
                }
            }
            in->idx[(size_t)t * c->k + j] = e;
            in->w[(size_t)t * c->k + j] = rng_float(&r);
        }
    }
}

static uint16_t y_of(int r, int s, int t, int h)
{
    rng_t g = {((uint64_t)r << 56) ^ ((uint64_t)s << 48) ^ ((uint64_t)t << 24) ^ (uint64_t)h};
    return rand_bf16(&g, -4, 4);
}

struct ctx {
    const struct ht_case *c;
    int rank;
    int failures;
};

#define CHECK(cx, cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            if ((cx)->failures++ < 5) {                                                            \
                fprintf(stderr, "rank %d: %s:%d: ", (cx)->rank, __FILE__, __LINE__);               \
                fprintf(stderr, __VA_ARGS__);                                                      \
                fputc('\n', stderr);                                                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

#define OPCHECK(g, call)                                                                           \
    do {                                                                                           \
        ep_status_t st_ = (call);                                                                  \
        if (st_ != EP_OK) {                                                                        \
            fprintf(stderr, "rank %d: %s failed: %s: %s\n", cx.rank, #call, ep_strerror(st_),      \
                    ep_group_last_error(g));                                                       \
            rc = 1;                                                                                \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

static int in_rank(const struct ht_case *c, const int32_t *idx, int r)
{
    int L = c->E / c->R;
    for (int j = 0; j < c->k; j++)
        if (idx[j] >= 0 && idx[j] / L == r) return 1;
    return 0;
}

static void check_layout(struct ctx *cx, const struct inputs *in, const ep_ht_layout_t *lay)
{
    const struct ht_case *c = cx->c;
    for (int r = 0; r < c->R; r++) {
        int n = 0;
        for (int t = 0; t < in->T; t++) {
            int want = in_rank(c, in->idx + (size_t)t * c->k, r);
            n += want;
            CHECK(cx, lay->is_token_in_rank[(size_t)t * c->R + r] == want,
                  "is_token_in_rank[%d][%d] = %d", t, r,
                  lay->is_token_in_rank[(size_t)t * c->R + r]);
        }
        CHECK(cx, lay->num_tokens_per_rank[r] == n, "tokens to rank %d: %d, want %d", r,
              lay->num_tokens_per_rank[r], n);
    }
    for (int e = 0; e < c->E; e++) {
        int n = 0;
        for (int t = 0; t < in->T; t++)
            for (int j = 0; j < c->k; j++)
                n += in->idx[(size_t)t * c->k + j] == e;
        CHECK(cx, lay->num_tokens_per_expert[e] == n, "tokens of expert %d: %d, want %d", e,
              lay->num_tokens_per_expert[e], n);
    }
}

/* Compares the received rows (data set 1 or 2) and, for a full dispatch, the rest. */
static void check_dispatch(struct ctx *cx, struct inputs *all, const ep_ht_dispatch_out_t *o,
                           int set, int full)
{
    const struct ht_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H, k = c->k, me = cx->rank, n = 0;
    int fp8 = all[0].fp8;
    size_t row = fp8 ? (size_t)H : 2 * (size_t)H, nsc = (size_t)H / 128;
    int cnt[1024] = {0};
    for (int s = 0; s < R; s++) {
        const struct inputs *in = &all[s];
        for (int t = 0; t < in->T; t++) {
            const int32_t *idx = in->idx + (size_t)t * k;
            if (!in_rank(c, idx, me)) continue;
            if (n >= o->capacity) {
                n++;
                continue;
            }
            const uint8_t *x = (set == 1 ? in->x : in->x2) + (size_t)t * row;
            const float *xs = (set == 1 ? in->xs : in->xs2) + (size_t)t * nsc;
            CHECK(cx, !memcmp((const uint8_t *)o->recv_x + (size_t)n * row, x, row),
                  "row %d (rank %d token %d): data differs", n, s, t);
            if (fp8)
                CHECK(cx, !memcmp(o->recv_scales + (size_t)n * nsc, xs, nsc * 4),
                      "row %d: scales differ", n);
            if (full)
                for (int j = 0; j < k; j++) {
                    int local = idx[j] >= 0 && idx[j] / L == me;
                    int want = local ? idx[j] - me * L : -1;
                    float ww = local && !in->no_weights ? in->w[(size_t)t * k + j] : 0.0f;
                    CHECK(cx, o->recv_topk_idx[(size_t)n * k + j] == want,
                          "row %d slot %d: id %d, want %d", n, j,
                          o->recv_topk_idx[(size_t)n * k + j], want);
                    CHECK(cx, o->recv_topk_weights[(size_t)n * k + j] == ww,
                          "row %d slot %d: weight %g, want %g", n, j,
                          o->recv_topk_weights[(size_t)n * k + j], ww);
                    if (local) cnt[want]++;
                }
            n++;
        }
    }
    CHECK(cx, o->num_recv_tokens == n, "received %d rows, want %d (T of rank 0: %d)",
          o->num_recv_tokens, n, all[0].T);
    if (full) {
        int a = all[me].align > 1 ? all[me].align : 1;
        for (int e = 0; e < L; e++) {
            int want = (cnt[e] + a - 1) / a * a;
            CHECK(cx, o->num_recv_per_expert[e] == want, "expert %d: %d rows, want %d", e,
                  o->num_recv_per_expert[e], want);
        }
    }
}

static int ht_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const struct ht_case *c = arg;
    struct ctx cx = {c, rank, 0};
    int R = c->R, L = c->E / R, H = c->H, k = c->k, M = c->M, rc = 0;
    size_t N = (size_t)M * R;
    ep_group_t *g = NULL;
    struct inputs in[EP_MAX_RANKS];
    memset(in, 0, sizeof in);
    for (int s = 0; s < R; s++) {
        in[s].x = malloc((size_t)M * H * 2 + 1);
        in[s].x2 = malloc((size_t)M * H * 2 + 1);
        in[s].xs = malloc((size_t)M * (H / 128) * 4 + 4);
        in[s].xs2 = malloc((size_t)M * (H / 128) * 4 + 4);
        in[s].idx = malloc((size_t)M * k * 4 + 4);
        in[s].w = malloc((size_t)M * k * 4 + 4);
    }
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
    CHECK(&cx, ep_ht_max_recv_tokens(g) == (int)N, "ep_ht_max_recv_tokens %d",
          ep_ht_max_recv_tokens(g));
    for (int it = 0; it < c->iters; it++) {
        for (int s = 0; s < R; s++)
            gen(c, (uint64_t)it, s, &in[s]);
        struct inputs *mine = &in[rank];
        OPCHECK(g, ep_get_dispatch_layout(g, mine->idx, mine->T, &lay, NULL));
        check_layout(&cx, mine, &lay);
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
                    want += in_rank(c, in[s].idx + (size_t)t * k, rank);
            ep_ht_dispatch_out_t small = o;
            if (rank == 0 && want > 0) small.capacity = want - 1;
            ep_status_t st = ep_ht_dispatch(g, &a, &small, &hd);
            if (rank == 0 && want > 0) {
                CHECK(&cx, st == EP_ERR_INVALID, "too small an output gave %d", st);
                CHECK(&cx, strstr(ep_group_last_error(g), "capacity") != NULL, "message: %s",
                      ep_group_last_error(g));
            } else {
                OPCHECK(g, st);
                check_dispatch(&cx, in, &small, 1, 1);
                ep_ht_handle_destroy(hd);
            }
            hd = NULL;
            continue;
        }
        OPCHECK(g, ep_ht_dispatch(g, &a, &o, &hd));
        check_dispatch(&cx, in, &o, 1, 1);
        ep_ht_dispatch_args_t a2 = a;
        a2.x = mine->x2;
        a2.x_scales = mine->xs2;
        OPCHECK(g, ep_ht_dispatch_cached(g, hd, &a2, &o));
        check_dispatch(&cx, in, &o, 2, 0);
        /* Combine: row n (from rank s, token t) carries y(me, s, t). */
        int n = 0;
        for (int s = 0; s < R; s++)
            for (int t = 0; t < in[s].T; t++)
                if (in_rank(c, in[s].idx + (size_t)t * k, rank)) {
                    for (int h = 0; h < H; h++)
                        y[(size_t)n * H + h] = y_of(rank, s, t, h);
                    n++;
                }
        OPCHECK(g, ep_ht_combine(g, hd, y, res, NULL));
        for (int t = 0; t < mine->T; t++)
            for (int h = 0; h < H; h++) {
                float acc = 0.0f;
                for (int r = 0; r < R; r++)
                    if (in_rank(c, mine->idx + (size_t)t * k, r))
                        acc = acc + ref_bf16_value(y_of(r, rank, t, h));
                uint16_t want = ref_bf16_round(acc);
                CHECK(&cx, res[(size_t)t * H + h] == want,
                      "combine token %d channel %d: %04x, "
                      "want %04x",
                      t, h, res[(size_t)t * H + h], want);
            }
        ep_ht_handle_destroy(hd);
        hd = NULL;
    }
out:
    ep_ht_handle_destroy(hd);
    ep_group_destroy(g);
    for (int s = 0; s < R; s++) {
        free(in[s].x);
        free(in[s].x2);
        free(in[s].xs);
        free(in[s].xs2);
        free(in[s].idx);
        free(in[s].w);
    }
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

static void run_case(const struct ht_case *c)
{
    printf("HT case: R=%d E=%d H=%d k=%d M=%d iters=%d\n", c->R, c->E, c->H, c->k, c->M, c->iters);
    assert_int_equal(run_ranks(c->R, ht_rank, (void *)c), 0);
}

static void ht_random_shapes(void **state)
{
    (void)state;
    rng_t r = {41};
    for (int i = 0; i < 14; i++) {
        struct ht_case c = {0};
        c.R = rng_int(&r, 1, 8);
        int Lmin = (8 + c.R - 1) / c.R, Lmax = 288 / c.R;
        c.E = c.R * rng_int(&r, Lmin, Lmax);
        c.H = rng_int(&r, 1, 56) * 128 + (rng_int(&r, 0, 3) ? 0 : 24);
        if (c.H > 7168) c.H = 7168;
        c.k = rng_int(&r, 1, c.E < 8 ? c.E : 8);
        int mmax = (int)(300000 / ((long)c.H * c.R));
        c.M = rng_int(&r, 1, mmax < 1 ? 1 : mmax > 256 ? 256 : mmax);
        c.iters = 3;
        c.squeeze = rng_int(&r, 0, 1);
        c.seed = rng_next(&r);
        run_case(&c);
    }
}

static void ht_deepep_shape(void **state)
{
    (void)state;
    struct ht_case c = {.R = 2, .E = 256, .H = 7168, .k = 8, .M = 512, .iters = 2, .seed = 9};
    run_case(&c);
}

static void ht_many_steps(void **state)
{
    (void)state;
    struct ht_case c = {
        .R = 4, .E = 64, .H = 128, .k = 6, .M = 40, .iters = 150, .squeeze = 1, .seed = 10};
    run_case(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ht_random_shapes),
        cmocka_unit_test(ht_deepep_shape),
        cmocka_unit_test(ht_many_steps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
