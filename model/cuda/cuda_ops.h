/* The CUDA model's kernels (model/cuda/, sm_90a), as extern "C" launchers that the forward
 * (cuda_model.c) calls. Every launcher enqueues on `stream` and returns a cudaError_t as int (0:
 * success); none synchronises with the host, and none reads a count from the host that the
 * device computed (counts are read on the device), so a decode step can be captured into a
 * CUDA graph. Each kernel has a plain-C reference twin (cuda_ref.h, or the C model's own ops)
 * and a test that compares them (tests/model_cuda/).
 *
 * Layouts are row-major. bf16 values are uint16_t bit patterns. T = tokens of the step on this
 * rank, H = hidden size, hd = head dim, nh / nkv = query / key-value heads. */
#ifndef EPD_CUDA_OPS_H
#define EPD_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "sample.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *epd_stream_t; /* cudaStream_t without the runtime header */

/* ---- embedding, norms, activations (norm.cu) ---------------------------------------------- */

/* h[t][:] = fp32(emb[tokens[t]][:]) for t < T; emb [V][H] bf16. */
int epd_cu_embed(float *h, const uint16_t *emb, const int32_t *tokens, int T, int H,
                 epd_stream_t stream);

/* Fused residual + RMSNorm: if delta != NULL, h[t] += fp32(delta[t]) (bf16 [T][H]) first; then
 * y = h[t] / sqrt(mean(h[t]^2) + eps) * w (w fp32 [H]) written to out_f32 [T][H] and/or
 * out_bf16 [T][H] (either may be NULL). Row sums in fp32. */
int epd_cu_add_rmsnorm(float *h, const uint16_t *delta, const float *w, float eps, int T, int H,
                       float *out_f32, uint16_t *out_bf16, epd_stream_t stream);

/* Dense SwiGLU activation: act[t][i] = bf16(silu(gu[t][i]) * gu[t][I + i]); gu fp32 [T][2I]
 * (gate then up, the output of one fused GEMM). */
int epd_cu_silu_mul(uint16_t *act, const float *gu, int T, int I, epd_stream_t stream);

/* dst[i][:] = src[rows[i]][:] for i < n; fp32 rows of `cols` values. */
int epd_cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int cols,
                       epd_stream_t stream);

/* ---- attention (attention.cu) ------------------------------------------------------------- */

/* qkv: fp32 [T][(nh + 2 nkv) hd] (q heads, then k heads, then v heads: one fused GEMM's
 * output). Per token: q and k heads RMS-normalised over hd with q_norm / k_norm (fp32 [hd]),
 * then rotary embedding at pos[t] (rotate-half form, inv_freq [hd/2]); q goes to q_out fp32
 * [T][nh][hd]; k and v go to the layer's paged cache, bf16 [num_blocks][block_size][nkv][hd],
 * at row slot[t] (= block * block_size + offset; slot < 0: not stored, e.g. padding rows). */
int epd_cu_qk_norm_rope_store(const float *qkv, const float *q_norm, const float *k_norm,
                              const float *inv_freq, const int32_t *pos, const int32_t *slot, int T,
                              int nh, int nkv, int hd, float eps, float *q_out, uint16_t *k_cache,
                              uint16_t *v_cache, epd_stream_t stream);

/* Causal GQA over the paged cache, for decode and prefill alike: token t (query q[t], fp32
 * [T][nh][hd]) of sequence seq_idx[t] attends positions 0..pos[t] of that sequence, whose
 * blocks are block_table[seq_idx[t]][0..] (int32 [S][max_blocks]). out: bf16 [T][nh * hd].
 * Softmax scale 1/sqrt(hd). Long contexts are split into chunks of split_len positions computed
 * in parallel and merged (flash-decoding); max_splits bounds the chunks per token (the grid is
 * fixed, so that a graph can replay it: chunks past a token's length exit at once); positions
 * past max_splits * split_len are not attended, so the caller sizes them for the longest
 * sequence. */
size_t epd_cu_attention_workspace(int T, int nh, int hd, int max_splits);
int epd_cu_attention(uint16_t *out, const float *q, const uint16_t *k_cache,
                     const uint16_t *v_cache, const int32_t *block_table, int max_blocks,
                     const int32_t *seq_idx, const int32_t *pos, int T, int nh, int nkv, int hd,
                     int block_size, int split_len, int max_splits, void *workspace,
                     epd_stream_t stream);

/* ---- MLA (mla.cu): DeepSeek's multi-head latent attention ------------------------------------
 * kvl = kv_lora_rank, rope = qk_rope_head_dim, nope = qk_nope_head_dim, vd = v_head_dim. The
 * layer's latent cache is bf16 [num_blocks][block_size][kvl + rope]: per position the normed
 * latent, then the rotated key part that all heads share. */

/* After the q and kv_a GEMMs. q: fp32 [T][nh][nope + rope]: the rope part of every head is
 * rotated in place at pos[t]. kv: fp32 [T][kvl + rope]: the latent is RMS-normalised over kvl
 * (kv_norm fp32 [kvl], eps), the key part rotated, and both stored as bf16 at row slot[t] of
 * cache (slot < 0: not stored, q is still rotated). Rotation: inv_freq [rope/2]; cos and sin
 * multiplied by rope_scale (YaRN's attention factor); pairs (2i, 2i + 1) when interleave, else
 * (i, i + rope/2). Twin: epd_mla_rope_store_ref. */
int epd_cu_mla_rope_store(float *q, const float *kv, const float *kv_norm, const float *inv_freq,
                          float rope_scale, int interleave, const int32_t *pos, const int32_t *slot,
                          int T, int nh, int nope, int rope, int kvl, float eps, uint16_t *cache,
                          epd_stream_t stream);

/* The absorbed form's attention proper (multi-query over the latent cache): token t of
 * sequence seq_idx[t] attends positions 0..pos[t] (blocks block_table[seq_idx[t]], int32
 * [S][max_blocks]) with score_j = (q_lat[t][h] . lat_j + q_pe[t][h] . pe_j) * scale and
 * o_lat[t][h] = sum_j softmax(score)_j lat_j. q_lat: fp32 [T][nh][kvl] (q_nope absorbed through
 * kv_b's key part); q_pe: head h of token t at q_pe + (t * nh + h) * pe_stride, rope fp32 values;
 * o_lat: bf16 [T][nh][kvl]. Splits along the context as epd_cu_attention (split_len,
 * max_splits; positions past split_len * max_splits are not attended; padding rows, seq_idx < 0,
 * get zeros). kvl <= 512, kvl + rope <= 640, both even. Twin: epd_mla_latent_ref. */
size_t epd_cu_mla_workspace(int T, int nh, int kvl, int max_splits);
int epd_cu_mla_attention(uint16_t *o_lat, const float *q_lat, const float *q_pe, int pe_stride,
                         const uint16_t *cache, const int32_t *block_table, int max_blocks,
                         const int32_t *seq_idx, const int32_t *pos, int T, int nh, int kvl,
                         int rope, float scale, int block_size, int split_len, int max_splits,
                         void *workspace, epd_stream_t stream);

/* The expanded form (prefill), step 1: the context of every sequence s < S of the step
 * gathered contiguously: position p < seq_len[s] goes to row base[s] + p of lat bf16
 * [rows][kvl] and pe bf16 [rows][rope]. base, seq_len: device int32 [S]; max_len bounds
 * seq_len. */
int epd_cu_mla_gather(uint16_t *lat, uint16_t *pe, const uint16_t *cache,
                      const int32_t *block_table, int max_blocks, const int32_t *base,
                      const int32_t *seq_len, int S, int max_len, int kvl, int rope, int block_size,
                      epd_stream_t stream);
/* Step 2, after kvx = lat . kv_b^T (fp32 [rows][nh][nope + vd]): per row and head, keys
 * k bf16 [rows][nh][hdp] = (kvx[r][h][0..nope), pe[r], zeros) and values v bf16 [rows][nh][hdp]
 * = (kvx[r][h][nope..nope + vd), zeros): the paged layout of epd_cu_attention with nkv = nh and
 * head dim hdp >= max(nope + rope, vd). */
int epd_cu_mla_expand_kv(uint16_t *k, uint16_t *v, const float *kvx, const uint16_t *pe, int rows,
                         int nh, int nope, int rope, int vd, int hdp, epd_stream_t stream);
/* q_out fp32 [T][nh][hdp] = (q[t][h] * q_scale, zeros) for q fp32 [T][nh][qk]. */
int epd_cu_mla_pad_q(float *q_out, const float *q, int T, int nh, int qk, int hdp, float q_scale,
                     epd_stream_t stream);
/* out bf16 [T][nh][vd] = the first vd values of each head of src bf16 [T][nh][hdp]. */
int epd_cu_mla_unpad(uint16_t *out, const uint16_t *src, int T, int nh, int vd, int hdp,
                     epd_stream_t stream);

/* ---- MoE (moe.cu) ----------------------------------------------------------------------------
 * Packed per-expert layout (libep's LL output, or the local one below): the rows of local
 * expert l are rows row_base(l) .. row_base(l) + counts[l] - 1 of a packed array, where
 * row_base(l) = offsets[l] if offsets != NULL, else l * stride. counts (and offsets) are device
 * int32 [L]; rows past a count are neither read nor written. */

/* The routing's fix-ups, in place on topk_idx [T][k] (global expert ids from ep_route) and
 * topk_w: rows t >= *n_valid (device int32; NULL: all rows valid) get ids -1 and weight 0;
 * valid ids are counted into expert_tokens[E] (uint64; may be NULL) and then mapped through
 * slot_of[E] (libep slot numbering; NULL: identity). */
int epd_cu_route_fixup(int32_t *topk_idx, float *topk_w, int T, int k, int E,
                       const int32_t *n_valid, const int32_t *slot_of,
                       unsigned long long *expert_tokens, epd_stream_t stream);

/* Local plan of a one-rank group (no exchange): counts[E] of the valid (t, j) selections per
 * expert, offsets[E] their exclusive prefix sum, row_of[T][k] the packed row of selection
 * (t, j) (-1 where topk_idx is -1), and packed[row][H] = x[t] (bf16). Rows within an expert
 * come in any order (each row is computed alone, so results do not depend on it). */
int epd_cu_moe_local_dispatch(uint16_t *packed, int32_t *counts, int32_t *offsets, int32_t *row_of,
                              const uint16_t *x, const int32_t *topk_idx, int T, int k, int E,
                              int H, epd_stream_t stream);
/* h[t][:] += sum over j ascending with row_of[t][j] >= 0 of w[t][j] * fp32(y[row_of[t][j]][:]),
 * the sum formed in fp32 first. */
int epd_cu_moe_local_combine(float *h, const uint16_t *y, const int32_t *row_of,
                             const float *topk_w, int T, int k, int H, epd_stream_t stream);

/* The experts' SwiGLU on the packed layout, weights streamed once per expert whatever its row
 * count: act[row][i] = bf16(silu(x[row] . Wg[l][i]) * (x[row] . Wu[l][i])) with
 * w_gate_up[l] = [2I][H] bf16 (gate rows 0..I-1, up rows I..2I-1), x either bf16 [rows][H]
 * (x_scales NULL) or fp8 e4m3 [rows][H] with fp32 x_scales [rows][H/128] (libep's FP8
 * dispatch); then y[row][c] = bf16(act[row] . Wd[l][c]) with w_down[l] = [H][I] bf16. act is
 * [rows][I] bf16 in the same row numbering. Dot products in fp32. max_rows bounds counts[l]
 * (the packed array's rows per expert for the stride layout). */
int epd_cu_expert_gate_up(uint16_t *act, const void *x, const float *x_scales,
                          const int32_t *counts, const int32_t *offsets, int stride,
                          const uint16_t *w_gate_up, int L, int H, int I, int max_rows,
                          epd_stream_t stream);
int epd_cu_expert_down(uint16_t *y, const uint16_t *act, const int32_t *counts,
                       const int32_t *offsets, int stride, const uint16_t *w_down, int L, int H,
                       int I, int max_rows, epd_stream_t stream);
/* The same with the weights of an FP8 checkpoint as stored: e4m3 codes (w8_gate_up [L][2I][H],
 * gate rows then up rows; w8_down [L][H][I]) with fp32 scales per block of bn rows by bk
 * channels, w = e4m3(q) * scale: gate_up's w_scales [L][2][ceil(I/bn)][ceil(H/bk)] (the gate
 * projection's blocks, then the up projection's: each keeps its own row blocks), down's
 * [L][ceil(H/bn)][ceil(I/bk)]. bk a multiple of 32. The codes become bf16 in registers (exact);
 * the sum over each block of channels is scaled once. NaN codes are not carried. */
int epd_cu_expert_gate_up_w8(uint16_t *act, const void *x, const float *x_scales,
                             const int32_t *counts, const int32_t *offsets, int stride,
                             const uint8_t *w8_gate_up, const float *w_scales, int bn, int bk,
                             int L, int H, int I, int max_rows, epd_stream_t stream);
int epd_cu_expert_down_w8(uint16_t *y, const uint16_t *act, const int32_t *counts,
                          const int32_t *offsets, int stride, const uint8_t *w8_down,
                          const float *w_scales, int bn, int bk, int L, int H, int I, int max_rows,
                          epd_stream_t stream);

/* ---- sampling (sample.cu) ----------------------------------------------------------------- */

/* next[m] = the token sample.h's algorithm picks for logits[m][V] (fp32) with params[m]
 * (device memory), one block per row; rows m >= *n_dev (device int; NULL: M) are skipped.
 * workspace: epd_cu_sample_workspace(M, V) bytes. */
size_t epd_cu_sample_workspace(int M, int V);
int epd_cu_sample(int32_t *next, const float *logits, const epd_sample_params_t *params, int M,
                  int V, const int32_t *n_dev, void *workspace, epd_stream_t stream);

/* ---- conversions (norm.cu) ---------------------------------------------------------------- */

/* dst[i] = bf16(src[i]) (round to nearest even) for n values. */
int epd_cu_f32_to_bf16(uint16_t *dst, const float *src, size_t n, epd_stream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* EPD_CUDA_OPS_H */
