/* The Qwen3-MoE model of one rank: weights (fp32; replicated non-expert weights plus this
 * rank's experts), per-sequence KV caches and the batched forward pass, whose MoE blocks run
 * expert-parallel through libep: its low-latency (LL) dispatch/combine for decode-sized steps,
 * its high-throughput (HT) one for prefill-sized steps.
 *
 * Lockstep: every rank of the EP group calls the forward the same number of times (a rank
 * without work passes zero items), since each MoE layer is a collective exchange, and every
 * rank takes the same path (LL or HT) in each call. */
#ifndef EPD_QWEN3_MOE_H
#define EPD_QWEN3_MOE_H

#include "ep.h"
#include "hf_config.h"
#include "model_err.h"
#include "placement.h"

#include <stddef.h>
#include <stdint.h>

typedef struct epd_model epd_model_t;
typedef struct epd_seq epd_seq_t;

typedef struct epd_model_opts {
    const char *dir;                        /* checkpoint directory: config.json + *.safetensors */
    ep_group_t *group;                      /* this rank's EP group (see epd_model_ep_config) */
    const epd_model_placement_t *placement; /* NULL: contiguous */
    int max_seq_len;                        /* KV cache bound per sequence (0: the config's
                                               max_position_embeddings) */
    /* epd_model_forward_step takes HT when the step's largest rank batch has at least this many
     * tokens (0: ll_max_tokens + 1, i.e. only when LL cannot carry it). Same on every rank. */
    int ht_min_tokens;
} epd_model_opts_t;

/* Bytes of weights one rank holds, in fp32. */
typedef struct epd_model_mem {
    size_t replicated_bytes; /* embeddings, attention, norms, routers, dense MLPs, lm_head */
    size_t expert_bytes;     /* this rank's experts, all MoE layers */
    int local_experts;       /* experts per MoE layer on this rank */
} epd_model_mem_t;

/* What a rank of an R-rank group will hold for this config (no checkpoint needed). */
void epd_model_mem_estimate(const epd_hf_config_t *cfg, int nranks, epd_model_mem_t *mem);

/* Fills the model-dependent fields of an EP config (experts, hidden, top-k, LL and HT bounds):
 * the caller sets backend, transport, timeout and creates the group from it. max_batch_tokens
 * is the per-rank bound on the tokens of an LL (decode-sized) step; max_prefill_tokens that of
 * an HT (prefill-sized) step, HT off (ht_max_tokens 0) unless it exceeds max_batch_tokens. */
void epd_model_ep_config(const epd_hf_config_t *cfg, int max_batch_tokens, int max_prefill_tokens,
                         ep_config_t *ep);

/* Loads config.json and this rank's weights (group rank, group size). */
int epd_model_load(const epd_model_opts_t *opts, epd_model_t **out, epd_err_t *err);
void epd_model_destroy(epd_model_t *m);
const epd_hf_config_t *epd_model_config(const epd_model_t *m);
void epd_model_mem(const epd_model_t *m, epd_model_mem_t *mem);
/* Tokens an LL step may carry on this rank (the group's ll_max_tokens). */
int epd_model_max_batch_tokens(const epd_model_t *m);
/* Tokens an HT step may carry on this rank (the group's ht_max_tokens), or the LL bound when
 * the group has HT off: the most one forward call can take. */
int epd_model_max_prefill_tokens(const epd_model_t *m);

typedef enum epd_moe_path { EPD_MOE_LL = 0, EPD_MOE_HT = 1 } epd_moe_path_t;
/* The path epd_model_forward_step takes for a step whose largest rank batch is step_max_tokens:
 * HT if the group has it and step_max_tokens >= ht_min_tokens, else LL. */
epd_moe_path_t epd_model_step_path(const epd_model_t *m, int step_max_tokens);
/* Forward calls since the load that took each path: counts[EPD_MOE_LL], counts[EPD_MOE_HT]. */
void epd_model_path_counts(const epd_model_t *m, uint64_t counts[2]);
/* Replaces the EP group after the old one failed and was recreated (the caller destroys the
 * old one). The new group must have the same rank, size and configuration. */
int epd_model_set_group(epd_model_t *m, ep_group_t *group, epd_err_t *err);
/* Tokens this rank's routers sent to each expert since the load, summed over the MoE layers:
 * counts[num_experts], by global expert id. Read it from the thread that runs the forward. */
void epd_model_expert_tokens(const epd_model_t *m, uint64_t *counts);

/* A sequence: its KV cache ([layers][len][kv_heads][head_dim] keys and values) and length. */
int epd_seq_create(const epd_model_t *m, epd_seq_t **out, epd_err_t *err);
void epd_seq_destroy(epd_seq_t *s);
int epd_seq_len(const epd_seq_t *s);
/* Forgets the tokens from position len on (len <= current length). */
void epd_seq_truncate(epd_seq_t *s, int len);
size_t epd_seq_bytes(const epd_seq_t *s);

typedef struct epd_batch_item {
    epd_seq_t *seq;        /* tokens are appended at positions seq len .. */
    const int32_t *tokens; /* [num_tokens] */
    int num_tokens;        /* >= 1 */
    int want_logits;       /* write the logits of this item's last token */
} epd_batch_item_t;

/* One step of this rank: runs n items (n may be 0) through the model and appends them to
 * their sequences. logits: [m][vocab] for the m items with want_logits, in item order. On
 * failure no sequence grows; an EP failure leaves the group in the state libep reports (the
 * caller aborts the step on every rank). Bad input on this rank (too many tokens for the
 * step's path, an id outside the vocabulary, a full KV cache) still joins the step's exchanges
 * with zero tokens and is returned afterwards.
 *
 * step_max_tokens is the largest token count any rank of the group passes in this step, the
 * same number on every rank (the caller agrees on it, e.g. through its per-step control word):
 * it picks the path (epd_model_step_path) identically everywhere. This rank's tokens must not
 * exceed it, nor the path's bound (max_batch_tokens for LL, max_prefill_tokens for HT). */
int epd_model_forward_step(epd_model_t *m, const epd_batch_item_t *items, int n,
                           int step_max_tokens, float *logits, epd_err_t *err);
/* The same on the LL path whatever the batch sizes (tokens at most max_batch_tokens): for
 * callers whose every rank always calls this one. */
int epd_model_forward(epd_model_t *m, const epd_batch_item_t *items, int n, float *logits,
                      epd_err_t *err);

#endif /* EPD_QWEN3_MOE_H */
