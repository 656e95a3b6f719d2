/* HT (prefill) dispatch and combine of the cuda backend on the proxy path (tcp/rdma transport),
 * driven from the host thread that calls them.
 *
 * HT needs the host anyway (the caller learns N, the rows it receives), and moves large blocks,
 * so instead of per-row commands through the ring the host runs each op as one transfer:
 *  1. dispatch only: the routing comes to the host, which computes pos[t][d] (row of token t
 *     among the rows to rank d, in token order) and the counts, writes its row {counts[R],
 *     expert counts[E]} into its window, puts it into every peer's window and SETs a count
 *     word to the dispatch's sequence number; then waits for every peer's row and derives N,
 *     base_at[d] (first row of its block on rank d) and num_recv_per_expert.
 *  2. a kernel packs the rows per destination (x, scales, local topk ids, weights as separate
 *     segments; own rows straight into the outputs), the copy engine moves each peer's block to
 *     the window's send area, and the wire puts it into that peer's receive block, followed by
 *     an ADD on the peer's transfer counter for this rank;
 *  3. once every peer's counter says its block arrived, one copy per segment and source puts
 *     the rows into the outputs (rows are ordered by (source rank, token), so a source's rows are
 *     one range); the host waits for the copies and flushes the wire before returning.
 * Combine sends each source its rows back the same way; the source sums its copies with a
 * kernel (rank order, fp32, like the NVLink kernels).
 *
 * Reuse. Receive blocks alternate between two sets by transfer number (every HT op is one
 * transfer, the same on all ranks): a rank's op n + 2 starts after its op n + 1, which needed
 * every peer's op n + 1 data, which a peer sends only after its op n returned, i.e. after it
 * copied op n's block out. Count rows alternate by dispatch number in the same way, and the send
 * area is free again once the flush at the end of an op returned.
 */
#include "cuda_impl.h"

#include <stdlib.h>
#include <string.h>

static size_t row_stride(int R, int E)
{
    return ((size_t)(R + E) * 4 + 15) / 16 * 16;
}

static size_t rows_off(const epk_layout_t *l, int R, int E, int parity, int src)
{
    return l->ht_rows + ((size_t)parity * R + src) * row_stride(R, E);
}

/* ht_cnt words: [parity * R + src] count rows (SET to the dispatch number), [4R + src]
 * transfers received from src (ADD 1 per HT op). */
static size_t word_off(const epk_layout_t *l, int idx)
{
    return l->ht_cnt + (size_t)idx * 8;
}

static size_t xfer_off(const epk_layout_t *l, int R, int parity, int src)
{
    return l->ht_xfer + ((size_t)parity * R + src) * l->ht_blk;
}

static size_t send_off(const epk_layout_t *l, int dst)
{
    return l->ht_send + (size_t)dst * l->ht_blk;
}

/* A failed wire call or wait as the group's error (the wire's message names the peer). */
static ep_status_t wire_fail(ep_group_t *g, ep_status_t st, int peer, const char *what)
{
    cuda_impl_t *c = impl_of(g);
    if (st == EP_ERR_ABORTED || atomic_load(&g->aborted))
        return ep_group_fail(g, peer, EP_ERR_ABORTED, "rank %d: group aborted", g->rank);
    int fp = atomic_load(&c->wire->failed_peer);
    if (fp >= 0 && fp < g->nranks) peer = fp;
    return ep_group_fail(g, peer, st, "rank %d: HT %s: %s", g->rank, what,
                         c->wire->error[0] ? c->wire->error : ep_strerror(st));
}

static ep_status_t sync(ep_group_t *g, void *stream, const char *what)
{
    cudaError_t e = cudaStreamSynchronize((cudaStream_t)stream);
    return e == cudaSuccess ? EP_OK : cuda_fail(g, e, what);
}

static ep_status_t copy(ep_group_t *g, void *dst, const void *src, size_t n, void *stream)
{
    if (n == 0) return EP_OK;
    cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, (cudaStream_t)stream);
    return e == cudaSuccess ? EP_OK : cuda_fail(g, e, "HT staging copy");
}

/* Puts this rank's send block for d (segments of the given sizes) into d's receive block of
 * transfer parity xp, then adds 1 to d's transfer counter for this rank. */
static ep_status_t put_block(ep_group_t *g, int d, int xp, const size_t seg_off[4],
                             const size_t seg_len[4])
{
    cuda_impl_t *c = impl_of(g);
    const epk_layout_t *l = &c->ctx.lay;
    ep_status_t st;
    for (int i = 0; i < 4; ++i)
        if (seg_len[i] &&
            (st = ep_wire_put_local(c->wire, d, xfer_off(l, g->nranks, xp, g->rank) + seg_off[i],
                                    send_off(l, d) + seg_off[i], seg_len[i])))
            return wire_fail(g, st, d, "sending rows");
    if ((st = c->wire->ops->signal(c->wire, d, word_off(l, 4 * g->nranks + g->rank), 1,
                                   EP_SIGNAL_ADD)))
        return wire_fail(g, st, d, "signalling rows");
    return EP_OK;
}

/* Waits until every peer's transfer number n arrived. */
static ep_status_t wait_blocks(ep_group_t *g, uint64_t n)
{
    cuda_impl_t *c = impl_of(g);
    for (int s = 0; s < g->nranks; ++s) {
        if (s == g->rank) continue;
        ep_status_t st = ep_wire_wait(c->wire, word_off(&c->ctx.lay, 4 * g->nranks + s), n, s);
        if (st) return wire_fail(g, st, s, "waiting for rows");
    }
    return EP_OK;
}

/* Steps 1 (count exchange) of a fresh dispatch: fills h and pos (device). */
static ep_status_t exchange_counts(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                                   ep_ht_dispatch_out_t *out, struct cuda_ht_handle *h)
{
    cuda_impl_t *c = impl_of(g);
    const epk_layout_t *l = &c->ctx.lay;
    const int R = g->nranks, me = g->rank, E = g->cfg.num_experts, L = E / R;
    const int k = g->cfg.num_topk, T = a->num_tokens;
    const uint64_t seq = ++c->ht_seq;
    const int parity = (int)(seq & 1);
    ep_status_t st;

    if ((st = copy(g, c->ht_idx_host, a->topk_idx, (size_t)T * k * 4, a->stream)) ||
        (st = sync(g, a->stream, "cudaStreamSynchronize before the HT count exchange")))
        return st;
    int32_t *row = (int32_t *)(c->win_host + rows_off(l, R, E, parity, me));
    memset(row, 0, (size_t)(R + E) * 4);
    for (int t = 0; t < T; ++t) {
        uint64_t mask = 0;
        for (int j = 0; j < k; ++j) {
            const int e = c->ht_idx_host[(size_t)t * k + j];
            if (e < 0) continue;
            if (e >= E)
                return ep_group_fail(g, -1, EP_ERR_INVALID,
                                     "rank %d: topk_idx[%d][%d] = %d is not an expert (0..%d)", me,
                                     t, j, e, E - 1);
            row[R + e]++;
            mask |= 1ull << (e / L);
        }
        for (int d = 0; d < R; ++d)
            c->ht_pos_host[(size_t)t * R + d] = mask >> d & 1 ? row[d]++ : -1;
    }
    /* publish the row, then wait for every peer's */
    const size_t off = rows_off(l, R, E, parity, me);
    for (int d = 0; d < R; ++d) {
        if (d == me) continue;
        if ((st = ep_wire_put_local(c->wire, d, off, off, (size_t)(R + E) * 4)) ||
            (st = c->wire->ops->signal(c->wire, d, word_off(l, parity * R + me), seq,
                                       EP_SIGNAL_SET)))
            return wire_fail(g, st, d, "sending counts");
    }
    for (int s = 0; s < R; ++s) {
        if (s == me) continue;
        if ((st = ep_wire_wait(c->wire, word_off(l, parity * R + s), seq, s)))
            return wire_fail(g, st, s, "waiting for counts");
    }
    int n = 0;
    for (int s = 0; s < R; ++s) {
        const int32_t *rs = (const int32_t *)(c->win_host + rows_off(l, R, E, parity, s));
        h->recv_from[s] = rs[me];
        n += rs[me];
    }
    for (int d = 0; d < R; ++d) {
        int b = 0;
        for (int s = 0; s < me; ++s)
            b += ((const int32_t *)(c->win_host + rows_off(l, R, E, parity, s)))[d];
        h->base_at[d] = b;
        h->count_to[d] = row[d];
    }
    const int align = a->expert_alignment > 1 ? a->expert_alignment : 1;
    for (int e = 0; e < L; ++e) {
        int m = 0;
        for (int s = 0; s < R; ++s)
            m += ((const int32_t *)(c->win_host + rows_off(l, R, E, parity, s)))[R + me * L + e];
        c->ht_nrpe_host[e] = (m + align - 1) / align * align;
    }
    h->num_tokens = T;
    h->num_recv = n;
    if ((st = copy(g, out->num_recv_per_expert, c->ht_nrpe_host, (size_t)L * 4, a->stream)) ||
        (st = copy(g, h->sc->st.pos, c->ht_pos_host, (size_t)T * R * 4, a->stream)))
        return st;
    return EP_OK;
}

/* Steps 2 and 3: one transfer of rows along h's routes (with the routing when fresh). */
static ep_status_t transfer_rows(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                                 ep_ht_dispatch_out_t *out, const struct cuda_ht_handle *h,
                                 int fresh)
{
    cuda_impl_t *c = impl_of(g);
    const epk_layout_t *l = &c->ctx.lay;
    const int R = g->nranks, me = g->rank, H = g->cfg.hidden, k = g->cfg.num_topk;
    const size_t rb = a->use_fp8 ? (size_t)H : (size_t)H * 2, sb = (size_t)(H / 128) * 4;
    const int fits = h->num_recv <= out->capacity;
    ep_status_t st;

    epk_ht_pack_params_t pp = {
        .x = a->x,
        .x_scales = a->x_scales,
        .use_fp8 = a->use_fp8,
        .num_tokens = h->num_tokens,
        .topk_idx = fresh ? a->topk_idx : NULL,
        .topk_w = fresh ? a->topk_weights : NULL,
        .pos = h->sc->st.pos,
        .pack = c->ht_pack,
        .recv_x = out->recv_x,
        .recv_scales = out->recv_scales,
        .recv_topk_idx = fresh ? out->recv_topk_idx : NULL,
        .recv_topk_w = fresh ? out->recv_topk_weights : NULL,
        .row0 = h->base_at[me],
        .capacity = out->capacity,
        .blocks = c->ht_blocks,
    };
    if ((st = cuda_launched(g, epk_ht_pack(&c->ctx, &pp, a->stream), "HT pack")) != EP_OK)
        return st;
    const size_t seg_off[4] = {0, l->ht_seg_s, l->ht_seg_i, l->ht_seg_w};
    size_t seg_len[EP_MAX_RANKS][4];
    for (int d = 0; d < R; ++d) {
        const size_t n = d == me ? 0 : (size_t)h->count_to[d];
        seg_len[d][0] = n * rb;
        seg_len[d][1] = a->use_fp8 ? n * sb : 0;
        seg_len[d][2] = fresh ? n * k * 4 : 0;
        seg_len[d][3] = fresh ? n * k * 4 : 0;
        for (int i = 0; i < 4; ++i)
            if ((st = copy(g, c->win_host + send_off(l, d) + seg_off[i],
                           c->ht_pack + (size_t)d * l->ht_blk + seg_off[i], seg_len[d][i],
                           a->stream)))
                return st;
    }
    if ((st = sync(g, a->stream, "cudaStreamSynchronize after packing HT rows"))) return st;
    const int xp = (int)(c->ht_xfer_n & 1);
    for (int d = 0; d < R; ++d)
        if (d != me && (st = put_block(g, d, xp, seg_off, seg_len[d]))) return st;
    if ((st = wait_blocks(g, ++c->ht_xfer_n))) return st;

    int first = 0;
    for (int s = 0; s < R; ++s) {
        const size_t n = (size_t)h->recv_from[s];
        const uint8_t *blk = c->win_host + xfer_off(l, R, xp, s);
        if (s != me && n && fits) {
            if ((st = copy(g, (uint8_t *)out->recv_x + (size_t)first * rb, blk, n * rb,
                           a->stream)) ||
                (a->use_fp8 && (st = copy(g, (uint8_t *)out->recv_scales + (size_t)first * sb,
                                          blk + l->ht_seg_s, n * sb, a->stream))) ||
                (fresh && (st = copy(g, out->recv_topk_idx + (size_t)first * k, blk + l->ht_seg_i,
                                     n * k * 4, a->stream))) ||
                (fresh && (st = copy(g, out->recv_topk_weights + (size_t)first * k,
                                     blk + l->ht_seg_w, n * k * 4, a->stream))))
                return st;
        }
        first += (int)n;
    }
    if ((st = sync(g, a->stream, "cudaStreamSynchronize after the HT copies"))) return st;
    if ((st = c->wire->ops->flush(c->wire))) return wire_fail(g, st, -1, "flushing the wire");
    if (!fits)
        return ep_group_fail(g, -1, EP_ERR_INVALID,
                             "rank %d: HT dispatch receives %d rows, out.capacity is %d", me,
                             h->num_recv, out->capacity);
    out->num_recv_tokens = h->num_recv;
    return EP_OK;
}

ep_status_t cuda_ht_dispatch_proxy(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                                   ep_ht_dispatch_out_t *out, struct cuda_ht_handle *h, int cached)
{
    ep_status_t st;
    if (!cached && (st = exchange_counts(g, a, out, h))) return st;
    return transfer_rows(g, a, out, h, !cached);
}

ep_status_t cuda_ht_combine_proxy(ep_group_t *g, const struct cuda_ht_handle *h, const uint16_t *x,
                                  uint16_t *out, void *stream)
{
    cuda_impl_t *c = impl_of(g);
    const epk_layout_t *l = &c->ctx.lay;
    const int R = g->nranks, me = g->rank, H = g->cfg.hidden;
    const size_t rb = (size_t)H * 2;
    ep_status_t st;

    /* every source's rows go back to it: they are one range of x */
    size_t seg_len[EP_MAX_RANKS][4];
    const size_t seg_off[4] = {0, 0, 0, 0};
    int first = 0;
    for (int s = 0; s < R; ++s) {
        const size_t n = (size_t)h->recv_from[s];
        memset(seg_len[s], 0, sizeof seg_len[s]);
        if (s != me) {
            seg_len[s][0] = n * rb;
            if ((st = copy(g, c->win_host + send_off(l, s), x + (size_t)first * H, n * rb, stream)))
                return st;
        }
        first += (int)n;
    }
    if ((st = sync(g, stream, "cudaStreamSynchronize before the HT combine transfer"))) return st;
    const int xp = (int)(c->ht_xfer_n & 1);
    for (int s = 0; s < R; ++s)
        if (s != me && (st = put_block(g, s, xp, seg_off, seg_len[s]))) return st;
    if ((st = wait_blocks(g, ++c->ht_xfer_n))) return st;
    /* the copies of this rank's tokens, into the device stage, then the sum */
    for (int d = 0; d < R; ++d)
        if (d != me &&
            (st = copy(g, c->ht_pack + (size_t)d * l->ht_blk, c->win_host + xfer_off(l, R, xp, d),
                       (size_t)h->count_to[d] * rb, stream)))
            return st;
    if ((st = cuda_launched(g,
                            epk_ht_sum(&c->ctx, h->sc->st.pos, h->num_tokens, x, h->base_at[me],
                                       c->ht_pack, out, c->ht_blocks, stream),
                            "HT combine sum")))
        return st;
    if ((st = sync(g, stream, "cudaStreamSynchronize after the HT combine"))) return st;
    if ((st = c->wire->ops->flush(c->wire))) return wire_fail(g, st, -1, "flushing the wire");
    return EP_OK;
}
