/* LL dispatch/combine of the cpu backend against a naive reference over all ranks' inputs:
 * random shapes, fp8 and bf16, hook and no hook, both LL buffers in alternation, long runs. */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

struct ll_case {
    int R, E, H, k, M;
    int fp8;   /* 0: bf16, 1: fp8, 2: random per op */
    int hook;  /* 0: never, 1: always, 2: random per op and rank */
    int iters; /* iterations of a random pattern (d c, or d d c c) */
    uint64_t seed;
};

/* One rank's inputs for one op id (generated identically by every thread). */
struct inputs {
    int T;
    uint16_t *x;  /* [M][H] */
    int32_t *idx; /* [M][k] */
    float *w;     /* [M][k] */
    uint8_t *q;   /* [M][H] reference fp8 of x */
    float *qs;    /* [M][H/128] */
    int qdone;
};

struct op_state {
    struct inputs *in; /* [R] */
    int fp8, round_scale;
    ep_ll_dispatch_out_t out;
    ep_ll_handle_t *handle;
    ep_hook_t *hook;
    uint16_t *y;   /* expert outputs [L][S][H] */
    uint16_t *res; /* combine result [M][H] */
};

static uint64_t mix(uint64_t a, uint64_t b)
{
    rng_t r = {a * 0x100000001b3ull ^ b};
    return rng_next(&r);
}

static void gen_inputs(const struct ll_case *c, uint64_t op, int s, struct inputs *in)
{
    rng_t r = {mix(c->seed, op * 64 + (uint64_t)s)};
    in->T = rng_int(&r, 0, 4) == 0 ? 0 : rng_int(&r, 0, c->M);
    in->qdone = 0;
    for (int t = 0; t < in->T; t++) {
        int emin = rng_int(&r, -12, 2);
        for (int h = 0; h < c->H; h++)
            in->x[(size_t)t * c->H + h] = rand_bf16(&r, emin, emin + 6);
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
            in->w[(size_t)t * c->k + j] = rng_float(&r) * 2.0f - 0.5f;
        }
    }
}

static void ref_quant_inputs(const struct ll_case *c, struct inputs *in, int round_scale)
{
    if (in->qdone == 1 + round_scale) return;
    for (int t = 0; t < in->T; t++)
        for (int b = 0; b < c->H / 128; b++) {
            const uint16_t *x = in->x + (size_t)t * c->H + b * 128;
            float amax = 0;
            for (int i = 0; i < 128; i++)
                amax = fmaxf(amax, fabsf(ref_bf16_value(x[i])));
            float s = fmaxf(amax, 1e-4f) / 448.0f;
            if (round_scale) {
                int ex;
                if (frexpf(s, &ex) != 0.5f) s = ldexpf(1.0f, ex);
            }
            in->qs[(size_t)t * (c->H / 128) + b] = s;
            for (int i = 0; i < 128; i++)
                in->q[(size_t)t * c->H + b * 128 + i] = ref_fp8_round(ref_bf16_value(x[i]) / s);
        }
    in->qdone = 1 + round_scale;
}

/* The expert output for (source rank, token, global expert): a bf16 hash, |v| in [2^-3, 2^4). */
static uint16_t y_of(int s, int t, int e, int h)
{
    rng_t r = {((uint64_t)s << 48) ^ ((uint64_t)t << 32) ^ ((uint64_t)e << 16) ^ (uint64_t)h};
    return rand_bf16(&r, -3, 3);
}

struct ctx {
    const struct ll_case *c;
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

static void check_dispatch(struct ctx *cx, struct op_state *o)
{
    const struct ll_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H, k = c->k;
    size_t S = (size_t)c->M * R;
    for (int el = 0; el < L; el++) {
        int eg = cx->rank * L + el, n = 0;
        for (int s = 0; s < R; s++) {
            struct inputs *in = &o->in[s];
            int first = n;
            if (o->fp8) ref_quant_inputs(c, in, o->round_scale);
            for (int t = 0; t < in->T; t++) {
                int hit = 0;
                for (int j = 0; j < k; j++)
                    hit |= in->idx[(size_t)t * k + j] == eg;
                if (!hit) continue;
                size_t at = (size_t)el * S + (size_t)n;
                if (n < (int)S) {
                    CHECK(cx, o->out.recv_src_info[at] == t, "expert %d row %d: src %d, want %d",
                          eg, n, o->out.recv_src_info[at], t);
                    if (o->fp8) {
                        CHECK(cx,
                              !memcmp((uint8_t *)o->out.recv_x + at * H, in->q + (size_t)t * H,
                                      (size_t)H),
                              "expert %d row %d (rank %d token %d): fp8 bytes differ", eg, n, s, t);
                        CHECK(cx,
                              !memcmp(o->out.recv_scales + at * (H / 128),
                                      in->qs + (size_t)t * (H / 128), sizeof(float) * (H / 128)),
                              "expert %d row %d: scales differ", eg, n);
                    } else {
                        CHECK(cx,
                              !memcmp((uint16_t *)o->out.recv_x + at * H, in->x + (size_t)t * H,
                                      2 * (size_t)H),
                              "expert %d row %d (rank %d token %d): bf16 data differs", eg, n, s,
                              t);
                    }
                }
                n++;
            }
            const int32_t *rg = o->out.recv_range + ((size_t)el * R + s) * 2;
            CHECK(cx, rg[0] == first && rg[1] == n - first,
                  "expert %d from rank %d: range (%d, %d), want (%d, %d)", eg, s, rg[0], rg[1],
                  first, n - first);
        }
        CHECK(cx, o->out.recv_count[el] == n, "expert %d: count %d, want %d", eg,
              o->out.recv_count[el], n);
    }
}

/* Fills the expert outputs from what the dispatch says each row is. */
static void make_y(struct ctx *cx, struct op_state *o)
{
    const struct ll_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H;
    size_t S = (size_t)c->M * R;
    for (int el = 0; el < L; el++)
        for (int s = 0; s < R; s++) {
            const int32_t *rg = o->out.recv_range + ((size_t)el * R + s) * 2;
            for (int i = rg[0]; i < rg[0] + rg[1]; i++) {
                size_t at = (size_t)el * S + (size_t)i;
                for (int h = 0; h < H; h++)
                    o->y[at * H + h] = y_of(s, o->out.recv_src_info[at], cx->rank * L + el, h);
            }
        }
}

static void check_combine(struct ctx *cx, struct op_state *o)
{
    const struct ll_case *c = cx->c;
    struct inputs *in = &o->in[cx->rank];
    int H = c->H, k = c->k;
    for (int t = 0; t < in->T; t++)
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) {
                int e = in->idx[(size_t)t * k + j];
                if (e < 0) continue;
                volatile float p =
                    in->w[(size_t)t * k + j] * ref_bf16_value(y_of(cx->rank, t, e, h));
                acc = acc + p;
            }
            uint16_t want = ref_bf16_round(acc);
            CHECK(cx, o->res[(size_t)t * H + h] == want, "token %d channel %d: %04x, want %04x", t,
                  h, o->res[(size_t)t * H + h], want);
        }
}

static int alloc_inputs(const struct ll_case *c, struct inputs *in)
{
    size_t M = (size_t)c->M, H = (size_t)c->H, k = (size_t)c->k;
    in->x = malloc(M * H * 2 + 2);
    in->idx = malloc(M * k * 4 + 4);
    in->w = malloc(M * k * 4 + 4);
    in->q = malloc(M * H + 1);
    in->qs = malloc(M * (H / 128) * 4 + 4);
    return in->x && in->idx && in->w && in->q && in->qs;
}

static void free_inputs(struct inputs *in)
{
    free(in->x);
    free(in->idx);
    free(in->w);
    free(in->q);
    free(in->qs);
}

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

static int ll_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const struct ll_case *c = arg;
    struct ctx cx = {c, rank, 0};
    int R = c->R, L = c->E / R, rc = 0;
    size_t S = (size_t)c->M * R;
    ep_group_t *g = NULL;
    struct inputs in[2][EP_MAX_RANKS];
    struct op_state op[2];
    memset(in, 0, sizeof in);
    memset(op, 0, sizeof op);
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < R; s++)
            if (!alloc_inputs(c, &in[a][s])) return 1;
        op[a].in = in[a];
        op[a].y = malloc((size_t)L * S * c->H * 2);
        op[a].res = malloc((size_t)c->M * c->H * 2 + 2);
    }

    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.num_experts = c->E;
    cfg.hidden = c->H;
    cfg.num_topk = c->k;
    cfg.ll_max_tokens = c->M;
    cfg.timeout_ms = 30000;
    OPCHECK(NULL, ep_group_create(&cfg, bs, &g));
    rng_t pr = {mix(c->seed, 999)};                   /* the pattern: same on every rank */
    rng_t hr = {mix(c->seed, 1000 + (uint64_t)rank)}; /* hook choices: per rank */
    uint64_t opid = 0;
    for (int it = 0; it < c->iters; it++) {
        int nops = rng_int(&pr, 1, 2); /* 1: d c; 2: dA dB cA cB */
        for (int a = 0; a < nops; a++) {
            struct op_state *o = &op[a];
            for (int s = 0; s < R; s++)
                gen_inputs(c, opid, s, &o->in[s]);
            opid++;
            o->fp8 = c->fp8 == 2 ? rng_int(&pr, 0, 1) : c->fp8;
            o->round_scale = o->fp8 ? rng_int(&pr, 0, 1) : 0;
            int hook = c->hook == 2 ? rng_int(&hr, 0, 1) : c->hook;
            struct inputs *mine = &o->in[rank];
            ep_ll_dispatch_args_t da = {.x = mine->x,
                                        .num_tokens = mine->T,
                                        .topk_idx = mine->idx,
                                        .topk_weights = mine->w,
                                        .use_fp8 = o->fp8,
                                        .round_scale = o->round_scale,
                                        .use_hook = hook};
            o->hook = NULL;
            OPCHECK(g, ep_ll_dispatch(g, &da, &o->out, &o->handle, &o->hook));
            if (!hook && o->hook) CHECK(&cx, 0, "dispatch without hook returned a hook");
        }
        for (int a = 0; a < nops; a++)
            if (op[a].hook) OPCHECK(g, ep_hook_run(op[a].hook));
        for (int a = 0; a < nops; a++) {
            check_dispatch(&cx, &op[a]);
            make_y(&cx, &op[a]);
        }
        for (int a = 0; a < nops; a++) {
            struct op_state *o = &op[a];
            struct inputs *mine = &o->in[rank];
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
            check_combine(&cx, &op[a]);
    }
out:
    ep_group_destroy(g);
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < R; s++)
            free_inputs(&in[a][s]);
        free(op[a].y);
        free(op[a].res);
    }
    return rc || cx.failures;
}

static void run_case(const struct ll_case *c)
{
    printf("LL case: R=%d E=%d H=%d k=%d M=%d fp8=%d hook=%d iters=%d\n", c->R, c->E, c->H, c->k,
           c->M, c->fp8, c->hook, c->iters);
    assert_int_equal(run_ranks(c->R, ll_rank, (void *)c), 0);
}

static void ll_random_shapes(void **state)
{
    (void)state;
    rng_t r = {31};
    for (int i = 0; i < 14; i++) {
        struct ll_case c = {0};
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
        c.M = rng_int(&r, 1, mmax < 1 ? 1 : mmax > 64 ? 64 : mmax);
        c.hook = rng_int(&r, 0, 2);
        c.iters = 3;
        c.seed = rng_next(&r);
        run_case(&c);
    }
}

static void ll_deepep_shape(void **state)
{
    (void)state;
    struct ll_case c = {
        .R = 2, .E = 288, .H = 7168, .k = 8, .M = 128, .fp8 = 2, .hook = 2, .iters = 2, .seed = 77};
    run_case(&c);
}

static void ll_hundreds_of_steps(void **state)
{
    (void)state;
    struct ll_case c = {
        .R = 4, .E = 32, .H = 128, .k = 4, .M = 12, .fp8 = 2, .hook = 2, .iters = 300, .seed = 5};
    run_case(&c);
}

static void ll_eight_ranks_top8(void **state)
{
    (void)state;
    struct ll_case c = {
        .R = 8, .E = 256, .H = 256, .k = 8, .M = 24, .fp8 = 2, .hook = 2, .iters = 20, .seed = 6};
    run_case(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ll_random_shapes),
        cmocka_unit_test(ll_deepep_shape),
        cmocka_unit_test(ll_hundreds_of_steps),
        cmocka_unit_test(ll_eight_ranks_top8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
