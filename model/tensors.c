/* The tensor tables of Qwen3-MoE and DeepSeek-V2/V3 (tensors.h) and the memory estimate they
 * give (model.h). */
#include "tensors.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct table {
    epd_tensor_desc_t *t;
    int n;
} table_t;

static void add(table_t *tb, epd_weight_role_t role, int layer, int expert, int ndim, int64_t d0,
                int64_t d1, const char *fmt, ...) __attribute__((format(printf, 8, 9)));

static void add(table_t *tb, epd_weight_role_t role, int layer, int expert, int ndim, int64_t d0,
                int64_t d1, const char *fmt, ...)
{
    epd_tensor_desc_t *d = &tb->t[tb->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->name, sizeof(d->name), fmt, ap);
    va_end(ap);
    d->ndim = ndim;
    d->shape[0] = d0;
    d->shape[1] = ndim > 1 ? d1 : 0;
    d->role = role;
    d->layer = layer;
    d->expert = expert;
}

static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};

/* gate, up, down of a SwiGLU MLP of intermediate I under prefix p (roles from `first`). */
static void add_mlp(table_t *tb, epd_weight_role_t first, int l, int e, int64_t H, int64_t I,
                    const char *p)
{
    for (int j = 0; j < 3; j++)
        add(tb, (epd_weight_role_t)(first + j), l, e, 2, j == 2 ? H : I, j == 2 ? I : H,
            "%s.%s.weight", p, proj[j]);
}

static void add_qwen3_attention(table_t *tb, const epd_hf_config_t *c, int l, const char *p)
{
    const int64_t H = c->hidden_size, hd = c->head_dim;
    const int64_t qd = (int64_t)c->num_attention_heads * hd;
    const int64_t kvd = (int64_t)c->num_key_value_heads * hd;
    add(tb, EPD_W_Q, l, -1, 2, qd, H, "%s.self_attn.q_proj.weight", p);
    add(tb, EPD_W_K, l, -1, 2, kvd, H, "%s.self_attn.k_proj.weight", p);
    add(tb, EPD_W_V, l, -1, 2, kvd, H, "%s.self_attn.v_proj.weight", p);
    add(tb, EPD_W_O, l, -1, 2, H, qd, "%s.self_attn.o_proj.weight", p);
    add(tb, EPD_W_Q_NORM, l, -1, 1, hd, 0, "%s.self_attn.q_norm.weight", p);
    add(tb, EPD_W_K_NORM, l, -1, 1, hd, 0, "%s.self_attn.k_norm.weight", p);
}

static void add_mla(table_t *tb, const epd_hf_config_t *c, int l, const char *p)
{
    const int64_t H = c->hidden_size, nh = c->num_attention_heads, ql = c->q_lora_rank;
    const int64_t qk = c->qk_nope_head_dim + c->qk_rope_head_dim, kvl = c->kv_lora_rank;
    if (ql) {
        add(tb, EPD_W_Q_A, l, -1, 2, ql, H, "%s.self_attn.q_a_proj.weight", p);
        add(tb, EPD_W_Q_A_NORM, l, -1, 1, ql, 0, "%s.self_attn.q_a_layernorm.weight", p);
        add(tb, EPD_W_Q_B, l, -1, 2, nh * qk, ql, "%s.self_attn.q_b_proj.weight", p);
    } else {
        add(tb, EPD_W_Q, l, -1, 2, nh * qk, H, "%s.self_attn.q_proj.weight", p);
    }
    add(tb, EPD_W_KV_A, l, -1, 2, kvl + c->qk_rope_head_dim, H,
        "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    add(tb, EPD_W_KV_A_NORM, l, -1, 1, kvl, 0, "%s.self_attn.kv_a_layernorm.weight", p);
    add(tb, EPD_W_KV_B, l, -1, 2, nh * (c->qk_nope_head_dim + c->v_head_dim), kvl,
        "%s.self_attn.kv_b_proj.weight", p);
    add(tb, EPD_W_O, l, -1, 2, H, nh * c->v_head_dim, "%s.self_attn.o_proj.weight", p);
}

/* Linear weights are fp8 in an FP8 checkpoint, except the embedding, lm_head, the routers and
 * the modules_to_not_convert. */
static void mark_fp8(const epd_hf_config_t *c, epd_tensor_desc_t *t)
{
    switch (t->role) {
    case EPD_W_Q:
    case EPD_W_K:
    case EPD_W_V:
    case EPD_W_O:
    case EPD_W_DENSE_GATE:
    case EPD_W_DENSE_UP:
    case EPD_W_DENSE_DOWN:
    case EPD_W_EXPERT_GATE:
    case EPD_W_EXPERT_UP:
    case EPD_W_EXPERT_DOWN:
    case EPD_W_Q_A:
    case EPD_W_Q_B:
    case EPD_W_KV_A:
    case EPD_W_KV_B:
    case EPD_W_SHARED_GATE:
    case EPD_W_SHARED_UP:
    case EPD_W_SHARED_DOWN:
        break;
    default:
        return;
    }
    char module[sizeof(t->name)];
    size_t n = strlen(t->name);
    if (n > 7 && !strcmp(t->name + n - 7, ".weight")) n -= 7;
    memcpy(module, t->name, n);
    module[n] = 0;
    if (epd_hf_fp8_skipped(c, module)) return;
    t->fp8 = 1;
    t->block[0] = c->fp8.block_n;
    t->block[1] = c->fp8.block_k;
    t->scale_shape[0] = (t->shape[0] + c->fp8.block_n - 1) / c->fp8.block_n;
    t->scale_shape[1] = (t->shape[1] + c->fp8.block_k - 1) / c->fp8.block_k;
}

int epd_tensor_table(const epd_hf_config_t *c, epd_tensor_desc_t **out, int *n, epd_err_t *err)
{
    *out = NULL;
    *n = 0;
    const int64_t H = c->hidden_size, V = c->vocab_size;
    const int64_t I = c->moe_intermediate_size, Id = c->intermediate_size;
    const int mla = epd_hf_is_mla(c);
    size_t cap = 3;
    for (int l = 0; l < c->num_hidden_layers; l++)
        cap += 10 + (epd_hf_layer_is_moe(c, l) ? 5 + 3 * (size_t)c->num_experts : 3);
    table_t tb = {calloc(cap, sizeof(epd_tensor_desc_t)), 0};
    if (!tb.t) return epd_err_set(err, -ENOMEM, "out of memory for a table of %zu tensors", cap);
    add(&tb, EPD_W_EMBED, -1, -1, 2, V, H, "model.embed_tokens.weight");
    add(&tb, EPD_W_FINAL_NORM, -1, -1, 1, H, 0, "model.norm.weight");
    if (!c->tie_word_embeddings) add(&tb, EPD_W_LM_HEAD, -1, -1, 2, V, H, "lm_head.weight");
    for (int l = 0; l < c->num_hidden_layers; l++) {
        char p[64], x[96];
        snprintf(p, sizeof(p), "model.layers.%d", l);
        add(&tb, EPD_W_INPUT_NORM, l, -1, 1, H, 0, "%s.input_layernorm.weight", p);
        add(&tb, EPD_W_POST_NORM, l, -1, 1, H, 0, "%s.post_attention_layernorm.weight", p);
        if (mla)
            add_mla(&tb, c, l, p);
        else
            add_qwen3_attention(&tb, c, l, p);
        if (!epd_hf_layer_is_moe(c, l)) {
            snprintf(x, sizeof(x), "%s.mlp", p);
            add_mlp(&tb, EPD_W_DENSE_GATE, l, -1, H, Id, x);
            continue;
        }
        add(&tb, EPD_W_ROUTER, l, -1, 2, c->num_experts, H, "%s.mlp.gate.weight", p);
        if (c->router_bias)
            add(&tb, EPD_W_ROUTER_BIAS, l, -1, 1, c->num_experts, 0,
                "%s.mlp.gate.e_score_correction_bias", p);
        for (int e = 0; e < c->num_experts; e++) {
            snprintf(x, sizeof(x), "%s.mlp.experts.%d", p, e);
            add_mlp(&tb, EPD_W_EXPERT_GATE, l, e, H, I, x);
        }
        if (c->n_shared_experts > 0) {
            snprintf(x, sizeof(x), "%s.mlp.shared_experts", p);
            add_mlp(&tb, EPD_W_SHARED_GATE, l, -1, H, I * c->n_shared_experts, x);
        }
    }
    if (c->fp8.on)
        for (int i = 0; i < tb.n; i++)
            mark_fp8(c, &tb.t[i]);
    *out = tb.t;
    *n = tb.n;
    return 0;
}

size_t epd_tensor_elems(const epd_tensor_desc_t *t)
{
    return (size_t)t->shape[0] * (size_t)(t->ndim > 1 ? t->shape[1] : 1);
}

int epd_tensor_is_expert(const epd_tensor_desc_t *t)
{
    return t->expert >= 0;
}

int epd_tensor_cuda_fp8(const epd_tensor_desc_t *t)
{
    return t->fp8 && epd_tensor_is_expert(t);
}

void epd_tensor_scale_name(const epd_tensor_desc_t *t, char *buf, size_t n)
{
    snprintf(buf, n, "%s_scale_inv", t->name);
}

size_t epd_tensor_bytes(const epd_tensor_desc_t *t, epd_model_backend_t backend)
{
    size_t n = epd_tensor_elems(t);
    if (backend == EPD_MODEL_CPU) return n * sizeof(float);
    if (epd_tensor_cuda_fp8(t))
        return n + (size_t)t->scale_shape[0] * (size_t)t->scale_shape[1] * sizeof(float);
    switch (t->role) {
    case EPD_W_INPUT_NORM:
    case EPD_W_POST_NORM:
    case EPD_W_Q_NORM:
    case EPD_W_K_NORM:
    case EPD_W_FINAL_NORM:
    case EPD_W_Q_A_NORM:
    case EPD_W_KV_A_NORM:
    case EPD_W_ROUTER:
    case EPD_W_ROUTER_BIAS:
        return n * sizeof(float);
    default:
        return n * sizeof(uint16_t);
    }
}

void epd_model_mem_estimate(const epd_hf_config_t *cfg, int nranks, epd_model_backend_t backend,
                            epd_model_mem_t *mem)
{
    *mem = (epd_model_mem_t){0};
    mem->local_experts = nranks > 0 ? cfg->num_experts / nranks : 0;
    epd_tensor_desc_t *t;
    int n;
    if (epd_tensor_table(cfg, &t, &n, NULL)) return;
    /* every expert has the same shapes: a rank's experts weigh as much as experts 0..L-1 */
    for (int i = 0; i < n; i++) {
        if (!epd_tensor_is_expert(&t[i]))
            mem->replicated_bytes += epd_tensor_bytes(&t[i], backend);
        else if (t[i].expert < mem->local_experts)
            mem->expert_bytes += epd_tensor_bytes(&t[i], backend);
    }
    free(t);
}

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

static int same_shape(const epd_st_tensor_t *s, int ndim, const int64_t *shape)
{
    int ok = s->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = s->shape[i] == shape[i];
    return ok;
}

static int shape_error(const epd_st_tensor_t *s, const char *name, int ndim, const int64_t *shape,
                       epd_err_t *err)
{
    char want[96], got[96];
    fmt_shape(want, sizeof(want), ndim, shape);
    fmt_shape(got, sizeof(got), s->ndim, s->shape);
    return epd_err_set(err, -EINVAL, "%s: tensor '%s' has shape %s, the config implies %s",
                       epd_st_file_path(s->file), name, got, want);
}

int epd_tensor_find(const epd_st_ckpt_t *ck, const epd_tensor_desc_t *t, const epd_st_tensor_t **w,
                    const epd_st_tensor_t **scale, epd_err_t *err)
{
    *w = epd_st_ckpt_find(ck, t->name);
    *scale = NULL;
    if (!*w)
        return epd_err_set(err, -ENOENT, "%s: the checkpoint has no tensor '%s'",
                           epd_st_ckpt_dir(ck), t->name);
    const char *file = epd_st_file_path((*w)->file);
    if (!same_shape(*w, t->ndim, t->shape)) return shape_error(*w, t->name, t->ndim, t->shape, err);
    if (!t->fp8) {
        if ((*w)->dtype == EPD_ST_F8_E4M3)
            return epd_err_set(err, -EINVAL,
                               "%s: tensor '%s' is F8_E4M3, but config.json's quantization_config "
                               "does not quantize it",
                               file, t->name);
        return 0;
    }
    if ((*w)->dtype != EPD_ST_F8_E4M3)
        return epd_err_set(err, -EINVAL,
                           "%s: tensor '%s' is %s, but config.json's quantization_config (fp8) "
                           "makes it F8_E4M3 (list it in modules_to_not_convert if it is not "
                           "quantized)",
                           file, t->name, epd_st_dtype_name((*w)->dtype));
    char sn[sizeof(t->name) + 16];
    epd_tensor_scale_name(t, sn, sizeof(sn));
    *scale = epd_st_ckpt_find(ck, sn);
    if (!*scale)
        return epd_err_set(err, -ENOENT,
                           "%s: tensor '%s' is F8_E4M3 but the checkpoint has no scale '%s'", file,
                           t->name, sn);
    if (!same_shape(*scale, 2, t->scale_shape))
        return shape_error(*scale, sn, 2, t->scale_shape, err);
    if ((*scale)->dtype == EPD_ST_F8_E4M3)
        return epd_err_set(err, -EINVAL, "%s: scale '%s' is F8_E4M3 (BF16, F16 or F32 expected)",
                           epd_st_file_path((*scale)->file), sn);
    return 0;
}

int epd_tensor_load_f32(const epd_st_ckpt_t *ck, const epd_tensor_desc_t *t, float *dst,
                        epd_err_t *err)
{
    const epd_st_tensor_t *w, *s;
    int rc = epd_tensor_find(ck, t, &w, &s, err);
    if (rc || !dst) return rc;
    if (s)
        epd_st_dequant_fp8_rows(w, s, t->block[0], t->block[1], 0, t->shape[0], dst);
    else
        epd_st_to_f32(w, dst);
    return 0;
}
