/* The tensor table of an architecture (Qwen3-MoE so far): every weight of a checkpoint with its
 * name, shape and role, in one fixed order. Both implementations load from it, check shapes
 * against it and count memory with it, so that what a rank holds is known before loading. */
#ifndef EPD_TENSORS_H
#define EPD_TENSORS_H

#include "hf_config.h"
#include "model.h"
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
    EPD_W_EXPERT_DOWN
} epd_weight_role_t;

typedef struct epd_tensor_desc {
    char name[128]; /* the checkpoint's tensor name */
    int ndim;
    int64_t shape[2]; /* shape[1] unused when ndim is 1 */
    epd_weight_role_t role;
    int layer;  /* -1: not per layer */
    int expert; /* global expert id, -1: not an expert */
} epd_tensor_desc_t;

/* The table of cfg's checkpoint: a malloc'd array of *n descriptors (free it), in a fixed
 * order: embed, final norm, lm_head (absent when tied); then per layer: input norm, post norm,
 * q, k, v, o, q_norm, k_norm, and either the router and every expert's gate, up, down (expert
 * order) or the dense gate, up, down. */
int epd_tensor_table(const epd_hf_config_t *cfg, epd_tensor_desc_t **out, int *n, epd_err_t *err);
size_t epd_tensor_elems(const epd_tensor_desc_t *t);
int epd_tensor_is_expert(const epd_tensor_desc_t *t);
/* Bytes a backend stores for it: cpu fp32 everything; cuda bf16 except the norms (input, post,
 * q, k, final) and the routers, which stay fp32. */
size_t epd_tensor_bytes(const epd_tensor_desc_t *t, epd_model_backend_t backend);

#endif /* EPD_TENSORS_H */
