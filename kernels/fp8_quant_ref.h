/* Per-128-channel fp8 e4m3 quantisation of one bf16 row (reference twin of the cast the LL
 * dispatch kernel applies on the sender).
 *
 * For each block of EP_FP8_BLOCK channels of x (bf16 values read exactly as floats):
 *   amax  = max(|x_i|) over the block, floored at EP_FP8_AMAX_FLOOR
 *   scale = amax / 448.0f                      (IEEE fp32 division, round to nearest)
 *   round_scale: scale = 2^ceil(log2(scale))  (exact: bump the exponent if any mantissa bit)
 *   q_i   = fp8_e4m3_satfinite(x_i / scale)   (IEEE fp32 division, then numeric_ref's cast)
 * and x_i ~= float(q_i) * scale. The divisions are correctly rounded divisions, not
 * multiplications by a reciprocal: a CUDA kernel must use __fdiv_rn (or '/' without
 * fast-math) to reproduce the bytes exactly.
 */
#ifndef EP_FP8_QUANT_REF_H
#define EP_FP8_QUANT_REF_H

#include <stdint.h>

#define EP_FP8_AMAX_FLOOR 1e-4f

/* x: [H] bf16, H a multiple of 128 -> q: [H] e4m3, scales: [H/128] fp32 */
void ep_fp8_quant_row_ref(const uint16_t *x, int hidden, int round_scale, uint8_t *q,
                          float *scales);

/* The scale of one block whose absolute maximum is amax (before the floor). */
float ep_fp8_block_scale_ref(float amax, int round_scale);

#endif /* EP_FP8_QUANT_REF_H */
