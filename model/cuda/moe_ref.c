/* Plain-C twins of the MoE kernels (moe.cu); semantics in moe_ref.h. */
#include "moe_ref.h"

#include "numeric_ref.h"
#include "ops.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

#define FP8_BLOCK 128 /* channels per fp8 scale (EP_FP8_BLOCK) */

int epd_ref_route_fixup(int32_t *topk_idx, float *topk_w, int T, int k, int E,
                        const int32_t *n_valid, const int32_t *slot_of,
                        unsigned long long *expert_tokens)
{
    if (T < 0 || k <= 0 || E <= 0) return -EINVAL;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            size_t i = (size_t)t * k + j;
            int32_t e = topk_idx[i];
            if ((n_valid && t >= *n_valid) || e < 0 || e >= E) {
                topk_idx[i] = -1;
                topk_w[i] = 0.0f;
                continue;
            }
            if (expert_tokens) expert_tokens[e]++;
            if (slot_of) topk_idx[i] = slot_of[e];
        }
    return 0;
}

int epd_ref_moe_local_dispatch(uint16_t *packed, int32_t *counts, int32_t *offsets, int32_t *row_of,
                               const uint16_t *x, const int32_t *topk_idx, int T, int k, int E,
                               int H)
{
    if (T < 0 || k <= 0 || E <= 0 || H <= 0 || H % 8) return -EINVAL;
    for (int e = 0; e < E; e++)
        counts[e] = 0;
    for (size_t i = 0; i < (size_t)T * k; i++) {
        int32_t e = topk_idx[i];
        if (e >= 0 && e < E) counts[e]++;
    }
    int32_t run = 0;
    for (int e = 0; e < E; e++) {
        offsets[e] = run;
        run += counts[e];
    }
    int32_t *next = calloc((size_t)E, sizeof *next);
    if (!next) return -ENOMEM;
    for (size_t i = 0; i < (size_t)T * k; i++) {
        int32_t e = topk_idx[i];
        if (e < 0 || e >= E) {
            row_of[i] = -1;
            continue;
        }
        int32_t row = offsets[e] + next[e]++;
        row_of[i] = row;
        memcpy(packed + (size_t)row * H, x + (i / k) * H, (size_t)H * sizeof *x);
    }
    free(next);
    return 0;
}

int epd_ref_moe_local_combine(float *h, const uint16_t *y, const int32_t *row_of,
                              const float *topk_w, int T, int k, int H)
{
    if (T < 0 || k <= 0 || H <= 0 || H % 8) return -EINVAL;
    for (int t = 0; t < T; t++)
        for (int c = 0; c < H; c++) {
            float s = 0.0f;
            for (int j = 0; j < k; j++) {
                int32_t r = row_of[(size_t)t * k + j];
                if (r < 0) continue;
                float p = topk_w[(size_t)t * k + j] * epd_bf16_to_f32(y[(size_t)r * H + c]);
                s += p;
            }
            h[(size_t)t * H + c] += s;
        }
    return 0;
}

static int rows_of(const int32_t *counts, int l, int max_rows)
{
    int n = counts[l];
    return n < 0 ? 0 : (n > max_rows ? max_rows : n);
}

static float dot_bf16(const float *x, const uint16_t *w, int n)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += x[i] * epd_bf16_to_f32(w[i]);
    return s;
}

static int shape_ok(int L, int H, int I, int max_rows, const int32_t *offsets, int stride)
{
    return L >= 0 && H > 0 && I > 0 && H % 16 == 0 && I % 16 == 0 && max_rows >= 0 &&
           (offsets || stride >= max_rows);
}

/* sum over blocks of bk channels of (sum of x * e4m3(q) in the block) * scale[block] */
static float dot_w8(const float *x, const uint8_t *q, const float *scale_row, int n, int bk)
{
    float s = 0.0f;
    for (int b0 = 0; b0 < n; b0 += bk) {
        float p = 0.0f;
        for (int i = b0; i < n && i < b0 + bk; i++)
            p += x[i] * ep_fp8_e4m3_to_float(q[i]);
        s += p * scale_row[b0 / bk];
    }
    return s;
}

/* The experts' weights of one projection: bf16, or e4m3 codes with [rows/bn][cols/bk] block
 * scales per expert (q != NULL). */
typedef struct expert_w {
    const uint16_t *bf;
    const uint8_t *q;
    const float *sc;
    int bn, bk;
} expert_w_t;

static int w8_ok(const float *w_scales, int bn, int bk)
{
    return w_scales && bn >= 1 && bk >= 32 && bk % 32 == 0;
}

/* x . row r of matrix `mat` of a stack of rows x n matrices (the experts' projections, one
 * after the other), with each matrix's own block scales */
static float expert_dot(const expert_w_t *w, const float *x, int mat, int rows, int r, int n)
{
    const size_t at = ((size_t)mat * rows + (size_t)r) * (size_t)n;
    if (!w->q) return dot_bf16(x, w->bf + at, n);
    const size_t nbr = (size_t)(rows + w->bn - 1) / w->bn, nbk = (size_t)(n + w->bk - 1) / w->bk;
    return dot_w8(x, w->q + at, w->sc + ((size_t)mat * nbr + (size_t)(r / w->bn)) * nbk, n, w->bk);
}

/* The expert input row: fp8 with per-128 scales (x_scales) or bf16, as floats. */
static void input_row(float *xr, const void *x, const float *x_scales, size_t row, int H)
{
    for (int c = 0; c < H; c++)
        xr[c] = x_scales ? ep_fp8_e4m3_to_float(((const uint8_t *)x)[row * H + c]) *
                               x_scales[row * (H / FP8_BLOCK) + c / FP8_BLOCK]
                         : epd_bf16_to_f32(((const uint16_t *)x)[row * H + c]);
}

/* gate_up: per expert [2I][H], the gate matrix then the up matrix, each [I][H] with its own
 * [I/bn][H/bk] scales in an fp8 checkpoint. */
static int gate_up(uint16_t *act, const void *x, const float *x_scales, const int32_t *counts,
                   const int32_t *offsets, int stride, const expert_w_t *w, int L, int H, int I,
                   int max_rows)
{
    float *xr = malloc((size_t)H * sizeof *xr);
    if (!xr) return -ENOMEM;
    for (int l = 0; l < L; l++) {
        const int n = rows_of(counts, l, max_rows);
        const size_t base = offsets ? (size_t)offsets[l] : (size_t)l * stride;
        for (int r = 0; r < n; r++) {
            const size_t row = base + r;
            input_row(xr, x, x_scales, row, H);
            for (int i = 0; i < I; i++) {
                float g = expert_dot(w, xr, 2 * l, I, i, H);
                float u = expert_dot(w, xr, 2 * l + 1, I, i, H);
                act[row * I + i] = epd_f32_to_bf16(g / (1.0f + expf(-g)) * u);
            }
        }
    }
    free(xr);
    return 0;
}

/* down: per expert [H][I] */
static int down(uint16_t *y, const uint16_t *act, const int32_t *counts, const int32_t *offsets,
                int stride, const expert_w_t *w, int L, int H, int I, int max_rows)
{
    float *ar = malloc((size_t)I * sizeof *ar);
    if (!ar) return -ENOMEM;
    for (int l = 0; l < L; l++) {
        const int n = rows_of(counts, l, max_rows);
        const size_t base = offsets ? (size_t)offsets[l] : (size_t)l * stride;
        for (int r = 0; r < n; r++) {
            const size_t row = base + r;
            for (int i = 0; i < I; i++)
                ar[i] = epd_bf16_to_f32(act[row * I + i]);
            for (int c = 0; c < H; c++)
                y[row * H + c] = epd_f32_to_bf16(expert_dot(w, ar, l, H, c, I));
        }
    }
    free(ar);
    return 0;
}

int epd_ref_expert_gate_up(uint16_t *act, const void *x, const float *x_scales,
                           const int32_t *counts, const int32_t *offsets, int stride,
                           const uint16_t *w_gate_up, int L, int H, int I, int max_rows)
{
    if (!shape_ok(L, H, I, max_rows, offsets, stride) || (x_scales && H % FP8_BLOCK))
        return -EINVAL;
    const expert_w_t w = {.bf = w_gate_up};
    return gate_up(act, x, x_scales, counts, offsets, stride, &w, L, H, I, max_rows);
}

int epd_ref_expert_down(uint16_t *y, const uint16_t *act, const int32_t *counts,
                        const int32_t *offsets, int stride, const uint16_t *w_down, int L, int H,
                        int I, int max_rows)
{
    if (!shape_ok(L, H, I, max_rows, offsets, stride)) return -EINVAL;
    const expert_w_t w = {.bf = w_down};
    return down(y, act, counts, offsets, stride, &w, L, H, I, max_rows);
}

int epd_ref_expert_gate_up_w8(uint16_t *act, const void *x, const float *x_scales,
                              const int32_t *counts, const int32_t *offsets, int stride,
                              const uint8_t *w8_gate_up, const float *w_scales, int bn, int bk,
                              int L, int H, int I, int max_rows)
{
    if (!shape_ok(L, H, I, max_rows, offsets, stride) || (x_scales && H % FP8_BLOCK) ||
        !w8_ok(w_scales, bn, bk))
        return -EINVAL;
    const expert_w_t w = {.q = w8_gate_up, .sc = w_scales, .bn = bn, .bk = bk};
    return gate_up(act, x, x_scales, counts, offsets, stride, &w, L, H, I, max_rows);
}

int epd_ref_expert_down_w8(uint16_t *y, const uint16_t *act, const int32_t *counts,
                           const int32_t *offsets, int stride, const uint8_t *w8_down,
                           const float *w_scales, int bn, int bk, int L, int H, int I, int max_rows)
{
    if (!shape_ok(L, H, I, max_rows, offsets, stride) || !w8_ok(w_scales, bn, bk)) return -EINVAL;
    const expert_w_t w = {.q = w8_down, .sc = w_scales, .bn = bn, .bk = bk};
    return down(y, act, counts, offsets, stride, &w, L, H, I, max_rows);
}
