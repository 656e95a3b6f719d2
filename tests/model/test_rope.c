/* RoPE: YaRN's inverse frequencies at DeepSeek-V2-Lite's settings (rope dim 64, theta 1e4,
 * factor 40 over an original 4096 positions, beta 32/1) against the values that
 * tests/model/deepseek_ref.py (torch, transformers' formulas) computes; the interleaved and the
 * rotate-half pairings against a rotation written out here, with YaRN's attention factor. */
#include "ops.h"
#include "test_util.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

/* deepseek_ref.rope_params({'qk_rope_head_dim': 64, 'rope_theta': 10000, 'rope_scaling':
 * {'type': 'yarn', 'factor': 40, 'original_max_position_embeddings': 4096, 'beta_fast': 32,
 * 'beta_slow': 1, ...}}) */
static const float YARN_V2_LITE[32] = {
    1.000000000e+00f, 7.498942018e-01f, 5.623413324e-01f, 4.216965139e-01f, 3.162277639e-01f,
    2.371373624e-01f, 1.778279394e-01f, 1.333521456e-01f, 1.000000015e-01f, 7.498941571e-02f,
    5.623412877e-02f, 3.900692612e-02f, 2.687936090e-02f, 1.837814413e-02f, 1.244795602e-02f,
    8.334509097e-03f, 5.500000436e-03f, 3.561997321e-03f, 2.249365207e-03f, 1.370513462e-03f,
    7.905694074e-04f, 4.149904125e-04f, 1.778279402e-04f, 3.333803397e-05f, 2.499999937e-05f,
    1.874735426e-05f, 1.405853254e-05f, 1.054241238e-05f, 7.905694474e-06f, 5.928434348e-06f,
    4.445698323e-06f, 3.333803534e-06f};

static void test_yarn_inv_freq(void **state)
{
    (void)state;
    float inv[32];
    epd_rope_yarn_inv_freq(inv, 64, 10000.0, 40.0, 4096, 32.0, 1.0, 1);
    for (int i = 0; i < 32; i++)
        if (!(fabsf(inv[i] - YARN_V2_LITE[i]) <= 2e-6f * YARN_V2_LITE[i]))
            fail_msg("inv_freq[%d] = %.9e, reference %.9e", i, (double)inv[i],
                     (double)YARN_V2_LITE[i]);
}

/* x: one row of 2 heads of 8 at a head stride of 12 (4 values between heads stay untouched) */
static void test_rotate_pairings(void **state)
{
    (void)state;
    const float inv[4] = {1.0f, 0.5f, 0.25f, 0.125f};
    const int32_t pos[1] = {3};
    const float scale = 1.25f;
    for (int interleave = 0; interleave < 2; interleave++) {
        float x[24], want[24];
        for (int i = 0; i < 24; i++)
            x[i] = want[i] = (float)(i % 7) - 2.5f;
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++) {
                int a = h * 12 + (interleave ? 2 * i : i),
                    b = h * 12 + (interleave ? 2 * i + 1 : i + 4);
                double ang = 3.0 * inv[i], c = cos(ang) * scale, s = sin(ang) * scale;
                want[a] = (float)(x[a] * c - x[b] * s);
                want[b] = (float)(x[b] * c + x[a] * s);
            }
        epd_rope_rotate(x, pos, 1, 2, 24, 12, 8, inv, scale, interleave);
        for (int i = 0; i < 24; i++)
            if (!(fabsf(x[i] - want[i]) <= 1e-5f))
                fail_msg("interleave %d: x[%d] = %f, want %f", interleave, i, (double)x[i],
                         (double)want[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_yarn_inv_freq),
        cmocka_unit_test(test_rotate_pairings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
