/* Rotary position embedding: inverse frequencies (plain, or YaRN as transformers computes them)
 * and the rotation, rotate-half pairing (i, i + d/2) or interleaved pairing (2i, 2i + 1). */
#include "ops.h"

#include <math.h>

void epd_rope_inv_freq(float *inv_freq, int head_dim, double theta)
{
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = (float)(1.0 / pow(theta, (double)(2 * i) / head_dim));
}

void epd_rope_yarn_inv_freq(float *inv_freq, int dim, double theta, double factor,
                            int original_max_pos, double beta_fast, double beta_slow, int truncate)
{
    /* the dimension at which a frequency turns `rot` times over the original context */
    double lo = dim * log(original_max_pos / (beta_fast * 2 * M_PI)) / (2 * log(theta));
    double hi = dim * log(original_max_pos / (beta_slow * 2 * M_PI)) / (2 * log(theta));
    if (truncate) {
        lo = floor(lo);
        hi = ceil(hi);
    }
    if (lo < 0) lo = 0;
    if (hi > dim - 1) hi = dim - 1;
    if (lo == hi) hi += 0.001;
    for (int i = 0; i < dim / 2; i++) {
        /* fp32 throughout, as transformers' torch computation */
        float pos_freq = powf((float)theta, (float)(2 * i) / (float)dim);
        float ramp = ((float)i - (float)lo) / (float)(hi - lo);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float extra = 1.0f - ramp; /* weight of the unscaled (extrapolated) frequency */
        inv_freq[i] =
            (1.0f / ((float)factor * pos_freq)) * (1.0f - extra) + (1.0f / pos_freq) * extra;
    }
}

void epd_rope_rotate(float *x, const int32_t *pos, int rows, int heads, size_t row_stride,
                     size_t head_stride, int dim, const float *inv_freq, float scale,
                     int interleave)
{
    int half = dim / 2;
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < half; i++) {
            /* the angle is an fp32 product, as transformers computes it */
            float ang = (float)pos[r] * inv_freq[i];
            float c = (float)cos((double)ang) * scale, s = (float)sin((double)ang) * scale;
            int ia = interleave ? 2 * i : i, ib = interleave ? 2 * i + 1 : i + half;
            for (int h = 0; h < heads; h++) {
                float *xh = x + (size_t)r * row_stride + (size_t)h * head_stride;
                float a = xh[ia], b = xh[ib];
                xh[ia] = a * c - b * s;
                xh[ib] = b * c + a * s;
            }
        }
    }
}

void epd_rope_apply(float *x, const int32_t *pos, int rows, int heads, int head_dim,
                    const float *inv_freq)
{
    epd_rope_rotate(x, pos, rows, heads, (size_t)heads * head_dim, (size_t)head_dim, head_dim,
                    inv_freq, 1.0f, 0);
}
