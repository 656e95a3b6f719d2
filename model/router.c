/* MoE router for Qwen3-MoE: softmax over all experts, top-k, optional renormalisation. */
#include "ops.h"

#include <math.h>

void epd_route_softmax_topk(const float *logits, int rows, int experts, int k, int renormalize,
                            int32_t *idx, float *weights)
{
    for (int r = 0; r < rows; r++) {
        const float *lr = logits + (size_t)r * experts;
        float mx = -INFINITY;
        for (int e = 0; e < experts; e++)
            if (lr[e] > mx)
                mx = lr[e];
        double sum = 0;
        for (int e = 0; e < experts; e++)
            sum += exp((double)lr[e] - mx);
        int32_t *ir = idx + (size_t)r * k;
        float *wr = weights + (size_t)r * k;
        /* selection on the logits (softmax is monotonic); strict > keeps the lower id on ties */
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < experts; e++) {
                int taken = 0;
                for (int p = 0; p < j; p++)
                    taken |= ir[p] == e;
                if (!taken && (best < 0 || lr[e] > lr[best]))
                    best = e;
            }
            ir[j] = best;
            wr[j] = (float)(exp((double)lr[best] - mx) / sum);
        }
        if (renormalize) {
            float s = 0;
            for (int j = 0; j < k; j++)
                s += wr[j];
            for (int j = 0; j < k; j++)
                wr[j] /= s;
        }
    }
}
