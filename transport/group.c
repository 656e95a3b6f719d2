/* The EP group: public API entry points of libep, config and argument validation, the LL
 * buffer alternation, and the hand-off to the backend's ops table. */
#include "group.h"

#include "cpu.h"
#include "last_error.h"
#include "route_ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Generous bounds that keep every size computation far from overflow. */
#define EP_MAX_HIDDEN (1 << 16)
#define EP_MAX_EXPERTS (1 << 16)
#define EP_MAX_TOKENS (1 << 20)

#define HELLO_MAGIC 0x45504731u /* "EPG1" */

/* Detail of the last ep_group_create that failed on this thread (no group to hold it). */
static _Thread_local int tls_failed_peer = -1; /* its message: EP_LAST_ERROR_GROUP */

/* The names come from ep.h's tables (EP_STATUS_MAP, EP_BACKEND_MAP, EP_TRANSPORT_MAP). */
#define EP_NAME_CASE(prefix, name, value, text)                                                    \
    case prefix##name:                                                                             \
        return text;

const char *ep_strerror(ep_status_t st)
{
#define EP_STATUS_CASE(name, value, text) EP_NAME_CASE(EP_, name, value, text)
    switch (st) {
        EP_STATUS_MAP(EP_STATUS_CASE)
    }
#undef EP_STATUS_CASE
    return "unknown status";
}

const char *ep_backend_name(ep_backend_t b)
{
#define EP_BACKEND_CASE(name, value, text) EP_NAME_CASE(EP_BACKEND_, name, value, text)
    switch (b) {
        EP_BACKEND_MAP(EP_BACKEND_CASE)
    }
#undef EP_BACKEND_CASE
    return "unknown";
}

const char *ep_transport_name(ep_transport_kind_t t)
{
#define EP_TRANSPORT_CASE(name, value, text) EP_NAME_CASE(EP_TRANSPORT_, name, value, text)
    switch (t) {
        EP_TRANSPORT_MAP(EP_TRANSPORT_CASE)
    }
#undef EP_TRANSPORT_CASE
    return "unknown";
}

void ep_config_init(ep_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->backend = EP_BACKEND_CPU;
    cfg->transport = EP_TRANSPORT_AUTO;
    cfg->num_sms = 24;
    cfg->timeout_ms = 10000;
    cfg->device = -1;
    cfg->tcp_host = "127.0.0.1";
    cfg->tcp_port = 0;
}

ep_status_t ep_group_fail(ep_group_t *g, int peer, ep_status_t st, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&g->err_lock);
    va_start(ap, fmt);
    vsnprintf(g->error, sizeof g->error, fmt, ap);
    va_end(ap);
    atomic_store(&g->failed_peer, peer);
    pthread_mutex_unlock(&g->err_lock);
    return st;
}

static ep_status_t create_fail(int peer, ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static ep_status_t create_fail(int peer, ep_status_t st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ep_last_error_vset(EP_LAST_ERROR_GROUP, st, fmt, ap);
    va_end(ap);
    tls_failed_peer = peer;
    return st;
}

/* Checks everything of a config that does not depend on the other ranks. */
static ep_status_t check_config(const ep_config_t *c, int nranks)
{
    if (c->backend != EP_BACKEND_CPU && c->backend != EP_BACKEND_CUDA)
        return create_fail(-1, EP_ERR_INVALID, "config.backend %d is not cpu (0) or cuda (1)",
                           (int)c->backend);
#ifndef EP_HAVE_CUDA
    if (c->backend == EP_BACKEND_CUDA)
        return create_fail(-1, EP_ERR_UNSUPPORTED,
                           "config.backend cuda: this libep was built without CUDA");
#endif
    if (c->transport < EP_TRANSPORT_AUTO || c->transport > EP_TRANSPORT_RDMA)
        return create_fail(-1, EP_ERR_INVALID, "config.transport %d is not a known transport",
                           (int)c->transport);
    if (c->backend == EP_BACKEND_CPU && c->transport == EP_TRANSPORT_NVLINK)
        return create_fail(-1, EP_ERR_UNSUPPORTED,
                           "config.transport %s: the cpu backend supports auto, shm, tcp and rdma",
                           ep_transport_name(c->transport));
#ifndef EP_HAVE_RDMA
    if (c->transport == EP_TRANSPORT_RDMA)
        return create_fail(-1, EP_ERR_UNSUPPORTED,
                           "config.transport rdma: this libep was built without libibverbs and "
                           "librdmacm");
#endif
    if (nranks < 1 || nranks > EP_MAX_RANKS)
        return create_fail(-1, EP_ERR_INVALID, "bootstrap nranks %d is not in 1..%d", nranks,
                           EP_MAX_RANKS);
    if (c->num_experts < 1 || c->num_experts > EP_MAX_EXPERTS)
        return create_fail(-1, EP_ERR_INVALID, "config.num_experts %d is not in 1..%d",
                           c->num_experts, EP_MAX_EXPERTS);
    if (c->num_experts % nranks)
        return create_fail(-1, EP_ERR_INVALID,
                           "config.num_experts %d is not a multiple of the number of ranks %d",
                           c->num_experts, nranks);
    if (c->hidden < 1 || c->hidden > EP_MAX_HIDDEN)
        return create_fail(-1, EP_ERR_INVALID, "config.hidden %d is not in 1..%d", c->hidden,
                           EP_MAX_HIDDEN);
    if (c->num_topk < 1 || c->num_topk > EP_MAX_TOPK)
        return create_fail(-1, EP_ERR_INVALID, "config.num_topk %d is not in 1..%d", c->num_topk,
                           EP_MAX_TOPK);
    if (c->num_topk > c->num_experts)
        return create_fail(-1, EP_ERR_INVALID, "config.num_topk %d exceeds num_experts %d",
                           c->num_topk, c->num_experts);
    if (c->ll_max_tokens < 0 || c->ll_max_tokens > EP_MAX_TOKENS)
        return create_fail(-1, EP_ERR_INVALID, "config.ll_max_tokens %d is not in 0..%d",
                           c->ll_max_tokens, EP_MAX_TOKENS);
    if (c->ht_max_tokens < 0 || c->ht_max_tokens > EP_MAX_TOKENS)
        return create_fail(-1, EP_ERR_INVALID, "config.ht_max_tokens %d is not in 0..%d",
                           c->ht_max_tokens, EP_MAX_TOKENS);
    if (c->timeout_ms == 0)
        return create_fail(-1, EP_ERR_INVALID, "config.timeout_ms must be positive");
    if (c->backend == EP_BACKEND_CUDA && c->num_sms < 1)
        return create_fail(-1, EP_ERR_INVALID, "config.num_sms %d must be positive", c->num_sms);
    if (c->transport == EP_TRANSPORT_TCP && (c->tcp_port < 0 || c->tcp_port > 65535))
        return create_fail(-1, EP_ERR_INVALID, "config.tcp_port %d is not in 0..65535",
                           c->tcp_port);
    return EP_OK;
}

size_t ep_buffer_size_hint(const ep_config_t *cfg, int nranks)
{
    struct cpu_layout lo;
    if (!cfg || nranks < 1 || nranks > EP_MAX_RANKS || cfg->num_experts < 1 ||
        cfg->num_experts % nranks || cfg->hidden < 1 || cfg->num_topk < 1 ||
        cfg->num_topk > EP_MAX_TOPK || cfg->ll_max_tokens < 0 || cfg->ht_max_tokens < 0)
        return 0;
    if (ep_cpu_layout(cfg, nranks, &lo)) return 0;
    return lo.total;
}

/* What every rank tells the others at creation: the settings that must agree. */
struct hello {
    uint32_t magic;
    int32_t rank, nranks, backend;
    int32_t num_experts, hidden, num_topk, ll_max_tokens, ht_max_tokens;
};

static ep_status_t say_hello(ep_group_t *g, const ep_bootstrap_t *bs)
{
    const ep_config_t *c = &g->cfg;
    struct hello me = {HELLO_MAGIC,         g->rank,          g->nranks,
                       (int32_t)c->backend, c->num_experts,   c->hidden,
                       c->num_topk,         c->ll_max_tokens, c->ht_max_tokens};
    struct hello *all = calloc((size_t)g->nranks, sizeof *all);
    if (!all) return create_fail(-1, EP_ERR_NOMEM, "out of memory for the bootstrap exchange");
    ep_status_t st = EP_OK;
    int rc = bs->allgather(bs->ctx, &me, all, sizeof me, c->timeout_ms);
    if (rc) {
        /* A bootstrap may leave the blobs of the ranks that did arrive in place (the inproc
         * one does); then name the ones that did not. */
        char missing[256] = "";
        int first = -1;
        size_t n = 0;
        for (int r = 0; r < g->nranks; r++)
            if (all[r].magic != HELLO_MAGIC && n + 8 < sizeof missing) {
                n += (size_t)snprintf(missing + n, sizeof missing - n, "%s%d",
                                      first < 0 ? "" : ", ", r);
                if (first < 0) first = r;
            }
        if (rc > 0 || rc < EP_ERR_ABORTED) rc = EP_ERR_BOOTSTRAP;
        if (first >= 0 && first != g->rank && all[g->rank].magic == HELLO_MAGIC)
            st = create_fail(first, (ep_status_t)rc,
                             "rank %d: bootstrap exchange failed (%s) within %u ms; rank(s) %s "
                             "did not join",
                             g->rank, ep_strerror((ep_status_t)rc), c->timeout_ms, missing);
        else
            st = create_fail(-1, (ep_status_t)rc, "rank %d: bootstrap exchange failed (%s)",
                             g->rank, ep_strerror((ep_status_t)rc));
        goto out;
    }
    for (int r = 0; r < g->nranks; r++) {
        const struct hello *h = &all[r];
        if (h->magic != HELLO_MAGIC || h->rank != r || h->nranks != g->nranks) {
            st = create_fail(r, EP_ERR_BOOTSTRAP,
                             "rank %d: bootstrap slot %d holds rank %d of %d (magic %08x); the "
                             "bootstrap mixes up ranks",
                             g->rank, r, h->rank, h->nranks, h->magic);
            goto out;
        }
#define SAME(field)                                                                                \
    if (h->field != me.field) {                                                                    \
        st = create_fail(r, EP_ERR_INVALID,                                                        \
                         "config." #field " differs: rank %d has %d, rank %d "                     \
                         "has %d",                                                                 \
                         g->rank, (int)me.field, r, (int)h->field);                                \
        goto out;                                                                                  \
    }
        SAME(backend)
        SAME(num_experts)
        SAME(hidden)
        SAME(num_topk)
        SAME(ll_max_tokens)
        SAME(ht_max_tokens)
#undef SAME
    }
out:
    free(all);
    return st;
}

ep_status_t ep_group_create(const ep_config_t *cfg, const ep_bootstrap_t *bs, ep_group_t **out)
{
    ep_group_t *g = NULL;
    ep_status_t st;

    ep_last_error_clear(EP_LAST_ERROR_GROUP);
    tls_failed_peer = -1;
    if (!out) return create_fail(-1, EP_ERR_INVALID, "ep_group_create: out is NULL");
    *out = NULL;
    if (!cfg || !bs)
        return create_fail(-1, EP_ERR_INVALID, "ep_group_create: %s is NULL",
                           !cfg ? "cfg" : "bootstrap");
    if (!bs->allgather || !bs->barrier)
        return create_fail(-1, EP_ERR_INVALID,
                           "ep_group_create: the bootstrap lacks allgather or barrier");
    if ((st = check_config(cfg, bs->nranks))) return st;
    if (bs->rank < 0 || bs->rank >= bs->nranks)
        return create_fail(-1, EP_ERR_INVALID, "bootstrap rank %d is not in 0..%d", bs->rank,
                           bs->nranks - 1);

    g = calloc(1, sizeof *g);
    if (!g) return create_fail(-1, EP_ERR_NOMEM, "out of memory for the group");
    g->cfg = *cfg; /* tcp_host stays borrowed: the caller's string must outlive the group */
    g->rank = bs->rank;
    g->nranks = bs->nranks;
    g->num_local_experts = cfg->num_experts / bs->nranks;
    atomic_init(&g->aborted, 0);
    atomic_init(&g->failed_peer, -1);
    pthread_mutex_init(&g->err_lock, NULL);
#ifdef EP_HAVE_CUDA
    g->ops = cfg->backend == EP_BACKEND_CUDA ? &ep_backend_cuda_ops : &ep_backend_cpu_ops;
#else
    g->ops = &ep_backend_cpu_ops;
#endif

    if ((st = say_hello(g, bs))) goto fail;
    st = g->ops->create(g, bs);
    if (st) {
        create_fail(atomic_load(&g->failed_peer), st, "%s", g->error);
        goto fail_backend;
    }
    *out = g;
    return EP_OK;

fail_backend:
    if (g->impl) g->ops->destroy(g);
fail:
    pthread_mutex_destroy(&g->err_lock);
    free(g);
    return st;
}

void ep_group_destroy(ep_group_t *g)
{
    if (!g) return;
    g->ops->destroy(g);
    pthread_mutex_destroy(&g->err_lock);
    free(g);
}

int ep_group_rank(const ep_group_t *g)
{
    return g ? g->rank : -1;
}

int ep_group_size(const ep_group_t *g)
{
    return g ? g->nranks : 0;
}

int ep_group_num_local_experts(const ep_group_t *g)
{
    return g ? g->num_local_experts : 0;
}

const ep_config_t *ep_group_config(const ep_group_t *g)
{
    return g ? &g->cfg : NULL;
}

const char *ep_group_last_error(const ep_group_t *g)
{
    return g ? g->error : ep_last_error(EP_LAST_ERROR_GROUP);
}

int ep_group_failed_peer(const ep_group_t *g)
{
    return g ? atomic_load(&((ep_group_t *)g)->failed_peer) : tls_failed_peer;
}

static ep_status_t aborted_status(ep_group_t *g);

void ep_group_abort(ep_group_t *g, int peer)
{
    /* Any thread may abort, so only atomics are written here; the thread that owns the group
     * writes the message when one of its calls sees the abort (aborted_status). */
    if (!g) return;
    atomic_store(&g->failed_peer, peer >= 0 && peer < g->nranks ? peer : -1);
    if (atomic_exchange(&g->aborted, 1)) return;
    if (g->ops->abort) g->ops->abort(g);
}

ep_status_t ep_group_check(ep_group_t *g)
{
    if (!g) return EP_ERR_INVALID;
    if (atomic_load(&g->aborted)) return aborted_status(g);
    return g->ops->check ? g->ops->check(g) : EP_OK;
}

static ep_status_t aborted_status(ep_group_t *g)
{
    int peer = atomic_load(&g->failed_peer);
    if (peer >= 0)
        return ep_group_fail(g, peer, EP_ERR_ABORTED,
                             "rank %d: group aborted (rank %d marked down)", g->rank, peer);
    return ep_group_fail(g, -1, EP_ERR_ABORTED, "rank %d: group aborted", g->rank);
}

/* The status of an op as the caller sees it: an abort seen inside the backend gets its
 * message here, in the owning thread. */
static ep_status_t done(ep_group_t *g, ep_status_t st)
{
    return st == EP_ERR_ABORTED ? aborted_status(g) : st;
}

/* ---- argument validation ------------------------------------------------------------------ */

#define INVALID(g, ...) ep_group_fail(g, -1, EP_ERR_INVALID, __VA_ARGS__)

static int host_memory(const ep_group_t *g)
{
    return g->cfg.backend == EP_BACKEND_CPU;
}

static ep_status_t check_entry(ep_group_t *g)
{
    if (atomic_load(&g->aborted)) return aborted_status(g);
    return EP_OK;
}

/* Every id in [-1, E), no expert twice in one token. Only for host memory: on the cuda
 * backend the kernels check the ids. */
static ep_status_t check_topk(ep_group_t *g, const char *op, const int32_t *idx, int T)
{
    int k = g->cfg.num_topk, E = g->cfg.num_experts;
    if (!host_memory(g)) return EP_OK;
    for (int t = 0; t < T; t++) {
        const int32_t *row = idx + (size_t)t * k;
        for (int j = 0; j < k; j++) {
            if (row[j] < -1 || row[j] >= E)
                return INVALID(g, "%s: topk_idx[%d][%d] = %d is out of range (-1..%d)", op, t, j,
                               row[j], E - 1);
            for (int i = 0; i < j; i++)
                if (row[j] >= 0 && row[i] == row[j])
                    return INVALID(g, "%s: topk_idx[%d] names expert %d twice (slots %d and %d)",
                                   op, t, row[j], i, j);
        }
    }
    return EP_OK;
}

static ep_status_t check_tokens(ep_group_t *g, const char *op, int T, int max, const char *what)
{
    if (max == 0)
        return INVALID(g, "%s: the group has no %s mode (config.%s_max_tokens = 0)", op, what,
                       what);
    if (T < 0 || T > max)
        return INVALID(g, "%s: num_tokens %d is not in 0..%d (config.%s_max_tokens)", op, T, max,
                       what);
    return EP_OK;
}

static ep_status_t check_fp8(ep_group_t *g, const char *op, int use_fp8)
{
    if (use_fp8 && g->cfg.hidden % EP_FP8_BLOCK)
        return INVALID(g, "%s: fp8 needs hidden to be a multiple of %d, hidden is %d", op,
                       EP_FP8_BLOCK, g->cfg.hidden);
    return EP_OK;
}

#define NEED(g, op, ptr)                                                                           \
    do {                                                                                           \
        if (!(ptr)) return INVALID(g, "%s: %s is NULL", op, #ptr);                                 \
    } while (0)

/* The LL ops alternate between buffers 0 and 1. A call rejected before it started (bad
 * argument, wrong order) leaves the alternation where it was. */
static void ll_advance(ep_group_t *g, ep_status_t st)
{
    if (st != EP_ERR_INVALID && st != EP_ERR_STATE) g->ll_next_buf ^= 1;
}

ep_status_t ep_ll_dispatch(ep_group_t *g, const ep_ll_dispatch_args_t *a, ep_ll_dispatch_out_t *out,
                           ep_ll_handle_t **handle, ep_hook_t **hook)
{
    static const char op[] = "ep_ll_dispatch";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, a);
    NEED(g, op, out);
    NEED(g, op, handle);
    if (a->use_hook) NEED(g, op, hook);
    if ((st = check_tokens(g, op, a->num_tokens, g->cfg.ll_max_tokens, "ll"))) return st;
    if ((st = check_fp8(g, op, a->use_fp8))) return st;
    if (a->num_tokens > 0) {
        NEED(g, op, a->x);
        NEED(g, op, a->topk_idx);
    }
    if ((st = check_topk(g, op, a->topk_idx, a->num_tokens))) return st;
    st = g->ops->ll_dispatch(g, g->ll_next_buf, a, out, handle, hook);
    ll_advance(g, st);
    return done(g, st);
}

ep_status_t ep_ll_combine(ep_group_t *g, const ep_ll_combine_args_t *a, ep_hook_t **hook)
{
    static const char op[] = "ep_ll_combine";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, a);
    NEED(g, op, a->handle);
    if (a->use_hook) NEED(g, op, hook);
    if (a->handle->group != g) return INVALID(g, "%s: the handle belongs to another group", op);
    /* expert_y, topk_idx, topk_weights and out may be NULL where there is nothing to read or
     * write (no rows received, no tokens); the backend knows those counts and checks. */
    st = g->ops->ll_combine(g, g->ll_next_buf, a, hook);
    ll_advance(g, st);
    return done(g, st);
}

ep_status_t ep_hook_run(ep_hook_t *hook)
{
    if (!hook || !hook->group) return EP_ERR_INVALID;
    ep_group_t *g = hook->group;
    ep_status_t st = check_entry(g);
    if (st) return st;
    return done(g, g->ops->hook_run(g, hook));
}

ep_status_t ep_get_dispatch_layout(ep_group_t *g, const int32_t *topk_idx, int num_tokens,
                                   ep_ht_layout_t *layout, void *stream)
{
    static const char op[] = "ep_get_dispatch_layout";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, layout);
    NEED(g, op, layout->num_tokens_per_rank);
    NEED(g, op, layout->num_tokens_per_expert);
    if ((st = check_tokens(g, op, num_tokens, g->cfg.ht_max_tokens, "ht"))) return st;
    if (num_tokens > 0) {
        NEED(g, op, topk_idx);
        NEED(g, op, layout->is_token_in_rank);
    }
    if ((st = check_topk(g, op, topk_idx, num_tokens))) return st;
    return done(g, g->ops->get_dispatch_layout(g, topk_idx, num_tokens, layout, stream));
}

int ep_ht_max_recv_tokens(const ep_group_t *g)
{
    return g ? g->cfg.ht_max_tokens * g->nranks : 0;
}

static ep_status_t check_ht_out(ep_group_t *g, const char *op, const ep_ht_dispatch_args_t *a,
                                const ep_ht_dispatch_out_t *out, int cached)
{
    NEED(g, op, out);
    if (out->capacity < 0) return INVALID(g, "%s: out->capacity %d is negative", op, out->capacity);
    NEED(g, op, out->recv_x);
    if (a->use_fp8) NEED(g, op, out->recv_scales);
    if (!cached) {
        NEED(g, op, out->recv_topk_idx);
        NEED(g, op, out->num_recv_per_expert);
    }
    return EP_OK;
}

ep_status_t ep_ht_dispatch(ep_group_t *g, const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out,
                           ep_ht_handle_t **handle)
{
    static const char op[] = "ep_ht_dispatch";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, a);
    NEED(g, op, handle);
    if ((st = check_tokens(g, op, a->num_tokens, g->cfg.ht_max_tokens, "ht"))) return st;
    if ((st = check_fp8(g, op, a->use_fp8))) return st;
    if (a->expert_alignment < 0)
        return INVALID(g, "%s: expert_alignment %d is negative", op, a->expert_alignment);
    if (a->num_tokens > 0) {
        NEED(g, op, a->x);
        NEED(g, op, a->topk_idx);
        if (a->use_fp8) NEED(g, op, a->x_scales);
    }
    if ((st = check_ht_out(g, op, a, out, 0))) return st;
    if ((st = check_topk(g, op, a->topk_idx, a->num_tokens))) return st;
    return done(g, g->ops->ht_dispatch(g, a, out, handle));
}

ep_status_t ep_ht_dispatch_cached(ep_group_t *g, const ep_ht_handle_t *h,
                                  const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out)
{
    static const char op[] = "ep_ht_dispatch_cached";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, h);
    NEED(g, op, a);
    if (h->group != g) return INVALID(g, "%s: the handle belongs to another group", op);
    if ((st = check_fp8(g, op, a->use_fp8))) return st;
    if (a->num_tokens > 0) {
        NEED(g, op, a->x);
        if (a->use_fp8) NEED(g, op, a->x_scales);
    }
    if ((st = check_ht_out(g, op, a, out, 1))) return st;
    return done(g, g->ops->ht_dispatch_cached(g, h, a, out));
}

ep_status_t ep_ht_combine(ep_group_t *g, const ep_ht_handle_t *h, const uint16_t *x, uint16_t *out,
                          void *stream)
{
    static const char op[] = "ep_ht_combine";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, h);
    if (h->group != g) return INVALID(g, "%s: the handle belongs to another group", op);
    return done(g, g->ops->ht_combine(g, h, x, out, stream));
}

void ep_ht_handle_destroy(ep_ht_handle_t *h)
{
    if (h && h->group) h->group->ops->ht_handle_destroy(h);
}

/* ---- control words ------------------------------------------------------------------------ */

ep_status_t ep_group_allgather(ep_group_t *g, const void *in, void *out, size_t len)
{
    static const char op[] = "ep_group_allgather";
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    NEED(g, op, in);
    NEED(g, op, out);
    if (len < 1 || len > EP_ALLGATHER_MAX)
        return INVALID(g, "%s: len %zu is not in 1..%d (EP_ALLGATHER_MAX)", op, len,
                       EP_ALLGATHER_MAX);
    if (!g->ops->allgather)
        return ep_group_fail(g, -1, EP_ERR_UNSUPPORTED, "%s: the %s backend has no data-plane path",
                             op, g->ops->name);
    return done(g, g->ops->allgather(g, in, out, len));
}

/* ---- routing ------------------------------------------------------------------------------ */

static int check_route(const ep_route_params_t *p, const float *logits, int T, const int32_t *idx,
                       const float *w, char *msg, size_t n)
{
    if (!p) return snprintf(msg, n, "route params are NULL"), -1;
    if (p->kind != EP_ROUTE_SOFTMAX_TOPK && p->kind != EP_ROUTE_SIGMOID_GROUP &&
        p->kind != EP_ROUTE_SOFTMAX_GROUP)
        return snprintf(msg, n, "route kind %d is unknown", (int)p->kind), -1;
    if (p->num_experts < 1 || p->num_experts > EP_MAX_EXPERTS)
        return snprintf(msg, n, "route num_experts %d is not in 1..%d", p->num_experts,
                        EP_MAX_EXPERTS),
               -1;
    if (p->topk < 1 || p->topk > EP_MAX_TOPK || p->topk > p->num_experts)
        return snprintf(msg, n, "route topk %d is not in 1..%d", p->topk,
                        p->num_experts < EP_MAX_TOPK ? p->num_experts : EP_MAX_TOPK),
               -1;
    if (!isfinite(p->routed_scaling_factor))
        return snprintf(msg, n, "route routed_scaling_factor is not finite"), -1;
    if (p->kind == EP_ROUTE_SIGMOID_GROUP || p->kind == EP_ROUTE_SOFTMAX_GROUP) {
        if (p->num_groups < 1 || p->num_experts % p->num_groups)
            return snprintf(msg, n, "route num_groups %d does not divide num_experts %d",
                            p->num_groups, p->num_experts),
                   -1;
        if (p->topk_groups < 1 || p->topk_groups > p->num_groups)
            return snprintf(msg, n, "route topk_groups %d is not in 1..%d", p->topk_groups,
                            p->num_groups),
                   -1;
        int cand = p->topk_groups * (p->num_experts / p->num_groups);
        if (p->topk > cand)
            return snprintf(msg, n, "route topk %d exceeds the %d experts of %d kept groups",
                            p->topk, cand, p->topk_groups),
                   -1;
    }
    if (T < 0 || T > EP_MAX_TOKENS)
        return snprintf(msg, n, "route num_tokens %d is not in 0..%d", T, EP_MAX_TOKENS), -1;
    if (T > 0 && (!logits || !idx || !w))
        return snprintf(msg, n, "route %s is NULL",
                        !logits ? "logits"
                        : !idx  ? "topk_idx"
                                : "topk_weights"),
               -1;
    return 0;
}

ep_status_t ep_route_host(const ep_route_params_t *p, const float *logits, int num_tokens,
                          int32_t *topk_idx, float *topk_weights)
{
    char msg[160];
    if (check_route(p, logits, num_tokens, topk_idx, topk_weights, msg, sizeof msg))
        return create_fail(-1, EP_ERR_INVALID, "ep_route_host: %s", msg);
    return ep_route_ref(p, logits, num_tokens, topk_idx, topk_weights) ? EP_ERR_NOMEM : EP_OK;
}

ep_status_t ep_route(ep_group_t *g, const ep_route_params_t *p, const float *logits, int num_tokens,
                     int32_t *topk_idx, float *topk_weights, void *stream)
{
    char msg[160];
    ep_status_t st;
    if (!g) return EP_ERR_INVALID;
    if ((st = check_entry(g))) return st;
    if (check_route(p, logits, num_tokens, topk_idx, topk_weights, msg, sizeof msg))
        return INVALID(g, "ep_route: %s", msg);
    return done(g, g->ops->route(g, p, logits, num_tokens, topk_idx, topk_weights, stream));
}
