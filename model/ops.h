/* The operations of the Qwen3-MoE forward pass in plain C fp32, one file each (llm.c style).
 * Row-major tensors; every function states its layouts. Each output element is computed with a
 * summation order that does not depend on how many rows a call has, so a token's result is the
 * same whatever batch it runs in (and on whatever rank). */
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

/* attention.c: causal GQA of one token over one sequence's cache.
 * q: [heads][hd]; k, v: [len][kv_heads][hd] (positions 0..len-1 are attended);
 * out: [heads][hd]; scores: scratch [len]. Query head h reads kv head h / (heads / kv_heads). */
void epd_attention_token(float *out, const float *q, const float *k, const float *v, int len,
                         int heads, int kv_heads, int hd, float *scores);

/* attention.c: the same over a paged cache: k_pool, v_pool: [num_blocks][block_size][kv_heads][hd]
 * (one layer); position j of the sequence lives in block blocks[j / block_size] at row
 * j % block_size. The reference twin of the GPU's paged attention (model/cuda/attention.cu). */
void epd_attention_paged(float *out, const float *q, const float *k_pool, const float *v_pool,
                         const int32_t *blocks, int block_size, int len, int heads, int kv_heads,
                         int hd, float *scores);

/* swiglu.c: y[T][H] = down(silu(gate(x)) * up(x)) for x[T][H]; gate, up: [I][H], down: [H][I];
 * tmp: scratch [2][I]. */
void epd_swiglu(float *y, const float *x, const float *gate, const float *up, const float *down,
                int rows, int hidden, int inter, float *tmp);

#endif /* EPD_MODEL_OPS_H */
