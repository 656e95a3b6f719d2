/* SwiGLU feed-forward (Qwen3 experts and dense MLP): down(silu(gate(x)) * up(x)). */
#include "ops.h"

#include <math.h>

void epd_swiglu(float *y, const float *x, const float *gate, const float *up, const float *down,
                int rows, int hidden, int inter, float *tmp)
{
    float *g = tmp, *u = tmp + inter;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * hidden;
        epd_linear(g, xr, gate, 1, hidden, inter);
        epd_linear(u, xr, up, 1, hidden, inter);
        for (int i = 0; i < inter; i++)
            g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        epd_linear(y + (size_t)r * hidden, g, down, 1, inter, hidden);
    }
}
