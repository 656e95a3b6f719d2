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
#include <string.h>

#define EP_FP8_E4M3_MAX 448.0f

float ep_fp8_e4m3_to_float(uint8_t v);

/* The conversions on hot paths are inline (they run per element in the cpu backend). */
static inline uint32_t ep_ref_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float ep_ref_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float ep_bf16_to_float(uint16_t v)
{
    return ep_ref_u2f((uint32_t)v << 16);
}

static inline uint16_t ep_float_to_bf16(float f)
{
    uint32_t u = ep_ref_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    /* Round to nearest even on the 16 dropped bits; a carry into the exponent is the correct
     * result (up to infinity). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint8_t ep_float_to_fp8_e4m3(float f)
{
    uint32_t u = ep_ref_f2u(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t abs = u & 0x7fffffffu;

    if (abs > 0x7f800000u) return 0x7f;
    /* Anything at or above 448 (0x43e00000), infinity included, saturates. */
    if (abs >= 0x43e00000u) return sign | 0x7e;

    int fexp = (int)(abs >> 23); /* biased by 127 */
    uint32_t mant = abs & 0x7fffffu;
    if (fexp >= 121) {
        /* Normal in e4m3 (2^-6 and up): keep 3 of the 23 mantissa bits, round to nearest even
         * on the 20 dropped ones; the carry may bump the exponent (still <= 448 here). */
        uint32_t v = ((uint32_t)(fexp - 120) << 3) | (mant >> 20);
        uint32_t rem = mant & 0xfffffu;
        if (rem > 0x80000u || (rem == 0x80000u && (v & 1u))) v++;
        return sign | (uint8_t)v;
    }
    /* Subnormal in e4m3: value = m * 2^-9 with m = 0..7 (m = 8 is the smallest normal).
     * The float is (2^23 + mant) * 2^(fexp - 150) (fexp 0: mant * 2^-149). */
    if (fexp == 0) return sign; /* float subnormals are far below half of 2^-9 */
    uint64_t sig = (1ull << 23) | mant;
    int shift = 141 - fexp; /* sig * 2^(fexp-150) / 2^-9 = sig >> (141 - fexp) */
    if (shift >= 64) return sign;
    uint64_t m = sig >> shift;
    uint64_t rem = sig & ((1ull << shift) - 1);
    uint64_t half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (m & 1u))) m++;
    return sign | (uint8_t)m;
}

#endif /* EP_NUMERIC_REF_H */
