/* HT layout, dispatch, cached dispatch and combine of the cpu backend over a wire (layout and
 * protocol in cpu.h). Each token travels once per destination rank with its ids and weights;
 * received rows are ordered by (source rank, source token). Combine sends every received row
 * back to its source, which sums the copies of a token in rank order (weighted_sum_ref.h). */
#include "cpu.h"

#include "ht_layout_ref.h"
#include "weighted_sum_ref.h"

#include <stdlib.h>
#include <string.h>

struct ht_row_hdr {
    int32_t src_token;
    int32_t topk_idx[]; /* [k], then float weights[k] */
};

ep_status_t cpu_get_dispatch_layout(ep_group_t *g, const int32_t *topk_idx, int T,
                                    ep_ht_layout_t *layout, void *stream)
{
    ep_ht_layout_ref(topk_idx, T, g->cfg.num_topk, g->cfg.num_experts, g->nranks,
                     layout->num_tokens_per_rank, layout->num_tokens_per_expert,
                     layout->is_token_in_rank);
    return EP_OK;
}

static size_t ht_data_bytes(const ep_group_t *g, int fp8)
{
    size_t H = (size_t)g->cfg.hidden;
    return fp8 ? H + H / EP_FP8_BLOCK * sizeof(float) : 2 * H;
}

void cpu_ht_handle_destroy(ep_ht_handle_t *h)
{
    struct cpu_ht_handle *hh = (struct cpu_ht_handle *)h;
    if (!hh) return;
    free(hh->pos);
    free(hh->send_list);
    free(hh);
}

/* Puts the rows of this rank's tokens to their ranks and posts. With full, each row carries
 * its header (token, ids, weights); otherwise only the data (a cached dispatch). */
static ep_status_t ht_send(ep_group_t *g, const struct cpu_ht_handle *hh,
                           const ep_ht_dispatch_args_t *a, int full)
{
    struct cpu_impl *c = g->impl;
    struct cpu_chan *ch = &c->ch[CPU_CH_HT_DISP];
    const struct cpu_layout *lo = &c->lo;
    int R = g->nranks, k = g->cfg.num_topk, T = hh->num_tokens;
    size_t H = (size_t)g->cfg.hidden, nsc = H / EP_FP8_BLOCK;
    size_t data = ht_data_bytes(g, a->use_fp8);
    uint8_t *row = c->stage;
    ep_status_t st;

    cpu_chan_begin(ch);
    if ((st = cpu_chan_wait_free(g, ch))) return st;
    for (int t = 0; t < T; t++) {
        const int32_t *pos = hh->pos + (size_t)t * R;
        struct ht_row_hdr *h = (struct ht_row_hdr *)row;
        uint8_t *d = row + lo->ht_hdr;
        if (full) {
            float *w = (float *)(h->topk_idx + k);
            h->src_token = t;
            memcpy(h->topk_idx, a->topk_idx + (size_t)t * k, sizeof(int32_t) * (size_t)k);
            for (int j = 0; j < k; j++)
                w[j] = a->topk_weights ? a->topk_weights[(size_t)t * k + j] : 0.0f;
        }
        if (a->use_fp8) {
            memcpy(d, (const uint8_t *)a->x + (size_t)t * H, H);
            memcpy(d + H, a->x_scales + (size_t)t * nsc, nsc * sizeof(float));
        } else {
            memcpy(d, (const uint16_t *)a->x + (size_t)t * H, 2 * H);
        }
        for (int r = 0; r < R; r++) {
            if (pos[r] < 0) continue;
            size_t off = ch->data_off + (size_t)g->rank * lo->ht_slot + CPU_SLOT_HEADER +
                         (size_t)pos[r] * lo->ht_row;
            st = full ? cpu_put(g, r, off, row, lo->ht_hdr + data)
                      : cpu_put(g, r, off + lo->ht_hdr, d, data);
            if (st) return st;
        }
    }
    for (int r = 0; r < R; r++) {
        uint32_t n = (uint32_t)hh->send_cnt[r];
        if ((st = cpu_put(g, r, ch->data_off + (size_t)g->rank * lo->ht_slot, &n, sizeof n)))
            return st;
    }
    return cpu_chan_post(g, ch);
}

/* Reads the row counts of every source after the signals; checks them against the bound and,
 * for a cached dispatch, against the handle. */
static ep_status_t ht_counts(ep_group_t *g, const char *op, int32_t *cnt,
                             const struct cpu_ht_handle *expect)
{
    struct cpu_impl *c = g->impl;
    struct cpu_chan *ch = &c->ch[CPU_CH_HT_DISP];
    for (int s = 0; s < g->nranks; s++) {
        uint32_t n;
        memcpy(&n, c->buf + ch->data_off + (size_t)s * c->lo.ht_slot, sizeof n);
        if (n > (uint32_t)g->cfg.ht_max_tokens)
            return ep_group_fail(g, s, EP_ERR_PEER,
                                 "%s: rank %d sent %u rows, more than "
                                 "ht_max_tokens %d",
                                 op, s, n, g->cfg.ht_max_tokens);
        if (expect && (int32_t)n != expect->recv_cnt[s])
            return ep_group_fail(g, s, EP_ERR_PEER,
                                 "%s: rank %d sent %u rows, the handle's "
                                 "dispatch received %d from it (the ranks used different "
                                 "handles)",
                                 op, s, n, expect->recv_cnt[s]);
        cnt[s] = (int32_t)n;
    }
    return EP_OK;
}

/* Copies the received rows out: data always, ids/weights/counts when full. */
static void ht_unpack(ep_group_t *g, const struct cpu_ht_handle *hh, int use_fp8,
                      ep_ht_dispatch_out_t *out, int alignment, int full)
{
    struct cpu_impl *c = g->impl;
    struct cpu_chan *ch = &c->ch[CPU_CH_HT_DISP];
    const struct cpu_layout *lo = &c->lo;
    int R = g->nranks, L = g->num_local_experts, k = g->cfg.num_topk, first = g->rank * L;
    size_t H = (size_t)g->cfg.hidden, nsc = H / EP_FP8_BLOCK;

    if (full) memset(out->num_recv_per_expert, 0, sizeof(int32_t) * (size_t)L);
    for (int s = 0; s < R; s++) {
        const uint8_t *slot = c->buf + ch->data_off + (size_t)s * lo->ht_slot + CPU_SLOT_HEADER;
        for (int i = 0; i < hh->recv_cnt[s]; i++) {
            size_t n = (size_t)hh->recv_off[s] + (size_t)i;
            const uint8_t *row = slot + (size_t)i * lo->ht_row;
            const uint8_t *d = row + lo->ht_hdr;
            if (use_fp8) {
                memcpy((uint8_t *)out->recv_x + n * H, d, H);
                memcpy(out->recv_scales + n * nsc, d + H, nsc * sizeof(float));
            } else {
                memcpy((uint16_t *)out->recv_x + n * H, d, 2 * H);
            }
            if (!full) continue;
            const struct ht_row_hdr *h = (const struct ht_row_hdr *)row;
            const float *w = (const float *)(h->topk_idx + k);
            for (int j = 0; j < k; j++) {
                int e = h->topk_idx[j] - first;
                int local = h->topk_idx[j] >= 0 && e >= 0 && e < L;
                out->recv_topk_idx[n * k + j] = local ? e : -1;
                if (out->recv_topk_weights) out->recv_topk_weights[n * k + j] = local ? w[j] : 0.0f;
                if (local) out->num_recv_per_expert[e]++;
            }
        }
    }
    if (full && alignment > 1)
        for (int e = 0; e < L; e++)
            out->num_recv_per_expert[e] =
                (out->num_recv_per_expert[e] + alignment - 1) / alignment * alignment;
}

ep_status_t cpu_ht_dispatch(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                            ep_ht_dispatch_out_t *out, ep_ht_handle_t **handle)
{
    static const char op[] = "ep_ht_dispatch";
    struct cpu_impl *c = g->impl;
    int R = g->nranks, k = g->cfg.num_topk, T = a->num_tokens;
    ep_status_t st;

    struct cpu_ht_handle *hh = calloc(1, sizeof *hh);
    if (!hh) return ep_group_fail(g, -1, EP_ERR_NOMEM, "%s: out of memory for the handle", op);
    hh->base.group = g;
    hh->num_tokens = T;
    hh->pos = malloc(sizeof(int32_t) * ((size_t)T * R + 1));
    hh->send_list = malloc(sizeof(int32_t) * ((size_t)T * R + 1));
    if (!hh->pos || !hh->send_list) {
        cpu_ht_handle_destroy(&hh->base);
        return ep_group_fail(g, -1, EP_ERR_NOMEM,
                             "%s: out of memory for the handle of %d "
                             "tokens",
                             op, T);
    }
    for (int t = 0; t < T; t++) {
        uint64_t mask = cpu_dest_mask(g, a->topk_idx + (size_t)t * k);
        for (int r = 0; r < R; r++) {
            int32_t p = -1;
            if (mask >> r & 1) {
                p = hh->send_cnt[r]++;
                hh->send_list[(size_t)r * T + p] = t;
            }
            hh->pos[(size_t)t * R + r] = p;
        }
    }

    if ((st = ht_send(g, hh, a, 1))) goto fail;
    if ((st = cpu_chan_wait_all(g, &c->ch[CPU_CH_HT_DISP]))) goto fail;
    if ((st = ht_counts(g, op, hh->recv_cnt, NULL))) goto fail_release;
    for (int s = 0; s < R; s++) {
        hh->recv_off[s] = hh->num_recv;
        hh->num_recv += hh->recv_cnt[s];
    }
    if (hh->num_recv > out->capacity) {
        st = ep_group_fail(g, -1, EP_ERR_INVALID,
                           "%s: out->capacity %d is too small for the %d rows received (at "
                           "most ep_ht_max_recv_tokens() = %d)",
                           op, out->capacity, hh->num_recv, g->cfg.ht_max_tokens * R);
        goto fail_release;
    }
    ht_unpack(g, hh, a->use_fp8, out, a->expert_alignment, 1);
    out->num_recv_tokens = hh->num_recv;
    if ((st = cpu_chan_release(g, &c->ch[CPU_CH_HT_DISP]))) goto fail;
    *handle = &hh->base;
    return EP_OK;

fail_release:
    /* Let the senders go on: they must not wait for this rank's ack until the timeout. */
    cpu_chan_release(g, &c->ch[CPU_CH_HT_DISP]);
fail:
    cpu_ht_handle_destroy(&hh->base);
    return st;
}

ep_status_t cpu_ht_dispatch_cached(ep_group_t *g, const ep_ht_handle_t *h,
                                   const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out)
{
    static const char op[] = "ep_ht_dispatch_cached";
    struct cpu_impl *c = g->impl;
    const struct cpu_ht_handle *hh = (const struct cpu_ht_handle *)h;
    int32_t cnt[EP_MAX_RANKS];
    ep_status_t st;

    if (a->num_tokens != hh->num_tokens)
        return ep_group_fail(g, -1, EP_ERR_INVALID,
                             "%s: num_tokens %d differs from the handle's dispatch (%d)", op,
                             a->num_tokens, hh->num_tokens);
    if (out->capacity < hh->num_recv)
        return ep_group_fail(g, -1, EP_ERR_INVALID,
                             "%s: out->capacity %d is too small for the handle's %d rows", op,
                             out->capacity, hh->num_recv);
    if ((st = ht_send(g, hh, a, 0))) return st;
    if ((st = cpu_chan_wait_all(g, &c->ch[CPU_CH_HT_DISP]))) return st;
    if ((st = ht_counts(g, op, cnt, hh))) {
        cpu_chan_release(g, &c->ch[CPU_CH_HT_DISP]);
        return st;
    }
    ht_unpack(g, hh, a->use_fp8, out, 0, 0);
    out->num_recv_tokens = hh->num_recv;
    return cpu_chan_release(g, &c->ch[CPU_CH_HT_DISP]);
}

ep_status_t cpu_ht_combine(ep_group_t *g, const ep_ht_handle_t *h, const uint16_t *x, uint16_t *out,
                           void *stream)
{
    static const char op[] = "ep_ht_combine";
    struct cpu_impl *c = g->impl;
    const struct cpu_ht_handle *hh = (const struct cpu_ht_handle *)h;
    struct cpu_chan *ch = &c->ch[CPU_CH_HT_COMB];
    int R = g->nranks;
    size_t H = (size_t)g->cfg.hidden;
    const uint16_t *rows[EP_MAX_RANKS];
    ep_status_t st;

    if (hh->num_recv > 0 && !x)
        return ep_group_fail(g, -1, EP_ERR_INVALID, "%s: x is NULL for %d received rows", op,
                             hh->num_recv);
    if (hh->num_tokens > 0 && !out)
        return ep_group_fail(g, -1, EP_ERR_INVALID, "%s: out is NULL for %d tokens", op,
                             hh->num_tokens);
    cpu_chan_begin(ch);
    if ((st = cpu_chan_wait_free(g, ch))) return st;
    /* The rows from one source are contiguous in x and in source order: one put per rank. */
    for (int s = 0; s < R; s++) {
        if (!hh->recv_cnt[s]) continue;
        if ((st = cpu_put(g, s, ch->data_off + (size_t)g->rank * c->lo.ht_comb_slot,
                          x + (size_t)hh->recv_off[s] * H, (size_t)hh->recv_cnt[s] * 2 * H)))
            return st;
    }
    if ((st = cpu_chan_post(g, ch))) return st;
    if ((st = cpu_chan_wait_all(g, ch))) return st;
    const uint16_t *region = (const uint16_t *)(c->buf + ch->data_off);
    for (int t = 0; t < hh->num_tokens; t++) {
        int n = 0;
        for (int r = 0; r < R; r++) {
            int32_t p = hh->pos[(size_t)t * R + r];
            if (p >= 0) rows[n++] = region + ((size_t)r * c->lo.ht_comb_slot) / 2 + (size_t)p * H;
        }
        ep_weighted_sum_bf16_ref(rows, NULL, n, (int)H, out + (size_t)t * H);
    }
    return cpu_chan_release(g, ch);
}
