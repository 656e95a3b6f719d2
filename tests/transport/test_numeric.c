/* bf16 / fp8 e4m3 conversions and the fp8 block quantisation of kernels/, against hand-written
 * tables and the independent references of harness.c. */
#include "harness.h"

#include "fp8_quant_ref.h"
#include "numeric_ref.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static void fp8_known_values(void **state)
{
    static const struct {
        uint8_t b;
        float v;
    } tab[] = {
        {0x00, 0.0f},      {0x80, -0.0f},  {0x01, 0.001953125f}, {0x07, 0.013671875f},
        {0x08, 0.015625f}, {0x38, 1.0f},   {0x39, 1.125f},       {0x40, 2.0f},
        {0xb8, -1.0f},     {0x7e, 448.0f}, {0xfe, -448.0f},      {0x7d, 416.0f},
        {0x30, 0.5f},      {0x3f, 1.875f}, {0x77, 240.0f},       {0x78, 256.0f},
    };
    (void)state;
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        float v = ep_fp8_e4m3_to_float(tab[i].b);
        assert_int_equal(f_bits(v), f_bits(tab[i].v));
        assert_int_equal(ep_float_to_fp8_e4m3(tab[i].v), tab[i].b);
    }
    assert_true(isnan(ep_fp8_e4m3_to_float(0x7f)));
    assert_true(isnan(ep_fp8_e4m3_to_float(0xff)));
}

static void fp8_every_byte_decodes_exactly(void **state)
{
    (void)state;
    for (int b = 0; b < 256; b++) {
        double ref = ref_fp8_value((uint8_t)b);
        float v = ep_fp8_e4m3_to_float((uint8_t)b);
        if (isnan(ref)) {
            assert_true(isnan(v));
            continue;
        }
        assert_true((double)v == ref);
        assert_int_equal(signbit(v) != 0, (b & 0x80) != 0);
        /* Every finite code round-trips. */
        assert_int_equal(ep_float_to_fp8_e4m3(v), b);
    }
}

static void fp8_encode_special_cases(void **state)
{
    (void)state;
    assert_int_equal(ep_float_to_fp8_e4m3(NAN), 0x7f);
    assert_int_equal(ep_float_to_fp8_e4m3(-NAN), 0x7f);
    assert_int_equal(ep_float_to_fp8_e4m3(INFINITY), 0x7e);
    assert_int_equal(ep_float_to_fp8_e4m3(-INFINITY), 0xfe);
    assert_int_equal(ep_float_to_fp8_e4m3(1e30f), 0x7e);
    assert_int_equal(ep_float_to_fp8_e4m3(464.0f), 0x7e); /* would round to 480 unsaturated */
    assert_int_equal(ep_float_to_fp8_e4m3(449.0f), 0x7e);
    assert_int_equal(ep_float_to_fp8_e4m3(432.0f), 0x7e);        /* tie 416|448 -> even 448 */
    assert_int_equal(ep_float_to_fp8_e4m3(1.0625f), 0x38);       /* tie 1|1.125 -> even 1 */
    assert_int_equal(ep_float_to_fp8_e4m3(1.1875f), 0x3a);       /* tie 1.125|1.25 -> even 1.25 */
    assert_int_equal(ep_float_to_fp8_e4m3(0.0009765625f), 0x00); /* tie 0|2^-9 -> 0 */
    assert_int_equal(ep_float_to_fp8_e4m3(0.0009765626f), 0x01);
    assert_int_equal(ep_float_to_fp8_e4m3(-0.0009765625f), 0x80); /* keeps the sign */
    assert_int_equal(ep_float_to_fp8_e4m3(0.0029296875f), 0x02);  /* tie 1|2 x 2^-9 -> even */
    assert_int_equal(ep_float_to_fp8_e4m3(1e-30f), 0x00);
    assert_int_equal(ep_float_to_fp8_e4m3(bits_f(1)), 0x00); /* smallest float subnormal */
}

static void fp8_encode_sweep_matches_reference(void **state)
{
    (void)state;
    /* Every bf16 pattern (as a float), every midpoint between neighbouring fp8 values and its
     * two float neighbours, and random float bits. */
    for (uint32_t b = 0; b < 65536; b++) {
        float f = bits_f(b << 16);
        assert_int_equal(ep_float_to_fp8_e4m3(f), ref_fp8_round(f));
    }
    for (int b = 0; b < 0x7e; b++) {
        float mid = (float)((ref_fp8_value((uint8_t)b) + ref_fp8_value((uint8_t)(b + 1))) / 2);
        float cand[] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, 1000.0f)};
        for (int i = 0; i < 3; i++) {
            assert_int_equal(ep_float_to_fp8_e4m3(cand[i]), ref_fp8_round(cand[i]));
            assert_int_equal(ep_float_to_fp8_e4m3(-cand[i]), ref_fp8_round(-cand[i]));
        }
    }
    rng_t r = {7};
    for (int i = 0; i < 1000000; i++) {
        float f = bits_f((uint32_t)rng_next(&r));
        assert_int_equal(ep_float_to_fp8_e4m3(f), ref_fp8_round(f));
    }
    /* Dense sweep of the range that matters for scaled values. */
    for (float f = -500.0f; f < 500.0f; f += 0.0137f)
        assert_int_equal(ep_float_to_fp8_e4m3(f), ref_fp8_round(f));
}

static void bf16_known_values(void **state)
{
    static const struct {
        uint32_t f;
        uint16_t b;
    } tab[] = {
        {0x3f800000, 0x3f80}, /* 1 */
        {0x3f808000, 0x3f80}, /* tie -> even */
        {0x3f818000, 0x3f82}, /* tie -> even (up) */
        {0x3f808001, 0x3f81}, /* above the tie */
        {0x3f807fff, 0x3f80}, /* below the tie */
        {0x7f7fffff, 0x7f80}, /* max float rounds to inf */
        {0x7f7f7fff, 0x7f7f}, /* stays finite */
        {0x7f800000, 0x7f80}, /* inf */
        {0xff800000, 0xff80}, /* -inf */
        {0x80000000, 0x8000}, /* -0 */
        {0x00000001, 0x0000}, /* smallest subnormal -> 0 */
        {0x00008000, 0x0000}, /* tie -> even 0 */
        {0x00018000, 0x0002}, /* tie -> even */
        {0x7fc00000, 0x7fff}, /* qNaN -> canonical */
        {0xffc00001, 0x7fff}, /* -NaN -> canonical */
        {0x7f800001, 0x7fff}, /* sNaN -> canonical */
    };
    (void)state;
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        assert_int_equal(ep_float_to_bf16(bits_f(tab[i].f)), tab[i].b);
    for (uint32_t b = 0; b < 65536; b++) {
        float v = ep_bf16_to_float((uint16_t)b);
        float ref = ref_bf16_value((uint16_t)b);
        if (isnan(ref))
            assert_true(isnan(v));
        else
            assert_int_equal(f_bits(v), f_bits(ref));
    }
}

static void bf16_encode_sweep_matches_reference(void **state)
{
    (void)state;
    rng_t r = {11};
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)rng_next(&r);
        if (i & 1) u = (u & 0xffff0000u) | 0x8000u; /* exact ties */
        float f = bits_f(u);
        assert_int_equal(ep_float_to_bf16(f), ref_bf16_round(f));
    }
}

/* Independent block quantisation: scale via frexp, values via the table search. */
static void ref_quant(const uint16_t *x, int H, int round_scale, uint8_t *q, float *sc)
{
    for (int b = 0; b < H / 128; b++) {
        float amax = 0;
        for (int i = 0; i < 128; i++)
            amax = fmaxf(amax, fabsf(ref_bf16_value(x[b * 128 + i])));
        if (amax < 1e-4f) amax = 1e-4f;
        float s = amax / 448.0f;
        if (round_scale) {
            int e;
            float m = frexpf(s, &e);
            s = m == 0.5f ? s : ldexpf(1.0f, e);
        }
        sc[b] = s;
        for (int i = 0; i < 128; i++)
            q[b * 128 + i] = ref_fp8_round(ref_bf16_value(x[b * 128 + i]) / s);
    }
}

static void fp8_block_quant_matches_reference(void **state)
{
    (void)state;
    enum { H = 1024 };
    uint16_t x[H];
    uint8_t q[H], rq[H];
    float s[H / 128], rs[H / 128];
    rng_t r = {3};
    for (int it = 0; it < 400; it++) {
        int emin = rng_int(&r, -30, 0), emax = emin + rng_int(&r, 0, 20);
        for (int i = 0; i < H; i++)
            x[i] = rand_bf16(&r, emin, emax);
        if (it % 5 == 0) memset(x + 128, 0, 256); /* an all-zero block hits the amax floor */
        for (int rs_on = 0; rs_on < 2; rs_on++) {
            ep_fp8_quant_row_ref(x, H, rs_on, q, s);
            ref_quant(x, H, rs_on, rq, rs);
            assert_memory_equal(s, rs, sizeof s);
            assert_memory_equal(q, rq, sizeof q);
        }
    }
    /* A hand-checked block: amax 448 gives scale 1 and the values themselves. */
    for (int i = 0; i < 128; i++)
        x[i] = 0;
    x[0] = 0x43e0; /* 448 */
    x[1] = 0x3f80; /* 1 */
    x[2] = 0xc000; /* -2 */
    ep_fp8_quant_row_ref(x, 128, 0, q, s);
    assert_true(s[0] == 1.0f);
    assert_int_equal(q[0], 0x7e);
    assert_int_equal(q[1], 0x38);
    assert_int_equal(q[2], 0xc0);
    /* amax 100: scale 100/448 rounds up to 0.25 with round_scale. */
    x[0] = 0x42c8; /* 100 */
    ep_fp8_quant_row_ref(x, 128, 1, q, s);
    assert_true(s[0] == 0.25f);
    assert_int_equal(q[0], ref_fp8_round(400.0f));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fp8_known_values),
        cmocka_unit_test(fp8_every_byte_decodes_exactly),
        cmocka_unit_test(fp8_encode_special_cases),
        cmocka_unit_test(fp8_encode_sweep_matches_reference),
        cmocka_unit_test(bf16_known_values),
        cmocka_unit_test(bf16_encode_sweep_matches_reference),
        cmocka_unit_test(fp8_block_quant_matches_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
