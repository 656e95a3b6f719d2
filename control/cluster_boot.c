/* libep bootstrap over the control plane: allgather and barrier for the ranks of the current
 * epoch. Engine threads deposit their data and wait on a condition variable (with a timeout);
 * the loop thread, woken by a uv_async, sends each node's contribution to the coordinator,
 * which gathers every node's part in rank order and sends the result back to all members.
 *
 *   node data (BOOT_CONTRIB):   [local_ranks][len]      local rank order
 *   result    (BOOT_RESULT):    [nranks][len]           global rank order
 *
 * Each contribution also names its purpose (REASON: "engine: join", "libep: group creation",
 * set by the engine through epd_cluster_bootstrap_purpose): ranks that reach one (epoch,
 * generation, sequence) at different points of their protocol fail that collective with a
 * message naming both points, rather than exchanging data they would misread.
 */
#include "cluster_int.h"
#include "epd_clock.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

#define SUB "cluster"
/* Gathers of abandoned collectives (a rank timed out) are dropped once this many newer ones
 * exist, so a misbehaving engine cannot grow the coordinator's memory. */
#define MAX_GATHERS 16
/* Longest purpose name carried in a contribution. */
#define PURPOSE_MAX 64
/* Why a collective failed, as waiters see it. */
#define WHY_MAX 400

typedef struct boot_rank {
    cl_boot_t *b;
    int local;
    uint64_t epoch;    /* epoch of the ep_bootstrap_t handed out */
    unsigned gen_base; /* the engine's first group generation in this epoch */
    unsigned gen;      /* the engine's group generation, relative to gen_base */
    uint64_t seq;      /* collectives started in that epoch and generation */
    uint64_t wait_seq;
    int waiting;
    void *out; /* caller's buffer while it waits */
    size_t out_len;
    int done;
    int status;
    char why[WHY_MAX];
    const char *purpose; /* set and read by the rank's own thread; a static string */
} boot_rank_t;

/* A collective of this node: local ranks' data, sent once all local ranks contributed. */
typedef struct boot_op {
    struct boot_op *next;
    uint64_t seq;
    uint32_t len;
    int count;
    int sent;
    const char *purpose; /* the first local rank's */
    uint8_t *data;       /* [local_ranks][len] */
} boot_op_t;

/* Coordinator: one collective being gathered from every member. */
typedef struct gather {
    struct gather *next;
    uint64_t seq;
    uint32_t len;
    int have;
    uint8_t *got;  /* [nnodes] */
    uint8_t *data; /* [nranks][len] */
    int failed;
    int first;                 /* node whose contribution came first */
    char purpose[PURPOSE_MAX]; /* that contribution's purpose ("" if it named none) */
    char why[WHY_MAX];
} gather_t;

struct cl_boot {
    epd_cluster_t *c;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t epoch;
    int formed;
    int first_rank;
    int nranks;
    int local_ranks;
    boot_rank_t *ranks;
    boot_op_t *ops;
    gather_t *gathers; /* loop thread only */
    uv_async_t async;
    int async_open;
    int closed; /* the control plane stopped: waits end at once */
    /* collectives (allgathers and barriers) local ranks entered, for /v1/cluster: flat while
     * the engine steps on the data plane */
    _Atomic uint64_t collectives;
};

static void free_ops(cl_boot_t *b)
{
    while (b->ops) {
        boot_op_t *o = b->ops;
        b->ops = o->next;
        free(o->data);
        free(o);
    }
}

static void free_gathers(cl_boot_t *b)
{
    while (b->gathers) {
        gather_t *g = b->gathers;
        b->gathers = g->next;
        free(g->got);
        free(g->data);
        free(g);
    }
}

/* Wakes waiters of `seq` (0: every waiter) with a status; mu held. */
static void finish_waiters(cl_boot_t *b, uint64_t seq, int status, const char *why,
                           const uint8_t *data, size_t len)
{
    for (int i = 0; i < b->local_ranks; i++) {
        boot_rank_t *r = &b->ranks[i];
        int st = status;
        const char *w = why;
        if (!r->waiting || r->done || (seq && r->wait_seq != seq)) continue;
        if (st == 0 && len != r->out_len) {
            st = EP_ERR_BOOTSTRAP;
            w = "gathered size differs from the expected size";
        } else if (st == 0 && len) {
            memcpy(r->out, data, len);
        }
        r->status = st;
        snprintf(r->why, sizeof r->why, "%s", w ? w : "");
        r->done = 1;
    }
    pthread_cond_broadcast(&b->cv);
}

static void send_result(cl_boot_t *b, gather_t *g);
static void gather_add(cl_boot_t *b, int from, uint64_t epoch, uint64_t seq, uint32_t len,
                       const char *purpose, const uint8_t *data, uint32_t dlen);

static const char *purpose_or_unnamed(const char *p)
{
    return p && p[0] ? p : "an unnamed collective";
}

static void on_async(uv_async_t *a)
{
    cl_boot_t *b = a->data;
    epd_cluster_t *c = b->c;
    for (;;) {
        uint64_t epoch, seq = 0;
        uint32_t len = 0;
        const char *purpose = NULL;
        uint8_t *data = NULL;
        size_t dlen = 0;
        pthread_mutex_lock(&b->mu);
        epoch = b->epoch;
        for (boot_op_t *o = b->ops; o; o = o->next) {
            if (o->sent || o->count < b->local_ranks) continue;
            o->sent = 1;
            seq = o->seq;
            len = o->len;
            purpose = o->purpose;
            dlen = (size_t)len * (size_t)b->local_ranks;
            data = o->data;
            o->data = NULL;
            break;
        }
        pthread_mutex_unlock(&b->mu);
        if (!seq) return;
        int coord = c->table.valid ? c->table.coord : -1;
        if (coord == c->cfg.node_id) {
            gather_add(b, c->cfg.node_id, epoch, seq, len, purpose ? purpose : "", data,
                       (uint32_t)dlen);
        } else {
            epd_ctl_buf_t f;
            epd_ctl_buf_init(&f);
            epd_ctl_frame_begin(&f, EPD_CTL_BOOT_CONTRIB);
            epd_ctl_put_u64(&f, EPD_CTL_T_EPOCH, epoch);
            epd_ctl_put_u64(&f, EPD_CTL_T_SEQ, seq);
            epd_ctl_put_u32(&f, EPD_CTL_T_LEN, len);
            epd_ctl_put_bytes(&f, EPD_CTL_T_DATA, data, dlen);
            if (purpose) epd_ctl_put_str(&f, EPD_CTL_T_REASON, purpose);
            int r = epd_ctl_frame_end(&f);
            if (r == 0) r = cl_send_node(c, coord, &f);
            epd_ctl_buf_fini(&f);
            if (r < 0) {
                char why[128];
                snprintf(why, sizeof why, "no link to coordinator node %d", coord);
                pthread_mutex_lock(&b->mu);
                finish_waiters(b, seq, EP_ERR_PEER, why, NULL, 0);
                pthread_mutex_unlock(&b->mu);
            }
        }
        free(data);
    }
}

int cl_boot_create(epd_cluster_t *c, int local_ranks, cl_boot_t **out)
{
    cl_boot_t *b = calloc(1, sizeof *b);
    pthread_condattr_t ca;
    if (!b) return -1;
    b->c = c;
    b->local_ranks = local_ranks;
    b->first_rank = -1;
    b->ranks = calloc((size_t)local_ranks, sizeof *b->ranks);
    if (!b->ranks) goto fail;
    for (int i = 0; i < local_ranks; i++) {
        b->ranks[i].b = b;
        b->ranks[i].local = i;
    }
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = b;
    return 0;
fail:
    free(b->ranks);
    free(b);
    return -1;
}

int cl_boot_start(cl_boot_t *b)
{
    int rc = uv_async_init(b->c->loop, &b->async, on_async);
    if (rc < 0) return rc;
    b->async.data = b;
    b->async_open = 1;
    b->c->handles++;
    return 0;
}

static void on_async_closed(uv_handle_t *h)
{
    cl_boot_t *b = h->data;
    cl_handle_closed(b->c);
}

void cl_boot_close(cl_boot_t *b)
{
    pthread_mutex_lock(&b->mu);
    int open = b->async_open;
    b->async_open = 0;
    b->formed = 0; /* later collectives fail at once */
    b->closed = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    if (!open) return;
    uv_close((uv_handle_t *)&b->async, on_async_closed);
}

void cl_boot_destroy(cl_boot_t *b)
{
    if (!b) return;
    free_ops(b);
    free_gathers(b);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b->ranks);
    free(b);
}

void cl_boot_set_epoch(cl_boot_t *b, uint64_t epoch, int formed, int first_rank, int nranks,
                       const char *why)
{
    pthread_mutex_lock(&b->mu);
    if (epoch != b->epoch || (b->formed && !formed)) {
        finish_waiters(b, 0, EP_ERR_PEER, why, NULL, 0);
        free_ops(b);
    }
    b->epoch = epoch;
    b->formed = formed;
    b->first_rank = first_rank;
    b->nranks = nranks;
    pthread_cond_broadcast(&b->cv); /* epd_cluster_bootstrap_wait callers */
    pthread_mutex_unlock(&b->mu);
    free_gathers(b);
}

void cl_boot_abort(cl_boot_t *b, const char *why)
{
    pthread_mutex_lock(&b->mu);
    finish_waiters(b, 0, EP_ERR_PEER, why, NULL, 0);
    free_ops(b);
    pthread_mutex_unlock(&b->mu);
    free_gathers(b);
}

/* ---- coordinator ---- */

static gather_t *gather_get(cl_boot_t *b, uint64_t seq, uint32_t len, int nnodes, int nranks)
{
    gather_t *g, **pp;
    int n = 0;
    for (g = b->gathers; g; g = g->next)
        if (g->seq == seq) return g;
    for (pp = &b->gathers; *pp; pp = &(*pp)->next)
        n++;
    if (n >= MAX_GATHERS) {
        /* drop the oldest (lowest seq) */
        gather_t **oldest = &b->gathers;
        for (pp = &b->gathers; *pp; pp = &(*pp)->next)
            if ((*pp)->seq < (*oldest)->seq) oldest = pp;
        g = *oldest;
        *oldest = g->next;
        EPD_WARN(SUB, "bootstrap: dropping unfinished collective %" PRIu64, g->seq);
        free(g->got);
        free(g->data);
        free(g);
    }
    g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->seq = seq;
    g->len = len;
    g->got = calloc((size_t)nnodes, 1);
    g->data = malloc((size_t)nranks * len + 1);
    if (!g->got || !g->data) {
        free(g->got);
        free(g->data);
        free(g);
        return NULL;
    }
    g->next = b->gathers;
    b->gathers = g;
    return g;
}

static void gather_remove(cl_boot_t *b, gather_t *g)
{
    for (gather_t **pp = &b->gathers; *pp; pp = &(*pp)->next) {
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    }
    free(g->got);
    free(g->data);
    free(g);
}

static void deliver(cl_boot_t *b, uint64_t epoch, uint64_t seq, int status, const char *why,
                    const uint8_t *data, size_t len)
{
    pthread_mutex_lock(&b->mu);
    if (epoch == b->epoch) {
        finish_waiters(b, seq, status, why, data, len);
        for (boot_op_t **pp = &b->ops; *pp; pp = &(*pp)->next) {
            if ((*pp)->seq == seq) {
                boot_op_t *o = *pp;
                *pp = o->next;
                free(o->data);
                free(o);
                break;
            }
        }
    }
    pthread_mutex_unlock(&b->mu);
}

static void send_result(cl_boot_t *b, gather_t *g)
{
    epd_cluster_t *c = b->c;
    size_t total = (size_t)c->table.nranks * g->len;
    epd_ctl_buf_t f;
    epd_ctl_buf_init(&f);
    epd_ctl_frame_begin(&f, EPD_CTL_BOOT_RESULT);
    epd_ctl_put_u64(&f, EPD_CTL_T_EPOCH, c->table.epoch);
    epd_ctl_put_u64(&f, EPD_CTL_T_SEQ, g->seq);
    epd_ctl_put_u32(&f, EPD_CTL_T_STATUS, g->failed ? (uint32_t)(-EP_ERR_BOOTSTRAP) : 0);
    epd_ctl_put_u32(&f, EPD_CTL_T_LEN, g->len);
    epd_ctl_put_bytes(&f, EPD_CTL_T_DATA, g->data, g->failed ? 0 : total);
    if (g->failed) epd_ctl_put_str(&f, EPD_CTL_T_REASON, g->why);
    if (epd_ctl_frame_end(&f) == 0) {
        for (int i = 0; i < c->table.nnodes; i++)
            if (c->table.nodes[i].id != c->cfg.node_id) cl_send_node(c, c->table.nodes[i].id, &f);
    }
    epd_ctl_buf_fini(&f);
    deliver(b, c->table.epoch, g->seq, g->failed ? EP_ERR_BOOTSTRAP : 0, g->why, g->data,
            g->failed ? 0 : total);
}

static void gather_add(cl_boot_t *b, int from, uint64_t epoch, uint64_t seq, uint32_t len,
                       const char *purpose, const uint8_t *data, uint32_t dlen)
{
    epd_cluster_t *c = b->c;
    int idx;
    if (!c->table.valid || c->table.coord != c->cfg.node_id || epoch != c->table.epoch) {
        EPD_DEBUG(SUB, "bootstrap: contribution of node %d for epoch %" PRIu64 " ignored", from,
                  epoch);
        return;
    }
    const cl_nodeinfo_t *n = cl_table_node(c, from, &idx);
    if (!n) return;
    gather_t *g = gather_get(b, seq, len, c->table.nnodes, c->table.nranks);
    if (!g) return;
    if (!g->have) {
        g->first = from;
        snprintf(g->purpose, sizeof g->purpose, "%s", purpose);
    }
    if (!g->got[idx]) {
        int other = purpose[0] && g->purpose[0] && strcmp(purpose, g->purpose) != 0;
        if (g->failed) {
            /* the first disagreement is the one reported */
        } else if (other || len != g->len) {
            g->failed = 1;
            snprintf(g->why, sizeof g->why,
                     "ranks are out of step at collective %u of generation %u (epoch %" PRIu64
                     "): node %d is at %s (%u bytes per rank), node %d at %s (%u bytes per rank)",
                     (unsigned)(seq & 0xffffffffu), (unsigned)(seq >> 32), epoch, from,
                     purpose_or_unnamed(purpose), len, g->first, purpose_or_unnamed(g->purpose),
                     g->len);
        } else if ((uint64_t)dlen != (uint64_t)len * n->ranks) {
            g->failed = 1;
            snprintf(g->why, sizeof g->why, "node %d sent %u bytes for %u ranks of %u bytes", from,
                     dlen, n->ranks, len);
        } else if (len) {
            memcpy(g->data + (size_t)n->first_rank * len, data, dlen);
        }
        g->got[idx] = 1;
        g->have++;
    }
    if (g->have == c->table.nnodes) {
        send_result(b, g);
        gather_remove(b, g);
    }
}

uint64_t cl_boot_collectives(const cl_boot_t *b)
{
    return b ? atomic_load(&((cl_boot_t *)b)->collectives) : 0;
}

void cl_boot_on_contrib(cl_boot_t *b, int from, const epd_ctl_msg_t *m)
{
    uint64_t epoch, seq;
    uint32_t len, dl;
    const uint8_t *data;
    char purpose[PURPOSE_MAX] = "";
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_SEQ, &seq);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_LEN, &len);
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_DATA, &data, &dl);
    /* optional; a name that is too long or absent reads as unnamed */
    if (epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_REASON, purpose, sizeof purpose) < 0)
        purpose[0] = 0;
    gather_add(b, from, epoch, seq, len, purpose, data, dl);
}

void cl_boot_on_result(cl_boot_t *b, const epd_ctl_msg_t *m)
{
    uint64_t epoch, seq;
    uint32_t status, len, dl;
    const uint8_t *data;
    char why[1024] = "";
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_SEQ, &seq);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_STATUS, &status);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_LEN, &len);
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_DATA, &data, &dl);
    epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_REASON, why, sizeof why);
    int st = status ? -(int)(status & 0xff) : 0;
    deliver(b, epoch, seq, st, why[0] ? why : "coordinator reported a failure", data, dl);
}

/* ---- engine side ---- */

/* Why the calling thread's last collective failed. */
static _Thread_local char last_error[WHY_MAX];

const char *epd_cluster_bootstrap_last_error(void)
{
    return last_error;
}

static int boot_allgather(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms)
{
    boot_rank_t *r = ctx;
    cl_boot_t *b = r->b;
    struct timespec dl;
    int st;

    atomic_fetch_add(&b->collectives, 1);
    pthread_mutex_lock(&b->mu);
    if (!b->formed || b->epoch != r->epoch) {
        snprintf(last_error, sizeof last_error,
                 "epoch %" PRIu64 " is over (cluster at %" PRIu64 ")", r->epoch, b->epoch);
        pthread_mutex_unlock(&b->mu);
        EPD_WARN(SUB, "bootstrap: rank %d: epoch %" PRIu64 " is over (cluster at %" PRIu64 ")",
                 r->local, r->epoch, b->epoch);
        return EP_ERR_PEER;
    }
    if ((uint64_t)len * (uint64_t)b->nranks + 1024 > EPD_CTL_MAX_PAYLOAD) {
        pthread_mutex_unlock(&b->mu);
        EPD_ERROR(SUB, "bootstrap: allgather of %zu bytes x %d ranks exceeds a control frame", len,
                  b->nranks);
        return EP_ERR_INVALID;
    }
    /* (generation, sequence) in one u64: collectives of different generations never meet */
    uint64_t seq = ((uint64_t)r->gen << 32) | (++r->seq & 0xffffffffu);
    boot_op_t *o;
    for (o = b->ops; o; o = o->next)
        if (o->seq == seq) break;
    if (!o) {
        o = calloc(1, sizeof *o);
        if (o) o->data = malloc((size_t)b->local_ranks * len + 1);
        if (!o || !o->data) {
            if (o) free(o);
            pthread_mutex_unlock(&b->mu);
            return EP_ERR_NOMEM;
        }
        o->seq = seq;
        o->len = (uint32_t)len;
        o->purpose = r->purpose;
        o->next = b->ops;
        b->ops = o;
    }
    if (o->len != len || (o->purpose && r->purpose && strcmp(o->purpose, r->purpose) != 0)) {
        pthread_mutex_unlock(&b->mu);
        EPD_ERROR(SUB,
                  "bootstrap: local ranks are out of step at collective %u of generation %u: "
                  "rank %d is at %s (%zu bytes per rank), another local rank at %s (%u bytes)",
                  (unsigned)(seq & 0xffffffffu), (unsigned)(seq >> 32), b->first_rank + r->local,
                  purpose_or_unnamed(r->purpose), len, purpose_or_unnamed(o->purpose), o->len);
        return EP_ERR_INVALID;
    }
    if (len && o->data) memcpy(o->data + (size_t)r->local * len, in, len);
    o->count++;
    r->wait_seq = seq;
    r->waiting = 1;
    r->out = out;
    r->out_len = len * (size_t)b->nranks;
    r->done = 0;
    r->status = 0;
    r->why[0] = 0;
    /* Sent under the lock: cl_boot_close marks the async closed under it, so an engine thread
     * never signals a handle the loop already closed. */
    if (o->count == b->local_ranks && b->async_open) uv_async_send(&b->async);
    pthread_mutex_unlock(&b->mu);

    epd_deadline_after(&dl, timeout_ms);
    pthread_mutex_lock(&b->mu);
    int rc = 0;
    while (!r->done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&b->cv, &b->mu, &dl);
    if (!r->done) {
        st = EP_ERR_TIMEOUT;
        snprintf(last_error, sizeof last_error,
                 "collective %u of generation %u (%s) got no "
                 "result within %u ms",
                 (unsigned)(seq & 0xffffffffu), (unsigned)(seq >> 32),
                 purpose_or_unnamed(r->purpose), timeout_ms);
        EPD_WARN(SUB, "bootstrap: rank %d: %s", b->first_rank + r->local, last_error);
    } else {
        st = r->status;
        if (st) {
            snprintf(last_error, sizeof last_error, "%s", r->why);
            EPD_WARN(SUB, "bootstrap: rank %d: collective %" PRIu64 " failed: %s",
                     b->first_rank + r->local, seq, r->why);
        }
    }
    r->waiting = 0;
    r->out = NULL;
    r->done = 0;
    pthread_mutex_unlock(&b->mu);
    return st;
}

static int boot_barrier(void *ctx, unsigned timeout_ms)
{
    return boot_allgather(ctx, NULL, NULL, 0, timeout_ms);
}

void epd_cluster_bootstrap_purpose(const ep_bootstrap_t *bs, const char *what)
{
    /* only bootstraps of this module carry a name (an engine may run on another one) */
    if (bs && bs->allgather == boot_allgather && bs->ctx) ((boot_rank_t *)bs->ctx)->purpose = what;
}

int cl_boot_get(cl_boot_t *b, int local_rank, unsigned generation, unsigned wait_ms,
                ep_bootstrap_t *out, epd_err_t *err)
{
    struct timespec dl;
    if (local_rank < 0 || local_rank >= b->local_ranks) {
        return epd_err_set(err, -EINVAL, "local rank %d out of 0..%d", local_rank,
                           b->local_ranks - 1);
    }
    epd_deadline_after(&dl, wait_ms);
    pthread_mutex_lock(&b->mu);
    int rc = 0;
    while ((!b->formed || b->first_rank < 0) && !b->closed && wait_ms && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&b->cv, &b->mu, &dl);
    if (b->closed) {
        pthread_mutex_unlock(&b->mu);
        return epd_err_set(err, -ESHUTDOWN, "the control plane is stopping");
    }
    if (!b->formed || b->first_rank < 0) {
        pthread_mutex_unlock(&b->mu);
        if (wait_ms)
            return epd_err_set(err, -ETIMEDOUT, "the cluster did not form within %u ms", wait_ms);
        return epd_err_set(err, -EAGAIN, "the cluster is not formed");
    }
    boot_rank_t *r = &b->ranks[local_rank];
    /* Generations count from the first one used in this epoch: a node that restarted (its
     * engine at generation 0) and nodes that re-formed several times meet at relative 0. */
    if (r->epoch != b->epoch || generation < r->gen_base) {
        r->epoch = b->epoch;
        r->gen_base = generation;
        r->gen = 0;
        r->seq = 0;
    } else if (generation - r->gen_base != r->gen) {
        r->gen = generation - r->gen_base;
        r->seq = 0;
    }
    out->rank = b->first_rank + local_rank;
    out->nranks = b->nranks;
    out->ctx = r;
    out->allgather = boot_allgather;
    out->barrier = boot_barrier;
    pthread_mutex_unlock(&b->mu);
    return 0;
}
