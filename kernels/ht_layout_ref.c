/* Tokens per rank, tokens per expert and the token-in-rank matrix of an HT dispatch. */
#include "ht_layout_ref.h"

#include <string.h>

void ep_ht_layout_ref(const int32_t *topk_idx, int num_tokens, int topk, int num_experts,
                      int num_ranks, int32_t *num_tokens_per_rank, int32_t *num_tokens_per_expert,
                      uint8_t *is_token_in_rank)
{
    int per_rank = num_experts / num_ranks;
    uint8_t in_rank[64 * 4]; /* EP_MAX_RANKS, with room to spare */
    if (num_tokens_per_rank) memset(num_tokens_per_rank, 0, sizeof(int32_t) * (size_t)num_ranks);
    if (num_tokens_per_expert)
        memset(num_tokens_per_expert, 0, sizeof(int32_t) * (size_t)num_experts);
    for (int t = 0; t < num_tokens; t++) {
        const int32_t *idx = topk_idx + (size_t)t * topk;
        memset(in_rank, 0, (size_t)num_ranks);
        for (int j = 0; j < topk; j++) {
            int e = idx[j];
            if (e < 0) continue;
            /* A repeated expert id counts once for its expert, like for its rank. */
            int dup = 0;
            for (int i = 0; i < j; i++)
                dup |= idx[i] == e;
            if (!dup && num_tokens_per_expert) num_tokens_per_expert[e]++;
            in_rank[e / per_rank] = 1;
        }
        for (int r = 0; r < num_ranks; r++) {
            if (is_token_in_rank) is_token_in_rank[(size_t)t * num_ranks + r] = in_rank[r];
            if (num_tokens_per_rank) num_tokens_per_rank[r] += in_rank[r];
        }
    }
}
