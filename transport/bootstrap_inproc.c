/* In-process bootstrap: ranks are threads of one process sharing an ep_inproc_world_t;
 * allgather and barrier are rendezvous on a mutex and condition variable, with a timeout. */
#include "ep.h"
#include "epd_clock.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct rank_ctx {
    ep_inproc_world_t *w;
    int rank;
};

/* One collective in flight at a time per generation parity: a rank can run at most one
 * collective ahead of the slowest (the next one cannot complete without it), so two slots,
 * picked by the generation's parity, keep a fast rank from overwriting results a slow rank
 * has not copied out yet. */
struct slot {
    uint8_t *data; /* [nranks][len] */
    size_t cap;    /* bytes per rank the data can hold */
    size_t len;    /* bytes per rank of the collective in flight (SIZE_MAX: none yet) */
    uint8_t present[EP_MAX_RANKS]; /* arrived in this round (kept when one withdraws) */
    int arrived;
    int mismatch; /* ranks disagreed on len */
};

struct ep_inproc_world {
    int nranks;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t gen[EP_MAX_RANKS]; /* collectives each rank has completed */
    uint64_t done;              /* collectives completed by all */
    struct slot slot[2];
    struct rank_ctx ctx[EP_MAX_RANKS];
};

ep_status_t ep_inproc_world_create(int nranks, ep_inproc_world_t **out)
{
    pthread_condattr_t ca;
    if (!out || nranks < 1 || nranks > EP_MAX_RANKS) return EP_ERR_INVALID;
    ep_inproc_world_t *w = calloc(1, sizeof *w);
    if (!w) return EP_ERR_NOMEM;
    w->nranks = nranks;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    for (int i = 0; i < 2; i++)
        w->slot[i].len = SIZE_MAX;
    for (int r = 0; r < nranks; r++)
        w->ctx[r] = (struct rank_ctx){w, r};
    *out = w;
    return EP_OK;
}

void ep_inproc_world_destroy(ep_inproc_world_t *w)
{
    if (!w) return;
    for (int i = 0; i < 2; i++)
        free(w->slot[i].data);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

static int inproc_allgather(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms)
{
    struct rank_ctx *rc = ctx;
    if (!rc || (len && (!in || !out))) return EP_ERR_INVALID;
    ep_inproc_world_t *w = rc->w;
    int n = w->nranks, me = rc->rank;
    struct timespec deadline;
    int st = EP_OK;

    epd_deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&w->mu);
    uint64_t my_gen = w->gen[me];
    struct slot *s = &w->slot[my_gen & 1];
    if (s->len == SIZE_MAX) {
        s->len = len;
        s->mismatch = 0;
    } else if (s->len != len) {
        s->mismatch = 1;
    }
    if (len > s->cap) {
        /* Only the first arrival of a collective can find the slot too small unless ranks
         * disagree on len, in which case the data is moot. */
        uint8_t *d = realloc(s->data, len * (size_t)n);
        if (!d) {
            st = EP_ERR_NOMEM;
            goto withdraw_none;
        }
        s->data = d;
        s->cap = len;
    }
    if (len && !s->mismatch) memcpy(s->data + (size_t)me * len, in, len);
    s->present[me] = 1;
    if (++s->arrived == n) {
        w->done = my_gen + 1;
        pthread_cond_broadcast(&w->cv);
    }
    while (w->done <= my_gen) {
        int rc2 = pthread_cond_timedwait(&w->cv, &w->mu, &deadline);
        if (rc2 == ETIMEDOUT && w->done <= my_gen) {
            /* Withdraw, so that the collective stays consistent for a later retry, and leave
             * the blobs of the ranks that did arrive in out (the group names the others). */
            memset(out, 0, len * (size_t)n);
            if (!s->mismatch)
                for (int r = 0; r < n; r++)
                    if (s->present[r] && len)
                        memcpy((uint8_t *)out + (size_t)r * len, s->data + (size_t)r * len, len);
            if (--s->arrived == 0) {
                s->len = SIZE_MAX;
                memset(s->present, 0, sizeof s->present);
            }
            st = EP_ERR_TIMEOUT;
            goto out;
        }
    }
    if (s->mismatch) {
        st = EP_ERR_BOOTSTRAP;
    } else if (len) {
        memcpy(out, s->data, len * (size_t)n);
    }
    w->gen[me] = my_gen + 1;
    /* The last rank to copy out resets the slot for the collective after next. */
    if (--s->arrived == 0) {
        s->len = SIZE_MAX;
        memset(s->present, 0, sizeof s->present);
    }
    goto out;

withdraw_none:
    if (s->arrived == 0) s->len = SIZE_MAX;
out:
    pthread_mutex_unlock(&w->mu);
    return st;
}

static int inproc_barrier(void *ctx, unsigned timeout_ms)
{
    uint8_t b = 0, all[EP_MAX_RANKS];
    return inproc_allgather(ctx, &b, all, 1, timeout_ms);
}

void ep_inproc_bootstrap(ep_inproc_world_t *w, int rank, ep_bootstrap_t *out)
{
    memset(out, 0, sizeof *out);
    out->rank = rank;
    out->nranks = w ? w->nranks : 0;
    out->ctx = w && rank >= 0 && rank < w->nranks ? &w->ctx[rank] : NULL;
    out->allgather = inproc_allgather;
    out->barrier = inproc_barrier;
}
