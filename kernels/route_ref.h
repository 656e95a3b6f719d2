/* Router: logits -> top-k experts and weights (reference twin of the routing kernel).
 *
 * EP_ROUTE_SOFTMAX_TOPK (Qwen3-MoE, Mixtral): p = softmax(logits) in fp32 (max subtracted,
 *   expf, sum in expert order, p_e = e_e / sum); the k largest p (ties: lower expert id);
 *   renormalize: w_j = p_j / sum_j p_j (sum in slot order); then w_j *= routed_scaling_factor.
 * EP_ROUTE_SIGMOID_GROUP (DeepSeek-V3): s_e = 1 / (1 + expf(-logit_e)), b_e = s_e + bias[e]
 *   (bias NULL: 0). Experts split into num_groups consecutive groups; a group's score is the
 *   sum of its two largest b (its largest when a group has one expert); the topk_groups best
 *   groups are kept (ties: lower group id); the k largest b among their experts are chosen
 *   (ties: lower expert id); w_j = s of the chosen expert (unbiased); renormalize:
 *   w_j = w_j / (sum_j w_j + 1e-20f); then w_j *= routed_scaling_factor.
 * EP_ROUTE_SOFTMAX_GROUP (DeepSeek-V2 group_limited_greedy): p as for SOFTMAX_TOPK; a group's
 *   score is its largest p; the topk_groups best groups are kept (ties: lower group id); the k
 *   largest p among their experts are chosen; renormalize as SOFTMAX_TOPK; then the scaling.
 * Slots are filled in descending score order. Parameters are validated by the caller
 * (ep_route_host): 1 <= topk <= candidates, groups divide E.
 */
#ifndef EP_ROUTE_REF_H
#define EP_ROUTE_REF_H

#include "ep.h"

#include <stdint.h>

/* logits: [T][E] fp32 -> topk_idx: [T][k], topk_weights: [T][k]. Returns 0, or -1 when the
 * scratch for more than 512 experts cannot be allocated. */
int ep_route_ref(const ep_route_params_t *p, const float *logits, int num_tokens, int32_t *topk_idx,
                 float *topk_weights);

#endif /* EP_ROUTE_REF_H */
