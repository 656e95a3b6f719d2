/* The MLA twins (model/cuda/mla_ref.c) against independent references:
 * epd_mla_rope_store_ref against the RMSNorm and the rotation evaluated here in fp64 (both
 * pairings, with and without YaRN's attention factor), the bf16 store within one rounding, rows
 * of skipped slots untouched; the absorbed chain (epd_mla_absorb_q_ref, epd_mla_latent_ref,
 * epd_mla_absorb_out_ref) over paged latent caches with shuffled block tables and NaN decoy
 * blocks, block sizes 1, 4 and 16, several sequences and a padding token, against the C model's
 * epd_mla_attention_paged token by token and against the expanded form (keys and values per
 * head, epd_mla_expanded_ref), with the max_len cut. */
#include "mla_ref.h"
#include "ops.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "test_rng.h"

#include <setjmp.h>
#include <cmocka.h>

static uint64_t rng_state = 0x6a09e667f3bcc909ull;

static uint32_t rnd(void)
{
    return (uint32_t)(test_splitmix64(&rng_state) >> 32);
}

static float urand(float a)
{
    return test_rng_sym(&rng_state, a);
}

static void fill(float *x, size_t n, float a)
{
    test_rng_fill(&rng_state, x, n, a);
}

/* |got - want| within one bf16 rounding of want (and a little for the fp32 path before it) */
static int bf16_close(uint16_t got, double want)
{
    double g = epd_bf16_to_f32(got);
    return fabs(g - want) <= fabs(want) * (1.0 / 256) + 1e-6;
}

static void check_rope_store(int interleave, float rope_scale)
{
    const int T = 5, nh = 3, nope = 8, rope = 16, kvl = 24, qk = nope + rope, row = kvl + rope;
    const int rows = 8;
    const float eps = 1e-6f;
    float *q = malloc(sizeof(float) * T * nh * qk), *q0 = malloc(sizeof(float) * T * nh * qk);
    float *kv = malloc(sizeof(float) * T * row), w[24], inv_freq[8];
    uint16_t *cache = malloc(sizeof(uint16_t) * rows * row);
    int32_t pos[5] = {0, 1, 7, 300, 4095}, slot[5] = {3, -1, 0, 7, 5};
    fill(q, (size_t)T * nh * qk, 2.0f);
    memcpy(q0, q, sizeof(float) * T * nh * qk);
    fill(kv, (size_t)T * row, 3.0f);
    for (int i = 0; i < kvl; i++)
        w[i] = 0.5f + (float)i / kvl;
    epd_rope_yarn_inv_freq(inv_freq, rope, 10000.0, 40.0, 4096, 32, 1, 1);
    for (size_t i = 0; i < (size_t)rows * row; i++)
        cache[i] = 0xdead;
    assert_int_equal(epd_mla_rope_store_ref(q, kv, w, inv_freq, rope_scale, interleave, pos, slot,
                                            T, nh, nope, rope, kvl, eps, cache),
                     0);
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < rope / 2; j++) {
            float ang = (float)pos[t] * inv_freq[j];
            double c = (float)cos((double)ang) * (double)rope_scale;
            double s = (float)sin((double)ang) * (double)rope_scale;
            int ia = interleave ? 2 * j : j, ib = interleave ? 2 * j + 1 : j + rope / 2;
            for (int h = 0; h < nh; h++) {
                const float *x0 = q0 + ((size_t)t * nh + h) * qk + nope;
                const float *x = q + ((size_t)t * nh + h) * qk + nope;
                double ya = x0[ia] * c - x0[ib] * s, yb = x0[ib] * c + x0[ia] * s;
                assert_true(fabs(x[ia] - ya) <= 1e-5 * (1 + fabs(ya)));
                assert_true(fabs(x[ib] - yb) <= 1e-5 * (1 + fabs(yb)));
            }
            if (slot[t] < 0) continue;
            const float *k0 = kv + (size_t)t * row + kvl;
            const uint16_t *d = cache + (size_t)slot[t] * row + kvl;
            assert_true(bf16_close(d[ia], k0[ia] * c - k0[ib] * s));
            assert_true(bf16_close(d[ib], k0[ib] * c + k0[ia] * s));
        }
        for (int h = 0; h < nh; h++) /* the nope part is untouched */
            assert_memory_equal(q + ((size_t)t * nh + h) * qk, q0 + ((size_t)t * nh + h) * qk,
                                sizeof(float) * nope);
        if (slot[t] < 0) continue;
        double ss = 0;
        for (int i = 0; i < kvl; i++)
            ss += (double)kv[(size_t)t * row + i] * kv[(size_t)t * row + i];
        double inv = 1.0 / sqrt(ss / kvl + eps);
        for (int i = 0; i < kvl; i++)
            assert_true(
                bf16_close(cache[(size_t)slot[t] * row + i], w[i] * kv[(size_t)t * row + i] * inv));
    }
    /* rows 1, 2, 4, 6 were no token's slot */
    const int untouched[4] = {1, 2, 4, 6};
    for (int u = 0; u < 4; u++)
        for (int i = 0; i < row; i++)
            assert_int_equal(cache[(size_t)untouched[u] * row + i], 0xdead);
    assert_int_equal(epd_mla_rope_store_ref(q, kv, w, inv_freq, 1, 0, pos, slot, T, nh, nope, 15,
                                            kvl, eps, cache),
                     -1);
    free(q), free(q0), free(kv), free(cache);
}

static void test_rope_store_rotate_half(void **state)
{
    (void)state;
    check_rope_store(0, 1.0f);
}

static void test_rope_store_interleaved_yarn(void **state)
{
    (void)state;
    check_rope_store(1, 1.3465736f);
}

/* The absorbed chain vs the C model and vs the expanded form. */
static void check_absorbed(int block_size, int max_len_cut)
{
    enum { S = 3, T = 7 };
    const int nh = 4, nope = 16, rope = 8, kvl = 32, vd = 12, qk = nope + rope, row = kvl + rope;
    const int lens[S] = {1, 37, 20}; /* sequence lengths */
    const int max_blocks = (64 + block_size - 1) / block_size;
    const int nblocks = S * max_blocks + 3; /* +3 decoys */
    const float scale = 0.19f;
    int32_t *bt = malloc(sizeof(int32_t) * S * max_blocks),
            *perm = malloc(sizeof(int32_t) * nblocks);
    for (int i = 0; i < nblocks; i++)
        perm[i] = i;
    for (int i = nblocks - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint32_t)(i + 1)), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    for (int i = 0; i < S * max_blocks; i++)
        bt[i] = perm[i];
    float *cache = malloc(sizeof(float) * (size_t)nblocks * block_size * row);
    for (size_t i = 0; i < (size_t)nblocks * block_size * row; i++)
        cache[i] = NAN;
    for (int s = 0; s < S; s++)
        for (int j = 0; j < lens[s]; j++)
            for (int i = 0; i < row; i++)
                cache[((size_t)bt[s * max_blocks + j / block_size] * block_size + j % block_size) *
                          row +
                      i] = urand(1.0f);
    /* tokens: the last of sequence 0, the last two of 1, a padding row, three of 2 */
    int32_t seq_idx[T] = {0, 1, 1, -1, 2, 2, 2}, pos[T] = {0, 35, 36, 0, 17, 18, 19};
    float *q = malloc(sizeof(float) * T * nh * qk),
          *kv_b = malloc(sizeof(float) * nh * (nope + vd) * kvl);
    fill(q, (size_t)T * nh * qk, 1.0f);
    fill(kv_b, (size_t)nh * (nope + vd) * kvl, 0.3f);
    const int max_len = max_len_cut ? 24 : 64;
    float *q_lat = malloc(sizeof(float) * T * nh * kvl),
          *o_lat = malloc(sizeof(float) * T * nh * kvl);
    float *out = malloc(sizeof(float) * T * nh * vd),
          *exp_out = malloc(sizeof(float) * T * nh * vd);
    float *want = malloc(sizeof(float) * nh * vd);
    float *scratch = malloc(sizeof(float) * (size_t)64 * (nope + 1 + vd + 2 * kvl));
    epd_mla_absorb_q_ref(q_lat, q, kv_b, T, nh, nope, rope, kvl, vd);
    epd_mla_latent_ref(o_lat, q_lat, q + nope, qk, cache, bt, max_blocks, seq_idx, pos, T, nh, kvl,
                       rope, scale, block_size, max_len, scratch);
    epd_mla_absorb_out_ref(out, o_lat, kv_b, T, nh, nope, kvl, vd);
    epd_mla_expanded_ref(exp_out, q, cache, kv_b, bt, max_blocks, seq_idx, pos, T, nh, nope, rope,
                         kvl, vd, scale, block_size, max_len, scratch);
    float qn[4 * 16], qp[4 * 8];
    for (int t = 0; t < T; t++) {
        const float *o = out + (size_t)t * nh * vd, *e = exp_out + (size_t)t * nh * vd;
        if (seq_idx[t] < 0) {
            for (int i = 0; i < nh * vd; i++) {
                assert_true(o[i] == 0.0f);
                assert_true(e[i] == 0.0f);
            }
            continue;
        }
        for (int h = 0; h < nh; h++) {
            memcpy(qn + h * nope, q + ((size_t)t * nh + h) * qk, sizeof(float) * nope);
            memcpy(qp + h * rope, q + ((size_t)t * nh + h) * qk + nope, sizeof(float) * rope);
        }
        int len = pos[t] + 1 < max_len ? pos[t] + 1 : max_len;
        epd_mla_attention_paged(want, qn, qp, cache, kv_b, bt + (size_t)seq_idx[t] * max_blocks,
                                block_size, len, nh, nope, rope, kvl, vd, scale, scratch);
        for (int i = 0; i < nh * vd; i++) {
            assert_true(isfinite(o[i]));
            assert_true(fabsf(o[i] - want[i]) <= 1e-5f * (1 + fabsf(want[i])));
            assert_true(fabsf(e[i] - want[i]) <= 1e-4f * (1 + fabsf(want[i])));
        }
    }
    free(bt), free(perm), free(cache), free(q), free(kv_b), free(q_lat), free(o_lat), free(out);
    free(exp_out), free(want), free(scratch);
}

static void test_absorbed_block1(void **state)
{
    (void)state;
    check_absorbed(1, 0);
}

static void test_absorbed_block4_cut(void **state)
{
    (void)state;
    check_absorbed(4, 1);
}

static void test_absorbed_block16(void **state)
{
    (void)state;
    check_absorbed(16, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rope_store_rotate_half),
        cmocka_unit_test(test_rope_store_interleaved_yarn),
        cmocka_unit_test(test_absorbed_block1),
        cmocka_unit_test(test_absorbed_block4_cut),
        cmocka_unit_test(test_absorbed_block16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
