/* The rdma proxy thread: drains the command ring into per-peer queues, posts them as RDMA
 * WRITE (puts, SET signals) or fenced atomic fetch-and-add (ADD signals) with one doorbell
 * per peer and batch, polls the completion queue, retires completed commands (freeing ring
 * slots and staging in order), and fails a peer whose work completes in error, whose QP turns
 * fatal or who acknowledges nothing for timeout_ms, while it keeps serving the others.
 *
 * Ordering: on an RC QP, RDMA WRITEs are placed in order, so a SET written after a put is seen
 * after it. An atomic may overtake earlier WRITEs, so ADD carries IBV_SEND_FENCE. */
#include "rdma_wire.h"
#include "epd_clock.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define NONE UINT64_MAX
#define POST_BATCH 32 /* WRs per doorbell */
#define POLL_BATCH 64
/* Empty loop turns before the proxy naps; a nap is short, so a new command waits little. A
 * production node gives the proxy its own core and may raise this. */
#define IDLE_SPINS 2048
#define NAP_NS 20000
#define TICK_NS 1000000ull /* async events, rdma_cm events, silent peers */

static const char *op_name(uint8_t op)
{
    return op == RDMA_CMD_PUT ? "write" : op == RDMA_CMD_SET ? "signal write" : "fetch-and-add";
}

static void mark_done(struct wire_rdma *r, uint64_t seq)
{
    r->status[seq % RING_SLOTS] = 1;
}

static void drop_queue(struct wire_rdma *r, struct rdma_peer *p)
{
    for (uint64_t s = p->q_first; s != NONE; s = r->next[s % RING_SLOTS])
        mark_done(r, s);
    p->q_first = p->q_last = NONE;
}

static void take(struct wire_rdma *r, uint64_t seq)
{
    const struct rdma_cmd *c = &r->cmds[seq % RING_SLOTS];
    struct rdma_peer *p = &r->peers[c->peer];
    r->status[seq % RING_SLOTS] = 0;
    r->next[seq % RING_SLOTS] = NONE;
    if (atomic_load_explicit(&p->failed, memory_order_relaxed)) {
        mark_done(r, seq);
        return;
    }
    if (p->q_last == NONE)
        p->q_first = seq;
    else
        r->next[p->q_last % RING_SLOTS] = seq;
    p->q_last = seq;
}

static void build_wr(struct wire_rdma *r, struct rdma_peer *p, uint64_t seq, struct ibv_send_wr *wr,
                     struct ibv_sge *sge)
{
    const struct rdma_cmd *c = &r->cmds[seq % RING_SLOTS];
    memset(wr, 0, sizeof *wr);
    wr->wr_id = seq;
    wr->sg_list = sge;
    wr->num_sge = 1;
    wr->send_flags = IBV_SEND_SIGNALED;
    uint32_t rkey = atomic_load_explicit(&p->rkey, memory_order_relaxed);
    uint64_t raddr = p->raddr + c->remote_off;
    if (c->op == RDMA_CMD_ADD) {
        sge->addr = (uint64_t)(uintptr_t)r->scratch;
        sge->length = 8;
        sge->lkey = r->scratch_mr->lkey;
        wr->opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
        wr->send_flags |= IBV_SEND_FENCE;
        wr->wr.atomic.remote_addr = raddr;
        wr->wr.atomic.rkey = rkey;
        wr->wr.atomic.compare_add = c->value;
        return;
    }
    if (c->src == RDMA_SRC_LOCAL) {
        sge->addr = (uint64_t)(uintptr_t)(r->base.local + c->src_off);
        sge->lkey = r->mr->lkey;
    } else {
        sge->addr = (uint64_t)(uintptr_t)(r->stage + c->src_off);
        sge->lkey = r->stage_mr->lkey;
    }
    sge->length = c->len;
    wr->opcode = IBV_WR_RDMA_WRITE;
    wr->wr.rdma.remote_addr = raddr;
    wr->wr.rdma.rkey = rkey;
}

/* Posts what fits of peer i's queue in batches; returns the number posted. */
static int post_peer(struct wire_rdma *r, int i, uint64_t now)
{
    struct rdma_peer *p = &r->peers[i];
    if (atomic_load_explicit(&p->failed, memory_order_relaxed)) {
        drop_queue(r, p);
        return 0;
    }
    int total = 0;
    while (p->q_first != NONE && p->outstanding < r->opts.sq_depth) {
        struct ibv_send_wr wr[POST_BATCH], *bad = NULL;
        struct ibv_sge sge[POST_BATCH];
        int n = 0, room = r->opts.sq_depth - p->outstanding;
        uint64_t s = p->q_first;
        while (s != NONE && n < POST_BATCH && n < room) {
            build_wr(r, p, s, &wr[n], &sge[n]);
            if (n) wr[n - 1].next = &wr[n];
            n++;
            s = r->next[s % RING_SLOTS];
        }
        int rc = ibv_post_send(p->qp, wr, &bad);
        int posted = rc ? (int)(bad - wr) : n;
        if (posted && p->outstanding == 0) p->progress_ns = now;
        p->outstanding += posted;
        total += posted;
        for (int k = 0; k < posted; k++)
            p->q_first = r->next[p->q_first % RING_SLOTS];
        if (p->q_first == NONE) p->q_last = NONE;
        if (rc) {
            struct ibv_qp_attr qa;
            struct ibv_qp_init_attr qi;
            int in_err = !ibv_query_qp(p->qp, &qa, IBV_QP_STATE, &qi) && qa.qp_state == IBV_QPS_ERR;
            rdma_peer_fail(r, i, in_err ? EP_ERR_PEER : EP_ERR_IO,
                           "rank %d: posting rdma work to rank %d failed: %s%s", r->base.rank, i,
                           strerror(rc), in_err ? " (its queue pair is in the error state)" : "");
            drop_queue(r, p);
            break;
        }
    }
    return total;
}

static ep_status_t wc_status(enum ibv_wc_status s)
{
    switch (s) {
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
        return EP_ERR_TIMEOUT;
    case IBV_WC_WR_FLUSH_ERR:
        return EP_ERR_PEER;
    default:
        return EP_ERR_IO;
    }
}

static int poll_cq(struct wire_rdma *r, uint64_t now)
{
    struct ibv_wc wc[POLL_BATCH];
    int n = ibv_poll_cq(r->cq, POLL_BATCH, wc);
    if (n < 0) {
        /* The CQ itself failed: nothing completes any more; every peer is lost. */
        for (int i = 0; i < r->base.nranks; i++)
            if (i != r->base.rank && !atomic_load(&r->peers[i].failed))
                rdma_peer_fail(r, i, EP_ERR_IO, "rank %d: ibv_poll_cq failed (%d)", r->base.rank,
                               n);
        return 0;
    }
    for (int k = 0; k < n; k++) {
        uint64_t seq = wc[k].wr_id;
        const struct rdma_cmd *c = &r->cmds[seq % RING_SLOTS];
        struct rdma_peer *p = &r->peers[c->peer];
        p->outstanding--;
        p->progress_ns = now;
        mark_done(r, seq);
        if (wc[k].status == IBV_WC_SUCCESS || atomic_load(&p->failed)) continue;
        rdma_peer_fail(
            r, c->peer, wc_status(wc[k].status),
            "rank %d: rdma %s of %u bytes to rank %d at offset %llu failed: %s "
            "(vendor error 0x%x)%s",
            r->base.rank, op_name(c->op), c->len, c->peer, (unsigned long long)c->remote_off,
            ibv_wc_status_str(wc[k].status), wc[k].vendor_err,
            wc[k].status == IBV_WC_WR_FLUSH_ERR    ? "; the queue pair is in the error state"
            : wc[k].status == IBV_WC_RETRY_EXC_ERR ? "; the peer does not answer"
                                                   : "");
    }
    return n;
}

static void retire(struct wire_rdma *r)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed), t = tail;
    uint64_t stage = 0;
    while (t < r->seen && r->status[t % RING_SLOTS]) {
        stage = r->cmds[t % RING_SLOTS].stage_end;
        t++;
    }
    if (t == tail) return;
    atomic_store_explicit(&r->stage_tail, stage, memory_order_release);
    atomic_store_explicit(&r->tail, t, memory_order_release);
}

static void poll_async(struct wire_rdma *r)
{
    struct ibv_async_event ev;
    while (ibv_get_async_event(r->ctx, &ev) == 0) {
        enum ibv_event_type t = ev.event_type;
        if (t == IBV_EVENT_QP_FATAL || t == IBV_EVENT_QP_REQ_ERR || t == IBV_EVENT_QP_ACCESS_ERR ||
            t == IBV_EVENT_PATH_MIG_ERR) {
            for (int i = 0; i < r->base.nranks; i++)
                if (r->peers[i].qp && r->peers[i].qp == ev.element.qp &&
                    !atomic_load(&r->peers[i].failed))
                    rdma_peer_fail(r, i, EP_ERR_PEER,
                                   "rank %d: the queue pair to rank %d "
                                   "reported %s",
                                   r->base.rank, i, ibv_event_type_str(t));
        } else if (t == IBV_EVENT_DEVICE_FATAL || t == IBV_EVENT_PORT_ERR) {
            for (int i = 0; i < r->base.nranks; i++)
                if (i != r->base.rank && !atomic_load(&r->peers[i].failed))
                    rdma_peer_fail(r, i, EP_ERR_IO, "rank %d: %s port %d: %s", r->base.rank,
                                   r->sel.name, r->sel.port, ibv_event_type_str(t));
        }
        ibv_ack_async_event(&ev);
    }
}

static void check_silent(struct wire_rdma *r, uint64_t now)
{
    uint64_t limit = (uint64_t)r->base.timeout_ms * 1000000ull;
    for (int i = 0; i < r->base.nranks; i++) {
        struct rdma_peer *p = &r->peers[i];
        if (i == r->base.rank || p->outstanding == 0 || atomic_load(&p->failed)) continue;
        if (now - p->progress_ns > limit)
            rdma_peer_fail(r, i, EP_ERR_TIMEOUT,
                           "rank %d: rank %d acknowledged none of %d rdma operations within %u "
                           "ms (the peer does not answer)",
                           r->base.rank, i, p->outstanding, r->base.timeout_ms);
    }
}

void *rdma_proxy_main(void *arg)
{
    struct wire_rdma *r = arg;
    for (int i = 0; i < r->base.nranks; i++)
        r->peers[i].q_first = r->peers[i].q_last = NONE;
    uint64_t last_tick = epd_now_ns();
    unsigned idle = 0;
    while (!atomic_load_explicit(&r->stop, memory_order_relaxed)) {
        int work = 0;
        uint64_t now = epd_now_ns();
        uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
        for (; r->seen < head; r->seen++, work++)
            take(r, r->seen);
        for (int i = 0; i < r->base.nranks; i++)
            if (r->peers[i].q_first != NONE) work += post_peer(r, i, now);
        work += poll_cq(r, now);
        retire(r);
        if (now - last_tick > TICK_NS) {
            last_tick = now;
            poll_async(r);
            if (r->opts.use_cm) rdma_cm_poll(r);
            check_silent(r, now);
        }
        if (work) {
            idle = 0;
        } else if (++idle > IDLE_SPINS) {
            struct timespec ts = {0, NAP_NS};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}
