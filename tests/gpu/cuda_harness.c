/* GPU test/bench harness (see cuda_harness.h). */
#include "cuda_harness.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((weak)) ep_status_t ep_group_fail(ep_group_t *g, int peer, ep_status_t st,
                                                const char *fmt, ...)
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

__attribute__((weak)) const char *ep_strerror(ep_status_t st)
{
    switch (st) {
    case EP_OK:
        return "ok";
    case EP_ERR_TIMEOUT:
        return "timeout";
    default:
        return "error";
    }
}

int h_world_init(h_world_t *w, int nranks)
{
    w->nranks = nranks;
    w->slot = 4096;
    w->gather = calloc((size_t)nranks, w->slot);
    if (!w->gather)
        return -1;
    return pthread_barrier_init(&w->bar, NULL, (unsigned)nranks) == 0 ? 0 : -1;
}

void h_world_fini(h_world_t *w)
{
    pthread_barrier_destroy(&w->bar);
    free(w->gather);
}

void h_barrier(h_world_t *w)
{
    pthread_barrier_wait(&w->bar);
}

struct h_bs {
    h_world_t *w;
    int rank;
};
static struct h_bs bs_ctx[EP_MAX_RANKS];

static int h_allgather(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms)
{
    struct h_bs *b = ctx;
    if (len > b->w->slot)
        return EP_ERR_INVALID;
    memcpy(b->w->gather + (size_t)b->rank * b->w->slot, in, len);
    h_barrier(b->w);
    for (int r = 0; r < b->w->nranks; ++r)
        memcpy((unsigned char *)out + (size_t)r * len, b->w->gather + (size_t)r * b->w->slot, len);
    h_barrier(b->w);
    return 0;
}

static int h_bar(void *ctx, unsigned timeout_ms)
{
    struct h_bs *b = ctx;
    h_barrier(b->w);
    return 0;
}

void h_bootstrap(h_world_t *w, int rank, ep_bootstrap_t *bs)
{
    bs_ctx[rank].w = w;
    bs_ctx[rank].rank = rank;
    bs->rank = rank;
    bs->nranks = w->nranks;
    bs->ctx = &bs_ctx[rank];
    bs->allgather = h_allgather;
    bs->barrier = h_bar;
}

ep_status_t h_group_create(const ep_config_t *cfg, h_world_t *w, int rank, ep_group_t **out)
{
    ep_bootstrap_t bs;
    h_bootstrap(w, rank, &bs);
    ep_group_t *g = calloc(1, sizeof *g);
    if (!g)
        return EP_ERR_NOMEM;
    g->cfg = *cfg;
    g->rank = rank;
    g->nranks = w->nranks;
    g->num_local_experts = cfg->num_experts / w->nranks;
    g->ops = &ep_backend_cuda_ops;
    atomic_store(&g->failed_peer, -1);
    pthread_mutex_init(&g->err_lock, NULL);
    ep_status_t st = g->ops->create(g, &bs);
    if (st != EP_OK) {
        fprintf(stderr, "rank %d: create: %s\n", rank, g->error);
        g->ops->destroy(g);
        free(g);
        return st;
    }
    *out = g;
    return EP_OK;
}

void h_group_destroy(ep_group_t *g)
{
    if (!g)
        return;
    g->ops->destroy(g);
    pthread_mutex_destroy(&g->err_lock);
    free(g);
}

ep_status_t h_ll_dispatch(ep_group_t *g, const ep_ll_dispatch_args_t *a, ep_ll_dispatch_out_t *o,
                          ep_ll_handle_t **h, ep_hook_t **hook)
{
    int b = g->ll_next_buf;
    ep_status_t st = g->ops->ll_dispatch(g, b, a, o, h, hook);
    if (st == EP_OK)
        g->ll_next_buf = b ^ 1;
    return st;
}

ep_status_t h_ll_combine(ep_group_t *g, const ep_ll_combine_args_t *a, ep_hook_t **hook)
{
    int b = g->ll_next_buf;
    ep_status_t st = g->ops->ll_combine(g, b, a, hook);
    if (st == EP_OK)
        g->ll_next_buf = b ^ 1;
    return st;
}

ep_status_t h_hook_run(ep_group_t *g, ep_hook_t *hook)
{
    return g->ops->hook_run(g, hook);
}

int h_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess)
        return 0;
    return n;
}

float h_bf16_to_f(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t h_f_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float h_e4m3_to_f(uint8_t q)
{
    int s = q >> 7, ex = (q >> 3) & 15, m = q & 7;
    float v;
    if (ex == 15 && m == 7)
        v = NAN;
    else if (ex == 0)
        v = ldexpf((float)m / 8.f, -6);
    else
        v = ldexpf(1.f + (float)m / 8.f, ex - 7);
    return s ? -v : v;
}

/* Nearest e4m3 (round half to even on the value grid of the operand's binade, saturating to
 * 448), then encoded: written from the format's definition, not from the kernel's intrinsics. */
uint8_t h_f_to_e4m3(float f)
{
    if (isnan(f))
        return 0x7f;
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (a >= 448.f)
        return sign | 0x7e;
    int e;
    frexpf(a, &e);
    int E = e - 1 < -6 ? -6 : e - 1;
    float step = ldexpf(1.f, E - 3);
    float r = rintf(a / step) * step;
    if (r == 0.f)
        return sign;
    if (r >= 448.f)
        return sign | 0x7e;
    frexpf(r, &e);
    E = e - 1;
    if (E < -6)
        return sign | (uint8_t)(int)(r / ldexpf(1.f, -9));
    int m = (int)(r / ldexpf(1.f, E - 3)) - 8;
    return sign | (uint8_t)(((E + 7) << 3) | m);
}
