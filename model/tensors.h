/* The tensor table of an architecture (Qwen3-MoE, DeepSeek-V2/V3): every weight of a checkpoint
 * with its name, shape and role, in one fixed order. Both implementations load from it, check
 * shapes against it and count memory with it, so that what a rank holds is known before loading. */
#ifndef EPD_TENSORS_H
#define EPD_TENSORS_H

#include "hf_config.h"
#include "model.h"
#include "safetensors.h"
#include "epd_err.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    EPD_W_EMBED,
    EPD_W_FINAL_NORM,
    EPD_W_LM_HEAD,
    EPD_W_INPUT_NORM,
    EPD_W_POST_NORM,
    EPD_W_Q,
    EPD_W_K,
    EPD_W_V,
    EPD_W_O,
    EPD_W_Q_NORM,
    EPD_W_K_NORM,
    EPD_W_ROUTER,
    EPD_W_DENSE_GATE,
    EPD_W_DENSE_UP,
    EPD_W_DENSE_DOWN,
    EPD_W_EXPERT_GATE,
    EPD_W_EXPERT_UP,
    EPD_W_EXPERT_DOWN,
    /* DeepSeek's MLA (q_proj is EPD_W_Q when q_lora_rank is 0) */
    EPD_W_Q_A,       /* q_a_proj [q_lora][H] */
    EPD_W_Q_A_NORM,  /* q_a_layernorm [q_lora] */
    EPD_W_Q_B,       /* q_b_proj [heads * (nope + rope)][q_lora] */
    EPD_W_KV_A,      /* kv_a_proj_with_mqa [kvl + rope][H] */
    EPD_W_KV_A_NORM, /* kv_a_layernorm [kvl] */
    EPD_W_KV_B,      /* kv_b_proj [heads * (nope + vd)][kvl] */
    /* DeepSeek's MoE layers */
    EPD_W_ROUTER_BIAS, /* mlp.gate.e_score_correction_bias [E] (V3) */
    EPD_W_SHARED_GATE,
    EPD_W_SHARED_UP,
    EPD_W_SHARED_DOWN
} epd_weight_role_t;

typedef struct epd_tensor_desc {
    char name[128]; /* the checkpoint's tensor name */
    int ndim;
    int64_t shape[2]; /* shape[1] unused when ndim is 1 */
    epd_weight_role_t role;
    int layer;  /* -1: not per layer */
    int expert; /* global expert id, -1: not an expert */
    /* FP8 checkpoints (cfg->fp8.on): the weight is e4m3 with block scales in
     * <name>_scale_inv (epd_tensor_scale_name) of scale_shape; block [bn, bk] */
    int fp8;
    int block[2];
    int64_t scale_shape[2];
} epd_tensor_desc_t;

/* The table of cfg's checkpoint: a malloc'd array of *n descriptors (free it), in a fixed
 * order: embed, final norm, lm_head (absent when tied); then per layer: input norm, post norm,
 * the attention (Qwen3-MoE: q, k, v, o, q_norm, k_norm; DeepSeek: q or q_a, q_a_norm, q_b, then
 * kv_a, kv_a_norm, kv_b, o), and either the router (V3: its bias), every expert's gate, up, down
 * (expert order) and DeepSeek's shared experts, or the dense gate, up, down. DeepSeek's
 * multi-token-prediction layers (after the last layer) are not in it: loading skips them.
 * In an FP8 checkpoint every Linear weight is fp8 but the embedding, lm_head, the routers and
 * the config's modules_to_not_convert. */
int epd_tensor_table(const epd_hf_config_t *cfg, epd_tensor_desc_t **out, int *n, epd_err_t *err);
size_t epd_tensor_elems(const epd_tensor_desc_t *t);
int epd_tensor_is_expert(const epd_tensor_desc_t *t);
/* Bytes a backend stores for it: cpu fp32 everything (fp8 weights dequantised on load); cuda
 * bf16 except the norms and the routers (and their bias), which stay fp32, and the fp8 experts,
 * which stay fp8 (1 byte per weight) with their fp32 block scales; other fp8 weights (attention,
 * dense MLPs) are dequantised to bf16 on load. */
size_t epd_tensor_bytes(const epd_tensor_desc_t *t, epd_model_backend_t backend);
/* Whether the cuda model keeps the tensor in fp8 (an fp8 expert weight). */
int epd_tensor_cuda_fp8(const epd_tensor_desc_t *t);
/* "<name>_scale_inv" into buf[n]. */
void epd_tensor_scale_name(const epd_tensor_desc_t *t, char *buf, size_t n);

/* Finds t in the checkpoint and checks it against the table: its shape, and for an fp8 weight
 * the dtype F8_E4M3 and its scale tensor's shape (a scale of BF16, F16 or F32); a tensor the
 * table does not quantize must not be F8_E4M3. *w, and *scale for fp8 (else NULL), point into
 * the checkpoint. Errors name the tensor and its file. */
int epd_tensor_find(const epd_st_ckpt_t *ck, const epd_tensor_desc_t *t, const epd_st_tensor_t **w,
                    const epd_st_tensor_t **scale, epd_err_t *err);
/* epd_tensor_find, then the tensor in fp32 into dst[elems] (fp8: dequantised with its block
 * scales); dst NULL: only the checks. */
int epd_tensor_load_f32(const epd_st_ckpt_t *ck, const epd_tensor_desc_t *t, float *dst,
                        epd_err_t *err);

#endif /* EPD_TENSORS_H */
