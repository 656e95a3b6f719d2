/* The tensor tables of Qwen3-MoE and DeepSeek-V2/V3 (tensors.h) and the memory estimate they
 * give (model.h). */
#include "tensors.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

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

size_t epd_tensor_bytes(const epd_tensor_desc_t *t, epd_model_backend_t backend)
{
    size_t n = epd_tensor_elems(t);
    if (backend == EPD_MODEL_CPU) return n * sizeof(float);
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
