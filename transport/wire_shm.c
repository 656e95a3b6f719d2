/* The shm wire: ranks are threads of one process, so a put is a memcpy into the peer's
 * buffer and a signal an atomic store/add with release order on the peer's word. */
#include "wire.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct shm_wire {
    ep_wire_t base;
    uint8_t *peer[EP_MAX_RANKS];
};

struct shm_endpoint {
    int64_t pid;
    uint64_t addr;
    uint64_t bytes;
};

static ep_status_t shm_connect(ep_wire_t *w, const ep_bootstrap_t *bs, void *local, size_t bytes)
{
    struct shm_wire *s = (struct shm_wire *)w;
    struct shm_endpoint me = {(int64_t)getpid(), (uint64_t)(uintptr_t)local, bytes};
    struct shm_endpoint *all = calloc((size_t)w->nranks, sizeof *all);
    ep_status_t st = EP_OK;
    if (!all) return ep_wire_fail(w, -1, EP_ERR_NOMEM, "shm wire: out of memory");
    w->local = local;
    w->bytes = bytes;
    int rc = bs->allgather(bs->ctx, &me, all, sizeof me, w->timeout_ms);
    if (rc) {
        st = ep_wire_fail(w, -1, rc < 0 && rc >= EP_ERR_ABORTED ? rc : EP_ERR_BOOTSTRAP,
                          "rank %d: shm wire endpoint exchange failed (%s)", w->rank,
                          ep_strerror(rc < 0 && rc >= EP_ERR_ABORTED ? rc : EP_ERR_BOOTSTRAP));
        goto out;
    }
    for (int r = 0; r < w->nranks; r++) {
        if (all[r].pid != me.pid) {
            st = ep_wire_fail(w, r, EP_ERR_UNSUPPORTED,
                              "rank %d: the shm wire needs every rank in one process, but rank "
                              "%d is process %lld and this is process %lld (use tcp)",
                              w->rank, r, (long long)all[r].pid, (long long)me.pid);
            goto out;
        }
        if (all[r].bytes != bytes) {
            st = ep_wire_fail(w, r, EP_ERR_INVALID,
                              "rank %d: rank %d has a %llu-byte buffer, this rank %zu", w->rank, r,
                              (unsigned long long)all[r].bytes, bytes);
            goto out;
        }
        s->peer[r] = (uint8_t *)(uintptr_t)all[r].addr;
    }
out:
    free(all);
    return st;
}

static ep_status_t check_range(ep_wire_t *w, int peer, size_t off, size_t len, const char *what)
{
    if (peer < 0 || peer >= w->nranks)
        return ep_wire_fail(w, -1, EP_ERR_INVALID, "rank %d: %s to rank %d of %d", w->rank, what,
                            peer, w->nranks);
    if (off > w->bytes || len > w->bytes - off)
        return ep_wire_fail(w, peer, EP_ERR_INVALID,
                            "rank %d: %s of %zu bytes at offset %zu to rank %d overruns its "
                            "%zu-byte buffer",
                            w->rank, what, len, off, peer, w->bytes);
    return EP_OK;
}

static ep_status_t shm_put(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len)
{
    struct shm_wire *s = (struct shm_wire *)w;
    ep_status_t st = check_range(w, peer, remote_off, len, "put");
    if (st) return st;
    if (len) memcpy(s->peer[peer] + remote_off, src, len);
    return EP_OK;
}

static ep_status_t shm_signal(ep_wire_t *w, int peer, size_t remote_off, uint64_t value,
                              ep_signal_op_t op)
{
    struct shm_wire *s = (struct shm_wire *)w;
    ep_status_t st = check_range(w, peer, remote_off, sizeof(uint64_t), "signal");
    if (st) return st;
    if (remote_off % sizeof(uint64_t))
        return ep_wire_fail(w, peer, EP_ERR_INVALID, "rank %d: signal word offset %zu unaligned",
                            w->rank, remote_off);
    _Atomic uint64_t *word = (_Atomic uint64_t *)(s->peer[peer] + remote_off);
    /* Release: the peer's acquire load of the word sees every memcpy issued before. */
    if (op == EP_SIGNAL_ADD)
        atomic_fetch_add_explicit(word, value, memory_order_release);
    else
        atomic_store_explicit(word, value, memory_order_release);
    return EP_OK;
}

static ep_status_t shm_flush(ep_wire_t *w)
{
    (void)w;
    return EP_OK; /* every put and signal completed before it returned */
}

static void shm_destroy(ep_wire_t *w)
{
    free(w);
}

static const struct ep_wire_ops shm_ops = {
    .name = "shm",
    .connect = shm_connect,
    .put = shm_put,
    .signal = shm_signal,
    .flush = shm_flush,
    .destroy = shm_destroy,
};

ep_status_t ep_wire_shm_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out)
{
    struct shm_wire *s = calloc(1, sizeof *s);
    if (!s) return EP_ERR_NOMEM;
    s->base.ops = &shm_ops;
    s->base.rank = rank;
    s->base.nranks = nranks;
    s->base.timeout_ms = cfg->timeout_ms;
    atomic_init(&s->base.failed_peer, -1);
    atomic_init(&s->base.aborted, 0);
    *out = &s->base;
    return EP_OK;
}
