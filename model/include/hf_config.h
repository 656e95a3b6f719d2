/* Hugging Face config.json of a Qwen3-MoE checkpoint -> validated epd_hf_config_t.
 * Unknown model types, unsupported features and missing or mistyped fields are refused with
 * a message that names the file and the field. */
#ifndef EPD_HF_CONFIG_H
#define EPD_HF_CONFIG_H

#include "epd_err.h"

#include <stddef.h>

#define EPD_HF_MAX_LAYERS 1024

typedef struct epd_hf_config {
    char model_type[32];
    int hidden_size;
    int intermediate_size;     /* dense MLP layers (mlp_only_layers, or off the sparse step) */
    int moe_intermediate_size; /* each expert */
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;
    int vocab_size;
    double rms_norm_eps;
    double rope_theta;
    int num_experts; /* "num_experts" (also accepted: "num_local_experts") */
    int num_experts_per_tok;
    int norm_topk_prob;
    int decoder_sparse_step;
    int tie_word_embeddings;
    int max_position_embeddings;
    unsigned char mlp_only[EPD_HF_MAX_LAYERS]; /* mlp_only_layers as flags per layer */
} epd_hf_config_t;

/* Parses config.json text; `origin` names it in messages. */
int epd_hf_config_parse(const char *json, size_t len, const char *origin, epd_hf_config_t *cfg,
                        epd_err_t *err);
/* Reads <path> (a config.json file). */
int epd_hf_config_load(const char *path, epd_hf_config_t *cfg, epd_err_t *err);

/* Whether layer l has a sparse MoE block (else a dense SwiGLU MLP): transformers' rule. */
int epd_hf_layer_is_moe(const epd_hf_config_t *cfg, int layer);

#endif /* EPD_HF_CONFIG_H */
