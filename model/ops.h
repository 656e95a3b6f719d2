/* The operations of the Qwen3-MoE and DeepSeek forward passes in plain C fp32, one file each (llm.c
 * style). Row-major tensors; every function states its layouts. Each output element is computed
 * with a summation order that does not depend on how many rows a call has, so a token's result is
 * the same whatever batch it runs in (and on whatever rank). */
#ifndef EPD_MODEL_OPS_H
#define EPD_MODEL_OPS_H

#include "numeric_ref.h"

#include <stdint.h>

/* bf16 <-> fp32: libep's conversions (kernels/numeric_ref.h), bit for bit CUDA's
 * __float2bfloat16: round to nearest even, every NaN becomes the canonical 0x7fff. */
static inline uint16_t epd_f32_to_bf16(float f)
{
    return ep_float_to_bf16(f);
}

static inline float epd_bf16_to_f32(uint16_t h)
{
    return ep_bf16_to_float(h);
}

/* linear.c: y[T][out] = x[T][in] . W[out][in]^T (torch.nn.Linear without bias). */
void epd_linear(float *y, const float *x, const float *w, int rows, int in, int out);

/* rmsnorm.c: y[r][:] = x[r][:] / sqrt(mean(x[r]^2) + eps) * w[:] for rows of dim values;
 * y may equal x. */
void epd_rmsnorm(float *y, const float *x, const float *w, int rows, int dim, float eps);

/* rope.c: rotary position embedding, rotate-half form (the first and second halves of a head
 * are the pairs). inv_freq[head_dim/2] = theta^(-2i/head_dim). */
void epd_rope_inv_freq(float *inv_freq, int head_dim, double theta);
/* x: [T][heads][head_dim], pos[T] the position of each row. */
void epd_rope_apply(float *x, const int32_t *pos, int rows, int heads, int head_dim,
                    const float *inv_freq);
/* YaRN's inv_freq[dim/2] (transformers' _compute_yarn_parameters): frequencies that turn more
 * than beta_fast times over original_max_pos positions stay, those below beta_slow are divided
 * by factor, a linear ramp between. */
void epd_rope_yarn_inv_freq(float *inv_freq, int dim, double theta, double factor,
                            int original_max_pos, double beta_fast, double beta_slow, int truncate);
/* The general rotation: the dim values at x + r * row_stride + h * head_stride of row r and
 * head h, cos and sin multiplied by scale (YaRN's attention factor); pairs (i, i + dim/2), or
 * (2i, 2i + 1) when interleave (DeepSeek's layout). */
void epd_rope_rotate(float *x, const int32_t *pos, int rows, int heads, size_t row_stride,
                     size_t head_stride, int dim, const float *inv_freq, float scale,
                     int interleave);

/* attention.c: scores[j] = exp(scores[j] - mx) for j < len (mx: their maximum); returns 1 / their
 * sum (summed in double, in order), the factor that makes them the softmax. */
float epd_softmax_exp(float *scores, int len, float mx);

/* attention.c: causal GQA of one token over one sequence's paged cache. q: [heads][hd]; k_pool,
 * v_pool: [num_blocks][block_size][kv_heads][hd] (one layer); position j of the sequence lives in
 * block blocks[j / block_size] at row j % block_size (positions 0..len-1 are attended); out:
 * [heads][hd]; scores: scratch [len]. Query head h reads kv head h / (heads / kv_heads). The
 * reference of the GPU's paged attention (model/cuda/attention.cu and its twin). */
void epd_attention_paged(float *out, const float *q, const float *k_pool, const float *v_pool,
                         const int32_t *blocks, int block_size, int len, int heads, int kv_heads,
                         int hd, float *scores);

/* mla.c: DeepSeek's multi-head latent attention of one token over one sequence's paged latent
 * cache, in the absorbed form. cache: [num_blocks][block_size][kvl + rope] (one layer): per
 * position the normed latent (kvl) then the rotated shared key part (rope); kv_b: kv_b_proj
 * [heads][nope + vd][kvl]. q_nope: [heads][nope], q_pe: [heads][rope] (rotated); out:
 * [heads][vd]. Per head: q_lat = kv_b[h][:nope]^T q_nope; score_j = (q_lat . lat_j + q_pe .
 * pe_j) * scale; o_lat = sum_j softmax(score)_j lat_j; out = kv_b[h][nope:] o_lat. scratch:
 * [len + 2 * kvl]. Equal to the expanded form (keys and values per head) up to rounding. */
void epd_mla_attention_paged(float *out, const float *q_nope, const float *q_pe, const float *cache,
                             const float *kv_b, const int32_t *blocks, int block_size, int len,
                             int heads, int nope, int rope, int kvl, int vd, float scale,
                             float *scratch);

/* swiglu.c: y[T][H] = down(silu(gate(x)) * up(x)) for x[T][H]; gate, up: [I][H], down: [H][I];
 * tmp: scratch [2][I]. */
void epd_swiglu(float *y, const float *x, const float *gate, const float *up, const float *down,
                int rows, int hidden, int inter, float *tmp);

#endif /* EPD_MODEL_OPS_H */
