/* DeepSeek's multi-head latent attention of one query token over a paged latent cache, in the
 * absorbed form (kv_b_proj folded into the query and the output): what a decode step reads is
 * kvl + rope values per position, not keys and values per head. */
#include "ops.h"

#include <math.h>

void epd_mla_attention_paged(float *out, const float *q_nope, const float *q_pe, const float *cache,
                             const float *kv_b, const int32_t *blocks, int block_size, int len,
                             int heads, int nope, int rope, int kvl, int vd, float scale,
                             float *scratch)
{
    float *scores = scratch, *q_lat = scratch + len, *o_lat = q_lat + kvl;
    size_t row = (size_t)kvl + (size_t)rope;
    for (int h = 0; h < heads; h++) {
        const float *wk = kv_b + (size_t)h * (nope + vd) * kvl; /* [nope][kvl] */
        const float *wv = wk + (size_t)nope * kvl;              /* [vd][kvl] */
        const float *qn = q_nope + (size_t)h * nope, *qp = q_pe + (size_t)h * rope;
        for (int c = 0; c < kvl; c++)
            q_lat[c] = 0;
        for (int i = 0; i < nope; i++)
            for (int c = 0; c < kvl; c++)
                q_lat[c] += qn[i] * wk[(size_t)i * kvl + c];
        float mx = -INFINITY;
        for (int j = 0; j < len; j++) {
            const float *cj =
                cache + ((size_t)blocks[j / block_size] * block_size + j % block_size) * row;
            float s = 0, r = 0;
            for (int c = 0; c < kvl; c++)
                s += q_lat[c] * cj[c];
            for (int d = 0; d < rope; d++)
                r += qp[d] * cj[kvl + d];
            scores[j] = (s + r) * scale;
            if (scores[j] > mx) mx = scores[j];
        }
        float inv = epd_softmax_exp(scores, len, mx);
        for (int c = 0; c < kvl; c++)
            o_lat[c] = 0;
        for (int j = 0; j < len; j++) {
            const float *cj =
                cache + ((size_t)blocks[j / block_size] * block_size + j % block_size) * row;
            float p = scores[j] * inv;
            for (int c = 0; c < kvl; c++)
                o_lat[c] += p * cj[c];
        }
        float *oh = out + (size_t)h * vd;
        for (int d = 0; d < vd; d++) {
            float a = 0;
            for (int c = 0; c < kvl; c++)
                a += wv[(size_t)d * kvl + c] * o_lat[c];
            oh[d] = a;
        }
    }
}
