/* GPU test/bench harness (see cuda_harness.h). */
#include "cuda_harness.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int h_world_init(h_world_t *w, int nranks)
{
    w->nranks = nranks;
    if (ep_inproc_world_create(nranks, &w->inproc) != EP_OK) return -1;
    w->waiting = w->generation = w->broken = 0;
    if (pthread_mutex_init(&w->mu, NULL) != 0) return -1;
    return pthread_cond_init(&w->cv, NULL) == 0 ? 0 : -1;
}

void h_world_fini(h_world_t *w)
{
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    ep_inproc_world_destroy(w->inproc);
}

int h_barrier(h_world_t *w)
{
    pthread_mutex_lock(&w->mu);
    int gen = w->generation;
    if (++w->waiting == w->nranks) {
        w->waiting = 0;
        w->generation++;
        pthread_cond_broadcast(&w->cv);
    } else {
        while (gen == w->generation && !w->broken)
            pthread_cond_wait(&w->cv, &w->mu);
    }
    int broken = w->broken;
    pthread_mutex_unlock(&w->mu);
    return broken;
}

void h_world_break(h_world_t *w)
{
    pthread_mutex_lock(&w->mu);
    w->broken = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

ep_status_t h_group_create(const ep_config_t *cfg, h_world_t *w, int rank, ep_group_t **out)
{
    ep_bootstrap_t bs;
    ep_inproc_bootstrap(w->inproc, rank, &bs);
    ep_status_t st = ep_group_create(cfg, &bs, out);
    if (st != EP_OK)
        fprintf(stderr, "rank %d: ep_group_create: %s\n", rank, ep_group_last_error(NULL));
    return st;
}

void h_group_destroy(ep_group_t *g)
{
    if (g) ep_group_destroy(g);
}

int h_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}

int h_skip_without_gpu(void)
{
    if (h_device_count() > 0) return 0;
    printf("SKIP: no CUDA device present\n");
    return 1;
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
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
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
    if (isnan(f)) return 0x7f;
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (a >= 448.f) return sign | 0x7e;
    int e;
    frexpf(a, &e);
    int E = e - 1 < -6 ? -6 : e - 1;
    float step = ldexpf(1.f, E - 3);
    float r = rintf(a / step) * step;
    if (r == 0.f) return sign;
    if (r >= 448.f) return sign | 0x7e;
    frexpf(r, &e);
    E = e - 1;
    if (E < -6) return sign | (uint8_t)(int)(r / ldexpf(1.f, -9));
    int m = (int)(r / ldexpf(1.f, E - 3)) - 8;
    return sign | (uint8_t)(((E + 7) << 3) | m);
}
