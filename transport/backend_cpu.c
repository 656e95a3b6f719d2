/* The cpu backend: the symmetric buffer layout, the channel protocol over a wire, creation
 * and teardown, and the ops table (LL in cpu_ll.c, HT in cpu_ht.c). Layout and protocol are
 * described in cpu.h. */
#include "cpu.h"

#include "route_ref.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ALIGN(x, a) (((x) + (a)-1) / (a) * (a))

/* Adds n * size bytes to *acc with overflow checks; returns the old value (the region's
 * offset) through *off. */
static int grow(size_t *acc, size_t n, size_t size, size_t *off)
{
    if (size && n > (SIZE_MAX / 2) / size) return -1;
    size_t add = ALIGN(n * size, 64);
    if (*acc > SIZE_MAX / 2 - add) return -1;
    if (off) *off = *acc;
    *acc += add;
    return 0;
}

int ep_cpu_layout(const ep_config_t *cfg, int nranks, struct cpu_layout *lo)
{
    size_t R = (size_t)nranks, M = (size_t)cfg->ll_max_tokens, Mh = (size_t)cfg->ht_max_tokens;
    size_t k = (size_t)cfg->num_topk, H = (size_t)cfg->hidden;
    size_t data = 2 * H; /* bf16 data; fp8 data + scales (H + H/32) is never larger */
    size_t acc = 0;

    memset(lo, 0, sizeof *lo);
    if (grow(&acc, (size_t)CPU_CH_COUNT * 2 * R, sizeof(uint64_t), &lo->words_off)) return -1;
    lo->ll_hdr = ALIGN(4 + 4 * k, 16);
    lo->ll_row = ALIGN(lo->ll_hdr + data, 64);
    lo->ll_slot = M ? CPU_SLOT_HEADER + M * lo->ll_row : 0;
    lo->ht_hdr = ALIGN(4 + 8 * k, 16);
    lo->ht_row = ALIGN(lo->ht_hdr + data, 64);
    lo->ht_slot = Mh ? CPU_SLOT_HEADER + Mh * lo->ht_row : 0;
    lo->ht_comb_slot = Mh * 2 * H;
    for (int b = 0; b < 2; b++) {
        if (grow(&acc, R, lo->ll_slot, &lo->ll_disp_off[b]) ||
            grow(&acc, M * k, 2 * H, &lo->ll_comb_off[b]))
            return -1;
    }
    if (grow(&acc, R, lo->ht_slot, &lo->ht_disp_off) ||
        grow(&acc, R, lo->ht_comb_slot, &lo->ht_comb_off) ||
        grow(&acc, 1, EP_WIRE_AG_BYTES(R), &lo->ag_off))
        return -1;
    lo->total = acc;
    return 0;
}

/* ---- channels ----------------------------------------------------------------------------- */

ep_status_t cpu_wire_error(ep_group_t *g, ep_status_t st)
{
    struct cpu_impl *c = g->impl;
    if (st == EP_ERR_ABORTED) return st; /* ep_group_abort recorded why */
    int peer = atomic_load(&c->wire->failed_peer);
    return ep_group_fail(g, peer >= g->nranks ? -1 : peer, st, "%s", c->wire->error);
}

void cpu_chan_begin(struct cpu_chan *ch)
{
    ch->seq++;
}

/* Waits until word off + 8 * r of this rank's buffer holds at least v, for every rank r. */
static ep_status_t chan_wait_each(ep_group_t *g, size_t off, uint64_t v)
{
    struct cpu_impl *c = g->impl;
    for (int r = 0; r < g->nranks; r++) {
        ep_status_t st = ep_wire_wait(c->wire, off + 8 * (size_t)r, v, r);
        if (st) return cpu_wire_error(g, st);
    }
    return EP_OK;
}

/* Sets word off + 8 * my rank on every rank to v, then flushes. */
static ep_status_t chan_signal_each(ep_group_t *g, size_t off, uint64_t v)
{
    struct cpu_impl *c = g->impl;
    ep_wire_t *w = c->wire;
    for (int r = 0; r < g->nranks; r++) {
        ep_status_t st = w->ops->signal(w, r, off + 8 * (size_t)g->rank, v, EP_SIGNAL_SET);
        if (st) return cpu_wire_error(g, st);
    }
    ep_status_t st = w->ops->flush(w);
    return st ? cpu_wire_error(g, st) : EP_OK;
}

ep_status_t cpu_chan_wait_free(ep_group_t *g, struct cpu_chan *ch)
{
    return chan_wait_each(g, ch->ack_off, ch->seq - 1);
}

ep_status_t cpu_chan_post(ep_group_t *g, struct cpu_chan *ch)
{
    return chan_signal_each(g, ch->sig_off, ch->seq);
}

ep_status_t cpu_chan_wait_all(ep_group_t *g, struct cpu_chan *ch)
{
    return chan_wait_each(g, ch->sig_off, ch->seq);
}

ep_status_t cpu_chan_release(ep_group_t *g, struct cpu_chan *ch)
{
    return chan_signal_each(g, ch->ack_off, ch->seq);
}

ep_status_t cpu_put(ep_group_t *g, int peer, size_t off, const void *src, size_t len)
{
    struct cpu_impl *c = g->impl;
    ep_status_t st = c->wire->ops->put(c->wire, peer, off, src, len);
    return st ? cpu_wire_error(g, st) : EP_OK;
}

uint64_t cpu_dest_mask(const ep_group_t *g, const int32_t *idx)
{
    uint64_t m = 0;
    for (int j = 0; j < g->cfg.num_topk; j++)
        if (idx[j] >= 0) m |= 1ull << (idx[j] / g->num_local_experts);
    return m;
}

/* ---- create / destroy --------------------------------------------------------------------- */

static void free_impl(struct cpu_impl *c)
{
    for (int b = 0; b < 2; b++) {
        struct cpu_ll_buf *B = &c->ll[b];
        free(B->recv_x);
        free(B->recv_scales);
        free(B->recv_count);
        free(B->recv_src_info);
        free(B->recv_range);
        free(B->row_src);
        free(B->row_slot);
        free(B->disp_topk);
        free(B->comb_topk);
        free(B->comb_w);
    }
    free(c->stage);
    free(c->buf);
    free(c);
}

static ep_status_t alloc_ll(ep_group_t *g, struct cpu_impl *c)
{
    size_t L = (size_t)g->num_local_experts, R = (size_t)g->nranks;
    size_t M = (size_t)g->cfg.ll_max_tokens, k = (size_t)g->cfg.num_topk;
    size_t H = (size_t)g->cfg.hidden, S = M * R;
    for (int b = 0; b < 2; b++) {
        struct cpu_ll_buf *B = &c->ll[b];
        B->handle.base.group = g;
        B->handle.buf = b;
        B->hook.base.group = g;
        B->hook.buf = b;
        if (!M) continue;
        /* recv_x is sized for bf16; only the rows a dispatch fills are ever touched, so the
         * pages of the [L][S][H] worst case stay virtual. */
        B->recv_x = malloc(L * S * H * 2);
        B->recv_scales = malloc(L * S * (H / EP_FP8_BLOCK + 1) * sizeof(float));
        B->recv_count = calloc(L, sizeof(int32_t));
        B->recv_src_info = malloc(L * S * sizeof(int32_t));
        B->recv_range = calloc(L * R * 2, sizeof(int32_t));
        B->row_src = malloc(L * S * sizeof(int32_t));
        B->row_slot = malloc(L * S * sizeof(int32_t));
        B->disp_topk = malloc(M * k * sizeof(int32_t));
        B->comb_topk = malloc(M * k * sizeof(int32_t));
        B->comb_w = malloc(M * k * sizeof(float));
        if (!B->recv_x || !B->recv_scales || !B->recv_count || !B->recv_src_info ||
            !B->recv_range || !B->row_src || !B->row_slot || !B->disp_topk || !B->comb_topk ||
            !B->comb_w)
            return ep_group_fail(g, -1, EP_ERR_NOMEM,
                                 "rank %d: out of memory for the LL outputs (%zu x %zu rows of "
                                 "%zu channels)",
                                 g->rank, L, S, H);
    }
    return EP_OK;
}

static ep_status_t pick_wire(ep_group_t *g, const ep_bootstrap_t *bs, ep_wire_t **w)
{
    ep_transport_kind_t kind = g->cfg.transport;
    if (kind == EP_TRANSPORT_AUTO) {
        /* shm when every rank is in this process, tcp otherwise; every rank sees the same
         * pids, so every rank decides the same. */
        int64_t me = (int64_t)getpid(), *all = calloc((size_t)g->nranks, sizeof *all);
        if (!all) return ep_group_fail(g, -1, EP_ERR_NOMEM, "out of memory");
        int rc = bs->allgather(bs->ctx, &me, all, sizeof me, g->cfg.timeout_ms);
        if (rc) {
            free(all);
            return ep_group_fail(g, -1, rc < 0 && rc >= EP_ERR_ABORTED ? rc : EP_ERR_BOOTSTRAP,
                                 "rank %d: exchanging process ids failed (%s)", g->rank,
                                 ep_strerror(rc));
        }
        kind = EP_TRANSPORT_SHM;
        for (int r = 0; r < g->nranks; r++)
            if (all[r] != me) kind = EP_TRANSPORT_TCP;
        free(all);
    }
    ep_status_t st;
    if (kind == EP_TRANSPORT_SHM) {
        st = ep_wire_shm_create(&g->cfg, g->rank, g->nranks, w);
#ifdef EP_HAVE_RDMA
    } else if (kind == EP_TRANSPORT_RDMA) {
        st = ep_wire_rdma_create(&g->cfg, g->rank, g->nranks, w);
#endif
    } else {
        st = ep_wire_tcp_create(&g->cfg, g->rank, g->nranks, w);
    }
    if (st)
        return ep_group_fail(g, -1, st, "rank %d: creating the %s wire failed (%s)", g->rank,
                             ep_transport_name(kind), ep_strerror(st));
    return EP_OK;
}

static ep_status_t cpu_create(ep_group_t *g, const ep_bootstrap_t *bs)
{
    ep_status_t st;
    struct cpu_impl *c = calloc(1, sizeof *c);
    if (!c) return ep_group_fail(g, -1, EP_ERR_NOMEM, "out of memory");
    c->bs = *bs;
    if (ep_cpu_layout(&g->cfg, g->nranks, &c->lo)) {
        st = ep_group_fail(g, -1, EP_ERR_INVALID, "the symmetric buffer size overflows");
        goto fail;
    }
    size_t R = (size_t)g->nranks;
    c->buf = aligned_alloc(64, c->lo.total);
    size_t stage = c->lo.ll_row > c->lo.ht_row ? c->lo.ll_row : c->lo.ht_row;
    c->stage = aligned_alloc(64, stage);
    if (!c->buf || !c->stage) {
        st = ep_group_fail(g, -1, EP_ERR_NOMEM,
                           "rank %d: out of memory for the %zu-byte symmetric buffer", g->rank,
                           c->lo.total);
        goto fail;
    }
    /* Only the words need zeros; data regions are written before they are read. */
    memset(c->buf + c->lo.words_off, 0, (size_t)CPU_CH_COUNT * 2 * R * sizeof(uint64_t));
    memset(c->buf + c->lo.ag_off, 0, R * sizeof(uint64_t));
    for (int i = 0; i < CPU_CH_COUNT; i++) {
        struct cpu_chan *ch = &c->ch[i];
        ch->sig_off = c->lo.words_off + (size_t)i * 2 * R * 8;
        ch->ack_off = ch->sig_off + R * 8;
    }
    c->ch[CPU_CH_LL_DISP0].data_off = c->lo.ll_disp_off[0];
    c->ch[CPU_CH_LL_DISP1].data_off = c->lo.ll_disp_off[1];
    c->ch[CPU_CH_LL_COMB0].data_off = c->lo.ll_comb_off[0];
    c->ch[CPU_CH_LL_COMB1].data_off = c->lo.ll_comb_off[1];
    c->ch[CPU_CH_HT_DISP].data_off = c->lo.ht_disp_off;
    c->ch[CPU_CH_HT_COMB].data_off = c->lo.ht_comb_off;
    g->impl = c;
    if ((st = alloc_ll(g, c))) goto fail;
    if ((st = pick_wire(g, bs, &c->wire))) goto fail;
    if (atomic_load(&g->aborted)) atomic_store(&c->wire->aborted, 1);
    if ((st = c->wire->ops->connect(c->wire, bs, c->buf, c->lo.total))) {
        cpu_wire_error(g, st);
        goto fail_wire;
    }
    return EP_OK;

fail_wire:
    if (c->wire->ops->release_buffer) {
        c->wire->ops->release_buffer(c->wire, c->buf);
        c->buf = NULL;
    }
    c->wire->ops->destroy(c->wire);
fail:
    g->impl = NULL;
    free_impl(c);
    return st;
}

static void cpu_destroy(ep_group_t *g)
{
    struct cpu_impl *c = g->impl;
    if (!c) return;
    /* Peers may still be writing into this buffer (acks of the last op): wait until every rank
     * is here. A wire whose peers write straight into this memory (shm) takes the buffer over
     * and frees it once every rank has let go, even if this barrier timed out. */
    (void)c->bs.barrier(c->bs.ctx, g->cfg.timeout_ms);
    if (c->wire->ops->release_buffer) {
        c->wire->ops->release_buffer(c->wire, c->buf);
        c->buf = NULL;
    }
    c->wire->ops->destroy(c->wire);
    g->impl = NULL;
    free_impl(c);
}

static void cpu_abort(ep_group_t *g)
{
    struct cpu_impl *c = g->impl;
    if (c && c->wire) atomic_store(&c->wire->aborted, 1);
}

static ep_status_t cpu_route(ep_group_t *g, const ep_route_params_t *p, const float *logits, int T,
                             int32_t *topk_idx, float *topk_weights, void *stream)
{
    if (ep_route_ref(p, logits, T, topk_idx, topk_weights))
        return ep_group_fail(g, -1, EP_ERR_NOMEM, "ep_route: out of memory for %d experts",
                             p->num_experts);
    return EP_OK;
}

static ep_status_t cpu_allgather(ep_group_t *g, const void *in, void *out, size_t len)
{
    struct cpu_impl *c = g->impl;
    ep_status_t st = ep_wire_allgather(c->wire, c->lo.ag_off, ++c->ag_call, in, out, len);
    return st ? cpu_wire_error(g, st) : EP_OK;
}

const struct ep_backend_ops ep_backend_cpu_ops = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .route = cpu_route,
    .ll_dispatch = cpu_ll_dispatch,
    .ll_combine = cpu_ll_combine,
    .hook_run = cpu_hook_run,
    .get_dispatch_layout = cpu_get_dispatch_layout,
    .ht_dispatch = cpu_ht_dispatch,
    .ht_dispatch_cached = cpu_ht_dispatch_cached,
    .ht_combine = cpu_ht_combine,
    .ht_handle_destroy = cpu_ht_handle_destroy,
    .allgather = cpu_allgather,
    .abort = cpu_abort,
};
