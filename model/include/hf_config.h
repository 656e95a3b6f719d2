/* Hugging Face config.json of a Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3 checkpoint -> validated
 * epd_hf_config_t.
 * Unknown model types, unsupported features and missing or mistyped fields are refused with
 * a message that names the file and the field. */
#ifndef EPD_HF_CONFIG_H
#define EPD_HF_CONFIG_H

#include "epd_err.h"

#include <stddef.h>

#define EPD_HF_MAX_LAYERS 1024
#define EPD_HF_MAX_EOS 8

typedef enum epd_arch {
    EPD_ARCH_QWEN3_MOE = 0, /* GQA with q/k norms, softmax top-k routing */
    EPD_ARCH_DEEPSEEK_V2,   /* MLA, softmax routing (greedy or group-limited), shared experts */
    EPD_ARCH_DEEPSEEK_V3,   /* MLA, sigmoid + bias group-limited routing, shared experts */
} epd_arch_t;

/* How a token's experts are chosen (transformers' route_tokens_to_experts). */
typedef enum epd_router {
    EPD_ROUTER_SOFTMAX = 0,   /* softmax, top-k (Qwen3-MoE; DeepSeek-V2 "greedy") */
    EPD_ROUTER_SOFTMAX_GROUP, /* softmax; groups scored by their best expert (V2
                                 "group_limited_greedy") */
    EPD_ROUTER_SIGMOID_GROUP, /* sigmoid + e_score_correction_bias; groups by their two best (V3) */
} epd_router_t;

/* YaRN (rope_scaling / rope_parameters of rope_type "yarn"), as transformers computes it. */
typedef struct epd_rope_yarn {
    int on;
    double factor;
    int original_max_position_embeddings;
    double beta_fast, beta_slow;
    double mscale, mscale_all_dim; /* 0: absent */
    double attention_factor;       /* multiplies cos and sin: given, or derived from the mscales */
    int truncate;                  /* round the correction range outwards (default true) */
} epd_rope_yarn_t;

/* quantization_config of quant_method "fp8" (DeepSeek-V3, the Qwen3 -FP8 checkpoints): every
 * Linear weight but the embeddings, lm_head, the routers and the modules_to_not_convert is e4m3
 * (fmt "e4m3": e4m3fn, no infinities) with an fp32 scale per block of block_n rows (outputs) by
 * block_k columns (inputs), <weight>_scale_inv [ceil(out / block_n)][ceil(in / block_k)]:
 * W[r][c] = e4m3(q[r][c]) * scale_inv[r / block_n][c / block_k]. Activations are quantized
 * dynamically (activation_scheme "dynamic"), which leaves the weights as the only stored part. */
#define EPD_HF_FP8_SKIP_BYTES 16384
typedef struct epd_hf_fp8 {
    int on;
    int block_n, block_k;             /* weight_block_size [block_n, block_k] */
    int n_skip;                       /* modules_to_not_convert entries */
    char skip[EPD_HF_FP8_SKIP_BYTES]; /* the entries, each NUL-terminated, one after another */
} epd_hf_fp8_t;

typedef struct epd_hf_config {
    char model_type[32];
    epd_arch_t arch;
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
    /* eos_token_id (a number or a list; entries that are not numbers are passed over): what the
     * server stops at besides the tokenizer's own EOS */
    int num_eos;
    int eos_token_ids[EPD_HF_MAX_EOS];
    unsigned char mlp_only[EPD_HF_MAX_LAYERS]; /* mlp_only_layers as flags per layer */

    /* routing */
    epd_router_t router;
    int n_group, topk_group;      /* group-limited routers: groups, groups kept per token */
    double routed_scaling_factor; /* multiplies the routing weights (1 for Qwen3-MoE) */
    int router_bias;              /* mlp.gate.e_score_correction_bias exists (V3) */

    /* DeepSeek: MLA and the layer layout. head_dim above is qk_rope_head_dim for them. */
    int q_lora_rank; /* 0: q_proj straight from the hidden state */
    int kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
    int rope_interleave;          /* RoPE pairs adjacent values (2i, 2i+1), not (i, i + d/2) */
    int first_k_dense_replace;    /* layers 0..k-1 are dense MLPs */
    int n_shared_experts;         /* shared experts of intermediate moe_intermediate_size * n */
    int num_nextn_predict_layers; /* multi-token-prediction layers: skipped on load */
    epd_rope_yarn_t yarn;
    double attn_scale; /* the softmax scale: 1/sqrt(q/k head dim), times YaRN's mscale^2 */
    epd_hf_fp8_t fp8;  /* fp8.on: an FP8 block-quantized checkpoint */
} epd_hf_config_t;

/* Parses config.json text; `origin` names it in messages. */
int epd_hf_config_parse(const char *json, size_t len, const char *origin, epd_hf_config_t *cfg,
                        epd_err_t *err);
/* Reads <path> (a config.json file). */
int epd_hf_config_load(const char *path, epd_hf_config_t *cfg, epd_err_t *err);

/* Whether the model's attention is MLA (DeepSeek). */
int epd_hf_is_mla(const epd_hf_config_t *cfg);

/* Whether the Linear module `module` (a weight's name without ".weight") is listed in the fp8
 * quantization_config's modules_to_not_convert. An entry names a module and everything under it,
 * with or without the path above it ("lm_head", "model.layers.0.mlp.gate", "mlp.gate",
 * "self_attn"); "*" matches any run of characters ("model.layers.*.mlp.gate"). Matches are
 * bounded at dots, as transformers' bounded form has it: "model.layers.1" does not reach
 * model.layers.10, nor "attn" self_attn. */
int epd_hf_fp8_skipped(const epd_hf_config_t *cfg, const char *module);

/* Whether layer l has a sparse MoE block (else a dense SwiGLU MLP): transformers' rule. */
int epd_hf_layer_is_moe(const epd_hf_config_t *cfg, int layer);

#endif /* EPD_HF_CONFIG_H */
