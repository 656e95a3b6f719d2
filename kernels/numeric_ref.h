/* Scalar number formats of libep, bit-exact with CUDA's own conversions (reference twins).
 *
 *  bf16 <- float: __float2bfloat16 (cvt.rn.bf16.f32): round to nearest even; every NaN becomes
 *                 the canonical 0x7fff; overflow rounds to +-inf as IEEE says.
 *  fp8 e4m3 <- float: __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)
 *                 (cvt.rn.satfinite.e4m3x2.f32): round to nearest even, magnitudes beyond 448
 *                 (infinities included) saturate to +-448, NaN becomes 0x7f, the sign of zero
 *                 and of results that underflow to zero is kept.
 *  float <- bf16 / fp8: exact.
 */
#ifndef EP_NUMERIC_REF_H
#define EP_NUMERIC_REF_H

#include <stdint.h>

#define EP_FP8_E4M3_MAX 448.0f

float ep_bf16_to_float(uint16_t v);
uint16_t ep_float_to_bf16(float f);
float ep_fp8_e4m3_to_float(uint8_t v);
uint8_t ep_float_to_fp8_e4m3(float f);

#endif /* EP_NUMERIC_REF_H */
