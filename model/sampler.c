/* Sampling: seeded xoshiro256**, greedy, temperature, top-k and top-p (nucleus). */
#include "sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void epd_rng_seed(epd_rng_t *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t epd_rng_next(epd_rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

double epd_rng_uniform(epd_rng_t *r)
{
    return (double)(epd_rng_next(r) >> 11) * 0x1.0p-53;
}

int epd_sampler_init(epd_sampler_t *s, const epd_sampling_t *p, uint64_t seed, int vocab,
                     epd_err_t *err)
{
    s->order = NULL;
    s->prob = NULL;
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return epd_err_set(err, -EINVAL, "temperature: %g must be a finite number >= 0",
                           (double)p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return epd_err_set(err, -EINVAL, "top_p: %g must be in (0, 1]", (double)p->top_p);
    if (p->top_k < 0) return epd_err_set(err, -EINVAL, "top_k: %d must be >= 0", p->top_k);
    if (vocab < 1) return epd_err_set(err, -EINVAL, "sampler: vocabulary of %d tokens", vocab);
    s->p = *p;
    s->vocab = vocab;
    epd_rng_seed(&s->rng, seed);
    s->order = malloc(sizeof(int32_t) * (size_t)vocab);
    s->prob = malloc(sizeof(double) * (size_t)vocab);
    if (!s->order || !s->prob) {
        epd_sampler_fini(s);
        return epd_err_set(err, -ENOMEM, "sampler: out of memory");
    }
    return 0;
}

void epd_sampler_fini(epd_sampler_t *s)
{
    free(s->order);
    free(s->prob);
    s->order = NULL;
    s->prob = NULL;
}

int32_t epd_argmax(const float *logits, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best] || (logits[best] != logits[best] && logits[i] == logits[i]))
            best = i;
    return best;
}

/* qsort has no context argument: the probabilities being sorted, per thread */
static _Thread_local const double *tl_prob;

static int by_prob_desc(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (tl_prob[x] != tl_prob[y]) return tl_prob[x] > tl_prob[y] ? -1 : 1;
    return x < y ? -1 : x > y; /* equal probabilities: lower id first */
}

int32_t epd_sampler_pick(epd_sampler_t *s, const float *logits)
{
    int V = s->vocab;
    if (s->p.temperature == 0) return epd_argmax(logits, V);
    /* softmax(logits / T) in double; NaN logits get probability 0 */
    double mx = -INFINITY;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < V; i++) {
        double p = logits[i] == logits[i] ? exp(((double)logits[i] - mx) / s->p.temperature) : 0;
        s->prob[i] = p;
        sum += p;
        s->order[i] = i;
    }
    if (!(sum > 0)) return epd_argmax(logits, V);
    tl_prob = s->prob;
    qsort(s->order, (size_t)V, sizeof(int32_t), by_prob_desc);
    /* keep a prefix of the sorted tokens: at most top_k, and the shortest one whose mass
     * reaches top_p of the total */
    int keep = s->p.top_k > 0 && s->p.top_k < V ? s->p.top_k : V;
    double mass = 0, target = (double)s->p.top_p * sum;
    int n = 0;
    while (n < keep) {
        mass += s->prob[s->order[n++]];
        if (mass >= target) break;
    }
    double u = epd_rng_uniform(&s->rng) * mass, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->prob[s->order[i]];
        if (u < acc) return s->order[i];
    }
    return s->order[n - 1];
}
