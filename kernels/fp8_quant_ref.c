/* Per-128-channel fp8 e4m3 quantisation of bf16 rows (formula in fp8_quant_ref.h). */
#include "fp8_quant_ref.h"

#include "ep.h"
#include "numeric_ref.h"

#include <math.h>
#include <string.h>

float ep_fp8_block_scale_ref(float amax, int round_scale)
{
    if (!(amax >= EP_FP8_AMAX_FLOOR)) amax = EP_FP8_AMAX_FLOOR;
    float scale = amax / EP_FP8_E4M3_MAX;
    if (round_scale) {
        uint32_t u;
        memcpy(&u, &scale, sizeof u);
        /* scale >= 1e-4/448 is a positive normal: the next power of two up is the exponent
         * plus one whenever a mantissa bit is set. */
        if (u & 0x7fffffu) u = (u & 0xff800000u) + 0x800000u;
        memcpy(&scale, &u, sizeof u);
    }
    return scale;
}

void ep_fp8_quant_row_ref(const uint16_t *x, int hidden, int round_scale, uint8_t *q, float *scales)
{
    for (int b = 0; b < hidden / EP_FP8_BLOCK; b++) {
        const uint16_t *xb = x + (size_t)b * EP_FP8_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < EP_FP8_BLOCK; i++) {
            float a = fabsf(ep_bf16_to_float(xb[i]));
            if (a > amax) amax = a;
        }
        float scale = ep_fp8_block_scale_ref(amax, round_scale);
        scales[b] = scale;
        for (int i = 0; i < EP_FP8_BLOCK; i++)
            q[(size_t)b * EP_FP8_BLOCK + i] = ep_float_to_fp8_e4m3(ep_bf16_to_float(xb[i]) / scale);
    }
}
