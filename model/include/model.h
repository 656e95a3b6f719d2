/* The model interface the serving engine drives, the same for every implementation: the fp32
 * plain-C model (qwen3_moe.c, the reference) and the CUDA model (model/cuda/, bf16 on one GPU
 * per rank). One rank of an expert-parallel group: replicated weights plus this rank's experts,
 * a paged KV cache (a pool of fixed-size blocks; a sequence holds a block table) and the
 * batched forward step, whose MoE layers are collective exchanges through libep.
 *
 * Lockstep: every rank of the EP group calls epd_model_forward_step the same number of times
 * (a rank without work passes zero items), since each MoE layer is a collective exchange, and
 * every rank takes the same path (LL or HT) in each call.
 *
 * Threads: a model and its sequences belong to the thread that calls the forward. */
#ifndef EPD_MODEL_H
#define EPD_MODEL_H

#include "ep.h"
#include "hf_config.h"
#include "epd_err.h"
#include "placement.h"
#include "sample.h"

#include <stddef.h>
#include <stdint.h>

typedef struct epd_model epd_model_t;
typedef struct epd_seq epd_seq_t;

typedef enum epd_model_backend {
    EPD_MODEL_CPU = 0,  /* fp32 plain C on the host */
    EPD_MODEL_CUDA = 1, /* bf16 weights and KV on one GPU; EPD_ERR ENOTSUP if built without */
} epd_model_backend_t;

/* Tokens per KV block unless the options say otherwise. */
#define EPD_KV_BLOCK_DEFAULT 16

typedef struct epd_model_opts {
    const char *dir;                        /* checkpoint directory: config.json + *.safetensors */
    ep_group_t *group;                      /* this rank's EP group (see epd_model_ep_config) */
    const epd_model_placement_t *placement; /* NULL: contiguous */
    int max_seq_len;                        /* longest sequence (0: max_position_embeddings) */
    /* epd_model_forward_step takes HT when the step's largest rank batch has at least this many
     * tokens (0: ll_max_tokens + 1, i.e. only when LL cannot carry it). Same on every rank. */
    int ht_min_tokens;
    epd_model_backend_t backend;
    int device;        /* cuda: device ordinal of this rank's GPU */
    int max_seqs;      /* sequences a step may carry at once on this rank (0: 64) */
    int kv_block_size; /* tokens per KV block (0: EPD_KV_BLOCK_DEFAULT) */
    /* KV pool size. cpu: kv_blocks (0: enough for max_seqs sequences of max_seq_len; host
     * memory is taken block by block as sequences grow). cuda: kv_blocks if > 0, else what is
     * left of this rank's share of the GPU, kv_memory_fraction (0: 0.9) of its total memory
     * divided among the gpu_share ranks that use it (0: 1), once its weights and workspace are
     * counted (and never more than is free). */
    int kv_blocks;
    double kv_memory_fraction;
    int gpu_share;
    int fp8_dispatch; /* cuda, LL: send activations as fp8 e4m3 (+ scales), else bf16 */
    int no_graphs;    /* cuda: run decode steps eagerly instead of replaying CUDA graphs */
    /* Load progress (may be NULL): called from the loading thread as bytes of weights land. */
    void (*progress)(void *arg, uint64_t done_bytes, uint64_t total_bytes);
    void *progress_arg;
} epd_model_opts_t;

/* Bytes one rank holds, on the host (cpu) or the GPU (cuda). */
typedef struct epd_model_mem {
    size_t replicated_bytes; /* embeddings, attention, norms, routers, dense MLPs, lm_head */
    size_t expert_bytes;     /* this rank's experts, all MoE layers */
    size_t kv_bytes;         /* the KV pool (cpu: what is allocated so far) */
    size_t workspace_bytes;  /* activations, scratch, graphs' buffers */
    int local_experts;       /* experts per MoE layer on this rank */
    int kv_blocks_total, kv_blocks_free, kv_block_size;
    size_t kv_block_bytes; /* one block, all layers, K and V */
} epd_model_mem_t;

/* What a rank of an R-rank group will hold in weights (no checkpoint needed): fp32 for cpu,
 * bf16 (routers fp32) for cuda. Exact: the loaders count the same table (tensors.h). */
void epd_model_mem_estimate(const epd_hf_config_t *cfg, int nranks, epd_model_backend_t backend,
                            epd_model_mem_t *mem);

/* Fills the model-dependent fields of an EP config (experts, hidden, top-k, LL and HT bounds):
 * the caller sets backend, transport, timeout and creates the group from it. max_batch_tokens
 * is the per-rank bound on the tokens of an LL (decode-sized) step; max_prefill_tokens that of
 * an HT (prefill-sized) step, HT off (ht_max_tokens 0) unless it exceeds max_batch_tokens. */
void epd_model_ep_config(const epd_hf_config_t *cfg, int max_batch_tokens, int max_prefill_tokens,
                         ep_config_t *ep);

/* Loads config.json and this rank's weights (group rank, group size). */
int epd_model_load(const epd_model_opts_t *opts, epd_model_t **out, epd_err_t *err);
void epd_model_destroy(epd_model_t *m);
epd_model_backend_t epd_model_backend(const epd_model_t *m);
const epd_hf_config_t *epd_model_config(const epd_model_t *m);
void epd_model_mem(const epd_model_t *m, epd_model_mem_t *mem);
/* Tokens an LL step may carry on this rank (the group's ll_max_tokens). */
int epd_model_max_batch_tokens(const epd_model_t *m);
/* Tokens an HT step may carry on this rank (the group's ht_max_tokens), or the LL bound when
 * the group has HT off: the most one forward call can take. */
int epd_model_max_prefill_tokens(const epd_model_t *m);
int epd_model_max_seqs(const epd_model_t *m);

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

/* ---- paged KV cache ------------------------------------------------------------------------
 * One pool of blocks of kv_block_size positions per rank. A sequence takes blocks as it grows
 * (epd_model_forward_step reserves them) and gives them back when destroyed or truncated. */
int epd_model_kv_blocks_free(const epd_model_t *m);
int epd_model_kv_blocks_total(const epd_model_t *m);
int epd_model_kv_block_size(const epd_model_t *m);
/* Blocks a sequence of len positions holds: ceil(len / block size). */
int epd_model_kv_blocks_for(const epd_model_t *m, int len);

int epd_seq_create(epd_model_t *m, epd_seq_t **out, epd_err_t *err);
/* Gives the sequence's blocks back to the pool. */
void epd_seq_destroy(epd_seq_t *s);
int epd_seq_len(const epd_seq_t *s);
/* Forgets the tokens from position len on (len <= current length); whole blocks past it go back
 * to the pool. */
void epd_seq_truncate(epd_seq_t *s, int len);
/* Blocks the sequence holds, and their bytes. */
int epd_seq_blocks(const epd_seq_t *s);
size_t epd_seq_bytes(const epd_seq_t *s);

/* ---- the step ---------------------------------------------------------------------------- */

typedef struct epd_batch_item {
    epd_seq_t *seq;             /* tokens are appended at positions seq len .. */
    const int32_t *tokens;      /* [num_tokens] */
    int num_tokens;             /* >= 1 */
    int want_logits;            /* sample the token after this item's last one */
    epd_sample_params_t sample; /* want_logits: how (sample.h) */
} epd_batch_item_t;

/* One step of this rank: runs n items (n may be 0) through the model, appends them to their
 * sequences (reserving KV blocks) and samples the next token of every item with want_logits:
 * next[m] for the m such items, in item order. logits (may be NULL): [m][vocab] fp32 as well
 * (the cuda model copies them to the host only when asked: tests, not serving).
 *
 * On failure no sequence grows. -ENOSPC: the KV pool has too few free blocks for this batch
 * (the message says how many it needs and has; the caller frees some and retries). A failure
 * of the EP exchange (a timeout, a peer gone, an aborted group, data libep should not have
 * delivered) is EPD_EEXCHANGE (epd_err.h) and leaves the group in the state libep reports (the
 * caller aborts the step on every rank and re-forms the group); no other status means that. Bad
 * input on this rank (too many tokens for the step's path or the model's max_seqs, an id outside
 * the vocabulary, a sequence past max_seq_len, no KV room) still joins the step's exchanges with
 * zero tokens and is returned afterwards.
 *
 * step_max_tokens is the largest token count any rank of the group passes in this step, the
 * same number on every rank: it picks the path (epd_model_step_path) identically everywhere.
 * This rank's tokens must not exceed it, nor the path's bound. */
int epd_model_forward_step(epd_model_t *m, const epd_batch_item_t *items, int n,
                           int step_max_tokens, int32_t *next, float *logits, epd_err_t *err);
/* The same on the LL path whatever the batch sizes (tokens at most max_batch_tokens): for
 * callers whose every rank always calls this one. */
int epd_model_forward(epd_model_t *m, const epd_batch_item_t *items, int n, int32_t *next,
                      float *logits, epd_err_t *err);

#endif /* EPD_MODEL_H */
