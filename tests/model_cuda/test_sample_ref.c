/* epd_sample_ref (model/sample.c), the twin of the GPU sampler, against a reference written
 * here from sample.h's text with sorts instead of bisections: top-k keeps the k largest p plus
 * their ties, top-p the smallest descending prefix whose mass reaches top_p * Z plus ties; the
 * draw walks the kept p in id order. Also greedy, determinism, the distribution of many draws,
 * NaN / inf logits and the parameter checks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "test_rng.h"
#include "sample.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_V 700

/* The test's own generator (splitmix64), unrelated to the sampler's. */
static uint64_t rng_state = 0x1234abcdu;
static uint64_t rng_next(void)
{
    return test_splitmix64(&rng_state);
}
static double rng_unit(void)
{
    return test_rng_unit(&rng_state);
}
static float rng_normal(void)
{
    return test_rng_normal(&rng_state);
}

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The sum of p[i] over kept ids with p[i] >= t, in id order (the mass a top-p threshold t
 * keeps). */
static double mass_at(const float *p, const int *keep, int V, float t)
{
    double s = 0;
    for (int i = 0; i < V; i++)
        if (keep[i] && p[i] >= t) s += p[i];
    return s;
}

static int32_t ref_sample(const float *x, int V, const epd_sample_params_t *sp)
{
    static float p[MAX_V], sorted[MAX_V];
    static int keep[MAX_V];
    int32_t am = 0;
    int found = 0;
    for (int i = 0; i < V; i++)
        if (!isnan(x[i]) && (!found || x[i] > x[am])) {
            am = i;
            found = 1;
        }
    if (sp->temperature == 0 || !found || isinf(x[am])) return am;
    float inv_t = 1.0f / sp->temperature;
    if (isinf(inv_t)) return am;
    for (int i = 0; i < V; i++) {
        p[i] = isnan(x[i]) ? 0.0f : expf((x[i] - x[am]) * inv_t);
        keep[i] = p[i] > 0;
    }
    if (sp->top_k > 0 && sp->top_k < V) {
        memcpy(sorted, p, sizeof(float) * (size_t)V);
        qsort(sorted, (size_t)V, sizeof(float), cmp_desc);
        float kth = sorted[sp->top_k - 1];
        for (int i = 0; i < V; i++)
            keep[i] = keep[i] && p[i] >= kth;
    }
    if (sp->top_p < 1) {
        double z = mass_at(p, keep, V, 0.0f);
        double target = (double)sp->top_p * z;
        int n = 0;
        for (int i = 0; i < V; i++)
            if (keep[i]) sorted[n++] = p[i];
        qsort(sorted, (size_t)n, sizeof(float), cmp_desc);
        float thr = 0;
        for (int j = 0; j < n; j++) {
            if (j > 0 && sorted[j] == sorted[j - 1]) continue; /* the prefix ends after ties */
            if (mass_at(p, keep, V, sorted[j]) >= target) {
                thr = sorted[j];
                break;
            }
        }
        for (int i = 0; i < V; i++)
            keep[i] = keep[i] && p[i] >= thr;
    }
    double s = mass_at(p, keep, V, 0.0f);
    double u = epd_sample_uniform(sp->seed, sp->counter) * s, acc = 0;
    int32_t last = am;
    for (int i = 0; i < V; i++) {
        if (!keep[i]) continue;
        acc += p[i];
        last = i;
        if (acc > u) return i;
    }
    return last;
}

static void random_logits(float *x, int V)
{
    float scale = (float)(0.5 + 6 * rng_unit());
    int quantise = rng_next() % 3 == 0; /* many exact ties */
    for (int i = 0; i < V; i++) {
        x[i] = scale * rng_normal();
        if (quantise) x[i] = roundf(x[i]);
    }
    if (rng_next() % 4 == 0) x[rng_next() % (uint64_t)V] = NAN;
    if (rng_next() % 4 == 0) x[rng_next() % (uint64_t)V] = -INFINITY;
}

static epd_sample_params_t random_params(int V)
{
    static const float temps[] = {0, 0.25f, 0.7f, 1, 1.6f};
    static const float tops_p[] = {1, 1, 0.95f, 0.8f, 0.5f, 0.1f, 1e-6f};
    epd_sample_params_t sp = {0};
    sp.temperature = temps[rng_next() % 5];
    sp.top_p = tops_p[rng_next() % 7];
    const int ks[] = {0, 0, 1, 2, 5, 40, V - 1, V, V + 3};
    sp.top_k = ks[rng_next() % 9];
    if (sp.top_k < 0) sp.top_k = 0;
    sp.seed = rng_next();
    sp.counter = rng_next() % 1000;
    return sp;
}

static void test_matches_sorted_reference(void **state)
{
    (void)state;
    static float x[MAX_V], scratch[MAX_V];
    int sampled = 0;
    for (int c = 0; c < 4000; c++) {
        int V = 1 + (int)(rng_next() % (MAX_V - 1));
        random_logits(x, V);
        epd_sample_params_t sp = random_params(V);
        int32_t want = ref_sample(x, V, &sp), got = epd_sample_ref(x, V, &sp, scratch);
        if (want != got)
            fail_msg("case %d: V=%d T=%g top_k=%d top_p=%g: ref %d, epd_sample_ref %d", c, V,
                     (double)sp.temperature, sp.top_k, (double)sp.top_p, want, got);
        sampled += sp.temperature > 0;
    }
    assert_true(sampled > 2000);
}

static void test_greedy_is_argmax_lowest_tie(void **state)
{
    (void)state;
    float scratch[8];
    epd_sample_params_t sp = {.temperature = 0, .top_p = 1, .seed = 7};
    float a[8] = {1, 3, NAN, 3, -2, 3, 0, 2};
    assert_int_equal(epd_sample_ref(a, 8, &sp, scratch), 1);
    assert_int_equal(epd_sample_argmax(a, 8), 1);
    float b[4] = {NAN, -1, 5, NAN};
    assert_int_equal(epd_sample_ref(b, 4, &sp, scratch), 2);
    float c[3] = {NAN, NAN, NAN};
    assert_int_equal(epd_sample_ref(c, 3, &sp, scratch), 0);
    float d[3] = {-0.0f, 0.0f, -1};
    assert_int_equal(epd_sample_ref(d, 3, &sp, scratch), 0);
    /* a temperature whose inverse overflows is greedy too, ties to the lowest id */
    sp.temperature = 1e-40f;
    for (uint64_t k = 0; k < 50; k++) {
        sp.counter = k;
        assert_int_equal(epd_sample_ref(a, 8, &sp, scratch), 1);
    }
}

static void test_deterministic_per_seed_and_counter(void **state)
{
    (void)state;
    static float x[500], scratch[500];
    for (int i = 0; i < 500; i++)
        x[i] = 0.01f * rng_normal(); /* flat: the draw depends on u */
    epd_sample_params_t sp = {.temperature = 1, .top_p = 1, .seed = 42};
    int differ = 0;
    for (uint64_t k = 0; k < 200; k++) {
        sp.counter = k;
        int32_t t1 = epd_sample_ref(x, 500, &sp, scratch);
        assert_int_equal(epd_sample_ref(x, 500, &sp, scratch), t1);
        sp.seed = 43;
        differ += epd_sample_ref(x, 500, &sp, scratch) != t1;
        sp.seed = 42;
    }
    assert_true(differ > 150);
    assert_true(epd_sample_uniform(1, 2) == epd_sample_uniform(1, 2));
    assert_true(epd_sample_uniform(1, 2) != epd_sample_uniform(1, 3));
}

static void test_distribution_matches_softmax(void **state)
{
    (void)state;
    enum { V = 8, N = 20000 };
    const float x[V] = {0.3f, -1.0f, 1.2f, 0.0f, 2.0f, -0.5f, 0.9f, -3.0f};
    float scratch[V];
    double prob[V], z = 0;
    for (int i = 0; i < V; i++)
        z += prob[i] = exp((double)x[i]);
    int count[V] = {0};
    epd_sample_params_t sp = {.temperature = 1, .top_p = 1, .seed = 0xfeedu};
    for (uint64_t k = 0; k < N; k++) {
        sp.counter = k;
        int32_t t = epd_sample_ref(x, V, &sp, scratch);
        assert_in_range(t, 0, V - 1);
        count[t]++;
    }
    double chi2 = 0;
    for (int i = 0; i < V; i++) {
        double e = N * prob[i] / z;
        chi2 += (count[i] - e) * (count[i] - e) / e;
    }
    /* 7 degrees of freedom: P(chi2 > 29.9) ~ 1e-4 */
    if (chi2 > 29.9) fail_msg("chi-square %.2f over 20000 draws", chi2);
}

static void test_top_k_one_and_tiny_top_p_are_argmax(void **state)
{
    (void)state;
    static float x[300], scratch[300];
    for (int c = 0; c < 200; c++) {
        random_logits(x, 300);
        int32_t am = epd_sample_argmax(x, 300);
        if (isinf(x[am])) continue;
        epd_sample_params_t k1 = {.temperature = 1.3f,
                                  .top_p = 1,
                                  .top_k = 1,
                                  .seed = rng_next(),
                                  .counter = (uint64_t)c};
        epd_sample_params_t p0 = {
            .temperature = 1.3f, .top_p = 1e-7f, .seed = rng_next(), .counter = (uint64_t)c};
        /* ties at the maximum stay in: the token is one of them */
        int32_t a = epd_sample_ref(x, 300, &k1, scratch), b = epd_sample_ref(x, 300, &p0, scratch);
        assert_true(x[a] == x[am]);
        assert_true(x[b] == x[am]);
        if (c % 2 == 0) {
            x[am] += 1.0f; /* a unique maximum */
            assert_int_equal(epd_sample_ref(x, 300, &k1, scratch), am);
            assert_int_equal(epd_sample_ref(x, 300, &p0, scratch), am);
        }
    }
}

static void test_top_k_keeps_exactly_the_k_largest(void **state)
{
    (void)state;
    float x[10] = {0.1f, 0.5f, 0.4f, 0.0f, 0.45f, 0.2f, 0.3f, 0.35f, 0.25f, 0.15f}, scratch[10];
    epd_sample_params_t sp = {.temperature = 1, .top_p = 1, .top_k = 3, .seed = 5};
    int seen[10] = {0};
    for (uint64_t k = 0; k < 3000; k++) {
        sp.counter = k;
        seen[epd_sample_ref(x, 10, &sp, scratch)]++;
    }
    for (int i = 0; i < 10; i++)
        if (i == 1 || i == 2 || i == 4)
            assert_true(seen[i] > 700);
        else
            assert_int_equal(seen[i], 0);
}

static void test_nan_and_inf_logits(void **state)
{
    (void)state;
    float scratch[6];
    epd_sample_params_t sp = {.temperature = 1, .top_p = 1, .seed = 9};
    float a[6] = {NAN, 1, NAN, 1, -INFINITY, 0.5f};
    for (uint64_t k = 0; k < 500; k++) {
        sp.counter = k;
        int32_t t = epd_sample_ref(a, 6, &sp, scratch);
        assert_true(t == 1 || t == 3 || t == 5);
    }
    float b[5] = {1, INFINITY, 3, INFINITY, NAN};
    float c[3] = {-INFINITY, -INFINITY, -INFINITY};
    float d[3] = {NAN, NAN, NAN};
    for (uint64_t k = 0; k < 50; k++) {
        sp.counter = k;
        assert_int_equal(epd_sample_ref(b, 5, &sp, scratch), 1);
        assert_int_equal(epd_sample_ref(c, 3, &sp, scratch), 0);
        assert_int_equal(epd_sample_ref(d, 3, &sp, scratch), 0);
    }
}

static void expect_check_error(epd_sample_params_t sp, const char *name)
{
    epd_err_t err;
    epd_err_clear(&err);
    assert_true(epd_sample_check(&sp, &err) < 0);
    assert_true(err.status < 0);
    if (!strstr(err.msg, name)) fail_msg("message \"%s\" does not name %s", err.msg, name);
}

static void test_check_names_the_parameter(void **state)
{
    (void)state;
    epd_sample_params_t ok = {.temperature = 0.7f, .top_p = 0.9f, .top_k = 20};
    assert_int_equal(epd_sample_check(&ok, NULL), 0);
    ok.top_p = 1;
    ok.temperature = 0;
    ok.top_k = 0;
    assert_int_equal(epd_sample_check(&ok, NULL), 0);
    epd_sample_params_t bad = ok;
    bad.temperature = -1;
    expect_check_error(bad, "temperature");
    bad.temperature = NAN;
    expect_check_error(bad, "temperature");
    bad.temperature = INFINITY;
    expect_check_error(bad, "temperature");
    bad = ok;
    bad.top_p = 0;
    expect_check_error(bad, "top_p");
    bad.top_p = 1.5f;
    expect_check_error(bad, "top_p");
    bad.top_p = NAN;
    expect_check_error(bad, "top_p");
    bad = ok;
    bad.top_k = -1;
    expect_check_error(bad, "top_k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_sorted_reference),
        cmocka_unit_test(test_greedy_is_argmax_lowest_tie),
        cmocka_unit_test(test_deterministic_per_seed_and_counter),
        cmocka_unit_test(test_distribution_matches_softmax),
        cmocka_unit_test(test_top_k_one_and_tiny_top_p_are_argmax),
        cmocka_unit_test(test_top_k_keeps_exactly_the_k_largest),
        cmocka_unit_test(test_nan_and_inf_logits),
        cmocka_unit_test(test_check_names_the_parameter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
