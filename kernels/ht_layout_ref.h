/* HT dispatch layout: where each token goes (reference twin of the layout kernel).
 *
 * topk_idx: [T][k] global expert ids, -1 = none. With L = E / R experts per rank:
 *   num_tokens_per_expert[e] = tokens with e among their ids
 *   is_token_in_rank[t][r]   = 1 if any id of t lives on rank r (e / L == r), else 0
 *   num_tokens_per_rank[r]   = sum_t is_token_in_rank[t][r] (a token counts once per rank)
 * Any output may be NULL. Ids are assumed valid (checked by the caller).
 */
#ifndef EP_HT_LAYOUT_REF_H
#define EP_HT_LAYOUT_REF_H

#include <stdint.h>

void ep_ht_layout_ref(const int32_t *topk_idx, int num_tokens, int topk, int num_experts,
                      int num_ranks, int32_t *num_tokens_per_rank, int32_t *num_tokens_per_expert,
                      uint8_t *is_token_in_rank);

#endif /* EP_HT_LAYOUT_REF_H */
