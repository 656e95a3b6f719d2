/* fp8 e4m3 decoding; the bf16 conversions and the fp8 encoder are inline in numeric_ref.h. */
#include "numeric_ref.h"

#include <math.h>

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
