/* Weighted fp32 sum of bf16 rows, rounded once to bf16 (order in weighted_sum_ref.h). */
#include "weighted_sum_ref.h"

#include "numeric_ref.h"

#include <stddef.h>

void ep_weighted_sum_bf16_ref(const uint16_t *const *rows, const float *w, int n, int hidden,
                              uint16_t *out)
{
    for (int h = 0; h < hidden; h++) {
        float acc = 0.0f;
        for (int i = 0; i < n; i++) {
            float y = ep_bf16_to_float(rows[i][h]);
            if (w) {
                float p = w[i] * y;
                acc = acc + p;
            } else {
                acc = acc + y;
            }
        }
        out[h] = ep_float_to_bf16(acc);
    }
}
