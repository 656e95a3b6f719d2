/* Causal grouped-query attention of one query token over a sequence's paged KV cache. */
#include "ops.h"

#include <math.h>

float epd_softmax_exp(float *scores, int len, float mx)
{
    double sum = 0;
    for (int j = 0; j < len; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    return (float)(1.0 / sum);
}

void epd_attention_paged(float *out, const float *q, const float *k_pool, const float *v_pool,
                         const int32_t *blocks, int block_size, int len, int heads, int kv_heads,
                         int hd, float *scores)
{
    int group = heads / kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
    size_t row = (size_t)kv_heads * hd;
    for (int h = 0; h < heads; h++) {
        const float *qh = q + (size_t)h * hd;
        int kvh = h / group;
        float mx = -INFINITY;
        for (int j = 0; j < len; j++) {
            size_t at = ((size_t)blocks[j / block_size] * block_size + j % block_size) * row;
            const float *kj = k_pool + at + (size_t)kvh * hd;
            float s = 0;
            for (int d = 0; d < hd; d++)
                s += qh[d] * kj[d];
            s *= scale;
            scores[j] = s;
            if (s > mx) mx = s;
        }
        float inv = epd_softmax_exp(scores, len, mx);
        float *oh = out + (size_t)h * hd;
        for (int d = 0; d < hd; d++)
            oh[d] = 0;
        for (int j = 0; j < len; j++) {
            size_t at = ((size_t)blocks[j / block_size] * block_size + j % block_size) * row;
            const float *vj = v_pool + at + (size_t)kvh * hd;
            float p = scores[j] * inv;
            for (int d = 0; d < hd; d++)
                oh[d] += p * vj[d];
        }
    }
}
