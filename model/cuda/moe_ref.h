/* Plain-C twins of the MoE kernels of moe.cu (cuda_ops.h, "MoE"): the same arguments (host
 * memory, no stream), the same semantics, fp32 math and the same bf16 rounding points (act and
 * y rounded to bf16; the combine's sum in fp32). Each returns 0, or -EINVAL for a shape the
 * kernel refuses too. */
#ifndef EPD_MOE_REF_H
#define EPD_MOE_REF_H

#include <stdint.h>

/* topk_idx [T][k], topk_w [T][k]: rows t >= *n_valid (NULL: all valid) and ids outside 0..E-1
 * become id -1, weight 0; the other ids are counted into expert_tokens[E] (may be NULL) and
 * mapped through slot_of[E] (NULL: identity). */
int epd_ref_route_fixup(int32_t *topk_idx, float *topk_w, int T, int k, int E,
                        const int32_t *n_valid, const int32_t *slot_of,
                        unsigned long long *expert_tokens);

/* counts[E], offsets[E] (exclusive prefix sum), row_of[T][k] (-1 for ids -1), packed[row][H] =
 * x[t][H] (bf16). The twin orders an expert's rows by (t, j); the kernel's order is arbitrary. */
int epd_ref_moe_local_dispatch(uint16_t *packed, int32_t *counts, int32_t *offsets, int32_t *row_of,
                               const uint16_t *x, const int32_t *topk_idx, int T, int k, int E,
                               int H);

/* h[t][c] += sum over j ascending (row_of[t][j] >= 0) of topk_w[t][j] * y[row][c], in fp32. */
int epd_ref_moe_local_combine(float *h, const uint16_t *y, const int32_t *row_of,
                              const float *topk_w, int T, int k, int H);

/* act[row][i] = bf16(silu(g) * u), g = x[row] . w_gate_up[l][i], u = x[row] . w_gate_up[l][I+i];
 * x bf16 [rows][H] (x_scales NULL) or e4m3 [rows][H] with x_scales [rows][H/128], the value
 * being e4m3(q) * scale. Rows: counts[l] (clamped to 0..max_rows) from offsets[l] or l * stride. */
int epd_ref_expert_gate_up(uint16_t *act, const void *x, const float *x_scales,
                           const int32_t *counts, const int32_t *offsets, int stride,
                           const uint16_t *w_gate_up, int L, int H, int I, int max_rows);

/* y[row][c] = bf16(act[row] . w_down[l][c]), w_down [L][H][I]. */
int epd_ref_expert_down(uint16_t *y, const uint16_t *act, const int32_t *counts,
                        const int32_t *offsets, int stride, const uint16_t *w_down, int L, int H,
                        int I, int max_rows);

/* The fp8-weight forms (epd_cu_expert_gate_up_w8 / _down_w8; layouts in cuda_ops.h): per
 * output, the sum over each block of bk channels of x * e4m3(q) in fp32, times the block's
 * scale, summed over the blocks in order. bk a multiple of 32, as the kernels need. */
int epd_ref_expert_gate_up_w8(uint16_t *act, const void *x, const float *x_scales,
                              const int32_t *counts, const int32_t *offsets, int stride,
                              const uint8_t *w8_gate_up, const float *w_scales, int bn, int bk,
                              int L, int H, int I, int max_rows);
int epd_ref_expert_down_w8(uint16_t *y, const uint16_t *act, const int32_t *counts,
                           const int32_t *offsets, int stride, const uint8_t *w8_down,
                           const float *w_scales, int bn, int bk, int L, int H, int I,
                           int max_rows);

#endif /* EPD_MOE_REF_H */
