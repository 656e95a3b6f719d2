/* Linear layer without bias: y = x W^T, fp32, one dot product per output element. */
#include "ops.h"

void epd_linear(float *y, const float *x, const float *w, int rows, int in, int out)
{
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * in;
        float *yr = y + (size_t)r * out;
        for (int o = 0; o < out; o++) {
            const float *wo = w + (size_t)o * in;
            /* four partial sums: vectorisable, and a fixed order for every row count */
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int i = 0;
            for (; i + 4 <= in; i += 4) {
                s0 += xr[i] * wo[i];
                s1 += xr[i + 1] * wo[i + 1];
                s2 += xr[i + 2] * wo[i + 2];
                s3 += xr[i + 3] * wo[i + 3];
            }
            for (; i < in; i++)
                s0 += xr[i] * wo[i];
            yr[o] = (s0 + s1) + (s2 + s3);
        }
    }
}
