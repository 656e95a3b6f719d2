/* Weighted sum of bf16 rows into one bf16 row (reference twin of the combine reduction).
 *
 * out[h] = bf16( sum_{i=0}^{n-1} w[i] * float(rows[i][h]) ), accumulated in fp32 in the order
 * i = 0..n-1 (acc = acc + w*y, a multiply then an add, never fused), rounded once. w == NULL
 * means every weight is 1 (the sum is then a plain sum of the rows). n == 0 gives +0.
 * LL combine calls it with the token's top-k slots in slot order (skipping -1); HT combine
 * with the copies in source-rank order.
 */
#ifndef EP_WEIGHTED_SUM_REF_H
#define EP_WEIGHTED_SUM_REF_H

#include <stdint.h>

/* rows: n pointers to [H] bf16; w: [n] or NULL; out: [H] bf16 */
void ep_weighted_sum_bf16_ref(const uint16_t *const *rows, const float *w, int n, int hidden,
                              uint16_t *out);

#endif /* EP_WEIGHTED_SUM_REF_H */
