/* bf16 and fp8 e4m3 conversions, bit-exact with CUDA's (see numeric_ref.h). */
#include "numeric_ref.h"

#include <math.h>
#include <string.h>

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float ep_bf16_to_float(uint16_t v)
{
    return u2f((uint32_t)v << 16);
}

uint16_t ep_float_to_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    /* Round to nearest even on the 16 dropped bits; a carry into the exponent is the correct
     * result (up to infinity). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float ep_fp8_e4m3_to_float(uint8_t v)
{
    int sign = v >> 7;
    int exp = (v >> 3) & 0xf;
    int man = v & 0x7;
    float mag;
    if (exp == 0xf && man == 0x7) return NAN;
    if (exp == 0)
        mag = ldexpf((float)man, -9); /* subnormal: man * 2^-6 / 8 */
    else
        mag = ldexpf((float)(8 + man), exp - 10); /* (1 + man/8) * 2^(exp-7) */
    return sign ? -mag : mag;
}

uint8_t ep_float_to_fp8_e4m3(float f)
{
    uint32_t u = f2u(f);
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
