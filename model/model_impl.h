/* What an implementation of the model interface (model.h) provides, and the flat step batch
 * that model.c builds from the engine's items and hands it. Not a public interface: model.c,
 * qwen3_moe.c (cpu) and model/cuda/cuda_model.c (cuda) share it.
 *
 * model.c owns what is the same for every implementation: the KV block pool (which blocks are
 * free, each sequence's block table), argument checks, the KV reservation of a step, the
 * sequence lengths, and the lockstep rule that a rank with bad input still joins the step with
 * zero tokens. An implementation owns weights, KV storage (indexed by block id) and compute. */
#ifndef EPD_MODEL_IMPL_H
#define EPD_MODEL_IMPL_H

#include "model.h"

/* One step of one rank, flattened: T tokens of S sequences. */
typedef struct epd_step {
    int num_tokens;             /* T (0: the rank joins the exchanges with nothing) */
    int step_max_tokens;        /* largest T of any rank this step */
    int path;                   /* epd_moe_path_t for the whole group */
    const int32_t *tokens;      /* [T] ids, checked to be < vocab */
    const int32_t *pos;         /* [T] position of each token in its sequence */
    const int32_t *seq_idx;     /* [T] its sequence, 0..S-1; a sequence's tokens are consecutive */
    int num_seqs;               /* S */
    const int32_t *seq_len;     /* [S] length after this step (the last token's pos + 1) */
    const int32_t *block_table; /* [S][max_blocks] KV block ids (rows valid up to their length) */
    int max_blocks;             /* row stride of block_table: ceil(max_seq_len / block size) */
    int num_logits;             /* M */
    const int32_t *logit_rows;  /* [M] token rows whose next token is wanted */
    const epd_sample_params_t *sample; /* [M] */
} epd_step_t;

typedef struct epd_model_ops {
    const char *name;
    void (*destroy)(void *impl);
    /* Sizes the KV storage for num_blocks blocks of block_size positions (called once, after
     * load; the cuda model picks num_blocks itself when *num_blocks is 0). */
    int (*kv_init)(void *impl, int block_size, int *num_blocks, epd_err_t *err);
    /* Runs one flat step: next[M] sampled tokens, logits[M][V] if not NULL. */
    int (*forward)(void *impl, const epd_step_t *step, int32_t *next, float *logits,
                   epd_err_t *err);
    void (*mem)(void *impl, epd_model_mem_t *mem);
    int (*set_group)(void *impl, ep_group_t *group, epd_err_t *err);
    void (*expert_tokens)(void *impl, uint64_t *counts);
} epd_model_ops_t;

/* moe.c: libep's routing parameters of the checkpoint's router (bias: the layer's
 * e_score_correction_bias or NULL; device memory for ep_route on the cuda backend). Both
 * implementations route through it. */
ep_route_params_t epd_moe_route_params(const epd_hf_config_t *cfg, const float *bias);

/* The cpu implementation (qwen3_moe.c) and the cuda one (model/cuda/cuda_model.c; absent in a
 * build without CUDA). Each loads config + weights for o->group's rank into *impl. */
int epd_cpu_model_load(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                       const epd_model_placement_t *placement, void **impl,
                       const epd_model_ops_t **ops, epd_err_t *err);
int epd_cuda_model_load(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                        const epd_model_placement_t *placement, void **impl,
                        const epd_model_ops_t **ops, epd_err_t *err);

#endif /* EPD_MODEL_IMPL_H */
