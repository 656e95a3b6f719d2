/* The sampling algorithm of sample.h in plain C: the reference twin of model/cuda/sample.cu. */
#include "sample.h"

#include <errno.h>
#include <math.h>
#include <string.h>

int epd_sample_check(const epd_sample_params_t *p, epd_err_t *err)
{
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return epd_err_set(err, -EINVAL, "temperature: %g must be a finite number >= 0",
                           (double)p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return epd_err_set(err, -EINVAL, "top_p: %g must be in (0, 1]", (double)p->top_p);
    if (p->top_k < 0) return epd_err_set(err, -EINVAL, "top_k: %d must be >= 0", p->top_k);
    return 0;
}

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double epd_sample_uniform(uint64_t seed, uint64_t counter)
{
    return (double)(mix64(mix64(seed) + counter) >> 11) * 0x1.0p-53;
}

int32_t epd_sample_argmax(const float *x, int V)
{
    int32_t best = -1;
    for (int i = 0; i < V; i++)
        if (x[i] == x[i] && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

static float bits_f(uint32_t b)
{
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* The largest t in [0, 1] (by bits) with count(p >= t) >= k. */
static float kth_threshold(const float *p, int V, int k)
{
    uint32_t lo = 0, hi = 0x3f800001u;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        float t = bits_f(mid);
        int n = 0;
        for (int i = 0; i < V; i++)
            n += p[i] >= t;
        if (n >= k)
            lo = mid;
        else
            hi = mid;
    }
    return bits_f(lo);
}

/* The largest t with sum(p >= t) >= target (p already 0 where dropped). */
static float mass_threshold(const float *p, int V, double target)
{
    uint32_t lo = 0, hi = 0x3f800001u;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        float t = bits_f(mid);
        double s = 0;
        for (int i = 0; i < V; i++)
            if (p[i] >= t) s += p[i];
        if (s >= target)
            lo = mid;
        else
            hi = mid;
    }
    return bits_f(lo);
}

int32_t epd_sample_ref(const float *x, int V, const epd_sample_params_t *sp, float *p)
{
    if (sp->temperature == 0) return epd_sample_argmax(x, V);
    int32_t am = epd_sample_argmax(x, V);
    float mx = x[am];
    if (!(mx == mx) || isinf(mx)) return am; /* all NaN, or an infinite logit */
    float inv_t = 1.0f / sp->temperature;
    if (isinf(inv_t)) return am; /* a subnormal temperature: the limit is greedy (0 * inf: NaN) */
    for (int i = 0; i < V; i++)
        p[i] = x[i] == x[i] ? expf((x[i] - mx) * inv_t) : 0.0f;
    if (sp->top_k > 0 && sp->top_k < V) {
        float t = kth_threshold(p, V, sp->top_k);
        for (int i = 0; i < V; i++)
            if (p[i] < t) p[i] = 0;
    }
    if (sp->top_p < 1) {
        double z = 0;
        for (int i = 0; i < V; i++)
            z += p[i];
        float t = mass_threshold(p, V, (double)sp->top_p * z);
        for (int i = 0; i < V; i++)
            if (p[i] < t) p[i] = 0;
    }
    double s = 0;
    for (int i = 0; i < V; i++)
        s += p[i];
    double u = epd_sample_uniform(sp->seed, sp->counter) * s;
    double acc = 0;
    int32_t last = am;
    for (int i = 0; i < V; i++) {
        if (p[i] <= 0) continue;
        acc += p[i];
        last = i;
        if (acc > u) return i;
    }
    return last;
}
