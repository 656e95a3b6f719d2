/* The cuda backend's proxy thread (see proxy.h): executes the kernels' put/signal commands in
 * ring order through the wire, so a signal reaches a peer after the puts issued before it. */
#include "proxy.h"
#include "epd_clock.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

/* Spins this many empty polls before napping (a decode step's commands come in bursts a few
 * microseconds apart; the nap only starts after a long idle gap). */
#define IDLE_SPINS 20000
#define NAP_NS 20000

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Tells the kernels that a peer is gone: every wait then gives up (EPK_CODE_PEER). */
static void report(ep_cuda_proxy_t *p, int peer)
{
    if (p->err[EPK_ERR_CODE] != EPK_CODE_OK) return;
    p->err[EPK_ERR_PEER] = peer;
    p->err[EPK_ERR_WHAT] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    p->err[EPK_ERR_CODE] = EPK_CODE_PEER;
}

/* Records the first refused command (what, and the wire's own account) and reports the peer. */
static void refuse(ep_cuda_proxy_t *p, int peer, ep_status_t st, const char *what)
{
    ep_wire_t *w = p->wire;
    if (p->error[0] == 0)
        snprintf(p->error, sizeof p->error, "rank %d: proxy: %s failed: %s%s%.256s", w->rank, what,
                 ep_strerror(st), w->error[0] ? ": " : "", w->error);
    int fp = atomic_load(&w->failed_peer);
    report(p, fp >= 0 && fp < w->nranks ? fp : peer);
}

static void run(ep_cuda_proxy_t *p, const epk_cmd_t *c)
{
    ep_wire_t *w = p->wire;
    char what[96];
    ep_status_t st;
    if (c->peer >= w->nranks || c->peer == w->rank) {
        snprintf(what, sizeof what, "command %u for rank %u", (unsigned)c->op, (unsigned)c->peer);
        refuse(p, -1, EP_ERR_INVALID, what);
        return;
    }
    switch (c->op) {
    case EPK_CMD_PUT:
        st = ep_wire_put_local(w, c->peer, c->b, c->a, c->len);
        if (st) {
            snprintf(what, sizeof what, "put of %u bytes to rank %u", (unsigned)c->len,
                     (unsigned)c->peer);
            refuse(p, c->peer, st, what);
        }
        break;
    case EPK_CMD_SIGNAL_ADD:
        st = w->ops->signal(w, c->peer, c->b, c->a, EP_SIGNAL_ADD);
        if (st) {
            snprintf(what, sizeof what, "signal to rank %u", (unsigned)c->peer);
            refuse(p, c->peer, st, what);
        }
        break;
    default:
        snprintf(what, sizeof what, "unknown command %u for rank %u", (unsigned)c->op,
                 (unsigned)c->peer);
        refuse(p, -1, EP_ERR_INVALID, what);
    }
}

/* Puts merged into one wire put at most (a decode step's messages to one peer are one range). */
#define MERGE_MAX (4u << 20)

/* Whether put c continues put p: same peer, and contiguous on both sides. */
static int continues(const epk_cmd_t *p, const epk_cmd_t *c)
{
    return c->op == EPK_CMD_PUT && p->peer == c->peer && p->a + p->len == c->a &&
           p->b + p->len == c->b && p->len + c->len <= MERGE_MAX;
}

static void *proxy_main(void *arg)
{
    ep_cuda_proxy_t *p = arg;
    ep_wire_t *w = p->wire;
    uint64_t head = atomic_load(p->head);
    unsigned idle = 0;
    /* A put held back while the next commands may extend it; it goes out before any other
     * command and whenever the ring runs dry, so ring order is kept. */
    epk_cmd_t pend;
    int have_pend = 0;

    while (!atomic_load_explicit(&p->stop, memory_order_relaxed)) {
        epk_cmd_t *slot = &p->slots[head & (p->nslots - 1)];
        uint32_t seq = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
        if (seq != (uint32_t)(head + 1)) {
            if (have_pend) {
                run(p, &pend);
                have_pend = 0;
                atomic_store_explicit(&p->done, head, memory_order_release);
                continue;
            }
            if (atomic_load_explicit(&w->failed_peer, memory_order_acquire) >= 0) {
                int fp = atomic_load(&w->failed_peer);
                report(p, fp < w->nranks ? fp : -1);
            }
            if (++idle < IDLE_SPINS) {
                cpu_relax();
            } else {
                struct timespec ts = {0, NAP_NS};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        idle = 0;
        /* the GPU wrote the fields before seq (fence, system scope) */
        epk_cmd_t c;
        memcpy(&c, (const void *)slot, sizeof c);
        ++head;
        atomic_store_explicit(p->head, head, memory_order_release); /* the slot is free */
        if (have_pend && continues(&pend, &c)) {
            pend.len += c.len;
            continue;
        }
        if (have_pend) run(p, &pend);
        have_pend = 0;
        if (c.op == EPK_CMD_PUT) {
            pend = c;
            have_pend = 1;
            continue;
        }
        run(p, &c);
        atomic_store_explicit(&p->done, head, memory_order_release);
    }
    if (have_pend) run(p, &pend);
    return NULL;
}

ep_status_t ep_cuda_proxy_start(ep_cuda_proxy_t *p)
{
    atomic_store(&p->stop, 0);
    atomic_store(&p->done, atomic_load(p->head));
    int rc = pthread_create(&p->thread, NULL, proxy_main, p);
    if (rc) return EP_ERR_NOMEM;
    p->running = 1;
    return EP_OK;
}

ep_status_t ep_cuda_proxy_drain(ep_cuda_proxy_t *p, uint64_t tail, unsigned timeout_ms)
{
    /* After a failure the proxy still serves the peers that are alive, so their commands are
     * waited for too; but a kernel that gave up on a full ring leaves a slot it never wrote,
     * so once the group has failed, a pause without progress ends the wait. */
    const uint64_t start = epd_now_ns(), limit = start + (uint64_t)timeout_ms * 1000000ull;
    uint64_t seen = atomic_load(&p->done), moved = start;
    while (atomic_load_explicit(&p->done, memory_order_acquire) < tail) {
        const uint64_t t = epd_now_ns(), done = atomic_load(&p->done);
        if (done != seen) {
            seen = done;
            moved = t;
        }
        if (!p->running) return EP_ERR_STATE;
        if (p->err[EPK_ERR_CODE] != EPK_CODE_OK && t - moved > 200000000ull) return EP_ERR_PEER;
        if (t > limit) return EP_ERR_TIMEOUT;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    ep_status_t st = p->wire->ops->flush(p->wire);
    return p->err[EPK_ERR_CODE] != EPK_CODE_OK ? EP_ERR_PEER : st;
}

void ep_cuda_proxy_stop(ep_cuda_proxy_t *p)
{
    if (!p->running) return;
    atomic_store(&p->stop, 1);
    pthread_join(p->thread, NULL);
    p->running = 0;
}
