/* Test harness for libep (see harness.h). */
#include "test_rng.h"
#include "harness.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint64_t rng_next(rng_t *r)
{
    return test_splitmix64(&r->s);
}

int rng_int(rng_t *r, int lo, int hi)
{
    return lo + (int)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

float rng_float(rng_t *r)
{
    return (float)(rng_next(r) >> 40) / 16777216.0f;
}

struct rank_arg {
    int rank;
    ep_bootstrap_t bs;
    rank_fn fn;
    void *arg;
    int rc;
};

static void *rank_main(void *p)
{
    struct rank_arg *a = p;
    a->rc = a->fn(a->rank, &a->bs, a->arg);
    return NULL;
}

int run_ranks(int nranks, rank_fn fn, void *arg)
{
    ep_inproc_world_t *w;
    pthread_t th[EP_MAX_RANKS];
    struct rank_arg ra[EP_MAX_RANKS];
    int failed = 0;
    if (ep_inproc_world_create(nranks, &w) != EP_OK) return nranks;
    for (int r = 0; r < nranks; r++) {
        ra[r] = (struct rank_arg){.rank = r, .fn = fn, .arg = arg};
        ep_inproc_bootstrap(w, r, &ra[r].bs);
        pthread_create(&th[r], NULL, rank_main, &ra[r]);
    }
    for (int r = 0; r < nranks; r++) {
        pthread_join(th[r], NULL);
        failed += ra[r].rc != 0;
    }
    ep_inproc_world_destroy(w);
    return failed;
}

float ref_bf16_value(uint16_t b)
{
    int sign = b >> 15, exp = (b >> 7) & 0xff, man = b & 0x7f;
    double v;
    if (exp == 0xff) return man ? NAN : (sign ? -INFINITY : INFINITY);
    if (exp == 0)
        v = man * pow(2.0, -133); /* 2^-126 * man / 128 */
    else
        v = (1.0 + man / 128.0) * pow(2.0, exp - 127);
    return (float)(sign ? -v : v);
}

uint16_t ref_bf16_round(float f)
{
    if (isnan(f)) return 0x7fff;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t lo = (uint16_t)(u >> 16);
    if ((u & 0xffff) == 0) return lo;
    uint16_t hi = (uint16_t)(lo + 1); /* the next pattern away from zero */
    if (isinf(ref_bf16_value(hi))) {
        /* Rounding to infinity happens at or above the halfway point to 2^128. */
        double half = (fabs((double)ref_bf16_value(lo)) + ldexp(1.0, 128)) / 2;
        if (fabs((double)f) > half || (fabs((double)f) == half && (lo & 1))) return hi;
        return lo;
    }
    double dl = fabs((double)f - (double)ref_bf16_value(lo));
    double dh = fabs((double)ref_bf16_value(hi) - (double)f);
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return (lo & 1) ? hi : lo;
}

double ref_fp8_value(uint8_t b)
{
    int sign = b >> 7, exp = (b >> 3) & 15, man = b & 7;
    if (exp == 15 && man == 7) return NAN;
    double v = exp == 0 ? man / 8.0 * pow(2.0, -6) : (1.0 + man / 8.0) * pow(2.0, exp - 7);
    return sign ? -v : v;
}

static double fp8_pos[0x7f]; /* values of the codes 0x00..0x7e */
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;

static void fp8_table(void)
{
    for (int b = 0; b < 0x7f; b++)
        fp8_pos[b] = ref_fp8_value((uint8_t)b);
}

uint8_t ref_fp8_round(float f)
{
    pthread_once(&fp8_once, fp8_table);
    if (isnan(f)) return 0x7f;
    double a = fabs((double)f);
    uint8_t sign = signbit(f) ? 0x80 : 0;
    if (a >= 448.0) return sign | 0x7e;
    /* Positive codes 0x00..0x7e are increasing in value: binary search the last one <= a. */
    int lo = 0, hi = 0x7e;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (fp8_pos[mid] <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    double vl = fp8_pos[lo];
    if (vl == a || lo == 0x7e) return sign | (uint8_t)lo;
    double vh = fp8_pos[lo + 1];
    double dl = a - vl, dh = vh - a;
    int pick = dl < dh ? lo : dh < dl ? lo + 1 : ((lo & 1) ? lo + 1 : lo);
    return sign | (uint8_t)pick;
}

uint16_t rand_bf16(rng_t *r, int emin, int emax)
{
    int e = rng_int(r, emin, emax) + 127;
    return (uint16_t)((rng_next(r) & 1) << 15 | (uint32_t)e << 7 | (rng_next(r) & 0x7f));
}

static float bf16_val[65536];
static pthread_once_t bf16_once = PTHREAD_ONCE_INIT;

static void bf16_table(void)
{
    for (int b = 0; b < 65536; b++)
        bf16_val[b] = ref_bf16_value((uint16_t)b);
}

const float *ref_bf16_table(void)
{
    pthread_once(&bf16_once, bf16_table);
    return bf16_val;
}
