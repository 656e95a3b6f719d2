/* Weighted fp32 sum of bf16 rows, rounded once to bf16 (order in weighted_sum_ref.h). */
#include "weighted_sum_ref.h"

#include "numeric_ref.h"

#include <stddef.h>

void ep_weighted_sum_bf16_ref(const uint16_t *const *rows, const float *w, int n, int hidden,
                              uint16_t *out)
{
    /* Blocks of channels keep the accumulators in registers; each channel still sees the rows
     * in order i = 0..n-1, so the bits are those of the plain loop. */
    enum { BLOCK = 256 };
    float acc[BLOCK];
    for (int h0 = 0; h0 < hidden; h0 += BLOCK) {
        int nb = hidden - h0 < BLOCK ? hidden - h0 : BLOCK;
        for (int h = 0; h < nb; h++)
            acc[h] = 0.0f;
        for (int i = 0; i < n; i++) {
            const uint16_t *y = rows[i] + h0;
            float wi = w ? w[i] : 1.0f;
            if (w) {
                for (int h = 0; h < nb; h++) {
                    float p = wi * ep_bf16_to_float(y[h]);
                    acc[h] = acc[h] + p;
                }
            } else {
                for (int h = 0; h < nb; h++)
                    acc[h] = acc[h] + ep_bf16_to_float(y[h]);
            }
        }
        for (int h = 0; h < nb; h++)
            out[h0 + h] = ep_float_to_bf16(acc[h]);
    }
}
