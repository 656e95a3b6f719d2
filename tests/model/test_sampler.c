/* Sampling: the PRNG against published test vectors, greedy ties, top-p/top-k truncation and
 * temperature against frequencies computed here from the softmax, reproducibility per seed,
 * parameter errors. */
#include "sampler.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

static void test_prng_vectors(void **state)
{
    (void)state;
    /* splitmix64 from 0: the first outputs of the reference generator */
    epd_rng_t r;
    epd_rng_seed(&r, 0);
    assert_true(r.s[0] == 0xe220a8397b1dcdafull);
    assert_true(r.s[1] == 0x6e789e6aa1b965f4ull);
    assert_true(r.s[2] == 0x06c45d188009454full);
    /* xoshiro256** from the state {1, 2, 3, 4} */
    r.s[0] = 1;
    r.s[1] = 2;
    r.s[2] = 3;
    r.s[3] = 4;
    assert_true(epd_rng_next(&r) == 11520ull);
    assert_true(epd_rng_next(&r) == 0ull);
    assert_true(epd_rng_next(&r) == 1509978240ull);
    assert_true(epd_rng_next(&r) == 1215971899390074240ull);
    for (int i = 0; i < 1000; i++) {
        double u = epd_rng_uniform(&r);
        assert_true(u >= 0.0 && u < 1.0);
    }
}

static void test_greedy(void **state)
{
    (void)state;
    float l[5] = {0.5f, 2.0f, -1.0f, 2.0f, NAN};
    assert_int_equal(epd_argmax(l, 5), 1); /* tie between 1 and 3: the lower id */
    float n[3] = {NAN, -5.0f, -4.0f};
    assert_int_equal(epd_argmax(n, 3), 2); /* NaN never wins */
    epd_sampler_t s;
    epd_sampling_t p = {.temperature = 0, .top_p = 1};
    assert_int_equal(epd_sampler_init(&s, &p, 1, 5, NULL), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(epd_sampler_pick(&s, l), 1);
    epd_sampler_fini(&s);
}

#define DRAWS 40000

/* Frequencies of DRAWS picks; each compared with the expected probability within 5 sigma. */
static void check_freq(const epd_sampling_t *p, const float *logits, int V, const double *expect)
{
    epd_sampler_t s;
    assert_int_equal(epd_sampler_init(&s, p, 42, V, NULL), 0);
    int count[16] = {0};
    for (int i = 0; i < DRAWS; i++) {
        int t = epd_sampler_pick(&s, logits);
        assert_true(t >= 0 && t < V);
        count[t]++;
    }
    for (int v = 0; v < V; v++) {
        double f = (double)count[v] / DRAWS, e = expect[v];
        double sigma = sqrt(e * (1 - e) / DRAWS);
        if (e == 0)
            assert_int_equal(count[v], 0);
        else if (fabs(f - e) > 5 * sigma + 1e-9)
            fail_msg("token %d: frequency %.4f, expected %.4f", v, f, e);
    }
    epd_sampler_fini(&s);
}

static void test_distributions(void **state)
{
    (void)state;
    const double prob[4] = {0.5, 0.3, 0.15, 0.05};
    float l[4];
    for (int i = 0; i < 4; i++)
        l[i] = (float)log(prob[i]) + 3.0f; /* softmax is shift invariant */

    epd_sampling_t plain = {.temperature = 1, .top_p = 1};
    check_freq(&plain, l, 4, prob);

    /* top_p 0.75: the two most likely tokens (mass 0.8) renormalised */
    epd_sampling_t nucleus = {.temperature = 1, .top_p = 0.75f};
    const double e_nuc[4] = {0.5 / 0.8, 0.3 / 0.8, 0, 0};
    check_freq(&nucleus, l, 4, e_nuc);

    /* top_k 3 */
    epd_sampling_t topk = {.temperature = 1, .top_p = 1, .top_k = 3};
    const double e_k[4] = {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0};
    check_freq(&topk, l, 4, e_k);

    /* temperature 2: p^(1/2) renormalised */
    double z = 0, e_t[4];
    for (int i = 0; i < 4; i++)
        z += sqrt(prob[i]);
    for (int i = 0; i < 4; i++)
        e_t[i] = sqrt(prob[i]) / z;
    epd_sampling_t warm = {.temperature = 2, .top_p = 1};
    check_freq(&warm, l, 4, e_t);
}

static void test_seeded(void **state)
{
    (void)state;
    float l[8] = {0, 0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f};
    epd_sampling_t p = {.temperature = 1, .top_p = 0.9f};
    epd_sampler_t a, b, c;
    assert_int_equal(epd_sampler_init(&a, &p, 7, 8, NULL), 0);
    assert_int_equal(epd_sampler_init(&b, &p, 7, 8, NULL), 0);
    assert_int_equal(epd_sampler_init(&c, &p, 8, 8, NULL), 0);
    int same = 1;
    for (int i = 0; i < 64; i++) {
        int x = epd_sampler_pick(&a, l);
        assert_int_equal(x, epd_sampler_pick(&b, l));
        same &= x == epd_sampler_pick(&c, l);
    }
    assert_false(same); /* another seed, another sequence (64 draws of ~8 choices) */
    epd_sampler_fini(&a);
    epd_sampler_fini(&b);
    epd_sampler_fini(&c);
}

static void test_bad_params(void **state)
{
    (void)state;
    static const struct {
        epd_sampling_t p;
        const char *expect;
    } bad[] = {
        {{.temperature = -1, .top_p = 1}, "temperature"},
        {{.temperature = NAN, .top_p = 1}, "temperature"},
        {{.temperature = INFINITY, .top_p = 1}, "temperature"},
        {{.temperature = 1, .top_p = 0}, "top_p"},
        {{.temperature = 1, .top_p = 1.5f}, "top_p"},
        {{.temperature = 1, .top_p = 1, .top_k = -1}, "top_k"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        epd_sampler_t s;
        epd_err_t err;
        assert_int_equal(epd_sampler_init(&s, &bad[i].p, 1, 4, &err), -EINVAL);
        assert_non_null(strstr(err.msg, bad[i].expect));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prng_vectors),  cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_distributions), cmocka_unit_test(test_seeded),
        cmocka_unit_test(test_bad_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
