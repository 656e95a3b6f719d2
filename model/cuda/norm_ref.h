/* Plain-C reference twins of norm.cu's kernels (cuda_ops.h, "embedding, norms, activations"):
 * same arguments, host memory, same layouts. fp32 -> bf16 is epd_f32_to_bf16 (model/ops.h);
 * sampling's twin is epd_sample_ref (model/include/sample.h). */
#ifndef EPD_NORM_REF_H
#define EPD_NORM_REF_H

#include <stdint.h>

/* h[t][:] = fp32(emb[tokens[t]][:]) for t < T; emb [V][H] bf16, h [T][H]. */
void epd_embed_ref(float *h, const uint16_t *emb, const int32_t *tokens, int T, int H);

/* If delta != NULL, h[t] += fp32(delta[t]) (bf16 [T][H]); then epd_rmsnorm of the row with w
 * [H] into out_f32 [T][H] and/or bf16(...) into out_bf16 [T][H] (either NULL). scratch: [H]
 * floats. */
void epd_add_rmsnorm_ref(float *h, const uint16_t *delta, const float *w, float eps, int T, int H,
                         float *out_f32, uint16_t *out_bf16, float *scratch);

/* act[t][i] = bf16(silu(gu[t][i]) * gu[t][I + i]), silu(g) * u written as swiglu.c does:
 * g / (1 + expf(-g)) * u. gu fp32 [T][2I], act bf16 [T][I]. */
void epd_silu_mul_ref(uint16_t *act, const float *gu, int T, int I);

/* dst[i][:] = src[rows[i]][:] for i < n; fp32 rows of `cols` values. */
void epd_gather_rows_ref(float *dst, const float *src, const int32_t *rows, int n, int cols);

#endif /* EPD_NORM_REF_H */
