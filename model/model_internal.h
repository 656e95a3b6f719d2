/* The cpu implementation's state (fp32 plain C on the host), shared by cpu_model.c (load, KV
 * storage, forward) and moe.c (the MoE block). Not a public interface. */
#ifndef EPD_MODEL_INTERNAL_H
#define EPD_MODEL_INTERNAL_H

#include "model_impl.h"

typedef struct epd_layer_w {
    float *input_norm;      /* [H] */
    float *q, *k, *v, *o;   /* [nh*hd][H], [nkv*hd][H] x2, [H][nh*hd] */
    float *q_norm, *k_norm; /* [hd] */
    float *post_norm;       /* [H] */
    int is_moe;
    float *router;                    /* [E][H] (MoE) */
    float *router_bias;               /* [E] DeepSeek-V3's e_score_correction_bias */
    float *sh_gate, *sh_up, *sh_down; /* DeepSeek's shared experts: [Is][H] x2, [H][Is] */
    /* DeepSeek's MLA (q above is q_proj when there is no q LoRA) */
    float *q_a, *q_a_norm, *q_b;    /* [ql][H], [ql], [nh*(nope+rope)][ql] */
    float *kv_a, *kv_a_norm, *kv_b; /* [kvl+rope][H], [kvl], [nh*(nope+vd)][kvl] */
    float *gate, *up, *down;        /* MoE: [L][I][H], [L][I][H], [L][H][I] local experts in slot
                                       order; dense: [Id][H], [Id][H], [H][Id] */
} epd_layer_w_t;

typedef struct epd_cpu_model {
    epd_hf_config_t cfg;
    ep_group_t *group;
    int rank, nranks, local; /* local = experts per rank (L) */
    int ll_tokens;           /* the group's ll_max_tokens: per-rank bound of an LL step */
    int ht_tokens;           /* the group's ht_max_tokens: per-rank bound of an HT step (0: off) */
    int max_tokens;          /* max(ll_tokens, ht_tokens): rows of the scratch below */
    int max_seq_len;
    const epd_model_placement_t *placement; /* model.c's, outlives this */
    epd_model_mem_t mem;                    /* weights, kv and workspace bytes */
    uint64_t *expert_tokens; /* [E] tokens routed to each global expert, all MoE layers */

    float *embed;   /* [V][H] */
    float *norm;    /* [H] */
    float *lm_head; /* [V][H]; == embed when tied */
    epd_layer_w_t *layers;
    float *inv_freq;  /* [hd/2] (MLA: hd is the rope part) */
    float rope_scale; /* YaRN's attention factor on cos and sin (1: none) */
    int mla;          /* DeepSeek's attention */

    /* paged KV: per layer [kv_cap][block_size][kv_row]; blocks 0..kv_cap-1 exist so far (the
     * pool hands out the lowest ids first, so storage grows with the blocks in use). kv_row:
     * nkv*hd keys in k_pool and as many values in v_pool; MLA: the latent cache, kvl + rope
     * values per position in k_pool (v_pool unused) */
    int block_size, num_blocks, kv_cap, kv_row;
    float **k_pool, **v_pool; /* [layers] */

    /* scratch for max_tokens rows */
    float *h, *xn, *q, *k, *v, *att, *tmp; /* [T][H] [T][H] [T][q_dim] [T][kv_row] x2
                                              [T][att_dim] [T][H] */
    float *q_lora;                         /* [T][ql] (MLA with q LoRA) */
    float *scores;                         /* [max_seq_len (+ 2 * kvl for MLA)] */
    float *ffn_tmp;                        /* [2][max(I, Id, Is)] */
    float *logit_row, *sample_tmp;         /* [V] */
    float *router_logits;                  /* [T][E] */
    int32_t *topk_idx;                     /* [T][k] libep slot ids */
    float *topk_w;                         /* [T][k] */
    uint16_t *xb;                          /* [T][H] bf16 dispatch input */
    uint16_t *comb;                        /* [T][H] bf16 combine output */
    uint16_t *expert_y;                    /* LL: [L][S][H] bf16, S = ll_tokens * R */
    float *row_in, *row_out, *row_acc;     /* [H] */
    /* HT, for ht_cap = ep_ht_max_recv_tokens() received rows (NULL when HT is off) */
    int ht_cap;
    uint16_t *ht_x;         /* [N][H] bf16 received activations */
    int32_t *ht_idx;        /* [N][k] local expert ids, -1 for other ranks' experts */
    float *ht_w;            /* [N][k] */
    int32_t *ht_per_expert; /* [L] */
    uint16_t *ht_y;         /* [N][H] bf16 per-rank partial sums for the combine */
} epd_cpu_model_t;

/* moe.c: h[T][H] += MoE(xn[T][H]) of layer l through libep's LL path, or its HT path if ht
 * (collective, every rank on the same path; T may be 0). */
int epd_moe_forward(epd_cpu_model_t *m, int layer, int rows, int ht, epd_err_t *err);

#endif /* EPD_MODEL_INTERNAL_H */
