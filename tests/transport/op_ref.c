/* Naive LL / HT references of the op tests (see op_ref.h). */
#include "op_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t rng_mix(uint64_t a, uint64_t b)
{
    rng_t r = {a * 0x100000001b3ull ^ b};
    return rng_next(&r);
}

void gen_routing(rng_t *r, const struct op_case *c, int T, int32_t *idx, float *w, float wlo,
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

/* ---- LL ------------------------------------------------------------------------------------ */

int ll_in_alloc(const struct op_case *c, struct ll_in *in)
{
    size_t M = (size_t)c->ll_M, H = (size_t)c->H, k = (size_t)c->k;
    int ok = 1;
    ok &= (in->x = malloc(M * H * 2 + 2)) != NULL;
    ok &= (in->idx = malloc(M * k * 4 + 4)) != NULL;
    ok &= (in->w = malloc(M * k * 4 + 4)) != NULL;
    ok &= (in->q = malloc(M * H + 1)) != NULL;
    ok &= (in->qs = malloc(M * (H / 128) * 4 + 4)) != NULL;
    ok &= (in->qmode = malloc(M + 1)) != NULL;
    return ok;
}

void ll_in_free(struct ll_in *in)
{
    free(in->x);
    free(in->idx);
    free(in->w);
    free(in->q);
    free(in->qs);
    free(in->qmode);
}

void ref_quant_token(const struct op_case *c, struct ll_in *in, int t, int round_scale)
{
    const float *bf16_val = ref_bf16_table();
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

uint16_t ref_ll_y(int s, int t, int e, int h, int emax)
{
    rng_t r = {((uint64_t)s << 48) ^ ((uint64_t)t << 32) ^ ((uint64_t)e << 16) ^ (uint64_t)h};
    return rand_bf16(&r, -emax, emax);
}

void check_ll_dispatch(struct op_ctx *cx, struct ll_op *o)
{
    const struct op_case *c = cx->c;
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
                OP_CHECK(cx, o->out.recv_src_info[at] == t, "expert %d row %zu: src %d, want %d",
                         eg, at, o->out.recv_src_info[at], t);
                if (o->fp8) {
                    ref_quant_token(c, in, t, o->round_scale);
                    OP_CHECK(cx,
                             !memcmp((uint8_t *)o->out.recv_x + at * H, in->q + (size_t)t * H,
                                     (size_t)H),
                             "expert %d (rank %d token %d): fp8 bytes differ", eg, s, t);
                    OP_CHECK(cx,
                             !memcmp(o->out.recv_scales + at * nsc, in->qs + (size_t)t * nsc,
                                     sizeof(float) * nsc),
                             "expert %d (rank %d token %d): scales differ (round_scale %d)", eg, s,
                             t, o->round_scale);
                } else {
                    OP_CHECK(cx,
                             !memcmp((uint16_t *)o->out.recv_x + at * H, in->x + (size_t)t * H,
                                     2 * (size_t)H),
                             "expert %d (rank %d token %d): bf16 row differs", eg, s, t);
                }
            }
            const int32_t *rg = o->out.recv_range + ((size_t)el * R + s) * 2;
            OP_CHECK(cx, rg[0] == first && rg[1] == n - first,
                     "expert %d from rank %d: range (%d, %d), want (%d, %d)", eg, s, rg[0], rg[1],
                     first, n - first);
        }
        OP_CHECK(cx, o->out.recv_count[el] == n, "expert %d: count %d, want %d", eg,
                 o->out.recv_count[el], n);
    }
}

void make_ll_y(struct op_ctx *cx, struct ll_op *o, int emax)
{
    const struct op_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H;
    size_t S = (size_t)c->ll_M * R;
    for (int el = 0; el < L; el++)
        for (int s = 0; s < R; s++) {
            const int32_t *rg = o->out.recv_range + ((size_t)el * R + s) * 2;
            for (int i = rg[0]; i < rg[0] + rg[1] && i < (int)S; i++) {
                size_t at = (size_t)el * S + (size_t)i;
                for (int h = 0; h < H; h++)
                    o->y[at * H + h] =
                        ref_ll_y(s, o->out.recv_src_info[at], cx->rank * L + el, h, emax);
            }
        }
}

void check_ll_combine(struct op_ctx *cx, struct ll_op *o, int emax)
{
    const float *bf16_val = ref_bf16_table();
    const struct op_case *c = cx->c;
    struct ll_in *in = &o->in[cx->rank];
    int H = c->H, k = c->k;
    for (int t = 0; t < in->T; t++)
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) {
                int e = in->idx[(size_t)t * k + j];
                if (e < 0) continue;
                volatile float p =
                    in->w[(size_t)t * k + j] * bf16_val[ref_ll_y(cx->rank, t, e, h, emax)];
                acc = acc + p;
            }
            uint16_t want = ref_bf16_round(acc);
            OP_CHECK(cx, o->res[(size_t)t * H + h] == want,
                     "combine token %d channel %d: %04x, want %04x", t, h,
                     o->res[(size_t)t * H + h], want);
        }
}

/* ---- HT ------------------------------------------------------------------------------------ */

int ht_in_alloc(const struct op_case *c, struct ht_in *in)
{
    size_t M = (size_t)c->ht_M, H = (size_t)c->H, k = (size_t)c->k;
    int ok = 1;
    ok &= (in->x = malloc(M * H * 2 + 1)) != NULL;
    ok &= (in->x2 = malloc(M * H * 2 + 1)) != NULL;
    ok &= (in->xs = malloc(M * (H / 128) * 4 + 4)) != NULL;
    ok &= (in->xs2 = malloc(M * (H / 128) * 4 + 4)) != NULL;
    ok &= (in->idx = malloc(M * k * 4 + 4)) != NULL;
    ok &= (in->w = malloc(M * k * 4 + 4)) != NULL;
    return ok;
}

void ht_in_free(struct ht_in *in)
{
    free(in->x);
    free(in->x2);
    free(in->xs);
    free(in->xs2);
    free(in->idx);
    free(in->w);
}

int ht_in_rank(const struct op_case *c, const int32_t *idx, int r)
{
    int L = c->E / c->R;
    for (int j = 0; j < c->k; j++)
        if (idx[j] >= 0 && idx[j] / L == r) return 1;
    return 0;
}

uint16_t ref_ht_y(int r, int s, int t, int h, int emax)
{
    rng_t g = {((uint64_t)r << 56) ^ ((uint64_t)s << 48) ^ ((uint64_t)t << 24) ^ (uint64_t)h};
    return rand_bf16(&g, -emax, emax);
}

void check_ht_layout(struct op_ctx *cx, const struct ht_in *in, const ep_ht_layout_t *lay)
{
    const struct op_case *c = cx->c;
    for (int r = 0; r < c->R; r++) {
        int n = 0;
        for (int t = 0; t < in->T; t++) {
            int want = ht_in_rank(c, in->idx + (size_t)t * c->k, r);
            n += want;
            OP_CHECK(cx, lay->is_token_in_rank[(size_t)t * c->R + r] == want,
                     "is_token_in_rank[%d][%d] = %d, want %d", t, r,
                     lay->is_token_in_rank[(size_t)t * c->R + r], want);
        }
        OP_CHECK(cx, lay->num_tokens_per_rank[r] == n, "tokens to rank %d: %d, want %d", r,
                 lay->num_tokens_per_rank[r], n);
    }
    for (int e = 0; e < c->E; e++) {
        int n = 0;
        for (size_t i = 0; i < (size_t)in->T * c->k; i++)
            n += in->idx[i] == e;
        OP_CHECK(cx, lay->num_tokens_per_expert[e] == n, "tokens of expert %d: %d, want %d", e,
                 lay->num_tokens_per_expert[e], n);
    }
}

void check_ht_dispatch(struct op_ctx *cx, const struct ht_in *all, const ep_ht_dispatch_out_t *o,
                       int set, int full)
{
    const struct op_case *c = cx->c;
    int R = c->R, L = c->E / R, H = c->H, k = c->k, me = cx->rank, n = 0, fp8 = all[0].fp8;
    size_t row = fp8 ? (size_t)H : 2 * (size_t)H, nsc = (size_t)H / 128;
    int cnt[1024] = {0};
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
            OP_CHECK(cx, !memcmp((const uint8_t *)o->recv_x + (size_t)n * row, x, row),
                     "HT row %d (rank %d token %d, set %d): data differs", n, s, t, set);
            if (fp8)
                OP_CHECK(cx, !memcmp(o->recv_scales + (size_t)n * nsc, xs, nsc * 4),
                         "HT row %d (rank %d token %d, set %d): scales differ", n, s, t, set);
            for (int j = 0; full && j < k; j++) {
                int local = idx[j] >= 0 && idx[j] / L == me;
                int want = local ? idx[j] - me * L : -1;
                float ww = local && !in->no_weights ? in->w[(size_t)t * k + j] : 0.0f;
                OP_CHECK(cx, o->recv_topk_idx[(size_t)n * k + j] == want,
                         "HT row %d slot %d: id %d, want %d", n, j,
                         o->recv_topk_idx[(size_t)n * k + j], want);
                OP_CHECK(cx, o->recv_topk_weights[(size_t)n * k + j] == ww,
                         "HT row %d slot %d: weight %g, want %g", n, j,
                         o->recv_topk_weights[(size_t)n * k + j], ww);
                if (local) cnt[want]++;
            }
            n++;
        }
    }
    OP_CHECK(cx, o->num_recv_tokens == n, "HT received %d rows, want %d", o->num_recv_tokens, n);
    if (!full) return;
    int a = all[me].align > 1 ? all[me].align : 1;
    for (int e = 0; e < L; e++) {
        int want = (cnt[e] + a - 1) / a * a;
        OP_CHECK(cx, o->num_recv_per_expert[e] == want, "HT expert %d: %d rows, want %d (align %d)",
                 e, o->num_recv_per_expert[e], want, a);
    }
}

void make_ht_y(struct op_ctx *cx, const struct ht_in *all, int capacity, uint16_t *y, int emax)
{
    const struct op_case *c = cx->c;
    int R = c->R, H = c->H, k = c->k, n = 0;
    for (int s = 0; s < R; s++)
        for (int t = 0; t < all[s].T; t++)
            if (ht_in_rank(c, all[s].idx + (size_t)t * k, cx->rank) && n < capacity) {
                for (int h = 0; h < H; h++)
                    y[(size_t)n * H + h] = ref_ht_y(cx->rank, s, t, h, emax);
                n++;
            }
}

void check_ht_combine(struct op_ctx *cx, const struct ht_in *mine, const uint16_t *res, int emax)
{
    const float *bf16_val = ref_bf16_table();
    const struct op_case *c = cx->c;
    int R = c->R, H = c->H, k = c->k;
    for (int t = 0; t < mine->T; t++)
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int r = 0; r < R; r++)
                if (ht_in_rank(c, mine->idx + (size_t)t * k, r))
                    acc = acc + bf16_val[ref_ht_y(r, cx->rank, t, h, emax)];
            uint16_t want = ref_bf16_round(acc);
            OP_CHECK(cx, res[(size_t)t * H + h] == want,
                     "HT combine token %d channel %d: %04x, want %04x", t, h,
                     res[(size_t)t * H + h], want);
        }
}
