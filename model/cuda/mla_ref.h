/* Plain-C reference twins of the MLA kernels (mla.cu) and of the GEMMs around them in the
 * CUDA forward: the latent store, the latent attention, the absorption of q and of the output
 * through kv_b, and the expanded form (keys and values per head) that prefill computes. Layouts
 * as in cuda_ops.h; bf16 values are uint16_t bits; caches widened to fp32 where named so. */
#ifndef EPD_MLA_REF_H
#define EPD_MLA_REF_H

#include <stddef.h>
#include <stdint.h>

/* Twin of epd_cu_mla_rope_store: per token t, q's rope part of every head rotated in place by
 * epd_rope_rotate (cos and sin times rope_scale; interleaved pairs when interleave); kv's latent
 * epd_rmsnorm'ed over kvl (kv_norm, eps) and its key part rotated alike, both rounded to bf16 into
 * row slot[t] of cache [rows][kvl + rope] (slot < 0: not stored). Returns 0, or -1 for a shape
 * the kernel rejects (rope odd, < 2 or > 256, nh < 1, kvl < 1, T < 0). */
int epd_mla_rope_store_ref(float *q, const float *kv, const float *kv_norm, const float *inv_freq,
                           float rope_scale, int interleave, const int32_t *pos,
                           const int32_t *slot, int T, int nh, int nope, int rope, int kvl,
                           float eps, uint16_t *cache);

/* Twin of epd_cu_mla_attention on an fp32 cache [rows][kvl + rope] (widen the bf16 one): for
 * token t of sequence seq_idx[t] (blocks block_table[seq_idx[t]], int32 [S][max_blocks]) over
 * len = min(pos[t] + 1, max_len) positions, per head h: s_j = (q_lat[t][h] . lat_j + q_pe(t, h) .
 * pe_j) * scale, o_lat[t][h] = sum_j softmax(s)_j lat_j (fp32 [T][nh][kvl]; the kernel rounds it to
 * bf16). q_pe(t, h) = q_pe + (t * nh + h) * pe_stride. Tokens with seq_idx < 0 get zeros.
 * scores: scratch [max_len]. */
void epd_mla_latent_ref(float *o_lat, const float *q_lat, const float *q_pe, int pe_stride,
                        const float *cache, const int32_t *block_table, int max_blocks,
                        const int32_t *seq_idx, const int32_t *pos, int T, int nh, int kvl,
                        int rope, float scale, int block_size, int max_len, float *scores);

/* The absorption (cuda_forward.c's batched GEMM over heads): q_lat[t][h][c] = sum_i
 * q[t][h][i] kv_b[h][i][c] for i < nope, c < kvl. q: fp32 [T][nh][nope + rope]; kv_b: fp32
 * [nh][nope + vd][kvl]; q_lat: fp32 [T][nh][kvl]. */
void epd_mla_absorb_q_ref(float *q_lat, const float *q, const float *kv_b, int T, int nh, int nope,
                          int rope, int kvl, int vd);
/* The output's (the second batched GEMM): out[t][h][d] = sum_c kv_b[h][nope + d][c]
 * o_lat[t][h][c]; out fp32 [T][nh * vd]. */
void epd_mla_absorb_out_ref(float *out, const float *o_lat, const float *kv_b, int T, int nh,
                            int nope, int kvl, int vd);

/* The expanded form (prefill's path): per token t and head h, keys k_j = (kv_b[h][:nope] lat_j,
 * pe_j) and values v_j = kv_b[h][nope:] lat_j for the positions j < len of its sequence (len as
 * above); out[t][h] = sum_j softmax((q[t][h] . k_j) * scale)_j v_j, fp32 [T][nh * vd]. q: fp32
 * [T][nh][nope + rope] (rope part rotated); cache: fp32 [rows][kvl + rope]. scratch:
 * [max_len * (nope + 1 + vd)]. Mathematically equal to the absorbed form. */
void epd_mla_expanded_ref(float *out, const float *q, const float *cache, const float *kv_b,
                          const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                          const int32_t *pos, int T, int nh, int nope, int rope, int kvl, int vd,
                          float scale, int block_size, int max_len, float *scratch);

#endif /* EPD_MLA_REF_H */
