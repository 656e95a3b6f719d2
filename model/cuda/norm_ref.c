/* Reference twins of norm.cu (norm_ref.h), built on the C model's ops where they fit. */
#include "norm_ref.h"

#include "ops.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

void epd_embed_ref(float *h, const uint16_t *emb, const int32_t *tokens, int T, int H)
{
    for (int t = 0; t < T; t++) {
        const uint16_t *src = emb + (size_t)tokens[t] * H;
        float *dst = h + (size_t)t * H;
        for (int i = 0; i < H; i++)
            dst[i] = epd_bf16_to_f32(src[i]);
    }
}

void epd_add_rmsnorm_ref(float *h, const uint16_t *delta, const float *w, float eps, int T, int H,
                         float *out_f32, uint16_t *out_bf16, float *scratch)
{
    for (int t = 0; t < T; t++) {
        const size_t off = (size_t)t * H;
        float *hr = h + off;
        if (delta)
            for (int i = 0; i < H; i++)
                hr[i] += epd_bf16_to_f32(delta[off + i]);
        float *y = out_f32 ? out_f32 + off : scratch;
        epd_rmsnorm(y, hr, w, 1, H, eps);
        if (out_bf16)
            for (int i = 0; i < H; i++)
                out_bf16[off + i] = epd_f32_to_bf16(y[i]);
    }
}

void epd_silu_mul_ref(uint16_t *act, const float *gu, int T, int I)
{
    for (int t = 0; t < T; t++) {
        const float *g = gu + (size_t)t * 2 * I, *u = g + I;
        for (int i = 0; i < I; i++)
            act[(size_t)t * I + i] = epd_f32_to_bf16(g[i] / (1.0f + expf(-g[i])) * u[i]);
    }
}

void epd_gather_rows_ref(float *dst, const float *src, const int32_t *rows, int n, int cols)
{
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)i * cols, src + (size_t)rows[i] * cols, (size_t)cols * sizeof(float));
}
