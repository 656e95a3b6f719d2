/* The MoE kernels' C twins (moe_ref.c) against independent references: the experts against
 * the C model's linear/SwiGLU ops per row (bf16-rounded inputs and weights; offsets and stride
 * layouts; bf16 and fp8 inputs; experts without rows), the local dispatch + combine against a
 * direct per-token loop over the selected experts, the route fix-ups against hand-written
 * expectations. */
#include "moe_ref.h"
#include "numeric_ref.h"
#include "ops.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

static uint64_t rng = 0x243f6a8885a308d3ull;

static float urand(float a) /* uniform in [-a, a) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return a * ((float)(rng >> 40) * (2.0f / 16777216.0f) - 1.0f);
}

/* bf16 values within one ulp of each other (the ulp of the larger), or both below floor. */
static int bf16_close(float a, float b, float floor)
{
    if (fabsf(a - b) <= floor) return 1;
    float m = fmaxf(fabsf(a), fabsf(b));
    int ex;
    frexpf(m, &ex);
    return fabsf(a - b) <= ldexpf(1.0f, ex - 8) * 1.0001f;
}

typedef struct {
    int H, I, L;
    float *wg, *wu, *wd;   /* fp32 copies of the bf16 weights: [L][I][H], [L][I][H], [L][H][I] */
    uint16_t *w_gu, *w_dn; /* bf16: [L][2I][H], [L][H][I] */
    /* fp8 weights (experts_init_w8; then wg, wu, wd are their values): e4m3 [L][2I][H],
     * [L][H][I]; scales [L][2][I/bn][H/bk], [L][H/bn][I/bk] (rounded up) */
    int bn, bk;
    uint8_t *q_gu, *q_dn;
    float *s_gu, *s_dn;
} experts_t;

static void experts_init(experts_t *e, int H, int I, int L)
{
    memset(e, 0, sizeof(*e));
    e->H = H;
    e->I = I;
    e->L = L;
    e->w_gu = malloc((size_t)L * 2 * I * H * 2);
    e->w_dn = malloc((size_t)L * H * I * 2);
    e->wg = malloc((size_t)L * I * H * 4);
    e->wu = malloc((size_t)L * I * H * 4);
    e->wd = malloc((size_t)L * H * I * 4);
    for (int l = 0; l < L; l++)
        for (int r = 0; r < 2 * I; r++)
            for (int c = 0; c < H; c++) {
                uint16_t b = epd_f32_to_bf16(urand(2.0f / sqrtf((float)H)));
                e->w_gu[((size_t)l * 2 * I + r) * H + c] = b;
                float *dst =
                    r < I ? e->wg + ((size_t)l * I + r) * H : e->wu + ((size_t)l * I + r - I) * H;
                dst[c] = epd_bf16_to_f32(b);
            }
    for (size_t i = 0; i < (size_t)L * H * I; i++) {
        e->w_dn[i] = epd_f32_to_bf16(urand(2.0f / sqrtf((float)I)));
        e->wd[i] = epd_bf16_to_f32(e->w_dn[i]);
    }
}

static float e4m3_value(uint8_t q);

static uint8_t random_e4m3(void)
{
    uint8_t q;
    do
        q = (uint8_t)(urand(128.0f) + 128.0f);
    while ((q & 0x7f) == 0x7f); /* no NaN */
    return q;
}

/* Random e4m3 weights with random block scales of bn x bk; the fp32 copies are their values,
 * decoded here (e4m3_value) and scaled, independently of the twins. */
static void experts_init_w8(experts_t *e, int H, int I, int L, int bn, int bk)
{
    memset(e, 0, sizeof(*e));
    e->H = H;
    e->I = I;
    e->L = L;
    e->bn = bn;
    e->bk = bk;
    const int gr = (I + bn - 1) / bn, gc = (H + bk - 1) / bk; /* gate/up blocks */
    const int dr = (H + bn - 1) / bn, dc = (I + bk - 1) / bk; /* down blocks */
    e->q_gu = malloc((size_t)L * 2 * I * H);
    e->q_dn = malloc((size_t)L * H * I);
    e->s_gu = malloc((size_t)L * 2 * gr * gc * 4);
    e->s_dn = malloc((size_t)L * dr * dc * 4);
    e->wg = malloc((size_t)L * I * H * 4);
    e->wu = malloc((size_t)L * I * H * 4);
    e->wd = malloc((size_t)L * H * I * 4);
    /* codes reach 448: scales put the weights near +-2/sqrt(K) */
    for (size_t i = 0; i < (size_t)L * 2 * gr * gc; i++)
        e->s_gu[i] = (urand(0.5f) + 1.0f) * 2.0f / sqrtf((float)H) / 64.0f;
    for (size_t i = 0; i < (size_t)L * dr * dc; i++)
        e->s_dn[i] = (urand(0.5f) + 1.0f) * 2.0f / sqrtf((float)I) / 64.0f;
    for (int l = 0; l < L; l++)
        for (int r = 0; r < 2 * I; r++)
            for (int c = 0; c < H; c++) {
                uint8_t q = random_e4m3();
                e->q_gu[((size_t)l * 2 * I + r) * H + c] = q;
                const int half = r >= I, rr = r - half * I;
                const float s = e->s_gu[(((size_t)l * 2 + half) * gr + rr / bn) * gc + c / bk];
                float *dst = half ? e->wu : e->wg;
                dst[((size_t)l * I + rr) * H + c] = e4m3_value(q) * s;
            }
    for (int l = 0; l < L; l++)
        for (int r = 0; r < H; r++)
            for (int c = 0; c < I; c++) {
                uint8_t q = random_e4m3();
                e->q_dn[((size_t)l * H + r) * I + c] = q;
                e->wd[((size_t)l * H + r) * I + c] =
                    e4m3_value(q) * e->s_dn[((size_t)l * dr + r / bn) * dc + c / bk];
            }
}

static void experts_fini(experts_t *e)
{
    free(e->q_gu);
    free(e->q_dn);
    free(e->s_gu);
    free(e->s_dn);
    free(e->w_gu);
    free(e->w_dn);
    free(e->wg);
    free(e->wu);
    free(e->wd);
}

/* The reference of one row through expert l: epd_linear for gate and up, silu(g) * u rounded to
 * bf16 (act, the kernel's rounding point), epd_linear for down rounded to bf16. Also y without
 * the intermediate rounding, through epd_swiglu. */
static void expert_row(const experts_t *e, int l, const float *x, uint16_t *act, uint16_t *y,
                       float *y_swiglu)
{
    const int H = e->H, I = e->I;
    float *g = malloc((size_t)I * 4), *u = malloc((size_t)I * 4), *a = malloc((size_t)I * 4);
    float *yf = malloc((size_t)H * 4), *tmp = malloc((size_t)2 * I * 4);
    epd_linear(g, x, e->wg + (size_t)l * I * H, 1, H, I);
    epd_linear(u, x, e->wu + (size_t)l * I * H, 1, H, I);
    for (int i = 0; i < I; i++) {
        float s = g[i] / (1.0f + expf(-g[i])) * u[i];
        act[i] = epd_f32_to_bf16(s);
        a[i] = epd_bf16_to_f32(act[i]);
    }
    epd_linear(yf, a, e->wd + (size_t)l * H * I, 1, I, H);
    for (int c = 0; c < H; c++)
        y[c] = epd_f32_to_bf16(yf[c]);
    epd_swiglu(y_swiglu, x, e->wg + (size_t)l * I * H, e->wu + (size_t)l * I * H,
               e->wd + (size_t)l * H * I, 1, H, I, tmp);
    free(g);
    free(u);
    free(a);
    free(yf);
    free(tmp);
}

/* Decodes an e4m3 byte from its fields, independently of numeric_ref's decoder. */
static float e4m3_value(uint8_t q)
{
    int s = q >> 7, ex = (q >> 3) & 15, m = q & 7;
    double v = ex ? (1.0 + m / 8.0) * pow(2.0, ex - 7) : m / 8.0 * pow(2.0, -6);
    return (float)(s ? -v : v);
}

/* Tolerances: act and y within one bf16 ulp of the reference that rounds at the same points
 * (the fp32 sums differ only in order); y within 2^-6 of the row's largest |y| of epd_swiglu's
 * unrounded result (the bf16 intermediate and output roundings, 2^-9 each, over I terms). */
static void check_layout_w(int H, int I, int L, int fp8, int strided, int bn, int bk)
{
    experts_t e;
    if (bn)
        experts_init_w8(&e, H, I, L, bn, bk);
    else
        experts_init(&e, H, I, L);
    int32_t counts[6] = {3, 0, 5, 1, 0, 2}; /* experts 1 and 4 without rows */
    assert_true(L <= 6);
    int32_t offsets[6];
    int max_rows = 0, total = 0;
    for (int l = 0; l < L; l++) {
        offsets[l] = total + 2 * l; /* gaps between experts stay untouched */
        total += counts[l];
        if (counts[l] > max_rows) max_rows = counts[l];
    }
    const int stride = max_rows + 1;
    const size_t nrows = strided ? (size_t)L * stride : (size_t)total + 2 * L;
    uint8_t *x8 = malloc(nrows * H);
    uint16_t *x16 = malloc(nrows * H * 2);
    float *xs = malloc(nrows * (H / 128 + 1) * 4);
    float *xf = malloc(nrows * H * 4); /* the reference's view of each row */
    for (size_t r = 0; r < nrows; r++) {
        for (int b = 0; b < H / 128; b++)
            xs[r * (H / 128) + b] = (urand(1.0f) + 1.5f) / 448.0f;
        for (int c = 0; c < H; c++) {
            if (fp8) {
                uint8_t q;
                do
                    q = (uint8_t)(urand(128.0f) + 128.0f);
                while ((q & 0x7f) == 0x7f);
                x8[r * H + c] = q;
                xf[r * H + c] = e4m3_value(q) * xs[r * (H / 128) + c / 128];
            } else {
                x16[r * H + c] = epd_f32_to_bf16(urand(1.0f));
                xf[r * H + c] = epd_bf16_to_f32(x16[r * H + c]);
            }
        }
    }
    uint16_t *act = malloc(nrows * I * 2), *y = malloc(nrows * H * 2);
    memset(act, 0xab, nrows * I * 2);
    memset(y, 0xab, nrows * H * 2);
    const int32_t *offs = strided ? NULL : offsets;
    const void *xin = fp8 ? (const void *)x8 : (const void *)x16;
    if (bn) {
        assert_int_equal(epd_ref_expert_gate_up_w8(act, xin, fp8 ? xs : NULL, counts, offs, stride,
                                                   e.q_gu, e.s_gu, bn, bk, L, H, I, max_rows),
                         0);
        assert_int_equal(epd_ref_expert_down_w8(y, act, counts, offs, stride, e.q_dn, e.s_dn, bn,
                                                bk, L, H, I, max_rows),
                         0);
    } else {
        assert_int_equal(epd_ref_expert_gate_up(act, xin, fp8 ? xs : NULL, counts, offs, stride,
                                                e.w_gu, L, H, I, max_rows),
                         0);
        assert_int_equal(
            epd_ref_expert_down(y, act, counts, offs, stride, e.w_dn, L, H, I, max_rows), 0);
    }

    uint16_t *ra = malloc((size_t)I * 2), *ry = malloc((size_t)H * 2);
    float *rs = malloc((size_t)H * 4);
    char *written = calloc(nrows, 1);
    for (int l = 0; l < L; l++) {
        size_t base = strided ? (size_t)l * stride : (size_t)offsets[l];
        for (int r = 0; r < counts[l]; r++) {
            size_t row = base + r;
            written[row] = 1;
            expert_row(&e, l, xf + row * H, ra, ry, rs);
            for (int i = 0; i < I; i++)
                assert_true(
                    bf16_close(epd_bf16_to_f32(act[row * I + i]), epd_bf16_to_f32(ra[i]), 1e-6f));
            float ymax = 0;
            for (int c = 0; c < H; c++)
                ymax = fmaxf(ymax, fabsf(rs[c]));
            for (int c = 0; c < H; c++) {
                /* the twin's y from its own act vs the reference's from its own: act may differ
                 * by an ulp, so the comparison is against the row scale */
                float got = epd_bf16_to_f32(y[row * H + c]);
                assert_true(fabsf(got - epd_bf16_to_f32(ry[c])) <= ymax * 0x1p-8f + 1e-6f);
                assert_true(fabsf(got - rs[c]) <= ymax * 0x1p-6f);
            }
        }
    }
    /* rows that belong to no expert (gaps, slots past a count) are not written */
    for (size_t row = 0; row < nrows; row++)
        if (!written[row]) {
            assert_int_equal(act[row * I], 0xabab);
            assert_int_equal(y[row * H], 0xabab);
        }
    free(ra);
    free(ry);
    free(rs);
    free(written);
    free(x8);
    free(x16);
    free(xs);
    free(xf);
    free(act);
    free(y);
    experts_fini(&e);
}

static void check_layout(int H, int I, int L, int fp8, int strided)
{
    check_layout_w(H, I, L, fp8, strided, 0, 0);
}

static void test_experts_bf16_offsets(void **state)
{
    (void)state;
    check_layout(128, 48, 6, 0, 0);
}

static void test_experts_bf16_stride(void **state)
{
    (void)state;
    check_layout(64, 96, 6, 0, 1);
}

static void test_experts_fp8_offsets(void **state)
{
    (void)state;
    check_layout(256, 48, 6, 1, 0);
}

static void test_experts_fp8_stride(void **state)
{
    (void)state;
    check_layout(128, 32, 4, 1, 1);
}

/* fp8 weights in ragged blocks (rows and channels), with bf16 and fp8 inputs */
static void test_experts_w8(void **state)
{
    (void)state;
    check_layout_w(128, 96, 6, 0, 0, 40, 64); /* gate rows 96/40, down channels 96/64 */
    check_layout_w(128, 48, 4, 0, 1, 48, 96); /* channels 128/96 */
    check_layout_w(256, 96, 6, 1, 0, 40, 96); /* fp8 inputs: 128-channel blocks beside 96 */
    check_layout_w(128, 32, 4, 1, 1, 128, 128);
}

static void test_experts_down_alone(void **state)
{
    (void)state;
    /* the down twin vs epd_linear on a given act, row by row, within one ulp */
    const int H = 64, I = 48, L = 2;
    experts_t e;
    experts_init(&e, H, I, L);
    int32_t counts[2] = {2, 3}, offsets[2] = {3, 0};
    uint16_t act[5 * 48], y[5 * 64];
    float a[48], yf[64];
    for (int i = 0; i < 5 * I; i++)
        act[i] = epd_f32_to_bf16(urand(1.0f));
    assert_int_equal(epd_ref_expert_down(y, act, counts, offsets, 0, e.w_dn, L, H, I, 8), 0);
    for (int l = 0; l < L; l++)
        for (int r = 0; r < counts[l]; r++) {
            int row = offsets[l] + r;
            for (int i = 0; i < I; i++)
                a[i] = epd_bf16_to_f32(act[row * I + i]);
            epd_linear(yf, a, e.wd + (size_t)l * H * I, 1, I, H);
            for (int c = 0; c < H; c++)
                assert_true(bf16_close(epd_bf16_to_f32(y[row * H + c]), yf[c], 1e-6f));
        }
    experts_fini(&e);
}

static void test_experts_refuse_shapes(void **state)
{
    (void)state;
    int32_t counts[1] = {1};
    uint16_t buf[64] = {0};
    assert_int_equal(epd_ref_expert_gate_up(buf, buf, NULL, counts, NULL, 1, buf, 1, 24, 16, 1),
                     -EINVAL); /* H not a multiple of 16 */
    float sc[1] = {1.0f};
    assert_int_equal(epd_ref_expert_gate_up(buf, buf, sc, counts, NULL, 1, buf, 1, 64, 16, 1),
                     -EINVAL); /* fp8 needs whole 128-channel blocks */
    assert_int_equal(epd_ref_expert_down(buf, buf, counts, NULL, 1, buf, 1, 16, 16, 2),
                     -EINVAL); /* stride below max_rows */
    const uint8_t *q = (const uint8_t *)buf;
    assert_int_equal(
        epd_ref_expert_gate_up_w8(buf, buf, NULL, counts, NULL, 1, q, sc, 16, 48, 1, 32, 16, 1),
        -EINVAL); /* bk not a multiple of 32 */
    assert_int_equal(
        epd_ref_expert_down_w8(buf, buf, counts, NULL, 1, q, NULL, 16, 32, 1, 32, 16, 1),
        -EINVAL); /* no scales */
}

/* Dispatch, experts, combine on one rank vs h[t] += sum_j w[t][j] * expert_{e(t,j)}(x[t]) in a
 * direct loop (the same bf16 rounding of y, the sum in j order). */
static void test_local_dispatch_combine(void **state)
{
    (void)state;
    const int T = 7, k = 3, E = 5, H = 64, I = 32;
    experts_t e;
    experts_init(&e, H, I, E);
    int32_t idx[7 * 3];
    float w[7 * 3];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            idx[t * k + j] = (t * 2 + j * 3) % E;
            w[t * k + j] = 0.25f + 0.1f * j + 0.01f * t;
        }
    idx[4] = -1; /* a masked selection */
    uint16_t x[7 * 64];
    for (int i = 0; i < T * H; i++)
        x[i] = epd_f32_to_bf16(urand(1.0f));
    float h[7 * 64], h_ref[7 * 64];
    for (int i = 0; i < T * H; i++)
        h[i] = h_ref[i] = urand(1.0f);

    int32_t counts[5], offsets[5], row_of[7 * 3];
    uint16_t packed[7 * 3 * 64], act[7 * 3 * 32], y[7 * 3 * 64];
    assert_int_equal(
        epd_ref_moe_local_dispatch(packed, counts, offsets, row_of, x, idx, T, k, E, H), 0);
    int total = 0;
    for (int l = 0; l < E; l++) {
        assert_int_equal(offsets[l], total);
        int n = 0;
        for (int i = 0; i < T * k; i++)
            n += idx[i] == l;
        assert_int_equal(counts[l], n);
        total += n;
    }
    assert_int_equal(total, T * k - 1);
    assert_int_equal(row_of[4], -1);
    assert_int_equal(
        epd_ref_expert_gate_up(act, packed, NULL, counts, offsets, 0, e.w_gu, E, H, I, T * k), 0);
    assert_int_equal(epd_ref_expert_down(y, act, counts, offsets, 0, e.w_dn, E, H, I, T * k), 0);
    assert_int_equal(epd_ref_moe_local_combine(h, y, row_of, w, T, k, H), 0);

    float xf[64], sum[64];
    uint16_t ra[32], ry[64];
    float rs[64];
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < H; c++) {
            xf[c] = epd_bf16_to_f32(x[t * H + c]);
            sum[c] = 0.0f;
        }
        for (int j = 0; j < k; j++) {
            int l = idx[t * k + j];
            if (l < 0) continue;
            expert_row(&e, l, xf, ra, ry, rs);
            for (int c = 0; c < H; c++)
                sum[c] += w[t * k + j] * epd_bf16_to_f32(ry[c]);
        }
        for (int c = 0; c < H; c++) {
            float want = h_ref[t * H + c] + sum[c];
            /* y within an ulp of the reference's: a few 2^-8 relative per term */
            assert_true(fabsf(h[t * H + c] - want) <= 0x1p-7f * (fabsf(sum[c]) + 1.0f));
        }
    }
    experts_fini(&e);
}

/* The combine alone: exact against a hand sum in j order. */
static void test_local_combine_exact(void **state)
{
    (void)state;
    const int k = 3, H = 8;
    uint16_t y[3 * 8];
    for (int i = 0; i < 3 * H; i++)
        y[i] = epd_f32_to_bf16((float)(i + 1) * 0.5f);
    int32_t row_of[3] = {2, -1, 0};
    float w[3] = {0.5f, 100.0f, 0.25f};
    float h[8];
    for (int c = 0; c < H; c++)
        h[c] = 1.0f;
    assert_int_equal(epd_ref_moe_local_combine(h, y, row_of, w, 1, k, H), 0);
    for (int c = 0; c < H; c++) {
        float s = 0.5f * ((float)(2 * H + c + 1) * 0.5f) + 0.25f * ((float)(c + 1) * 0.5f);
        assert_true(h[c] == 1.0f + s);
    }
}

static void test_route_fixup(void **state)
{
    (void)state;
    /* T 3, k 2, E 4; row 2 past n_valid; one id already -1 */
    int32_t idx[6] = {3, 0, -1, 2, 1, 1};
    float w[6] = {0.6f, 0.4f, 0.7f, 0.3f, 0.9f, 0.1f};
    const int32_t n_valid = 2;
    const int32_t slot_of[4] = {2, 3, 0, 1};
    unsigned long long tok[4] = {10, 0, 0, 5};
    assert_int_equal(epd_ref_route_fixup(idx, w, 3, 2, 4, &n_valid, slot_of, tok), 0);
    const int32_t want_idx[6] = {1, 2, -1, 0, -1, -1};
    const float want_w[6] = {0.6f, 0.4f, 0.0f, 0.3f, 0.0f, 0.0f};
    const unsigned long long want_tok[4] = {11, 0, 1, 6};
    for (int i = 0; i < 6; i++) {
        assert_int_equal(idx[i], want_idx[i]);
        assert_true(w[i] == want_w[i]);
    }
    for (int e = 0; e < 4; e++)
        assert_true(tok[e] == want_tok[e]);

    /* no n_valid, no slot map, no counters: only invalid ids change */
    int32_t idx2[4] = {1, 7, 0, -3};
    float w2[4] = {1, 2, 3, 4};
    assert_int_equal(epd_ref_route_fixup(idx2, w2, 2, 2, 4, NULL, NULL, NULL), 0);
    assert_int_equal(idx2[0], 1);
    assert_int_equal(idx2[1], -1);
    assert_int_equal(idx2[2], 0);
    assert_int_equal(idx2[3], -1);
    assert_true(w2[0] == 1 && w2[1] == 0 && w2[2] == 3 && w2[3] == 0);
}

/* numeric_ref's e4m3 decoder (used by the gate_up twin) agrees with the field decoding here. */
static void test_e4m3_decode(void **state)
{
    (void)state;
    for (int q = 0; q < 256; q++) {
        if ((q & 0x7f) == 0x7f) {
            assert_true(isnan(ep_fp8_e4m3_to_float((uint8_t)q)));
            continue;
        }
        assert_true(ep_fp8_e4m3_to_float((uint8_t)q) == e4m3_value((uint8_t)q));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_experts_bf16_offsets),
        cmocka_unit_test(test_experts_bf16_stride),
        cmocka_unit_test(test_experts_fp8_offsets),
        cmocka_unit_test(test_experts_fp8_stride),
        cmocka_unit_test(test_experts_w8),
        cmocka_unit_test(test_experts_down_alone),
        cmocka_unit_test(test_experts_refuse_shapes),
        cmocka_unit_test(test_local_dispatch_combine),
        cmocka_unit_test(test_local_combine_exact),
        cmocka_unit_test(test_route_fixup),
        cmocka_unit_test(test_e4m3_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
