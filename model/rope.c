/* Rotary position embedding (default RoPE, no scaling), rotate-half pairing (i, i + hd/2). */
#include "ops.h"

#include <math.h>

void epd_rope_inv_freq(float *inv_freq, int head_dim, double theta)
{
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = (float)(1.0 / pow(theta, (double)(2 * i) / head_dim));
}

void epd_rope_apply(float *x, const int32_t *pos, int rows, int heads, int head_dim,
                    const float *inv_freq)
{
    int half = head_dim / 2;
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < half; i++) {
            /* the angle is an fp32 product, as transformers computes it */
            float ang = (float)pos[r] * inv_freq[i];
            float c = (float)cos((double)ang), s = (float)sin((double)ang);
            for (int h = 0; h < heads; h++) {
                float *xh = x + ((size_t)r * heads + h) * head_dim;
                float a = xh[i], b = xh[i + half];
                xh[i] = a * c - b * s;
                xh[i + half] = b * c + a * s;
            }
        }
    }
}
