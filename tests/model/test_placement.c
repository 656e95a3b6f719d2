/* Expert placement: contiguous and explicit maps, their libep slot numbering, refusals, and the
 * per-rank weight bytes reported for a config. */
#include "placement.h"
#include "model.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <string.h>

static void test_contiguous(void **state)
{
    (void)state;
    epd_model_placement_t p;
    epd_err_t err;
    assert_int_equal(epd_model_placement_contiguous(16, 4, &p, &err), 0);
    assert_int_equal(p.local, 4);
    for (int e = 0; e < 16; e++) {
        assert_int_equal(epd_model_placement_rank(&p, e), e / 4); /* DESIGN.md: e / (E / R) */
        assert_int_equal(p.slot_of[e], e);
    }
    assert_int_equal(epd_model_placement_local_expert(&p, 2, 3), 11);
    epd_model_placement_fini(&p);
    assert_int_equal(epd_model_placement_contiguous(16, 3, &p, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "16 experts do not split evenly over 3 ranks"));
}

static void test_explicit(void **state)
{
    (void)state;
    /* round-robin over 2 ranks: even experts on rank 0, odd on rank 1 */
    int map[8];
    for (int e = 0; e < 8; e++)
        map[e] = e % 2;
    epd_model_placement_t p;
    epd_err_t err;
    assert_int_equal(epd_model_placement_explicit(8, 2, map, 8, &p, &err), 0);
    for (int e = 0; e < 8; e++) {
        assert_int_equal(epd_model_placement_rank(&p, e), e % 2);
        /* libep's rule: slot s on rank s / L */
        assert_int_equal(p.slot_of[e] / p.local, e % 2);
        assert_int_equal(p.expert_of[p.slot_of[e]], e);
    }
    /* a rank's experts keep increasing order in its slots */
    for (int l = 0; l < 4; l++) {
        assert_int_equal(epd_model_placement_local_expert(&p, 0, l), 2 * l);
        assert_int_equal(epd_model_placement_local_expert(&p, 1, l), 2 * l + 1);
    }
    epd_model_placement_fini(&p);

    int uneven[8] = {0, 0, 0, 0, 0, 1, 1, 1};
    assert_int_equal(epd_model_placement_explicit(8, 2, uneven, 8, &p, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "expert_map[4]: rank 0 already holds 4 experts"));
    int out_of_range[8] = {0, 0, 0, 0, 1, 1, 1, 2};
    assert_int_equal(epd_model_placement_explicit(8, 2, out_of_range, 8, &p, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "expert_map[7]: rank 2 outside 0..1"));
    assert_int_equal(epd_model_placement_explicit(8, 2, map, 7, &p, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "7 entries for 8 experts"));
}

static void test_bytes_per_rank(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err;
    int rc = epd_hf_config_load(EPD_ORACLE_DIR "/config.json", &c, &err);
    if (rc) fail_msg("%s", err.msg);
    /* counted by hand from the oracle's shapes (H 128, V 384, 4 q / 2 kv heads of 32, experts
     * 16 x (3 x 96 x 128), dense layer 1 with intermediate 256, untied lm_head) */
    size_t H = 128, V = 384;
    size_t attn = 128 * 128 + 64 * 128 * 2 + 128 * 128 + 32 * 2 + 128 * 2;
    size_t repl = V * H * 2 + H + 3 * attn + 2 * (16 * H) + 3 * 256 * H;
    size_t expert = 3 * 96 * H;
    for (int R = 1; R <= 4; R *= 2) {
        epd_model_mem_t m;
        epd_model_mem_estimate(&c, R, EPD_MODEL_CPU, &m);
        assert_int_equal(m.local_experts, 16 / R);
        assert_int_equal(m.replicated_bytes, repl * 4);
        assert_int_equal(m.expert_bytes, 2 * (16 / R) * expert * 4);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_contiguous),
        cmocka_unit_test(test_explicit),
        cmocka_unit_test(test_bytes_per_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
