/* Plain-C reference twins of the attention kernels (attention.cu): the q/k norm + RoPE + paged
 * bf16 KV store, and a batch wrapper of epd_attention_paged (model/attention.c) with the GPU
 * launcher's argument conventions. Layouts as in cuda_ops.h; bf16 values are uint16_t bits. */
#ifndef EPD_ATTENTION_REF_H
#define EPD_ATTENTION_REF_H

#include <stddef.h>
#include <stdint.h>

/* Largest head dim the twins (and the kernels) take. */
#define EPD_ATTN_MAX_HD 256

/* Twin of epd_cu_qk_norm_rope_store. qkv: fp32 [T][(nh + 2 nkv) hd]; per token t, each q and k
 * head is epd_rmsnorm'ed over hd (q_norm / k_norm fp32 [hd], eps), then epd_rope_apply'ed at
 * pos[t] (inv_freq [hd/2]); q -> q_out fp32 [T][nh][hd]; k (normed, rotated) and v (as is) ->
 * bf16 (round to nearest even) at row slot[t] of k_cache / v_cache [rows][nkv][hd] (slot < 0:
 * not stored). Returns 0, or -1 for a shape the kernel rejects (hd odd or > EPD_ATTN_MAX_HD,
 * nh or nkv < 1, T < 0). */
int epd_qk_norm_rope_store_ref(const float *qkv, const float *q_norm, const float *k_norm,
                               const float *inv_freq, const int32_t *pos, const int32_t *slot,
                               int T, int nh, int nkv, int hd, float eps, float *q_out,
                               uint16_t *k_cache, uint16_t *v_cache);

/* Twin of epd_cu_attention on fp32 pools (widen the bf16 caches first): for each token t,
 * out[t] = epd_attention_paged(q[t]) over blocks block_table[seq_idx[t]] (int32 [S][max_blocks])
 * and len = min(pos[t] + 1, max_len) positions, where max_len = split_len * max_splits of the
 * kernel call. Tokens with seq_idx < 0 or len < 1 get zeros (the kernel's padding rows).
 * q: fp32 [T][nh][hd]; out: fp32 [T][nh * hd] (the kernel rounds it to bf16); k_pool, v_pool:
 * fp32 [num_blocks][block_size][nkv][hd]; scores: scratch [max_len]. */
void epd_attention_ref(float *out, const float *q, const float *k_pool, const float *v_pool,
                       const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                       const int32_t *pos, int T, int nh, int nkv, int hd, int block_size,
                       int max_len, float *scores);

/* dst[i] = fp32(src[i]) for n bf16 values (the kernels read the cache this way). */
void epd_bf16_widen(float *dst, const uint16_t *src, size_t n);

#endif /* EPD_ATTENTION_REF_H */
