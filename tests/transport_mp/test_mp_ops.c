/* LL and HT ops of the cpu backend over the tcp wire, one forked process per rank, against a
 * naive reference that every process computes for its own rank from all ranks' inputs (each
 * process generates every rank's inputs from the shared seed). Random shapes, fp8 (with and
 * without round_scale) and bf16, hook and no hook, both LL buffers in alternation, HT layout,
 * dispatch with alignment, cached dispatch and combine, tens of steps per world; bit-exact. */
#include "harness.h"
#include "mp_world.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

struct mp_case {
    int R, E, H, k;
    int ll_M, ht_M; /* per-rank token bounds; 0 disables the mode */
    int fp8;        /* 0: bf16 only, 1: fp8 only, 2: random per op */
    int hook;       /* 0: never, 1: always, 2: random per op and rank */
    int steps;
    uint64_t seed;
};

/* Values of all bf16 patterns (ref_bf16_value, tabulated once in the parent before fork). */
static float bf16_val[65536];

static uint64_t mix(uint64_t a, uint64_t b)
{
    rng_t r = {a * 0x100000001b3ull ^ b};
    return rng_next(&r);
}

/* ---- inputs, identical in every process ------------------------------------------------- */

/* Routing of T tokens: k distinct experts or -1 per token, some tokens with no expert at all. */
static void gen_routing(rng_t *r, const struct mp_case *c, int T, int32_t *idx, float *w, float wlo,
                        float wspan)
{
    for (int t = 0; t < T; t++) {
        int none = rng_int(r, 0, 9) == 0;
        for (int j = 0; j < c->k; j++) {
            int32_t e = -1;
            if (!none && rng_int(r, 0, 6)) {
                for (;;) {
                    e = rng_int(r, 0, c->E - 1);
                    int dup = 0;
                    for (int i = 0; i < j; i++)
                        dup |= idx[(size_t)t * c->k + i] == e;
                    if (!dup) break;
                }
            }
            idx[(size_t)t * c->k + j] = e;
            w[(size_t)t * c->k + j] = wlo + rng_float(r) * wspan;
        }
    }
}

/* Token count of rank s for op `op`: 0..max, and always 0 on one rank of every R + 1 ops. */
static int gen_tokens(rng_t *r, const struct mp_case *c, uint64_t op, int s, int max)
{
    if ((uint64_t)s == op % (uint64_t)(c->R + 1)) return 0;
    return rng_int(r, 0, 3) == 0 ? 0 : rng_int(r, 0, max);
}

struct ll_in {
    int T;
    uint16_t *x;    /* [M][H] bf16 */
    int32_t *idx;   /* [M][k] */
    float *w;       /* [M][k] */
    uint8_t *q;     /* [M][H] reference fp8 of x */
    float *qs;      /* [M][H/128] reference scales */
    uint8_t *qmode; /* [M] 0: not quantised yet, else 1 + round_scale */
};

static void gen_ll(const struct mp_case *c, uint64_t op, int s, struct ll_in *in)
{
    rng_t r = {mix(c->seed, op * 64 + (uint64_t)s)};
    in->T = gen_tokens(&r, c, op, s, c->ll_M);
    for (int t = 0; t < in->T; t++) {
        int emin = rng_int(&r, -12, 2);
        for (int h = 0; h < c->H; h++)
            in->x[(size_t)t * c->H + h] = rand_bf16(&r, emin, emin + 6);
        in->qmode[t] = 0;
    }
    gen_routing(&r, c, in->T, in->idx, in->w, -0.5f, 2.0f);
}

/* The test's own per-128-channel quantisation of token t: scale = max(amax, 1e-4) / 448,
 * rounded up to a power of two with round_scale; q = e4m3(x / scale), RNE, saturating. */
static void ref_quant_token(const struct mp_case *c, struct ll_in *in, int t, int round_scale)
{
    if (in->qmode[t] == 1 + round_scale) return;
    for (int b = 0; b < c->H / 128; b++) {
        const uint16_t *x = in->x + (size_t)t * c->H + b * 128;
        float amax = 0;
        for (int i = 0; i < 128; i++)
            amax = fmaxf(amax, fabsf(bf16_val[x[i]]));
        float s = fmaxf(amax, 1e-4f) / 448.0f;
        if (round_scale) {
            int ex;
            if (frexpf(s, &ex) != 0.5f) s = ldexpf(1.0f, ex);
        }
        in->qs[(size_t)t * (c->H / 128) + b] = s;
        for (int i = 0; i < 128; i++)
            in->q[(size_t)t * c->H + b * 128 + i] = ref_fp8_round(bf16_val[x[i]] / s);
    }
    in->qmode[t] = (uint8_t)(1 + round_scale);
}

struct ht_in {
    int T, fp8, align, no_weights;
    uint8_t *x, *x2; /* [M][H] fp8 or [M][H] bf16; x2: the cached dispatch's data */
    float *xs, *xs2; /* [M][H/128] */
    int32_t *idx;    /* [M][k] */
    float *w;        /* [M][k] */
};

static void gen_ht(const struct mp_case *c, uint64_t op, int s, struct ht_in *in)
{
    rng_t pr = {mix(c->seed, op * 64 + 63)}; /* the op's format: the same for every rank */
    rng_t r = {mix(c->seed, op * 64 + (uint64_t)s)};
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

/* ---- checks -------------------------------------------------------------------------------- */

struct ctx {
    const struct mp_case *c;
    int rank, failures;
    uint64_t op;
};

#define CHECK(cx, cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond) && (cx)->failures++ < 8) {                                                     \
            fprintf(stderr, "rank %d op %llu: %s:%d: ", (cx)->rank, (unsigned long long)(cx)->op,  \
                    __FILE__, __LINE__);                                                           \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

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

/* Expert output for (source rank, token, global expert, channel): |v| in [2^-12, 2^13), wide
 * enough that the weighted sum rounds differently in another slot order. */
static uint16_t ll_y(int s, int t, int e, int h)
{
    rng_t r = {((uint64_t)s << 48) ^ ((uint64_t)t << 32) ^ ((uint64_t)e << 16) ^ (uint64_t)h};
    return rand_bf16(&r, -12, 12);
}

/* HT row that rank r sends back for (source rank s, token t, channel h). Exponents span more
 * than fp32's 24 bits of mantissa, so that a sum of copies rounds and its order shows. */
static uint16_t ht_y(int r, int s, int t, int h)
{
    rng_t g = {((uint64_t)r << 56) ^ ((uint64_t)s << 48) ^ ((uint64_t)t << 24) ^ (uint64_t)h};
    return rand_bf16(&g, -16, 16);
}

struct ll_op {
    struct ll_in *in; /* [R] */
    int fp8, round_scale;
    ep_ll_dispatch_out_t out;
    ep_ll_handle_t *handle;
    ep_hook_t *hook;
    uint16_t *y;   /* [L][S][H] expert outputs */
    uint16_t *res; /* [M][H] combine result */
};

static void check_ll_dispatch(struct ctx *cx, struct ll_op *o)
{
    const struct mp_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H, k = c->k, nsc = H / 128;
    size_t S = (size_t)c->ll_M * R;
    for (int el = 0; el < L; el++) {
        int eg = cx->rank * L + el, n = 0;
        for (int s = 0; s < R; s++) {
            struct ll_in *in = &o->in[s];
            int first = n;
            for (int t = 0; t < in->T; t++) {
                int hit = 0;
                for (int j = 0; j < k; j++)
                    hit |= in->idx[(size_t)t * k + j] == eg;
                if (!hit) continue;
                size_t at = (size_t)el * S + (size_t)n++;
                if (n > (int)S) continue;
                CHECK(cx, o->out.recv_src_info[at] == t, "expert %d row %zu: src %d, want %d", eg,
                      at, o->out.recv_src_info[at], t);
                if (o->fp8) {
                    ref_quant_token(c, in, t, o->round_scale);
                    CHECK(cx,
                          !memcmp((uint8_t *)o->out.recv_x + at * H, in->q + (size_t)t * H,
                                  (size_t)H),
                          "expert %d (rank %d token %d): fp8 bytes differ", eg, s, t);
                    CHECK(cx,
                          !memcmp(o->out.recv_scales + at * nsc, in->qs + (size_t)t * nsc,
                                  sizeof(float) * nsc),
                          "expert %d (rank %d token %d): scales differ (round_scale %d)", eg, s, t,
                          o->round_scale);
                } else {
                    CHECK(cx,
                          !memcmp((uint16_t *)o->out.recv_x + at * H, in->x + (size_t)t * H,
                                  2 * (size_t)H),
                          "expert %d (rank %d token %d): bf16 row differs", eg, s, t);
                }
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

/* Expert outputs from what the dispatch says each row is (checked above). */
static void make_ll_y(struct ctx *cx, struct ll_op *o)
{
    const struct mp_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H;
    size_t S = (size_t)c->ll_M * R;
    for (int el = 0; el < L; el++)
        for (int s = 0; s < R; s++) {
            const int32_t *rg = o->out.recv_range + ((size_t)el * R + s) * 2;
            for (int i = rg[0]; i < rg[0] + rg[1] && i < (int)S; i++) {
                size_t at = (size_t)el * S + (size_t)i;
                for (int h = 0; h < H; h++)
                    o->y[at * H + h] = ll_y(s, o->out.recv_src_info[at], cx->rank * L + el, h);
            }
        }
}

/* out[t][h] = bf16(sum over slots j in order, skipping -1, of w[t][j] * y): fp32 products and
 * sums, never fused, rounded once (the contract of weighted_sum_ref.h). */
static void check_ll_combine(struct ctx *cx, struct ll_op *o)
{
    const struct mp_case *c = cx->c;
    struct ll_in *in = &o->in[cx->rank];
    int H = c->H, k = c->k;
    for (int t = 0; t < in->T; t++)
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) {
                int e = in->idx[(size_t)t * k + j];
                if (e < 0) continue;
                volatile float p = in->w[(size_t)t * k + j] * bf16_val[ll_y(cx->rank, t, e, h)];
                acc = acc + p;
            }
            uint16_t want = ref_bf16_round(acc);
            CHECK(cx, o->res[(size_t)t * H + h] == want,
                  "combine token %d channel %d: %04x, want %04x", t, h, o->res[(size_t)t * H + h],
                  want);
        }
}

static int ht_in_rank(const struct mp_case *c, const int32_t *idx, int r)
{
    int L = c->E / c->R;
    for (int j = 0; j < c->k; j++)
        if (idx[j] >= 0 && idx[j] / L == r) return 1;
    return 0;
}

static void check_ht_layout(struct ctx *cx, const struct ht_in *in, const ep_ht_layout_t *lay)
{
    const struct mp_case *c = cx->c;
    for (int r = 0; r < c->R; r++) {
        int n = 0;
        for (int t = 0; t < in->T; t++) {
            int want = ht_in_rank(c, in->idx + (size_t)t * c->k, r);
            n += want;
            CHECK(cx, lay->is_token_in_rank[(size_t)t * c->R + r] == want,
                  "is_token_in_rank[%d][%d] = %d, want %d", t, r,
                  lay->is_token_in_rank[(size_t)t * c->R + r], want);
        }
        CHECK(cx, lay->num_tokens_per_rank[r] == n, "tokens to rank %d: %d, want %d", r,
              lay->num_tokens_per_rank[r], n);
    }
    for (int e = 0; e < c->E; e++) {
        int n = 0;
        for (size_t i = 0; i < (size_t)in->T * c->k; i++)
            n += in->idx[i] == e;
        CHECK(cx, lay->num_tokens_per_expert[e] == n, "tokens of expert %d: %d, want %d", e,
              lay->num_tokens_per_expert[e], n);
    }
}

/* Received rows of data set 1 or 2; with full also ids, weights and per-expert counts. */
static void check_ht_dispatch(struct ctx *cx, const struct ht_in *all,
                              const ep_ht_dispatch_out_t *o, int set, int full)
{
    const struct mp_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H, k = c->k, me = cx->rank, n = 0, fp8 = all[0].fp8;
    size_t row = fp8 ? (size_t)H : 2 * (size_t)H, nsc = (size_t)H / 128;
    int cnt[64] = {0};
    for (int s = 0; s < R; s++) {
        const struct ht_in *in = &all[s];
        for (int t = 0; t < in->T; t++) {
            const int32_t *idx = in->idx + (size_t)t * k;
            if (!ht_in_rank(c, idx, me)) continue;
            if (n >= o->capacity) {
                n++;
                continue;
            }
            const uint8_t *x = (set == 1 ? in->x : in->x2) + (size_t)t * row;
            const float *xs = (set == 1 ? in->xs : in->xs2) + (size_t)t * nsc;
            CHECK(cx, !memcmp((const uint8_t *)o->recv_x + (size_t)n * row, x, row),
                  "HT row %d (rank %d token %d, set %d): data differs", n, s, t, set);
            if (fp8)
                CHECK(cx, !memcmp(o->recv_scales + (size_t)n * nsc, xs, nsc * 4),
                      "HT row %d (rank %d token %d, set %d): scales differ", n, s, t, set);
            for (int j = 0; full && j < k; j++) {
                int local = idx[j] >= 0 && idx[j] / L == me;
                int want = local ? idx[j] - me * L : -1;
                float ww = local && !in->no_weights ? in->w[(size_t)t * k + j] : 0.0f;
                CHECK(cx, o->recv_topk_idx[(size_t)n * k + j] == want,
                      "HT row %d slot %d: id %d, want %d", n, j,
                      o->recv_topk_idx[(size_t)n * k + j], want);
                CHECK(cx, o->recv_topk_weights[(size_t)n * k + j] == ww,
                      "HT row %d slot %d: weight %g, want %g", n, j,
                      o->recv_topk_weights[(size_t)n * k + j], ww);
                if (local) cnt[want]++;
            }
            n++;
        }
    }
    CHECK(cx, o->num_recv_tokens == n, "HT received %d rows, want %d", o->num_recv_tokens, n);
    if (!full) return;
    int a = all[me].align > 1 ? all[me].align : 1;
    for (int e = 0; e < L; e++) {
        int want = (cnt[e] + a - 1) / a * a;
        CHECK(cx, o->num_recv_per_expert[e] == want, "HT expert %d: %d rows, want %d (align %d)", e,
              o->num_recv_per_expert[e], want, a);
    }
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

static int alloc_state(const struct mp_case *c, struct rank_state *st)
{
    size_t H = (size_t)c->H, k = (size_t)c->k, R = (size_t)c->R, L = (size_t)(c->E / c->R);
    size_t M = (size_t)c->ll_M, S = M * R, N = (size_t)c->ht_M * R, HM = (size_t)c->ht_M;
    int ok = 1;
    for (int a = 0; a < 2; a++) {
        for (size_t s = 0; s < R; s++) {
            struct ll_in *in = &st->ll[a][s];
            ok &= (in->x = malloc(M * H * 2 + 2)) != NULL;
            ok &= (in->idx = malloc(M * k * 4 + 4)) != NULL;
            ok &= (in->w = malloc(M * k * 4 + 4)) != NULL;
            ok &= (in->q = malloc(M * H + 1)) != NULL;
            ok &= (in->qs = malloc(M * (H / 128) * 4 + 4)) != NULL;
            ok &= (in->qmode = malloc(M + 1)) != NULL;
        }
        st->op[a].in = st->ll[a];
        ok &= (st->op[a].y = malloc(L * S * H * 2 + 2)) != NULL;
        ok &= (st->op[a].res = malloc(M * H * 2 + 2)) != NULL;
    }
    for (size_t s = 0; s < R; s++) {
        struct ht_in *in = &st->ht[s];
        ok &= (in->x = malloc(HM * H * 2 + 1)) != NULL;
        ok &= (in->x2 = malloc(HM * H * 2 + 1)) != NULL;
        ok &= (in->xs = malloc(HM * (H / 128) * 4 + 4)) != NULL;
        ok &= (in->xs2 = malloc(HM * (H / 128) * 4 + 4)) != NULL;
        ok &= (in->idx = malloc(HM * k * 4 + 4)) != NULL;
        ok &= (in->w = malloc(HM * k * 4 + 4)) != NULL;
    }
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

static void free_state(const struct mp_case *c, struct rank_state *st)
{
    for (int a = 0; a < 2; a++) {
        for (int s = 0; s < c->R; s++) {
            struct ll_in *in = &st->ll[a][s];
            free(in->x);
            free(in->idx);
            free(in->w);
            free(in->q);
            free(in->qs);
            free(in->qmode);
        }
        free(st->op[a].y);
        free(st->op[a].res);
    }
    for (int s = 0; s < c->R; s++) {
        free(st->ht[s].x);
        free(st->ht[s].x2);
        free(st->ht[s].xs);
        free(st->ht[s].xs2);
        free(st->ht[s].idx);
        free(st->ht[s].w);
    }
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
static int ll_step(struct ctx *pcx, ep_group_t *g, struct rank_state *st, int nops, rng_t *pr,
                   rng_t *hr, uint64_t *opid)
{
    struct ctx cx = *pcx;
    const struct mp_case *c = cx.c;
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
        CHECK(&cx, !hook == !o->hook, "dispatch with use_hook %d returned hook %p", hook,
              (void *)o->hook);
    }
    for (int a = 0; a < nops; a++)
        if (st->op[a].hook) OPCHECK(g, ep_hook_run(st->op[a].hook));
    for (int a = 0; a < nops; a++) {
        check_ll_dispatch(&cx, &st->op[a]);
        make_ll_y(&cx, &st->op[a]);
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
        CHECK(&cx, !hook == !o->hook, "combine with use_hook %d returned hook %p", hook,
              (void *)o->hook);
    }
    for (int a = 0; a < nops; a++)
        if (st->op[a].hook) OPCHECK(g, ep_hook_run(st->op[a].hook));
    for (int a = 0; a < nops; a++)
        check_ll_combine(&cx, &st->op[a]);
out:
    pcx->failures = cx.failures;
    return rc;
}

/* One HT step: layout, dispatch, cached dispatch of a second data set, combine. */
static int ht_step(struct ctx *pcx, ep_group_t *g, struct rank_state *st, uint64_t *opid)
{
    struct ctx cx = *pcx;
    const struct mp_case *c = cx.c;
    int R = c->R, H = c->H, k = c->k, rc = 0;
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
    /* Row n (from rank s, token t) carries ht_y(me, s, t); out[t] is the sum of the copies in
     * rank order, fp32, rounded once. */
    int n = 0;
    for (int s = 0; s < R; s++)
        for (int t = 0; t < st->ht[s].T; t++)
            if (ht_in_rank(c, st->ht[s].idx + (size_t)t * k, cx.rank) && n < st->ho.capacity) {
                for (int h = 0; h < H; h++)
                    st->hy[(size_t)n * H + h] = ht_y(cx.rank, s, t, h);
                n++;
            }
    OPCHECK(g, ep_ht_combine(g, hd, st->hy, st->hres, NULL));
    for (int t = 0; t < mine->T; t++)
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int r = 0; r < R; r++)
                if (ht_in_rank(c, mine->idx + (size_t)t * k, r))
                    acc = acc + bf16_val[ht_y(r, cx.rank, t, h)];
            uint16_t want = ref_bf16_round(acc);
            CHECK(&cx, st->hres[(size_t)t * H + h] == want,
                  "HT combine token %d channel %d: %04x, want %04x", t, h,
                  st->hres[(size_t)t * H + h], want);
        }
out:
    ep_ht_handle_destroy(hd);
    pcx->failures = cx.failures;
    return rc;
}

static int ops_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    const struct mp_case *c = arg;
    struct ctx cx = {c, rank, 0, 0};
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
    mp_config(&cfg, c->E, c->H, c->k, c->ll_M, c->ht_M, 10000);
    OPCHECK(NULL, ep_group_create(&cfg, bs, &g));
    CHECK(&cx, ep_group_rank(g) == rank && ep_group_size(g) == nranks, "group says rank %d of %d",
          ep_group_rank(g), ep_group_size(g));
    if (c->ht_M)
        CHECK(&cx, ep_ht_max_recv_tokens(g) == c->ht_M * nranks, "ep_ht_max_recv_tokens %d",
              ep_ht_max_recv_tokens(g));
    rng_t pr = {mix(c->seed, 999)};                   /* the step pattern: the same everywhere */
    rng_t hr = {mix(c->seed, 1000 + (uint64_t)rank)}; /* hook choices: per rank */
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

static void run_case(const struct mp_case *c)
{
    int status[EP_MAX_RANKS];
    printf("case: R=%d E=%d H=%d k=%d ll_M=%d ht_M=%d fp8=%d hook=%d steps=%d\n", c->R, c->E, c->H,
           c->k, c->ll_M, c->ht_M, c->fp8, c->hook, c->steps);
    uint64_t t0 = mp_now_ms();
    int failed = mp_run(c->R, ops_rank, (void *)c, 20000, status);
    for (int r = 0; r < c->R; r++)
        if (status[r]) fprintf(stderr, "rank %d ended with status %d\n", r, status[r]);
    printf("  %llu ms\n", (unsigned long long)(mp_now_ms() - t0));
    assert_int_equal(failed, 0);
}

/* A random shape for R ranks: E in 8..64, H in 128..2048 (fp8 cases: a multiple of 128), top-k
 * 1..8, small token bounds so that the naive references stay quick. */
static struct mp_case random_case(int R, uint64_t seed, int steps)
{
    rng_t r = {seed};
    struct mp_case c = {.R = R, .steps = steps, .seed = rng_next(&r)};
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
        struct mp_case c = random_case(R, rng_next(&r), 30);
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

/* Fixed extremes: the largest hidden with top-8 and fp8 on every op, and a bf16 hidden that is
 * not a multiple of 128 with top-1. */
static void wide_rows_fp8(void **state)
{
    (void)state;
    struct mp_case c = {.R = 2,
                        .E = 16,
                        .H = 2048,
                        .k = 8,
                        .ll_M = 12,
                        .ht_M = 16,
                        .fp8 = 1,
                        .hook = 2,
                        .steps = 12,
                        .seed = 51};
    run_case(&c);
}

static void odd_hidden_bf16(void **state)
{
    (void)state;
    struct mp_case c = {.R = 3,
                        .E = 9,
                        .H = 200,
                        .k = 1,
                        .ll_M = 20,
                        .ht_M = 30,
                        .fp8 = 0,
                        .hook = 1,
                        .steps = 20,
                        .seed = 61};
    run_case(&c);
}

static void four_ranks_64_experts(void **state)
{
    (void)state;
    struct mp_case c = {.R = 4,
                        .E = 64,
                        .H = 256,
                        .k = 8,
                        .ll_M = 16,
                        .ht_M = 24,
                        .fp8 = 2,
                        .hook = 2,
                        .steps = 30,
                        .seed = 71};
    run_case(&c);
}

int main(void)
{
    for (int b = 0; b < 65536; b++)
        bf16_val[b] = ref_bf16_value((uint16_t)b);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(two_ranks),       cmocka_unit_test(three_ranks),
        cmocka_unit_test(four_ranks),      cmocka_unit_test(wide_rows_fp8),
        cmocka_unit_test(odd_hidden_bf16), cmocka_unit_test(four_ranks_64_experts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
