/* What every wire shares: waiting on a local signal word with a timeout, recording failures,
 * and the allgather of control words that any wire carries (ep_wire_allgather). */
#include "wire.h"
#include "epd_clock.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

ep_status_t ep_wire_fail(ep_wire_t *w, int peer, ep_status_t st, const char *fmt, ...)
{
    int expected = -1;
    /* The first failure names the culprit; later ones are usually its consequences. The word
     * reads -2 while the message is written, so that whoever sees the peer sees its message. */
    if (atomic_compare_exchange_strong(&w->failed_peer, &expected, -2)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->error, sizeof w->error, fmt, ap);
        va_end(ap);
        atomic_store_explicit(&w->failed_peer, peer < 0 ? w->nranks : peer, memory_order_release);
    }
    return st;
}

ep_status_t ep_wire_wait(ep_wire_t *w, size_t local_off, uint64_t target, int peer)
{
    _Atomic uint64_t *word = (_Atomic uint64_t *)(w->local + local_off);
    uint64_t start = epd_now_ns();
    uint64_t limit = (uint64_t)w->timeout_ms * 1000000ull;
    unsigned spins = 0;

    for (;;) {
        if (atomic_load_explicit(word, memory_order_acquire) >= target) return EP_OK;
        if (atomic_load_explicit(&w->aborted, memory_order_relaxed)) return EP_ERR_ABORTED;
        int fp = atomic_load_explicit(&w->failed_peer, memory_order_acquire);
        if (fp >= 0) return EP_ERR_PEER;
        if (++spins < 1024) continue;
        spins = 0;
        uint64_t t = epd_now_ns();
        if (t - start > limit)
            return ep_wire_fail(w, peer, EP_ERR_TIMEOUT,
                                "rank %d: no signal from rank %d within %u ms (word at offset %zu "
                                "is %llu, waiting for %llu)",
                                w->rank, peer, w->timeout_ms, local_off,
                                (unsigned long long)atomic_load(word), (unsigned long long)target);
        /* Yield after a short spin: ranks of the cpu backend may outnumber the cores. */
        struct timespec ts = {0, t - start < 1000000ull ? 0 : 20000};
        nanosleep(&ts, NULL);
    }
}

ep_status_t ep_wire_put_local(ep_wire_t *w, int peer, size_t remote_off, size_t local_off,
                              size_t len)
{
    if (w->ops->put_local) return w->ops->put_local(w, peer, remote_off, local_off, len);
    if (local_off > w->bytes || len > w->bytes - local_off) return EP_ERR_INVALID;
    return w->ops->put(w, peer, remote_off, w->local + local_off, len);
}

/* The head of a slot of ep_wire_allgather's region; the data follows at 64. */
struct ag_head {
    uint64_t call;
    uint32_t len;
    uint32_t pad;
};
#define AG_DATA 64

ep_status_t ep_wire_allgather(ep_wire_t *w, size_t off, uint64_t call, const void *in, void *out,
                              size_t len)
{
    const size_t R = (size_t)w->nranks, me = (size_t)w->rank, par = call & 1;
    const size_t slots = off + R * 8;
    _Alignas(64) uint8_t stage[EP_WIRE_AG_SLOT];
    struct ag_head h = {call, (uint32_t)len, 0};
    ep_status_t st;

    if (len > EP_ALLGATHER_MAX || off > w->bytes || EP_WIRE_AG_BYTES(R) > w->bytes - off)
        return EP_ERR_INVALID;
    memset(stage, 0, AG_DATA);
    memcpy(stage, &h, sizeof h);
    memcpy(stage + AG_DATA, in, len);
    const size_t mine = slots + (par * R + me) * EP_WIRE_AG_SLOT;
    for (size_t d = 0; d < R; d++) {
        if (d == me) continue;
        if ((st = w->ops->put(w, (int)d, mine, stage, AG_DATA + len)) ||
            (st = w->ops->signal(w, (int)d, off + me * 8, call, EP_SIGNAL_SET)))
            return st;
    }
    if ((st = w->ops->flush(w))) return st;
    memcpy((uint8_t *)out + me * len, in, len);
    for (size_t s = 0; s < R; s++) {
        if (s == me) continue;
        if ((st = ep_wire_wait(w, off + s * 8, call, (int)s))) return st;
        const uint8_t *slot = w->local + slots + (par * R + s) * EP_WIRE_AG_SLOT;
        memcpy(&h, slot, sizeof h);
        if (h.call != call)
            return ep_wire_fail(w, (int)s, EP_ERR_PEER,
                                "rank %d: allgather call %llu: rank %zu's slot holds call %llu "
                                "(the ranks' calls are out of step)",
                                w->rank, (unsigned long long)call, s, (unsigned long long)h.call);
        if (h.len != len)
            return ep_wire_fail(w, (int)s, EP_ERR_INVALID,
                                "rank %d: allgather call %llu: rank %zu gave %u bytes, this rank "
                                "%zu (len must be the same on every rank)",
                                w->rank, (unsigned long long)call, s, h.len, len);
        memcpy((uint8_t *)out + s * len, slot + AG_DATA, len);
    }
    return EP_OK;
}
