/* Reference twins of attention.cu, built from the C model's own ops (model/rmsnorm.c, rope.c,
 * attention.c) so that the CUDA model and the C model share one definition of the math. */
#include "attention_ref.h"

#include "ops.h"

#include <string.h>

int epd_qk_norm_rope_store_ref(const float *qkv, const float *q_norm, const float *k_norm,
                               const float *inv_freq, const int32_t *pos, const int32_t *slot,
                               int T, int nh, int nkv, int hd, float eps, float *q_out,
                               uint16_t *k_cache, uint16_t *v_cache)
{
    if (T < 0 || nh < 1 || nkv < 1 || hd < 2 || hd % 2 || hd > EPD_ATTN_MAX_HD) return -1;
    const size_t row = (size_t)(nh + 2 * nkv) * hd;
    float head[EPD_ATTN_MAX_HD];
    for (int t = 0; t < T; t++) {
        const float *x = qkv + (size_t)t * row;
        float *qt = q_out + (size_t)t * nh * hd;
        /* q: all heads of the token at once (one row of epd_rope_apply) */
        epd_rmsnorm(qt, x, q_norm, nh, hd, eps);
        epd_rope_apply(qt, &pos[t], 1, nh, hd, inv_freq);
        if (slot[t] < 0) continue;
        const size_t at = (size_t)slot[t] * nkv * hd;
        for (int h = 0; h < nkv; h++) {
            epd_rmsnorm(head, x + (size_t)(nh + h) * hd, k_norm, 1, hd, eps);
            epd_rope_apply(head, &pos[t], 1, 1, hd, inv_freq);
            for (int i = 0; i < hd; i++)
                k_cache[at + (size_t)h * hd + i] = epd_f32_to_bf16(head[i]);
        }
        const float *v = x + (size_t)(nh + nkv) * hd;
        for (size_t i = 0; i < (size_t)nkv * hd; i++)
            v_cache[at + i] = epd_f32_to_bf16(v[i]);
    }
    return 0;
}

void epd_attention_ref(float *out, const float *q, const float *k_pool, const float *v_pool,
                       const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                       const int32_t *pos, int T, int nh, int nkv, int hd, int block_size,
                       int max_len, float *scores)
{
    const size_t n = (size_t)nh * hd;
    for (int t = 0; t < T; t++) {
        float *ot = out + (size_t)t * n;
        long long len = (long long)pos[t] + 1;
        if (len > max_len) len = max_len;
        if (seq_idx[t] < 0 || len < 1) {
            memset(ot, 0, n * sizeof(float));
            continue;
        }
        epd_attention_paged(ot, q + (size_t)t * n, k_pool, v_pool,
                            block_table + (size_t)seq_idx[t] * max_blocks, block_size, (int)len, nh,
                            nkv, hd, scores);
    }
}

void epd_bf16_widen(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = epd_bf16_to_f32(src[i]);
}
