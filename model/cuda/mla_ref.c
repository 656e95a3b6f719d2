/* Reference twins of mla.cu and of the MLA GEMMs of the CUDA forward, built from the C model's
 * own ops (model/rmsnorm.c, rope.c, attention.c's softmax) so that both models share one
 * definition of the math. */
#include "mla_ref.h"

#include "ops.h"

#include <math.h>
#include <string.h>

#define MLA_REF_MAX_ROW 2048

int epd_mla_rope_store_ref(float *q, const float *kv, const float *kv_norm, const float *inv_freq,
                           float rope_scale, int interleave, const int32_t *pos,
                           const int32_t *slot, int T, int nh, int nope, int rope, int kvl,
                           float eps, uint16_t *cache)
{
    if (T < 0 || nh < 1 || nope < 0 || rope < 2 || rope % 2 || rope > 256 || kvl < 1 ||
        kvl + rope > MLA_REF_MAX_ROW)
        return -1;
    const int qk = nope + rope, row = kvl + rope;
    float x[MLA_REF_MAX_ROW];
    for (int t = 0; t < T; t++) {
        epd_rope_rotate(q + (size_t)t * nh * qk + nope, &pos[t], 1, nh, 0, (size_t)qk, rope,
                        inv_freq, rope_scale, interleave);
        if (slot[t] < 0) continue;
        memcpy(x, kv + (size_t)t * row, sizeof(float) * (size_t)row);
        epd_rmsnorm(x, x, kv_norm, 1, kvl, eps);
        epd_rope_rotate(x + kvl, &pos[t], 1, 1, 0, 0, rope, inv_freq, rope_scale, interleave);
        uint16_t *dst = cache + (size_t)slot[t] * row;
        for (int i = 0; i < row; i++)
            dst[i] = epd_f32_to_bf16(x[i]);
    }
    return 0;
}

static const float *cache_row(const float *cache, const int32_t *blocks, int block_size, int j,
                              int row)
{
    return cache + ((size_t)blocks[j / block_size] * block_size + j % block_size) * (size_t)row;
}

static int token_len(const int32_t *seq_idx, const int32_t *pos, int t, int max_len)
{
    long long len = (long long)pos[t] + 1;
    if (len > max_len) len = max_len;
    return seq_idx[t] < 0 || len < 1 ? 0 : (int)len;
}

void epd_mla_latent_ref(float *o_lat, const float *q_lat, const float *q_pe, int pe_stride,
                        const float *cache, const int32_t *block_table, int max_blocks,
                        const int32_t *seq_idx, const int32_t *pos, int T, int nh, int kvl,
                        int rope, float scale, int block_size, int max_len, float *scores)
{
    const int row = kvl + rope;
    for (int t = 0; t < T; t++) {
        const int len = token_len(seq_idx, pos, t, max_len);
        const int32_t *blocks = len ? block_table + (size_t)seq_idx[t] * max_blocks : NULL;
        for (int h = 0; h < nh; h++) {
            const size_t th = (size_t)t * nh + h;
            const float *ql = q_lat + th * kvl, *qp = q_pe + th * pe_stride;
            float *o = o_lat + th * kvl;
            memset(o, 0, sizeof(float) * (size_t)kvl);
            if (!len) continue;
            float mx = -INFINITY;
            for (int j = 0; j < len; j++) {
                const float *c = cache_row(cache, blocks, block_size, j, row);
                float s = 0, r = 0;
                for (int i = 0; i < kvl; i++)
                    s += ql[i] * c[i];
                for (int i = 0; i < rope; i++)
                    r += qp[i] * c[kvl + i];
                scores[j] = (s + r) * scale;
                if (scores[j] > mx) mx = scores[j];
            }
            const float inv = epd_softmax_exp(scores, len, mx);
            for (int j = 0; j < len; j++) {
                const float *c = cache_row(cache, blocks, block_size, j, row);
                const float p = scores[j] * inv;
                for (int i = 0; i < kvl; i++)
                    o[i] += p * c[i];
            }
        }
    }
}

void epd_mla_absorb_q_ref(float *q_lat, const float *q, const float *kv_b, int T, int nh, int nope,
                          int rope, int kvl, int vd)
{
    const int qk = nope + rope;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const float *qn = q + ((size_t)t * nh + h) * qk;
            const float *wk = kv_b + (size_t)h * (nope + vd) * kvl;
            float *o = q_lat + ((size_t)t * nh + h) * kvl;
            for (int c = 0; c < kvl; c++) {
                float a = 0;
                for (int i = 0; i < nope; i++)
                    a += qn[i] * wk[(size_t)i * kvl + c];
                o[c] = a;
            }
        }
}

void epd_mla_absorb_out_ref(float *out, const float *o_lat, const float *kv_b, int T, int nh,
                            int nope, int kvl, int vd)
{
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const float *ol = o_lat + ((size_t)t * nh + h) * kvl;
            const float *wv = kv_b + ((size_t)h * (nope + vd) + nope) * kvl;
            float *o = out + ((size_t)t * nh + h) * vd;
            for (int d = 0; d < vd; d++) {
                float a = 0;
                for (int c = 0; c < kvl; c++)
                    a += wv[(size_t)d * kvl + c] * ol[c];
                o[d] = a;
            }
        }
}

void epd_mla_expanded_ref(float *out, const float *q, const float *cache, const float *kv_b,
                          const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                          const int32_t *pos, int T, int nh, int nope, int rope, int kvl, int vd,
                          float scale, int block_size, int max_len, float *scratch)
{
    const int qk = nope + rope, row = kvl + rope;
    float *kn = scratch, *vv = kn + (size_t)max_len * nope, *scores = vv + (size_t)max_len * vd;
    for (int t = 0; t < T; t++) {
        const int len = token_len(seq_idx, pos, t, max_len);
        const int32_t *blocks = len ? block_table + (size_t)seq_idx[t] * max_blocks : NULL;
        for (int h = 0; h < nh; h++) {
            const float *qh = q + ((size_t)t * nh + h) * qk;
            const float *wk = kv_b + (size_t)h * (nope + vd) * kvl, *wv = wk + (size_t)nope * kvl;
            float *o = out + ((size_t)t * nh + h) * vd;
            memset(o, 0, sizeof(float) * (size_t)vd);
            if (!len) continue;
            float mx = -INFINITY;
            for (int j = 0; j < len; j++) {
                const float *c = cache_row(cache, blocks, block_size, j, row);
                epd_linear(kn + (size_t)j * nope, c, wk, 1, kvl, nope);
                epd_linear(vv + (size_t)j * vd, c, wv, 1, kvl, vd);
                float s = 0;
                for (int i = 0; i < nope; i++)
                    s += qh[i] * kn[(size_t)j * nope + i];
                for (int i = 0; i < rope; i++)
                    s += qh[nope + i] * c[kvl + i];
                scores[j] = s * scale;
                if (scores[j] > mx) mx = scores[j];
            }
            const float inv = epd_softmax_exp(scores, len, mx);
            for (int j = 0; j < len; j++)
                for (int d = 0; d < vd; d++)
                    o[d] += scores[j] * inv * vv[(size_t)j * vd + d];
        }
    }
}
