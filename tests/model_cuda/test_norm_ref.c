/* The twins of norm.cu (norm_ref.c) against references written here: embedding by widening the
 * bf16 bits by hand, add_rmsnorm against epd_rmsnorm on a copied row and against the formula in
 * double, silu_mul against swiglu.c's expression, gather_rows against a loop, and bf16 rounding
 * (the twin of epd_cu_f32_to_bf16) against a nearest-even choice made by distance. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "test_rng.h"
#include "norm_ref.h"
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x5eed0001u;
static uint64_t rng_next(void)
{
    return test_splitmix64(&rng_state);
}
static float rng_sym(float scale) /* uniform in (-scale, scale) */
{
    return scale * (float)((double)(rng_next() >> 11) / 4503599627370496.0 - 1.0);
}

static float widen(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bf16 of f: of the two bf16 values around f, the nearer; on a tie the one with an even last
 * bit. NaN: any NaN (the random loop pins epd_f32_to_bf16's to CUDA's 0x7fff). */
static uint16_t bf16_by_distance(float f)
{
    if (isnan(f)) return 0x7fc0;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t lo = (uint16_t)(u >> 16);
    if ((u & 0xffffu) == 0) return lo;
    uint16_t hi = (uint16_t)(lo + 1); /* the next magnitude up (same sign) */
    double dl = fabs((double)f - (double)widen(lo));
    double dh = isinf(widen(hi)) ? (double)ldexp(1.0, 128) - fabs((double)f)
                                 : fabs((double)widen(hi) - (double)f);
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return (lo & 1) ? hi : lo;
}

static void test_bf16_rounding(void **state)
{
    (void)state;
    const float fixed[] = {0.0f,
                           -0.0f,
                           1.0f,
                           1.00390625f /* halfway, even below */,
                           1.01171875f /* halfway, odd below */,
                           3.3895314e38f,
                           INFINITY,
                           -INFINITY,
                           1e-40f,
                           -1e-45f};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        assert_int_equal(epd_f32_to_bf16(fixed[i]), bf16_by_distance(fixed[i]));
    assert_int_equal(epd_f32_to_bf16(1.00390625f), 0x3f80);
    assert_int_equal(epd_f32_to_bf16(1.01171875f), 0x3f82);
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)rng_next();
        float f;
        memcpy(&f, &u, 4);
        uint16_t got = epd_f32_to_bf16(f);
        if (isnan(f)) {
            assert_int_equal(got, 0x7fff); /* CUDA's canonical NaN, whatever the sign/payload */
        } else if (got != bf16_by_distance(f)) {
            fail_msg("bits 0x%08x: 0x%04x, nearest-even 0x%04x", u, got, bf16_by_distance(f));
        }
    }
}

static void test_embed_widens_the_rows(void **state)
{
    (void)state;
    enum { V = 50, H = 37, T = 9 };
    static uint16_t emb[V * H];
    static float h[T * H];
    int32_t tokens[T] = {3, 0, 49, 3, 17, 48, 1, 22, 3};
    for (int i = 0; i < V * H; i++)
        emb[i] = (uint16_t)rng_next();
    epd_embed_ref(h, emb, tokens, T, H);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < H; i++) {
            uint32_t want = (uint32_t)emb[tokens[t] * H + i] << 16, got;
            memcpy(&got, &h[t * H + i], 4);
            assert_int_equal(got, want);
        }
}

static void check_add_rmsnorm(int T, int H, int with_delta, int want_f32, int want_bf16)
{
    float *h = malloc(sizeof(float) * (size_t)T * H), *h0 = malloc(sizeof(float) * (size_t)T * H);
    float *w = malloc(sizeof(float) * (size_t)H), *scratch = malloc(sizeof(float) * (size_t)H);
    float *row = malloc(sizeof(float) * (size_t)H), *yref = malloc(sizeof(float) * (size_t)H);
    float *out = malloc(sizeof(float) * (size_t)T * H);
    uint16_t *delta = malloc(sizeof(uint16_t) * (size_t)T * H);
    uint16_t *outb = malloc(sizeof(uint16_t) * (size_t)T * H);
    assert_non_null(h && h0 && w && scratch && row && yref && out && delta && outb);
    for (int i = 0; i < T * H; i++) {
        h0[i] = h[i] = rng_sym(3.0f) * (i % 7 == 0 ? 20.0f : 1.0f);
        delta[i] = epd_f32_to_bf16(rng_sym(2.0f));
    }
    for (int i = 0; i < H; i++)
        w[i] = 1.0f + rng_sym(0.5f);
    const float eps = 1e-6f;
    epd_add_rmsnorm_ref(h, with_delta ? delta : NULL, w, eps, T, H, want_f32 ? out : NULL,
                        want_bf16 ? outb : NULL, scratch);
    for (int t = 0; t < T; t++) {
        double ss = 0;
        for (int i = 0; i < H; i++) {
            row[i] = h0[t * H + i] + (with_delta ? widen(delta[t * H + i]) : 0.0f);
            assert_true(h[t * H + i] == row[i]); /* the residual stays in h */
            ss += (double)row[i] * row[i];
        }
        epd_rmsnorm(yref, row, w, 1, H, eps);
        double inv = 1.0 / sqrt(ss / H + eps);
        for (int i = 0; i < H; i++) {
            double exact = (double)row[i] * inv * w[i];
            assert_true(fabs(yref[i] - exact) <= 1e-6 * fabs(exact) + 1e-30);
            if (want_f32) assert_true(out[t * H + i] == yref[i]);
            if (want_bf16) assert_int_equal(outb[t * H + i], bf16_by_distance(yref[i]));
        }
    }
    free(h), free(h0), free(w), free(scratch), free(row), free(yref), free(out), free(delta),
        free(outb);
}

static void test_add_rmsnorm(void **state)
{
    (void)state;
    check_add_rmsnorm(5, 64, 1, 1, 1);
    check_add_rmsnorm(3, 33, 0, 1, 0);
    check_add_rmsnorm(4, 4096, 1, 0, 1);
    check_add_rmsnorm(2, 7, 0, 0, 1);
}

static void test_silu_mul_is_swiglus_expression(void **state)
{
    (void)state;
    enum { T = 6, I = 45 };
    static float gu[T * 2 * I];
    static uint16_t act[T * I];
    for (int i = 0; i < T * 2 * I; i++)
        gu[i] = rng_sym(12.0f);
    gu[0] = -100.0f; /* expf(100) = inf: silu -> -0 */
    gu[1] = 0.0f;
    epd_silu_mul_ref(act, gu, T, I);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < I; i++) {
            float g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
            float want = g / (1.0f + expf(-g)) * u;
            assert_int_equal(act[t * I + i], bf16_by_distance(want));
            double exact = (double)g / (1.0 + exp(-(double)g)) * u;
            assert_true(fabs(widen(act[t * I + i]) - exact) <= 1.0 / 256 * fabs(exact) + 1e-30);
        }
}

static void test_gather_rows(void **state)
{
    (void)state;
    enum { R = 20, C = 13, N = 8 };
    static float src[R * C], dst[N * C];
    int32_t rows[N] = {19, 0, 5, 5, 12, 1, 0, 7};
    for (int i = 0; i < R * C; i++)
        src[i] = rng_sym(100.0f);
    epd_gather_rows_ref(dst, src, rows, N, C);
    for (int i = 0; i < N; i++)
        for (int c = 0; c < C; c++)
            assert_true(dst[i * C + c] == src[rows[i] * C + c]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_rounding), cmocka_unit_test(test_embed_widens_the_rows),
        cmocka_unit_test(test_add_rmsnorm),   cmocka_unit_test(test_silu_mul_is_swiglus_expression),
        cmocka_unit_test(test_gather_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
