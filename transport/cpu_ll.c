/* LL dispatch and combine of the cpu backend over a wire (layout and protocol in cpu.h).
 *
 * Dispatch sends each token once per destination rank (with its src token index and its
 * top-k ids); the receiver fans the row out to its local experts, rows of an expert ordered
 * by (source rank, source token index). Combine sends each (token, slot) expert output back
 * to the token's rank, which sums them in slot order (weighted_sum_ref.h). */
#include "cpu.h"

#include "fp8_quant_ref.h"
#include "weighted_sum_ref.h"

#include <string.h>

struct ll_row_hdr {
    int32_t src_token;
    int32_t topk_idx[]; /* [k] */
};

static size_t ll_data_bytes(const ep_group_t *g, int fp8)
{
    size_t H = (size_t)g->cfg.hidden;
    return fp8 ? H + H / EP_FP8_BLOCK * sizeof(float) : 2 * H;
}

static ep_status_t ll_dispatch_recv(ep_group_t *g, int b)
{
    struct cpu_impl *c = g->impl;
    struct cpu_ll_buf *B = &c->ll[b];
    struct cpu_chan *ch = &c->ch[CPU_CH_LL_DISP0 + b];
    const struct cpu_layout *lo = &c->lo;
    int R = g->nranks, L = g->num_local_experts, k = g->cfg.num_topk;
    size_t H = (size_t)g->cfg.hidden, S = (size_t)g->cfg.ll_max_tokens * R;
    size_t nsc = H / EP_FP8_BLOCK, xrow = B->disp_fp8 ? H : 2 * H;
    int first = g->rank * L;
    ep_status_t st;

    B->hook.pending = 0;
    if ((st = cpu_chan_wait_all(g, ch))) return st;
    memset(B->recv_count, 0, sizeof(int32_t) * (size_t)L);
    for (int s = 0; s < R; s++) {
        const uint8_t *slot = c->buf + ch->data_off + (size_t)s * lo->ll_slot;
        uint32_t n;
        memcpy(&n, slot, sizeof n);
        if (n > (uint32_t)g->cfg.ll_max_tokens)
            return ep_group_fail(g, s, EP_ERR_PEER,
                                 "rank %d: rank %d sent %u LL rows, more than "
                                 "ll_max_tokens %d",
                                 g->rank, s, n, g->cfg.ll_max_tokens);
        for (int e = 0; e < L; e++)
            B->recv_range[((size_t)e * R + s) * 2] = B->recv_count[e];
        for (uint32_t i = 0; i < n; i++) {
            const uint8_t *row = slot + CPU_SLOT_HEADER + (size_t)i * lo->ll_row;
            const struct ll_row_hdr *h = (const struct ll_row_hdr *)row;
            const uint8_t *data = row + lo->ll_hdr;
            for (int j = 0; j < k; j++) {
                int e = h->topk_idx[j] - first;
                if (h->topk_idx[j] < 0 || e < 0 || e >= L) continue;
                size_t at = (size_t)e * S + (size_t)B->recv_count[e]++;
                if (B->disp_fp8) {
                    memcpy((uint8_t *)B->recv_x + at * xrow, data, H);
                    memcpy(B->recv_scales + at * nsc, data + H, nsc * sizeof(float));
                } else {
                    memcpy((uint8_t *)B->recv_x + at * xrow, data, 2 * H);
                }
                B->recv_src_info[at] = h->src_token;
                B->row_src[at] = s;
                B->row_slot[at] = j;
            }
        }
        for (int e = 0; e < L; e++) {
            int32_t *rg = &B->recv_range[((size_t)e * R + s) * 2];
            rg[1] = B->recv_count[e] - rg[0];
        }
    }
    if ((st = cpu_chan_release(g, ch))) return st;
    B->handle.valid = 1;
    return EP_OK;
}

ep_status_t cpu_ll_dispatch(ep_group_t *g, int b, const ep_ll_dispatch_args_t *a,
                            ep_ll_dispatch_out_t *out, ep_ll_handle_t **handle, ep_hook_t **hook)
{
    struct cpu_impl *c = g->impl;
    struct cpu_ll_buf *B = &c->ll[b];
    struct cpu_chan *ch = &c->ch[CPU_CH_LL_DISP0 + b];
    const struct cpu_layout *lo = &c->lo;
    int R = g->nranks, k = g->cfg.num_topk, T = a->num_tokens;
    size_t H = (size_t)g->cfg.hidden;
    uint32_t cnt[EP_MAX_RANKS] = {0};
    ep_status_t st;

    if (B->hook.pending)
        return ep_group_fail(g, -1, EP_ERR_STATE,
                             "ep_ll_dispatch: LL buffer %d still has a pending hook (run the "
                             "hook of an LL op before the op after next)",
                             b);

    /* From here on the op has side effects on every rank. */
    B->handle.valid = 0;
    B->disp_fp8 = a->use_fp8 != 0;
    B->disp_tokens = T;
    if (T) memcpy(B->disp_topk, a->topk_idx, sizeof(int32_t) * (size_t)T * k);
    cpu_chan_begin(ch);
    if ((st = cpu_chan_wait_free(g, ch))) return st;

    size_t row_used = lo->ll_hdr + ll_data_bytes(g, a->use_fp8);
    uint8_t *row = c->stage;
    for (int t = 0; t < T; t++) {
        const int32_t *idx = a->topk_idx + (size_t)t * k;
        uint64_t mask = cpu_dest_mask(g, idx);
        if (!mask) continue;
        struct ll_row_hdr *h = (struct ll_row_hdr *)row;
        h->src_token = t;
        memcpy(h->topk_idx, idx, sizeof(int32_t) * (size_t)k);
        const uint16_t *x = a->x + (size_t)t * H;
        uint8_t *data = row + lo->ll_hdr;
        if (a->use_fp8)
            ep_fp8_quant_row_ref(x, (int)H, a->round_scale, data, (float *)(data + H));
        else
            memcpy(data, x, 2 * H);
        for (int r = 0; r < R; r++) {
            if (!(mask >> r & 1)) continue;
            size_t off = ch->data_off + (size_t)g->rank * lo->ll_slot + CPU_SLOT_HEADER +
                         (size_t)cnt[r]++ * lo->ll_row;
            if ((st = cpu_put(g, r, off, row, row_used))) return st;
        }
    }
    for (int r = 0; r < R; r++) {
        size_t off = ch->data_off + (size_t)g->rank * lo->ll_slot;
        if ((st = cpu_put(g, r, off, &cnt[r], sizeof cnt[r]))) return st;
    }
    if ((st = cpu_chan_post(g, ch))) return st;

    out->recv_x = B->recv_x;
    out->recv_scales = a->use_fp8 ? B->recv_scales : NULL;
    out->recv_count = B->recv_count;
    out->recv_src_info = B->recv_src_info;
    out->recv_range = B->recv_range;
    *handle = &B->handle.base;
    if (a->use_hook) {
        B->hook.kind = CPU_HOOK_DISPATCH;
        B->hook.pending = 1;
        *hook = &B->hook.base;
        return EP_OK;
    }
    if (hook) *hook = NULL;
    return ll_dispatch_recv(g, b);
}

static ep_status_t ll_combine_recv(ep_group_t *g, int b)
{
    struct cpu_impl *c = g->impl;
    struct cpu_ll_buf *C = &c->ll[b];
    struct cpu_chan *ch = &c->ch[CPU_CH_LL_COMB0 + b];
    int k = g->cfg.num_topk;
    size_t H = (size_t)g->cfg.hidden;
    const uint16_t *rows[EP_MAX_TOPK];
    float w[EP_MAX_TOPK];
    ep_status_t st;

    C->hook.pending = 0;
    if ((st = cpu_chan_wait_all(g, ch))) return st;
    const uint16_t *region = (const uint16_t *)(c->buf + ch->data_off);
    for (int t = 0; t < C->comb_tokens; t++) {
        int n = 0;
        for (int j = 0; j < k; j++) {
            size_t s = (size_t)t * k + j;
            if (C->comb_topk[s] < 0) continue;
            rows[n] = region + s * H;
            w[n++] = C->comb_w[s];
        }
        ep_weighted_sum_bf16_ref(rows, w, n, (int)H, C->comb_out + (size_t)t * H);
    }
    return cpu_chan_release(g, ch);
}

ep_status_t cpu_ll_combine(ep_group_t *g, int b, const ep_ll_combine_args_t *a, ep_hook_t **hook)
{
    static const char op[] = "ep_ll_combine";
    struct cpu_impl *c = g->impl;
    const struct cpu_ll_handle *hd = (const struct cpu_ll_handle *)a->handle;
    struct cpu_ll_buf *D = &c->ll[hd->buf]; /* the dispatch's buffer */
    struct cpu_ll_buf *C = &c->ll[b];       /* this combine's buffer */
    struct cpu_chan *ch = &c->ch[CPU_CH_LL_COMB0 + b];
    int R = g->nranks, L = g->num_local_experts, k = g->cfg.num_topk, T = D->disp_tokens;
    size_t H = (size_t)g->cfg.hidden, S = (size_t)g->cfg.ll_max_tokens * R;
    ep_status_t st;

    if (!hd->valid)
        return ep_group_fail(g, -1, EP_ERR_STATE,
                             "%s: the handle's dispatch has not received yet (run its hook) or "
                             "was overwritten by a later dispatch on LL buffer %d",
                             op, hd->buf);
    if (C->hook.pending)
        return ep_group_fail(g, -1, EP_ERR_STATE,
                             "%s: LL buffer %d still has a pending hook (run the hook of an LL "
                             "op before the op after next)",
                             op, b);
    if (T > 0 && (!a->topk_idx || !a->topk_weights || !a->out))
        return ep_group_fail(g, -1, EP_ERR_INVALID, "%s: %s is NULL for %d tokens", op,
                             !a->topk_idx       ? "topk_idx"
                             : !a->topk_weights ? "topk_weights"
                                                : "out",
                             T);
    for (int e = 0; e < L && !a->expert_y; e++)
        if (D->recv_count[e])
            return ep_group_fail(g, -1, EP_ERR_INVALID,
                                 "%s: expert_y is NULL but local expert %d received %d rows", op, e,
                                 D->recv_count[e]);
    for (size_t i = 0; i < (size_t)T * k; i++)
        if (a->topk_idx[i] != D->disp_topk[i])
            return ep_group_fail(g, -1, EP_ERR_INVALID,
                                 "%s: topk_idx[%zu][%zu] = %d differs from the dispatch's %d", op,
                                 i / k, i % k, a->topk_idx[i], D->disp_topk[i]);

    /* The receive half needs the token side only; copy it so that it does not depend on
     * buffers a later op may reuse. */
    C->comb_tokens = T;
    if (T) {
        memcpy(C->comb_topk, a->topk_idx, sizeof(int32_t) * (size_t)T * k);
        memcpy(C->comb_w, a->topk_weights, sizeof(float) * (size_t)T * k);
    }
    C->comb_out = a->out;
    cpu_chan_begin(ch);
    if ((st = cpu_chan_wait_free(g, ch))) return st;
    for (int e = 0; e < L; e++) {
        for (int i = 0; i < D->recv_count[e]; i++) {
            size_t at = (size_t)e * S + (size_t)i;
            size_t slot = (size_t)D->recv_src_info[at] * k + (size_t)D->row_slot[at];
            if ((st = cpu_put(g, D->row_src[at], ch->data_off + slot * 2 * H, a->expert_y + at * H,
                              2 * H)))
                return st;
        }
    }
    if ((st = cpu_chan_post(g, ch))) return st;
    if (a->use_hook) {
        C->hook.kind = CPU_HOOK_COMBINE;
        C->hook.pending = 1;
        *hook = &C->hook.base;
        return EP_OK;
    }
    if (hook) *hook = NULL;
    return ll_combine_recv(g, b);
}

ep_status_t cpu_hook_run(ep_group_t *g, ep_hook_t *hook)
{
    struct cpu_hook *h = (struct cpu_hook *)hook;
    if (!h->pending)
        return ep_group_fail(g, -1, EP_ERR_STATE,
                             "ep_hook_run: the hook of LL buffer %d already ran", h->buf);
    return h->kind == CPU_HOOK_DISPATCH ? ll_dispatch_recv(g, h->buf) : ll_combine_recv(g, h->buf);
}
