/* The attention twins (model/cuda/attention_ref.c) against independent references:
 * epd_attention_ref over a paged cache with a shuffled block table (decoy blocks full of NaN)
 * against model/attention.c's epd_attention_paged on the same K/V laid out contiguously (one
 * block of the whole length), for several head dims, GQA
 * ratios, lengths around the block size and block sizes 1 and 16, with padding tokens and the
 * max_len cut; epd_qk_norm_rope_store_ref against epd_rmsnorm + epd_rope_apply applied head by
 * head and against the formula evaluated in fp64, the bf16 store against a rounding written
 * here, and rows of skipped slots left untouched. */
#include "attention_ref.h"
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

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

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

static void shuffle(int32_t *p, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint32_t)(i + 1));
        int32_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

/* bf16 by hand (round to nearest even on the bit pattern, finite inputs): independent of ops.h */
static uint16_t to_bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t lower = u & 0xffffu, upper = u >> 16;
    if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) upper++;
    return (uint16_t)upper;
}

/* ---- paged attention ------------------------------------------------------------------------- */

/* Two sequences of lengths len0 and len1 in one pool of shuffled blocks (plus NaN decoys);
 * tokens: the last position of each, a prefill-like run over sequence 0, a padding token and a
 * token cut by max_len. Each token's output must equal contiguous_attention over its sequence's
 * contiguous K/V (within 1e-6 relative: the same arithmetic, in the same order). */
/* The cpu model's attention over K/V laid out contiguously: one block holding all len positions. */
static void contiguous_attention(float *out, const float *q, const float *k, const float *v,
                                 int len, int nh, int nkv, int hd, float *scores)
{
    const int32_t block0 = 0;
    epd_attention_paged(out, q, k, v, &block0, len, len, nh, nkv, hd, scores);
}

static void check_paged(int hd, int nh, int nkv, int bs, int len0, int len1)
{
    const int lens[2] = {len0, len1};
    const size_t row = (size_t)nkv * hd;
    int nb[2], total = 0;
    for (int s = 0; s < 2; s++) {
        nb[s] = (lens[s] + bs - 1) / bs;
        total += nb[s];
    }
    const int decoys = 3, pool_blocks = total + decoys;
    const int max_blocks = nb[0] > nb[1] ? nb[0] : nb[1];
    int32_t *perm = malloc(sizeof(int32_t) * pool_blocks);
    int32_t *table = malloc(sizeof(int32_t) * 2 * max_blocks);
    float *kp = malloc(sizeof(float) * pool_blocks * bs * row);
    float *vp = malloc(sizeof(float) * pool_blocks * bs * row);
    float *kc[2], *vc[2];
    assert_non_null(perm);
    assert_non_null(table);
    assert_non_null(kp);
    assert_non_null(vp);
    for (size_t i = 0; i < (size_t)pool_blocks * bs * row; i++)
        kp[i] = vp[i] = NAN;
    for (int i = 0; i < pool_blocks; i++)
        perm[i] = i;
    shuffle(perm, pool_blocks);
    int next = 0;
    for (int s = 0; s < 2; s++) {
        kc[s] = malloc(sizeof(float) * lens[s] * row);
        vc[s] = malloc(sizeof(float) * lens[s] * row);
        assert_non_null(kc[s]);
        assert_non_null(vc[s]);
        fill(kc[s], (size_t)lens[s] * row, 2.0f);
        fill(vc[s], (size_t)lens[s] * row, 1.0f);
        for (int j = 0; j < max_blocks; j++)
            table[s * max_blocks + j] = j < nb[s] ? perm[next++] : -1;
        for (int j = 0; j < lens[s]; j++) {
            size_t at = ((size_t)table[s * max_blocks + j / bs] * bs + j % bs) * row;
            memcpy(kp + at, kc[s] + (size_t)j * row, sizeof(float) * row);
            memcpy(vp + at, vc[s] + (size_t)j * row, sizeof(float) * row);
        }
    }

    /* tokens: last of seq 1, a run of up to 5 consecutive positions ending at seq 0's last,
     * position 0 of seq 0, padding (seq -1), and seq 0's last with max_len = len0 - 1 */
    int32_t seq[9], pos[9];
    int T = 0;
    seq[T] = 1, pos[T++] = len1 - 1;
    for (int p = len0 - 5 < 0 ? 0 : len0 - 5; p < len0; p++)
        seq[T] = 0, pos[T++] = p;
    seq[T] = 0, pos[T++] = 0;
    seq[T] = -1, pos[T++] = len0 - 1;
    const int n = nh * hd;
    const int max_len = len0 > len1 ? len0 : len1;
    float *q = malloc(sizeof(float) * (T + 1) * n);
    float *out = malloc(sizeof(float) * (T + 1) * n);
    float *want = malloc(sizeof(float) * n);
    float *scores = malloc(sizeof(float) * max_len);
    assert_non_null(q);
    assert_non_null(out);
    assert_non_null(want);
    assert_non_null(scores);
    fill(q, (size_t)(T + 1) * n, 1.5f);
    epd_attention_ref(out, q, kp, vp, table, max_blocks, seq, pos, T, nh, nkv, hd, bs, max_len,
                      scores);
    for (int t = 0; t < T; t++) {
        if (seq[t] < 0) {
            for (int i = 0; i < n; i++)
                assert_true(out[(size_t)t * n + i] == 0.0f);
            continue;
        }
        contiguous_attention(want, q + (size_t)t * n, kc[seq[t]], vc[seq[t]], pos[t] + 1, nh, nkv,
                             hd, scores);
        for (int i = 0; i < n; i++) {
            float a = out[(size_t)t * n + i], b = want[i];
            if (!(fabsf(a - b) <= 1e-6f * fabsf(b) + 1e-30f))
                fail_msg("hd %d nh %d nkv %d bs %d token %d (seq %d pos %d) [%d]: %.9g vs %.9g", hd,
                         nh, nkv, bs, t, seq[t], pos[t], i, a, b);
        }
        if (pos[t] == 0) /* one position: the softmax weight is exactly 1, out = v */
            for (int h = 0; h < nh; h++)
                for (int d = 0; d < hd; d++)
                    assert_true(out[(size_t)t * n + (size_t)h * hd + d] ==
                                vc[seq[t]][(size_t)(h / (nh / nkv)) * hd + d]);
    }
    /* the cut: seq 0's last token with max_len = len0 - 1 attends len0 - 1 positions */
    if (len0 > 1) {
        int32_t s0 = 0, p0 = len0 - 1;
        float *qt = q + (size_t)T * n, *ot = out + (size_t)T * n;
        epd_attention_ref(ot, qt, kp, vp, table, max_blocks, &s0, &p0, 1, nh, nkv, hd, bs, len0 - 1,
                          scores);
        contiguous_attention(want, qt, kc[0], vc[0], len0 - 1, nh, nkv, hd, scores);
        for (int i = 0; i < n; i++)
            assert_true(fabsf(ot[i] - want[i]) <= 1e-6f * fabsf(want[i]) + 1e-30f);
    }
    for (int s = 0; s < 2; s++) {
        free(kc[s]);
        free(vc[s]);
    }
    free(scores);
    free(want);
    free(out);
    free(q);
    free(vp);
    free(kp);
    free(table);
    free(perm);
}

static void test_paged_matches_contiguous(void **state)
{
    (void)state;
    static const int hds[] = {16, 32, 128};
    static const int ratios[] = {1, 2, 8};
    static const int bss[] = {1, 16};
    for (size_t a = 0; a < sizeof(hds) / sizeof(hds[0]); a++)
        for (size_t b = 0; b < sizeof(ratios) / sizeof(ratios[0]); b++)
            for (size_t c = 0; c < sizeof(bss) / sizeof(bss[0]); c++) {
                const int hd = hds[a], nkv = 2, nh = nkv * ratios[b], bs = bss[c];
                const int lens[] = {1, bs > 1 ? bs - 1 : 2, bs, 1037};
                for (size_t l = 0; l < sizeof(lens) / sizeof(lens[0]); l++)
                    check_paged(hd, nh, nkv, bs, lens[l], lens[(l + 1) % 4]);
            }
}

/* ---- q/k norm + rope + store ----------------------------------------------------------------- */

static void check_norm_rope(int hd, int nh, int nkv, int T)
{
    const int heads = nh + 2 * nkv, rows = 2 * T + 3;
    const size_t rowlen = (size_t)nkv * hd;
    const float eps = 1e-6f;
    float *qkv = malloc(sizeof(float) * T * heads * hd);
    float *qn = malloc(sizeof(float) * hd), *kn = malloc(sizeof(float) * hd);
    float *inv = malloc(sizeof(float) * hd / 2);
    float *qo = malloc(sizeof(float) * T * nh * hd);
    uint16_t *kc = malloc(sizeof(uint16_t) * rows * rowlen);
    uint16_t *vc = malloc(sizeof(uint16_t) * rows * rowlen);
    int32_t *pos = malloc(sizeof(int32_t) * T), *slot = malloc(sizeof(int32_t) * T);
    int32_t *perm = malloc(sizeof(int32_t) * rows);
    float head[EPD_ATTN_MAX_HD];
    assert_true(qkv && qn && kn && inv && qo && kc && vc && pos && slot && perm);
    fill(qkv, (size_t)T * heads * hd, 3.0f);
    for (int i = 0; i < hd; i++) {
        qn[i] = 1.0f + urand(0.5f);
        kn[i] = 1.0f + urand(0.5f);
    }
    epd_rope_inv_freq(inv, hd, 1000000.0);
    for (int i = 0; i < rows; i++)
        perm[i] = i;
    shuffle(perm, rows);
    for (int t = 0; t < T; t++) {
        pos[t] = t == 0 ? 0 : (int32_t)(rnd() % 40000u);
        slot[t] = t % 5 == 3 ? -1 : perm[t]; /* distinct rows; some tokens not stored */
    }
    memset(kc, 0xff, sizeof(uint16_t) * rows * rowlen);
    memset(vc, 0xff, sizeof(uint16_t) * rows * rowlen);
    assert_int_equal(
        epd_qk_norm_rope_store_ref(qkv, qn, kn, inv, pos, slot, T, nh, nkv, hd, eps, qo, kc, vc),
        0);
    for (int t = 0; t < T; t++) {
        const float *x = qkv + (size_t)t * heads * hd;
        for (int h = 0; h < nh + nkv; h++) {
            const int is_q = h < nh;
            const float *w = is_q ? qn : kn;
            epd_rmsnorm(head, x + (size_t)h * hd, w, 1, hd, eps);
            epd_rope_apply(head, &pos[t], 1, 1, hd, inv);
            /* the formula in fp64 (norm, then rotation by the fp32 angle) */
            double ss = 0;
            for (int i = 0; i < hd; i++)
                ss += (double)x[(size_t)h * hd + i] * x[(size_t)h * hd + i];
            const double r = 1.0 / sqrt(ss / hd + eps);
            for (int i = 0; i < hd; i++) {
                const int half = hd / 2, j = i < half ? i : i - half;
                const double ang = (double)((float)pos[t] * inv[j]);
                const double a = w[j] * x[(size_t)h * hd + j] * r;
                const double b = w[j + half] * x[(size_t)h * hd + j + half] * r;
                const double y =
                    i < half ? a * cos(ang) - b * sin(ang) : b * cos(ang) + a * sin(ang);
                assert_true(fabs(head[i] - y) <= 1e-5 * (1 + fabs(y)));
                if (is_q) {
                    const float got = qo[((size_t)t * nh + h) * hd + i];
                    if (got != head[i])
                        fail_msg("q t %d h %d [%d]: %.9g vs %.9g", t, h, i, got, head[i]);
                } else if (slot[t] >= 0) {
                    const uint16_t got = kc[(size_t)slot[t] * rowlen + (size_t)(h - nh) * hd + i];
                    assert_int_equal(got, to_bf16_rne(head[i]));
                }
            }
        }
        if (slot[t] < 0) continue;
        for (size_t i = 0; i < rowlen; i++)
            assert_int_equal(vc[(size_t)slot[t] * rowlen + i],
                             to_bf16_rne(x[(size_t)(nh + nkv) * hd + i]));
    }
    /* rows no token stored stay as they were */
    for (int r = 0; r < rows; r++) {
        int used = 0;
        for (int t = 0; t < T; t++)
            used |= slot[t] == r;
        if (used) continue;
        for (size_t i = 0; i < rowlen; i++) {
            assert_int_equal(kc[(size_t)r * rowlen + i], 0xffff);
            assert_int_equal(vc[(size_t)r * rowlen + i], 0xffff);
        }
    }
    free(perm);
    free(slot);
    free(pos);
    free(vc);
    free(kc);
    free(qo);
    free(inv);
    free(kn);
    free(qn);
    free(qkv);
}

static void test_norm_rope_store(void **state)
{
    (void)state;
    check_norm_rope(16, 2, 2, 7);
    check_norm_rope(32, 4, 2, 11);
    check_norm_rope(128, 32, 4, 9);
    check_norm_rope(128, 8, 1, 3);
    check_norm_rope(256, 4, 4, 2);
}

static void test_norm_rope_rejects_bad_shapes(void **state)
{
    (void)state;
    float dummy[4] = {0};
    int32_t zero = 0;
    uint16_t c[4];
    assert_int_equal(epd_qk_norm_rope_store_ref(dummy, dummy, dummy, dummy, &zero, &zero, 1, 1, 1,
                                                15, 1e-6f, dummy, c, c),
                     -1);
    assert_int_equal(epd_qk_norm_rope_store_ref(dummy, dummy, dummy, dummy, &zero, &zero, 1, 1, 1,
                                                EPD_ATTN_MAX_HD + 2, 1e-6f, dummy, c, c),
                     -1);
    assert_int_equal(epd_qk_norm_rope_store_ref(dummy, dummy, dummy, dummy, &zero, &zero, 1, 0, 1,
                                                16, 1e-6f, dummy, c, c),
                     -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paged_matches_contiguous),
        cmocka_unit_test(test_norm_rope_store),
        cmocka_unit_test(test_norm_rope_rejects_bad_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
