/* The verbs wire: one RC queue pair per (this rank, peer), the symmetric buffer registered for
 * remote write and atomics, endpoints exchanged through the bootstrap (or rdma_cm, rdma_cm.c).
 * put() and signal() copy their source into registered staging memory and write a descriptor
 * into the command ring; the proxy thread (rdma_proxy.c) posts them. State: rdma_wire.h. */
#include "rdma_wire.h"
#include "epd_clock.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* destroy(): how long queued operations may take to complete before the QPs go. */
#define LINGER_MS 2000u
/* flush(): a backstop past timeout_ms; the proxy fails a silent peer at timeout_ms. */
#define FLUSH_SLACK_MS 2000u
#define ALIGN_UP(x, a) (((x) + (a)-1) / (a) * (a))

ep_status_t rdma_peer_fail(struct wire_rdma *r, int peer, ep_status_t st, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (peer >= 0 && peer < r->base.nranks) {
        struct rdma_peer *p = &r->peers[peer];
        int expected = 0;
        if (atomic_compare_exchange_strong(&p->failed, &expected, 1)) {
            p->fail_st = st;
            /* Posted work then completes (flushed) instead of holding ring and staging. */
            if (p->qp) {
                struct ibv_qp_attr a = {.qp_state = IBV_QPS_ERR};
                ibv_modify_qp(p->qp, &a, IBV_QP_STATE);
            }
        }
    }
    return ep_wire_fail(&r->base, peer, st, "%s", msg);
}

static ep_status_t peer_status(struct wire_rdma *r, int peer)
{
    struct rdma_peer *p = &r->peers[peer];
    if (atomic_load_explicit(&p->failed, memory_order_acquire))
        return p->fail_st ? p->fail_st : EP_ERR_PEER;
    return EP_OK;
}

/* ---- producer side of the ring ------------------------------------------------------------ */

/* Reserves one ring slot and `need` contiguous staging bytes (8-byte aligned), waiting while
 * the proxy catches up. Caller holds prod_lock. */
static ep_status_t reserve(struct wire_rdma *r, int peer, size_t need, uint64_t *pos, uint64_t *end)
{
    const uint64_t S = r->opts.stage_bytes;
    uint64_t deadline = 0;
    unsigned spins = 0;
    need = ALIGN_UP(need, 64);
    for (;;) {
        ep_status_t st = peer_status(r, peer);
        if (st) return st;
        if (atomic_load_explicit(&r->base.aborted, memory_order_relaxed)) return EP_ERR_ABORTED;
        uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        uint64_t stail = atomic_load_explicit(&r->stage_tail, memory_order_acquire);
        uint64_t off = r->stage_head % S;
        uint64_t skip = need && off + need > S ? S - off : 0;
        if (head - tail < RING_SLOTS && r->stage_head + skip + need - stail <= S) {
            r->stage_head += skip;
            *pos = r->stage_head % S;
            r->stage_head += need;
            *end = r->stage_head;
            return EP_OK;
        }
        if (++spins < 256) continue;
        uint64_t now = epd_now_ns();
        if (!deadline)
            deadline = now + (uint64_t)(r->base.timeout_ms + FLUSH_SLACK_MS) * 1000000ull;
        if (now > deadline) {
            int oldest = r->cmds[tail % RING_SLOTS].peer;
            return rdma_peer_fail(r, oldest, EP_ERR_TIMEOUT,
                                  "rank %d: the rdma command ring stayed full for %u ms; the "
                                  "oldest operation waits on rank %d",
                                  r->base.rank, r->base.timeout_ms + FLUSH_SLACK_MS, oldest);
        }
        sched_yield();
    }
}

static void push(struct wire_rdma *r, const struct rdma_cmd *c)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    r->cmds[head % RING_SLOTS] = *c;
    atomic_store_explicit(&r->head, head + 1, memory_order_release);
}

static ep_status_t check_peer(struct wire_rdma *r, int peer)
{
    if (!r->connected) return EP_ERR_STATE;
    return peer_status(r, peer);
}

static ep_status_t wire_put(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len)
{
    struct wire_rdma *r = rdma_of(w);
    if (peer < 0 || peer >= w->nranks || remote_off > w->bytes || len > w->bytes - remote_off ||
        (len && !src))
        return EP_ERR_INVALID;
    if (peer == w->rank) {
        memmove(w->local + remote_off, src, len);
        return EP_OK;
    }
    ep_status_t st = check_peer(r, peer);
    if (st || len == 0) return st;
    size_t chunk =
        r->opts.stage_bytes / 4 < PUT_CHUNK_MAX ? r->opts.stage_bytes / 4 : PUT_CHUNK_MAX;
    pthread_mutex_lock(&r->prod_lock);
    for (size_t done = 0; done < len && !st;) {
        size_t n = len - done < chunk ? len - done : chunk;
        uint64_t pos, end;
        if ((st = reserve(r, peer, n, &pos, &end))) break;
        memcpy(r->stage + pos, (const uint8_t *)src + done, n);
        struct rdma_cmd c = {.op = RDMA_CMD_PUT,
                             .src = RDMA_SRC_STAGE,
                             .peer = (uint16_t)peer,
                             .len = (uint32_t)n,
                             .remote_off = remote_off + done,
                             .src_off = pos,
                             .stage_end = end};
        push(r, &c);
        done += n;
    }
    pthread_mutex_unlock(&r->prod_lock);
    return st;
}

ep_status_t ep_wire_rdma_put_local(ep_wire_t *w, int peer, size_t remote_off, size_t local_off,
                                   size_t len)
{
    struct wire_rdma *r = rdma_of(w);
    if (peer < 0 || peer >= w->nranks || remote_off > w->bytes || len > w->bytes - remote_off ||
        local_off > w->bytes || len > w->bytes - local_off)
        return EP_ERR_INVALID;
    if (peer == w->rank) {
        memmove(w->local + remote_off, w->local + local_off, len);
        return EP_OK;
    }
    ep_status_t st = check_peer(r, peer);
    if (st || len == 0) return st;
    pthread_mutex_lock(&r->prod_lock);
    for (size_t done = 0; done < len && !st;) {
        size_t n = len - done < PUT_CHUNK_MAX ? len - done : PUT_CHUNK_MAX;
        uint64_t pos, end;
        if ((st = reserve(r, peer, 0, &pos, &end))) break;
        struct rdma_cmd c = {.op = RDMA_CMD_PUT,
                             .src = RDMA_SRC_LOCAL,
                             .peer = (uint16_t)peer,
                             .len = (uint32_t)n,
                             .remote_off = remote_off + done,
                             .src_off = local_off + done,
                             .stage_end = end};
        push(r, &c);
        done += n;
    }
    pthread_mutex_unlock(&r->prod_lock);
    return st;
}

static ep_status_t wire_signal(ep_wire_t *w, int peer, size_t remote_off, uint64_t value,
                               ep_signal_op_t op)
{
    struct wire_rdma *r = rdma_of(w);
    if (peer < 0 || peer >= w->nranks || remote_off % 8 || w->bytes < 8 ||
        remote_off > w->bytes - 8 || (op != EP_SIGNAL_SET && op != EP_SIGNAL_ADD))
        return EP_ERR_INVALID;
    if (peer == w->rank) {
        _Atomic uint64_t *a = (_Atomic uint64_t *)(w->local + remote_off);
        if (op == EP_SIGNAL_ADD)
            atomic_fetch_add_explicit(a, value, memory_order_release);
        else
            atomic_store_explicit(a, value, memory_order_release);
        return EP_OK;
    }
    ep_status_t st = check_peer(r, peer);
    if (st) return st;
    pthread_mutex_lock(&r->prod_lock);
    uint64_t pos, end;
    /* SET travels as an 8-byte RDMA WRITE from staging (ordered after the puts on the RC QP),
     * ADD as a fenced fetch-and-add (needs no staging). */
    st = reserve(r, peer, op == EP_SIGNAL_SET ? 8 : 0, &pos, &end);
    if (!st) {
        if (op == EP_SIGNAL_SET) memcpy(r->stage + pos, &value, 8);
        struct rdma_cmd c = {.op = op == EP_SIGNAL_SET ? RDMA_CMD_SET : RDMA_CMD_ADD,
                             .src = RDMA_SRC_STAGE,
                             .peer = (uint16_t)peer,
                             .len = 8,
                             .remote_off = remote_off,
                             .src_off = pos,
                             .value = value,
                             .stage_end = end};
        push(r, &c);
    }
    pthread_mutex_unlock(&r->prod_lock);
    return st;
}

static int first_failed(struct wire_rdma *r)
{
    for (int i = 0; i < r->base.nranks; i++)
        if (i != r->base.rank && atomic_load(&r->peers[i].failed)) return i;
    return -1;
}

/* Waits until every command pushed so far completed; returns -1 on time out. */
static int drain(struct wire_rdma *r, uint64_t limit_ms, int abortable)
{
    uint64_t target = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t deadline = epd_now_ns() + limit_ms * 1000000ull;
    unsigned spins = 0;
    while (atomic_load_explicit(&r->tail, memory_order_acquire) < target) {
        if (abortable && atomic_load_explicit(&r->base.aborted, memory_order_relaxed)) return -2;
        if (++spins < 256) continue;
        spins = 0;
        if (epd_now_ns() > deadline) return -1;
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static ep_status_t wire_flush(ep_wire_t *w)
{
    struct wire_rdma *r = rdma_of(w);
    if (!r->connected) return EP_OK;
    int rc = drain(r, (uint64_t)w->timeout_ms + FLUSH_SLACK_MS, 1);
    if (rc == -2) return EP_ERR_ABORTED;
    if (rc == -1) {
        uint64_t tail = atomic_load(&r->tail);
        int oldest = r->cmds[tail % RING_SLOTS].peer;
        return rdma_peer_fail(r, oldest, EP_ERR_TIMEOUT,
                              "rank %d: rdma operations to rank %d not completed within %u ms",
                              w->rank, oldest, w->timeout_ms + FLUSH_SLACK_MS);
    }
    int bad = first_failed(r);
    return bad >= 0 ? peer_status(r, bad) : EP_OK;
}

/* ---- set-up ------------------------------------------------------------------------------- */

/* Smallest t with 4.096 us * 2^t * (retries + 1) >= half the timeout, so that a silent peer
 * exhausts the RC retries inside timeout_ms. */
static int ack_timeout_for(unsigned timeout_ms)
{
    double per_try_us = (double)timeout_ms * 1000.0 / 2.0 / 8.0;
    int t = 8;
    while (t < 20 && 4.096 * (double)(1u << (t + 1)) <= per_try_us)
        t++;
    return t;
}

void rdma_qp_init_attr(struct wire_rdma *r, struct ibv_qp_init_attr *a)
{
    memset(a, 0, sizeof *a);
    a->send_cq = r->cq;
    a->recv_cq = r->cq;
    a->qp_type = IBV_QPT_RC;
    a->cap.max_send_wr = (uint32_t)r->opts.sq_depth;
    a->cap.max_recv_wr = 1; /* one-sided only; some providers refuse a zero-sized RQ */
    a->cap.max_send_sge = 1;
    a->cap.max_recv_sge = 1;
    a->sq_sig_all = 0;
}

static ep_status_t verbs_fail(struct wire_rdma *r, int peer, const char *call)
{
    int e = errno ? errno : EIO;
    if (peer >= 0)
        return rdma_peer_fail(r, peer, EP_ERR_IO, "rank %d: %s for rank %d on %s failed: %s",
                              r->base.rank, call, peer, r->sel.name, strerror(e));
    return rdma_peer_fail(r, -1, EP_ERR_IO, "rank %d: %s on %s failed: %s", r->base.rank, call,
                          r->sel.name[0] ? r->sel.name : "the rdma device", strerror(e));
}

static ep_status_t alloc_common(struct wire_rdma *r)
{
    struct ibv_device_attr da;
    if (ibv_query_device(r->ctx, &da)) return verbs_fail(r, -1, "ibv_query_device");
    r->max_rd_atomic =
        da.max_qp_rd_atom < da.max_qp_init_rd_atom ? da.max_qp_rd_atom : da.max_qp_init_rd_atom;
    if (r->max_rd_atomic > 16) r->max_rd_atomic = 16;
    if (r->max_rd_atomic < 1) r->max_rd_atomic = 1;
    if (r->opts.sq_depth > da.max_qp_wr) r->opts.sq_depth = da.max_qp_wr;
    long cqe = (long)r->opts.sq_depth * (r->base.nranks - 1) + 16;
    r->cq_depth = (int)(cqe < da.max_cqe ? cqe : da.max_cqe);
    if (!(r->pd = ibv_alloc_pd(r->ctx))) return verbs_fail(r, -1, "ibv_alloc_pd");
    if (!(r->cq = ibv_create_cq(r->ctx, r->cq_depth, NULL, NULL, 0)))
        return verbs_fail(r, -1, "ibv_create_cq");
    int remote = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                 IBV_ACCESS_REMOTE_ATOMIC;
    /* Host memory on the cpu backend; the cuda backend passes its dmabuf fd here. */
    if (!(r->mr = rdma_reg(r->pd, r->base.local, r->base.bytes, -1, remote)))
        return verbs_fail(r, -1, "ibv_reg_mr (symmetric buffer)");
    r->stage = aligned_alloc(4096, r->opts.stage_bytes);
    r->scratch = aligned_alloc(64, 64);
    if (!r->stage || !r->scratch)
        return rdma_peer_fail(r, -1, EP_ERR_NOMEM,
                              "rank %d: out of memory for %zu bytes of rdma "
                              "staging",
                              r->base.rank, r->opts.stage_bytes);
    if (!(r->stage_mr = rdma_reg(r->pd, r->stage, r->opts.stage_bytes, -1, IBV_ACCESS_LOCAL_WRITE)))
        return verbs_fail(r, -1, "ibv_reg_mr (staging)");
    if (!(r->scratch_mr = rdma_reg(r->pd, r->scratch, 64, -1, IBV_ACCESS_LOCAL_WRITE)))
        return verbs_fail(r, -1, "ibv_reg_mr (atomic scratch)");
    /* The proxy polls for asynchronous errors (a QP gone fatal) without blocking. */
    int fl = fcntl(r->ctx->async_fd, F_GETFL);
    if (fl < 0 || fcntl(r->ctx->async_fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return verbs_fail(r, -1, "fcntl(async_fd, O_NONBLOCK)");
    return EP_OK;
}

static ep_status_t create_qps(struct wire_rdma *r)
{
    for (int i = 0; i < r->base.nranks; i++) {
        if (i == r->base.rank) continue;
        struct ibv_qp_init_attr ia;
        rdma_qp_init_attr(r, &ia);
        struct rdma_peer *p = &r->peers[i];
        if (!(p->qp = ibv_create_qp(r->pd, &ia))) return verbs_fail(r, i, "ibv_create_qp");
        struct ibv_qp_attr a = {.qp_state = IBV_QPS_INIT,
                                .pkey_index = 0,
                                .port_num = (uint8_t)r->sel.port,
                                .qp_access_flags = IBV_ACCESS_REMOTE_WRITE |
                                                   IBV_ACCESS_REMOTE_READ |
                                                   IBV_ACCESS_REMOTE_ATOMIC};
        if (ibv_modify_qp(p->qp, &a,
                          IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
            return verbs_fail(r, i, "ibv_modify_qp(INIT)");
        uint32_t rnd = 0;
        if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd) rnd = (uint32_t)epd_now_ns();
        p->psn = rnd & 0xffffff;
    }
    return EP_OK;
}

static ep_status_t connect_qp(struct wire_rdma *r, int i, const struct rdma_blob *b, uint32_t qpn,
                              uint32_t rpsn)
{
    struct rdma_peer *p = &r->peers[i];
    enum ibv_mtu mtu =
        r->sel.active_mtu < (enum ibv_mtu)b->mtu ? r->sel.active_mtu : (enum ibv_mtu)b->mtu;
    if (r->opts.mtu && rdma_mtu_enum(r->opts.mtu) < mtu) mtu = rdma_mtu_enum(r->opts.mtu);
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_RTR,
                            .path_mtu = mtu,
                            .dest_qp_num = qpn,
                            .rq_psn = rpsn,
                            .max_dest_rd_atomic = (uint8_t)r->max_rd_atomic,
                            .min_rnr_timer = 12};
    a.ah_attr.port_num = (uint8_t)r->sel.port;
    a.ah_attr.dlid = b->lid;
    if (r->sel.roce) {
        a.ah_attr.is_global = 1;
        memcpy(a.ah_attr.grh.dgid.raw, b->gid, 16);
        a.ah_attr.grh.sgid_index = (uint8_t)r->sel.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.traffic_class = (uint8_t)r->opts.tc;
    }
    if (ibv_modify_qp(p->qp, &a,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
        return verbs_fail(r, i, "ibv_modify_qp(RTR)");
    struct ibv_qp_attr s = {.qp_state = IBV_QPS_RTS,
                            .timeout = (uint8_t)r->ack_timeout,
                            .retry_cnt = 7,
                            .rnr_retry = 7,
                            .sq_psn = p->psn,
                            .max_rd_atomic = (uint8_t)r->max_rd_atomic};
    if (ibv_modify_qp(p->qp, &s,
                      IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                          IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC))
        return verbs_fail(r, i, "ibv_modify_qp(RTS)");
    return EP_OK;
}

static ep_status_t check_blob(struct wire_rdma *r, int i, const struct rdma_blob *b)
{
    int me = r->base.rank;
    if (b->magic != RDMA_BLOB_MAGIC || b->version != RDMA_BLOB_VERSION)
        return rdma_peer_fail(r, i, EP_ERR_BOOTSTRAP,
                              "rank %d: rank %d's rdma endpoint is not one (magic 0x%08x, "
                              "version %u)",
                              me, i, b->magic, b->version);
    if (b->rank != (uint32_t)i || b->nranks != (uint32_t)r->base.nranks)
        return rdma_peer_fail(r, i, EP_ERR_BOOTSTRAP,
                              "rank %d: endpoint %d says it is rank %u of %u (expected %d of %d)",
                              me, i, b->rank, b->nranks, i, r->base.nranks);
    if (b->bytes != r->base.bytes)
        return rdma_peer_fail(r, i, EP_ERR_INVALID,
                              "rank %d: rank %d has a %llu-byte buffer, this rank %zu", me, i,
                              (unsigned long long)b->bytes, r->base.bytes);
    if (b->use_cm != (uint8_t)r->opts.use_cm || b->roce != (uint8_t)r->sel.roce)
        return rdma_peer_fail(
            r, i, EP_ERR_INVALID, "rank %d: rank %d uses %s over %s, this rank %s over %s", me, i,
            b->use_cm ? "rdma_cm" : "bootstrap QPs", b->roce ? "RoCE" : "InfiniBand",
            r->opts.use_cm ? "rdma_cm" : "bootstrap QPs", r->sel.roce ? "RoCE" : "InfiniBand");
    return EP_OK;
}

static ep_status_t wire_connect(ep_wire_t *w, const ep_bootstrap_t *bs, void *local, size_t bytes)
{
    struct wire_rdma *r = rdma_of(w);
    ep_status_t st;
    char err[256];
    int n = w->nranks, me = w->rank;
    w->local = local;
    w->bytes = bytes;
    if (r->opts_error[0]) return rdma_peer_fail(r, -1, EP_ERR_INVALID, "%s", r->opts_error);
    if (r->opts.use_cm) {
        if ((st = rdma_cm_open(r))) return st;
    } else {
        if (!(r->ctx = rdma_select(&r->opts, me, &r->sel, err, sizeof err)))
            return rdma_peer_fail(r, -1, EP_ERR_IO, "rank %d: %s", me, err);
    }
    if ((st = alloc_common(r))) return st;
    if (!r->opts.use_cm && (st = create_qps(r))) return st;

    size_t blob_len = sizeof(struct rdma_blob) + 8 * (size_t)n;
    uint8_t *mine = calloc(1, blob_len), *all = calloc((size_t)n, blob_len);
    if (!mine || !all) {
        free(mine);
        free(all);
        return rdma_peer_fail(r, -1, EP_ERR_NOMEM, "rank %d: out of memory", me);
    }
    struct rdma_blob *b = (struct rdma_blob *)mine;
    b->magic = RDMA_BLOB_MAGIC;
    b->version = RDMA_BLOB_VERSION;
    b->roce = (uint8_t)r->sel.roce;
    b->use_cm = (uint8_t)r->opts.use_cm;
    b->rank = (uint32_t)me;
    b->nranks = (uint32_t)n;
    b->addr = (uint64_t)(uintptr_t)local;
    b->bytes = bytes;
    b->rkey = r->mr->rkey;
    b->lid = r->sel.lid;
    b->mtu = (uint8_t)r->sel.active_mtu;
    memcpy(b->gid, r->sel.gid.raw, 16);
    if (r->opts.use_cm) {
        struct sockaddr_in *sa = (struct sockaddr_in *)rdma_get_local_addr(r->cm_listen);
        b->ipv4 = sa->sin_addr.s_addr;
        b->cm_port = ntohs(rdma_get_src_port(r->cm_listen));
    }
    uint32_t *qpn = (uint32_t *)(b + 1), *psn = qpn + n;
    for (int i = 0; i < n; i++) {
        if (i == me || !r->peers[i].qp) continue;
        qpn[i] = r->peers[i].qp->qp_num;
        psn[i] = r->peers[i].psn;
    }
    int rc = bs->allgather(bs->ctx, mine, all, blob_len, w->timeout_ms);
    if (rc) {
        st = rc < 0 && rc >= EP_ERR_ABORTED ? rc : EP_ERR_BOOTSTRAP;
        st = rdma_peer_fail(r, -1, st, "rank %d: rdma endpoint exchange failed (%s)", me,
                            ep_strerror(st));
        goto out;
    }
    for (int i = 0; i < n && !st; i++) {
        const struct rdma_blob *pb = (const struct rdma_blob *)(all + (size_t)i * blob_len);
        if ((st = check_blob(r, i, pb))) break;
        if (i == me) continue;
        r->peers[i].raddr = pb->addr;
        atomic_store(&r->peers[i].rkey, pb->rkey);
        if (!r->opts.use_cm) {
            const uint32_t *pq = (const uint32_t *)(pb + 1), *pp = pq + n;
            r->peers[i].qpn = pq[me];
            st = connect_qp(r, i, pb, pq[me], pp[me]);
        }
    }
    if (!st && r->opts.use_cm) st = rdma_cm_connect(r, all, blob_len);
    if (st) goto out;
    /* Nobody posts before every QP of every rank is ready to receive. */
    rc = bs->barrier(bs->ctx, w->timeout_ms);
    if (rc) {
        st = rdma_peer_fail(r, -1, EP_ERR_BOOTSTRAP,
                            "rank %d: barrier after connecting the rdma QPs failed (%s)", me,
                            ep_strerror(rc < 0 && rc >= EP_ERR_ABORTED ? rc : EP_ERR_BOOTSTRAP));
        goto out;
    }
    if ((rc = pthread_create(&r->proxy, NULL, rdma_proxy_main, r))) {
        errno = rc;
        st = verbs_fail(r, -1, "pthread_create (rdma proxy)");
        goto out;
    }
    r->proxy_started = 1;
    r->connected = 1;
out:
    free(mine);
    free(all);
    return st;
}

static void wire_destroy(ep_wire_t *w)
{
    struct wire_rdma *r = rdma_of(w);
    if (!r) return;
    if (r->proxy_started) {
        drain(r, LINGER_MS, 0);
        atomic_store(&r->stop, 1);
        pthread_join(r->proxy, NULL);
    }
    /* QPs first, then what they use; rdma_cm's ids (and with them its device context) last. */
    for (int i = 0; r->peers && i < w->nranks; i++) {
        struct rdma_peer *p = &r->peers[i];
        if (p->cm_id && p->cm_id->qp)
            rdma_destroy_qp(p->cm_id);
        else if (p->qp)
            ibv_destroy_qp(p->qp);
        p->qp = NULL;
    }
    if (r->scratch_mr) ibv_dereg_mr(r->scratch_mr);
    if (r->stage_mr) ibv_dereg_mr(r->stage_mr);
    if (r->mr) ibv_dereg_mr(r->mr);
    if (r->cq) ibv_destroy_cq(r->cq);
    if (r->pd) ibv_dealloc_pd(r->pd);
    if (r->opts.use_cm)
        rdma_cm_close(r);
    else if (r->ctx)
        ibv_close_device(r->ctx);
    free(r->scratch);
    free(r->stage);
    free(r->cmds);
    free(r->next);
    free(r->status);
    free(r->peers);
    pthread_mutex_destroy(&r->prod_lock);
    free(r);
}

static const struct ep_wire_ops rdma_ops = {
    .name = "rdma",
    .connect = wire_connect,
    .put = wire_put,
    .put_local = ep_wire_rdma_put_local,
    .signal = wire_signal,
    .flush = wire_flush,
    .destroy = wire_destroy,
};

void ep_wire_rdma_prefer_near(ep_wire_t *w, const char *pci_bus_id)
{
    struct wire_rdma *r = rdma_of(w);
    if (!r->opts.device[0] && !r->opts.near[0] && pci_bus_id && *pci_bus_id)
        snprintf(r->opts.near, sizeof r->opts.near, "%s", pci_bus_id);
}

ep_status_t ep_wire_rdma_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out)
{
    char err[200];
    struct rdma_opts o;
    const char *s = cfg->rdma_options ? cfg->rdma_options : getenv(RDMA_OPTIONS_ENV);
    *out = NULL;
    if (rank < 0 || nranks < 1 || nranks > EP_MAX_RANKS || rank >= nranks) return EP_ERR_INVALID;
    struct wire_rdma *r = calloc(1, sizeof *r);
    if (!r) return EP_ERR_NOMEM;
    r->base.ops = &rdma_ops;
    r->base.rank = rank;
    r->base.nranks = nranks;
    r->base.timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 10000;
    atomic_init(&r->base.failed_peer, -1);
    atomic_init(&r->base.aborted, 0);
    pthread_mutex_init(&r->prod_lock, NULL);
    /* A bad option string fails connect(), where the error reaches the group's message. */
    if (rdma_opts_parse(s, &o, err, sizeof err)) {
        snprintf(r->opts_error, sizeof r->opts_error, "rank %d: %s (from %s)", rank, err,
                 cfg->rdma_options ? "config.rdma_options" : RDMA_OPTIONS_ENV);
        rdma_opts_parse(NULL, &o, err, sizeof err);
    }
    r->opts = o;
    r->ack_timeout = ack_timeout_for(r->base.timeout_ms);
    r->peers = calloc((size_t)nranks, sizeof *r->peers);
    r->cmds = calloc(RING_SLOTS, sizeof *r->cmds);
    r->next = calloc(RING_SLOTS, sizeof *r->next);
    r->status = calloc(RING_SLOTS, 1);
    if (!r->peers || !r->cmds || !r->next || !r->status) {
        wire_destroy(&r->base);
        return EP_ERR_NOMEM;
    }
    *out = &r->base;
    return EP_OK;
}

/* ---- test hooks --------------------------------------------------------------------------- */

struct ibv_qp *ep_wire_rdma_qp(ep_wire_t *w, int peer)
{
    struct wire_rdma *r = rdma_of(w);
    return peer >= 0 && peer < w->nranks ? r->peers[peer].qp : NULL;
}

void ep_wire_rdma_set_rkey(ep_wire_t *w, int peer, uint32_t rkey)
{
    if (peer >= 0 && peer < w->nranks) atomic_store(&rdma_of(w)->peers[peer].rkey, rkey);
}

uint32_t ep_wire_rdma_rkey(ep_wire_t *w, int peer)
{
    return peer >= 0 && peer < w->nranks ? atomic_load(&rdma_of(w)->peers[peer].rkey) : 0;
}

const struct rdma_port_sel *ep_wire_rdma_port(ep_wire_t *w)
{
    return &rdma_of(w)->sel;
}

int ep_wire_rdma_uses_cm(ep_wire_t *w)
{
    return rdma_of(w)->opts.use_cm;
}
