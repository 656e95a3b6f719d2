/* The CUDA model of one rank: its state, shared by cuda_model.c (creation, KV storage,
 * workspace, memory accounting, the ops table), cuda_load.c (weights from the checkpoint, or
 * random ones for benchmarks) and cuda_forward.c (the step: eager, or a replayed CUDA graph per
 * decode bucket). Not a public interface: the engine reaches it through model.h.
 *
 * Precision: weights bf16 (norm weights and routers fp32; an FP8 checkpoint's experts e4m3
 * with fp32 block scales, its other fp8 weights dequantised to bf16 on load), KV cache bf16, the
 * residual stream fp32, GEMM inputs bf16 with fp32 accumulation and fp32 outputs, attention in fp32
 * over bf16 K/V, expert activations bf16 (or fp8 on the LL wire with model.fp8_dispatch). */
#ifndef EPD_CUDA_MODEL_H
#define EPD_CUDA_MODEL_H

#include "cuda_ops.h"
#include "model_impl.h"
#include "tensors.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* Decode-step graphs: buckets of tokens (powers of two up to the LL bound) by context buckets
 * (powers of two of positions, from EPD_CU_CTX_MIN). */
#define EPD_CU_MAX_GRAPHS 256
#define EPD_CU_CTX_MIN 256

typedef struct cu_layer {
    float *input_norm, *post_norm, *q_norm, *k_norm; /* fp32 [H], [H], [hd], [hd] */
    uint16_t *qkv;                                   /* [(nh + 2 nkv) hd][H] */
    uint16_t *o;                                     /* [H][nh hd] */
    int is_moe;
    float *router;     /* [E][H] fp32 */
    uint16_t *gate_up; /* MoE: [L][2I][H] (gate rows, then up rows); dense: [2Id][H] */
    uint16_t *down;    /* MoE: [L][H][I]; dense: [H][Id] */
    /* MoE layers of an FP8 checkpoint (w8): the experts as stored, e4m3 in the layouts above,
     * with their block scales (cuda_ops.h, epd_cu_expert_*_w8); gate_up and down are NULL */
    int w8;
    uint8_t *gate_up8, *down8;
    float *gate_up_sc, *down_sc;
    uint16_t *k_cache; /* [num_blocks][block_size][nkv][hd]; MLA: the latent cache
                          [num_blocks][block_size][kvl + rope] */
    uint16_t *v_cache; /* MLA: NULL */
    /* DeepSeek (MLA): qkv above is q_proj [nh (nope + rope)][H], or q_b_proj [.][ql] with q
     * LoRA; o is [H][nh vd] */
    uint16_t *q_a;                  /* [ql][H] */
    float *q_a_norm, *kv_a_norm;    /* fp32 [ql], [kvl] */
    uint16_t *kv_a;                 /* [kvl + rope][H] */
    uint16_t *kv_b;                 /* [nh][nope + vd][kvl] */
    float *router_bias;             /* fp32 [E] (V3's e_score_correction_bias) or NULL */
    uint16_t *sh_gate_up, *sh_down; /* shared experts: [2 Is][H], [H][Is]; or NULL */
} cu_layer_t;

/* The expanded (prefill) form's inputs, uploaded only on the steps that take it: sequence s's
 * context rows start at base[s] (a multiple of EPD_CU_EXP_BLOCK) of the expanded keys/values,
 * viewed as blocks of EPD_CU_EXP_BLOCK rows with block table bt [max_seqs][exp_cols]. */
#define EPD_CU_EXP_BLOCK 16
typedef struct cu_exp_in {
    int32_t *base, *seq_len; /* [max_seqs] */
    int32_t *bt;             /* [max_seqs][exp_cols] */
} cu_exp_in_t;

/* What one step's kernels read, uploaded from pinned host memory in one copy. Arrays are
 * sized for the model's bounds (max_tokens rows, max_seqs sequences). */
typedef struct cu_step_in {
    int32_t *tokens, *pos, *seq_idx, *slot; /* [Tmax] */
    int32_t *block_table;                   /* [max_seqs][max_blocks] */
    int32_t *logit_rows;                    /* [Tmax] */
    epd_sample_params_t *sample;            /* [Tmax] */
    int32_t *n_valid;                       /* [1] tokens of the step (graphs are padded) */
    int32_t *n_logits;                      /* [1] */
} cu_step_in_t;

typedef struct cu_graph {
    int tokens, ctx; /* bucket: padded token count, context bound */
    int split_len, max_splits;
    cudaGraphExec_t exec;
    uint64_t replays;
} cu_graph_t;

typedef struct cu_model {
    epd_hf_config_t cfg;
    epd_model_opts_t opts;
    ep_group_t *group;
    int rank, nranks, local, device;
    int32_t *slot_of_dev; /* [E] libep slot of each expert; NULL when contiguous */
    int ll_tokens, ht_tokens, max_tokens, max_seqs, max_seq_len;
    int qkv_dim, q_dim; /* (nh + 2 nkv) hd, nh hd */
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_ws;

    /* weights */
    uint16_t *embed, *lm_head; /* [V][H]; lm_head == embed when tied */
    float *final_norm;
    float *inv_freq; /* [hd/2] */
    cu_layer_t *layers;
    void *weights_block; /* one allocation for all weights */
    size_t weights_bytes, replicated_bytes, expert_bytes;

    /* KV */
    int block_size, num_blocks, max_blocks;
    void *kv_block;
    size_t kv_bytes, kv_block_bytes;

    /* workspace (device) */
    void *ws_block;
    size_t ws_bytes;
    float *h, *xn_f32, *qkv, *q, *gu, *router_logits, *topk_w, *moe_acc;
    uint16_t *xn_bf16, *att, *act, *packed, *expert_y, *moe_out, *final_bf16;
    int32_t *topk_idx, *counts, *offsets, *row_of;
    float *logits, *final_rows; /* [Tmax][V], [Tmax][H] */
    int32_t *next;
    void *attn_ws, *sample_ws;
    size_t attn_ws_bytes;
    unsigned long long *expert_tokens; /* [E] */
    int packed_rows;                   /* rows of packed/act/expert_y */
    cu_step_in_t in;                   /* device */
    void *in_dev;
    void *in_host; /* pinned mirror of in_dev */
    size_t in_bytes;
    cu_step_in_t in_h; /* the same arrays in in_host */
    int32_t *next_host;
    unsigned long long *expert_tokens_host;

    /* graphs */
    /* MLA (DeepSeek): dims and buffers of the absorbed form (decode, and any step whose
     * context does not fit the expanded buffers) and of the expanded form (prefill) */
    int mla, ql, kvl, nope, rope, vd, qk;
    float rope_scale;        /* YaRN's attention factor on cos and sin (1: none) */
    int hdp;                 /* expanded head dim (a size epd_cu_attention takes; 0: no expanded) */
    int exp_rows, exp_cols;  /* rows of the expanded keys/values; exp_rows / EPD_CU_EXP_BLOCK */
    float *q_lora;           /* [Tmax][ql] fp32 */
    uint16_t *q_lora_bf16;   /* [Tmax][ql] */
    uint16_t *q_bf16;        /* [Tmax][nh][qk] */
    float *q_lat;            /* [Tmax][nh][kvl] */
    uint16_t *o_lat;         /* [Tmax][nh][kvl] */
    uint16_t *lat_g, *pe_g;  /* [exp_rows][kvl], [exp_rows][rope] */
    float *kvx;              /* [exp_rows][nh][nope + vd] */
    uint16_t *k_exp, *v_exp; /* [exp_rows][nh][hdp] */
    float *q_pad;            /* [Tmax][nh][hdp] */
    uint16_t *att_pad;       /* [Tmax][nh][hdp] */
    cu_exp_in_t exp, exp_h;  /* device, and its pinned mirror */
    void *exp_dev, *exp_host;
    size_t exp_bytes;

    cu_graph_t graphs[EPD_CU_MAX_GRAPHS];
    int num_graphs;
    uint64_t eager_steps, graph_steps;
    /* phase timing (EPD_CUDA_PROFILE=1, or model-bench --profile; eager steps only), in ms,
     * summed: norms, attention GEMMs (qkv, o), attention proper (q/k norm, RoPE, KV store,
     * paged attention), expert GEMMs (and dense MLPs), routing + exchange (router, top-k,
     * dispatch/combine or local packing), lm_head + sampling + embedding */
    int profile;
    double phase_ms[6];
    uint64_t profiled_steps;
} cu_model_t;

/* cuda_model.c */
int cu_check(cudaError_t e, const char *what, epd_err_t *err);
int cu_blas_check(cublasStatus_t s, const char *what, epd_err_t *err);
/* Allocates weights (zeroed), workspace and step buffers for cfg on the current device. */
int cu_model_alloc(cu_model_t *m, epd_err_t *err);
void cu_model_free(cu_model_t *m);
extern const epd_model_ops_t epd_cuda_model_ops;

/* cuda_load.c: the weights of this rank from the checkpoint (opts.dir), streamed through
 * pinned buffers; progress through opts.progress. */
int cu_load_weights(cu_model_t *m, const epd_model_placement_t *placement, epd_err_t *err);
/* Random weights made on the GPU (benchmarks: a real model's shape without its file). */
int cu_random_weights(cu_model_t *m, uint64_t seed, epd_err_t *err);

/* cuda_forward.c: the experts' SwiGLU on packed rows with the layer's bf16 or fp8 weights */
int cu_experts(cu_model_t *m, const cu_layer_t *w, const void *x, const float *x_scales,
               const int32_t *counts, const int32_t *offsets, int stride, int L, int max_rows,
               epd_err_t *err);

/* cuda_forward.c */
int cu_forward(void *impl, const epd_step_t *s, int32_t *next, float *logits, epd_err_t *err);
void cu_graphs_destroy(cu_model_t *m);

/* random.cu */
#ifdef __cplusplus
extern "C" {
#endif
int epd_cu_fill_uniform_bf16(uint16_t *dst, size_t n, uint64_t seed, float lo, float hi,
                             cudaStream_t stream);
int epd_cu_fill_uniform_f32(float *dst, size_t n, uint64_t seed, float lo, float hi,
                            cudaStream_t stream);
/* e4m3 codes of uniform values in [lo, hi] (saturated to +-448) */
int epd_cu_fill_uniform_e4m3(uint8_t *dst, size_t n, uint64_t seed, float lo, float hi,
                             cudaStream_t stream);
#ifdef __cplusplus
}
#endif

/* The bench's door to the implementation (model-bench drives steps it builds itself). */
int epd_cuda_model_create_random(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                                 uint64_t seed, int kv_blocks, cu_model_t **out, epd_err_t *err);
void epd_cuda_model_destroy(cu_model_t *m);

#endif /* EPD_CUDA_MODEL_H */
