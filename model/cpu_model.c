/* The cpu implementation of the model interface (model_impl.h): Qwen3-MoE and DeepSeek-V2/V3 in
 * fp32 plain C on the host. Loading through the tensor table (fp32 conversion of the replicated
 * weights and of this rank's experts, FP8 checkpoints dequantised with their block scales; the
 * other ranks' experts are shape-checked), paged KV
 * storage taken lazily (keys and values, or MLA's latent), and the forward over a flat step with
 * sampling (sample.h). */
#include "model_internal.h"
#include "ops.h"
#include "safetensors.h"
#include "tensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- loading ------------------------------------------------------------------------------ */

static float **weight_slot(epd_cpu_model_t *m, const epd_tensor_desc_t *t)
{
    epd_layer_w_t *w = t->layer >= 0 ? &m->layers[t->layer] : NULL;
    switch (t->role) {
    case EPD_W_EMBED:
        return &m->embed;
    case EPD_W_FINAL_NORM:
        return &m->norm;
    case EPD_W_LM_HEAD:
        return &m->lm_head;
    case EPD_W_INPUT_NORM:
        return &w->input_norm;
    case EPD_W_POST_NORM:
        return &w->post_norm;
    case EPD_W_Q:
        return &w->q;
    case EPD_W_K:
        return &w->k;
    case EPD_W_V:
        return &w->v;
    case EPD_W_O:
        return &w->o;
    case EPD_W_Q_NORM:
        return &w->q_norm;
    case EPD_W_K_NORM:
        return &w->k_norm;
    case EPD_W_ROUTER:
        return &w->router;
    case EPD_W_DENSE_GATE:
    case EPD_W_EXPERT_GATE:
        return &w->gate;
    case EPD_W_DENSE_UP:
    case EPD_W_EXPERT_UP:
        return &w->up;
    case EPD_W_DENSE_DOWN:
    case EPD_W_EXPERT_DOWN:
        return &w->down;
    case EPD_W_Q_A:
        return &w->q_a;
    case EPD_W_Q_A_NORM:
        return &w->q_a_norm;
    case EPD_W_Q_B:
        return &w->q_b;
    case EPD_W_KV_A:
        return &w->kv_a;
    case EPD_W_KV_A_NORM:
        return &w->kv_a_norm;
    case EPD_W_KV_B:
        return &w->kv_b;
    case EPD_W_ROUTER_BIAS:
        return &w->router_bias;
    case EPD_W_SHARED_GATE:
        return &w->sh_gate;
    case EPD_W_SHARED_UP:
        return &w->sh_up;
    case EPD_W_SHARED_DOWN:
        return &w->sh_down;
    }
    return NULL;
}

/* Whether this rank stores the tensor (replicated, or one of its experts). */
static int mine(const epd_cpu_model_t *m, const epd_tensor_desc_t *t)
{
    return !epd_tensor_is_expert(t) || m->placement->slot_of[t->expert] / m->local == m->rank;
}

static int load_tensor(epd_cpu_model_t *m, const epd_st_ckpt_t *ck, const epd_tensor_desc_t *t,
                       epd_err_t *err)
{
    /* other ranks' experts: only checked, so every rank refuses a bad file */
    if (!mine(m, t)) return epd_tensor_load_f32(ck, t, NULL, err);
    float **slot = weight_slot(m, t);
    size_t bytes = epd_tensor_bytes(t, EPD_MODEL_CPU);
    float *dst;
    if (epd_tensor_is_expert(t)) {
        /* the layer's local experts in one array each, in slot order */
        if (!*slot && !(*slot = malloc(bytes * (size_t)m->local)))
            return epd_err_set(err, -ENOMEM, "out of memory for the experts of layer %d", t->layer);
        dst = *slot + (size_t)(m->placement->slot_of[t->expert] % m->local) * epd_tensor_elems(t);
        m->mem.expert_bytes += bytes;
    } else {
        if (!(*slot = malloc(bytes)))
            return epd_err_set(err, -ENOMEM, "out of memory for tensor '%s' (%zu bytes)", t->name,
                               bytes);
        dst = *slot;
        m->mem.replicated_bytes += bytes;
    }
    return epd_tensor_load_f32(ck, t, dst, err);
}

static int load_weights(epd_cpu_model_t *m, const epd_model_opts_t *o, const epd_st_ckpt_t *ck,
                        epd_err_t *err)
{
    epd_tensor_desc_t *tab;
    int n, rc;
    if ((rc = epd_tensor_table(&m->cfg, &tab, &n, err))) return rc;
    uint64_t total = 0, done = 0;
    for (int i = 0; i < n; i++)
        if (mine(m, &tab[i])) total += epd_tensor_bytes(&tab[i], EPD_MODEL_CPU);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        m->layers[l].is_moe = epd_hf_layer_is_moe(&m->cfg, l);
    for (int i = 0; i < n && !rc; i++) {
        rc = load_tensor(m, ck, &tab[i], err);
        if (!rc && mine(m, &tab[i])) {
            done += epd_tensor_bytes(&tab[i], EPD_MODEL_CPU);
            if (o->progress) o->progress(o->progress_arg, done, total);
        }
    }
    free(tab);
    if (!rc && m->cfg.tie_word_embeddings) m->lm_head = m->embed;
    return rc;
}

/* malloc that counts into the workspace bytes */
static void *ws(epd_cpu_model_t *m, size_t bytes)
{
    m->mem.workspace_bytes += bytes;
    return malloc(bytes);
}

static int alloc_scratch(epd_cpu_model_t *m, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    size_t T = (size_t)m->max_tokens, H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    size_t nh = (size_t)c->num_attention_heads, kvd = (size_t)m->kv_row;
    size_t qd = m->mla ? nh * (size_t)(c->qk_nope_head_dim + c->qk_rope_head_dim)
                       : nh * (size_t)c->head_dim;
    size_t attd = m->mla ? nh * (size_t)c->v_head_dim : qd;
    size_t inter = (size_t)c->moe_intermediate_size *
                   (size_t)(c->n_shared_experts > 1 ? c->n_shared_experts : 1);
    if ((size_t)c->intermediate_size > inter) inter = (size_t)c->intermediate_size;
    size_t S = (size_t)m->ll_tokens * (size_t)m->nranks;
    m->h = ws(m, sizeof(float) * T * H);
    m->xn = ws(m, sizeof(float) * T * H);
    m->q = ws(m, sizeof(float) * T * qd);
    m->k = ws(m, sizeof(float) * T * kvd);
    m->v = ws(m, sizeof(float) * T * (kvd > qd ? kvd : qd)); /* MLA: one token's q split */
    m->att = ws(m, sizeof(float) * T * attd);
    if (c->q_lora_rank && !(m->q_lora = ws(m, sizeof(float) * T * (size_t)c->q_lora_rank)))
        return epd_err_set(err, -ENOMEM, "out of memory for the scratch of %zu tokens", T);
    m->tmp = ws(m, sizeof(float) * T * H);
    m->scores = ws(m, sizeof(float) * ((size_t)m->max_seq_len + 2 * (size_t)c->kv_lora_rank));
    m->ffn_tmp = ws(m, sizeof(float) * 2 * inter);
    m->logit_row = ws(m, sizeof(float) * V);
    m->sample_tmp = ws(m, sizeof(float) * V);
    m->router_logits = ws(m, sizeof(float) * T * (size_t)c->num_experts);
    m->topk_idx = ws(m, sizeof(int32_t) * T * (size_t)c->num_experts_per_tok);
    m->topk_w = ws(m, sizeof(float) * T * (size_t)c->num_experts_per_tok);
    m->xb = ws(m, sizeof(uint16_t) * T * H);
    m->comb = ws(m, sizeof(uint16_t) * T * H);
    m->expert_y = ws(m, sizeof(uint16_t) * (size_t)m->local * S * H);
    m->row_in = ws(m, sizeof(float) * H);
    m->row_out = ws(m, sizeof(float) * H);
    m->row_acc = ws(m, sizeof(float) * H);
    m->inv_freq = ws(m, sizeof(float) * (size_t)(c->head_dim / 2));
    m->expert_tokens = calloc((size_t)c->num_experts, sizeof(uint64_t));
    if (!m->expert_tokens || !m->h || !m->xn || !m->q || !m->k || !m->v || !m->att || !m->tmp ||
        !m->scores || !m->ffn_tmp || !m->logit_row || !m->sample_tmp || !m->router_logits ||
        !m->topk_idx || !m->topk_w || !m->xb || !m->comb || !m->expert_y || !m->row_in ||
        !m->row_out || !m->row_acc || !m->inv_freq)
        return epd_err_set(err, -ENOMEM, "out of memory for the scratch of %zu tokens", T);
    if (m->ht_tokens > 0) {
        size_t N = (size_t)ep_ht_max_recv_tokens(m->group), K = (size_t)c->num_experts_per_tok;
        m->ht_cap = (int)N;
        m->ht_x = ws(m, sizeof(uint16_t) * N * H);
        m->ht_idx = ws(m, sizeof(int32_t) * N * K);
        m->ht_w = ws(m, sizeof(float) * N * K);
        m->ht_per_expert = ws(m, sizeof(int32_t) * (size_t)m->local);
        m->ht_y = ws(m, sizeof(uint16_t) * N * H);
        if (!m->ht_x || !m->ht_idx || !m->ht_w || !m->ht_per_expert || !m->ht_y)
            return epd_err_set(err, -ENOMEM,
                               "out of memory for the HT buffers of %zu received tokens", N);
    }
    m->rope_scale = 1.0f;
    if (c->yarn.on) {
        epd_rope_yarn_inv_freq(m->inv_freq, c->head_dim, c->rope_theta, c->yarn.factor,
                               c->yarn.original_max_position_embeddings, c->yarn.beta_fast,
                               c->yarn.beta_slow, c->yarn.truncate);
        m->rope_scale = (float)c->yarn.attention_factor;
    } else {
        epd_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta);
    }
    return 0;
}

static void cpu_destroy(void *impl);

static int cpu_kv_init(void *impl, int block_size, int *num_blocks, epd_err_t *err)
{
    epd_cpu_model_t *m = impl;
    if (block_size < 1 || *num_blocks < 1)
        return epd_err_set(err, -EINVAL, "KV cache: %d blocks of %d positions: both must be >= 1",
                           *num_blocks, block_size);
    int L = m->cfg.num_hidden_layers;
    m->block_size = block_size;
    m->num_blocks = *num_blocks;
    m->k_pool = calloc((size_t)L, sizeof(float *));
    m->v_pool = calloc((size_t)L, sizeof(float *));
    if (!m->k_pool || !m->v_pool) return epd_err_set(err, -ENOMEM, "KV cache: out of memory");
    m->mem.kv_block_bytes =
        (m->mla ? 1 : 2) * (size_t)L * (size_t)block_size * (size_t)m->kv_row * sizeof(float);
    return 0;
}

/* Storage for blocks 0..need-1 (grows geometrically up to num_blocks). */
static int kv_grow(epd_cpu_model_t *m, int need, epd_err_t *err)
{
    if (need <= m->kv_cap) return 0;
    int cap = m->kv_cap ? m->kv_cap : 4;
    while (cap < need)
        cap = cap > m->num_blocks / 2 ? m->num_blocks : cap * 2;
    if (cap > m->num_blocks) cap = m->num_blocks;
    size_t blk = (size_t)m->block_size * (size_t)m->kv_row * sizeof(float);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        float *k = realloc(m->k_pool[l], blk * (size_t)cap);
        if (!k) return epd_err_set(err, -ENOMEM, "KV cache: out of memory for %d blocks", cap);
        m->k_pool[l] = k;
        if (m->mla) continue;
        float *v = realloc(m->v_pool[l], blk * (size_t)cap);
        if (!v) return epd_err_set(err, -ENOMEM, "KV cache: out of memory for %d blocks", cap);
        m->v_pool[l] = v;
    }
    m->kv_cap = cap;
    m->mem.kv_bytes = (size_t)cap * m->mem.kv_block_bytes;
    return 0;
}

/* ---- forward ------------------------------------------------------------------------------ */

static const int32_t *blocks_of(const epd_step_t *st, int s)
{
    return st->block_table + (size_t)s * st->max_blocks;
}

/* Position p of sequence s's cache row in a layer's pool of kv_row values per position. */
static size_t kv_at(const epd_cpu_model_t *m, const epd_step_t *st, int t)
{
    int p = st->pos[t], bs = m->block_size;
    return ((size_t)blocks_of(st, st->seq_idx[t])[p / bs] * bs + p % bs) * (size_t)m->kv_row;
}

/* Qwen3-MoE: GQA with q/k RMSNorm before RoPE; keys and values cached. */
static void gqa_block(epd_cpu_model_t *m, const epd_step_t *st, int l, int T)
{
    const epd_hf_config_t *c = &m->cfg;
    const epd_layer_w_t *w = &m->layers[l];
    const int H = c->hidden_size, nh = c->num_attention_heads, nkv = c->num_key_value_heads;
    const int hd = c->head_dim, qd = nh * hd, kvd = nkv * hd;
    const float eps = (float)c->rms_norm_eps;

    epd_linear(m->q, m->xn, w->q, T, H, qd);
    epd_linear(m->k, m->xn, w->k, T, H, kvd);
    epd_linear(m->v, m->xn, w->v, T, H, kvd);
    epd_rmsnorm(m->q, m->q, w->q_norm, T * nh, hd, eps);
    epd_rmsnorm(m->k, m->k, w->k_norm, T * nkv, hd, eps);
    epd_rope_apply(m->q, st->pos, T, nh, hd, m->inv_freq);
    epd_rope_apply(m->k, st->pos, T, nkv, hd, m->inv_freq);
    /* the whole chunk enters the cache first: a token attends to the chunk's earlier tokens */
    for (int t = 0; t < T; t++) {
        memcpy(m->k_pool[l] + kv_at(m, st, t), m->k + (size_t)t * kvd, sizeof(float) * kvd);
        memcpy(m->v_pool[l] + kv_at(m, st, t), m->v + (size_t)t * kvd, sizeof(float) * kvd);
    }
    for (int t = 0; t < T; t++)
        epd_attention_paged(m->att + (size_t)t * qd, m->q + (size_t)t * qd, m->k_pool[l],
                            m->v_pool[l], blocks_of(st, st->seq_idx[t]), m->block_size,
                            st->pos[t] + 1, nh, nkv, hd, m->scores);
    epd_linear(m->tmp, m->att, w->o, T, qd, H);
}

/* DeepSeek: MLA. The cache holds per position the normed latent and the rotated shared key part
 * (kv_row = kvl + rope); attention runs in the absorbed form (mla.c). transformers' q_a and kv_a
 * layernorms have eps 1e-6 whatever rms_norm_eps says. */
static void mla_block(epd_cpu_model_t *m, const epd_step_t *st, int l, int T)
{
    const epd_hf_config_t *c = &m->cfg;
    const epd_layer_w_t *w = &m->layers[l];
    const int H = c->hidden_size, nh = c->num_attention_heads, ql = c->q_lora_rank;
    const int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kvl = c->kv_lora_rank;
    const int vd = c->v_head_dim, qk = nope + rope, qd = nh * qk, row = m->kv_row;

    if (ql) {
        epd_linear(m->q_lora, m->xn, w->q_a, T, H, ql);
        epd_rmsnorm(m->q_lora, m->q_lora, w->q_a_norm, T, ql, 1e-6f);
        epd_linear(m->q, m->q_lora, w->q_b, T, ql, qd);
    } else {
        epd_linear(m->q, m->xn, w->q, T, H, qd);
    }
    epd_linear(m->k, m->xn, w->kv_a, T, H, row); /* [T][kvl + rope] */
    for (int t = 0; t < T; t++)
        epd_rmsnorm(m->k + (size_t)t * row, m->k + (size_t)t * row, w->kv_a_norm, 1, kvl, 1e-6f);
    epd_rope_rotate(m->q + nope, st->pos, T, nh, (size_t)qd, (size_t)qk, rope, m->inv_freq,
                    m->rope_scale, c->rope_interleave);
    epd_rope_rotate(m->k + kvl, st->pos, T, 1, (size_t)row, 0, rope, m->inv_freq, m->rope_scale,
                    c->rope_interleave);
    for (int t = 0; t < T; t++)
        memcpy(m->k_pool[l] + kv_at(m, st, t), m->k + (size_t)t * row, sizeof(float) * row);
    float *q_nope = m->v, *q_pe = m->v + (size_t)nh * nope; /* per token, [nh][nope] [nh][rope] */
    for (int t = 0; t < T; t++) {
        const float *qt = m->q + (size_t)t * qd;
        for (int h = 0; h < nh; h++) {
            memcpy(q_nope + (size_t)h * nope, qt + (size_t)h * qk, sizeof(float) * nope);
            memcpy(q_pe + (size_t)h * rope, qt + (size_t)h * qk + nope, sizeof(float) * rope);
        }
        epd_mla_attention_paged(m->att + (size_t)t * nh * vd, q_nope, q_pe, m->k_pool[l], w->kv_b,
                                blocks_of(st, st->seq_idx[t]), m->block_size, st->pos[t] + 1, nh,
                                nope, rope, kvl, vd, (float)c->attn_scale, m->scores);
    }
    epd_linear(m->tmp, m->att, w->o, T, nh * vd, H);
}

static void attention_block(epd_cpu_model_t *m, const epd_step_t *st, int l, int T)
{
    const epd_hf_config_t *c = &m->cfg;
    epd_rmsnorm(m->xn, m->h, m->layers[l].input_norm, T, c->hidden_size, (float)c->rms_norm_eps);
    if (m->mla)
        mla_block(m, st, l, T);
    else
        gqa_block(m, st, l, T);
    for (size_t i = 0; i < (size_t)T * c->hidden_size; i++)
        m->h[i] += m->tmp[i];
}

/* KV storage for every block the step's sequences hold. */
static int step_storage(epd_cpu_model_t *m, const epd_step_t *st, epd_err_t *err)
{
    int top = -1;
    for (int s = 0; s < st->num_seqs; s++) {
        int nb = (st->seq_len[s] + m->block_size - 1) / m->block_size;
        for (int b = 0; b < nb; b++) {
            int id = blocks_of(st, s)[b];
            if (id < 0 || id >= m->num_blocks)
                return epd_err_set(err, -EINVAL, "forward: KV block id %d outside the pool of %d",
                                   id, m->num_blocks);
            top = id > top ? id : top;
        }
    }
    return kv_grow(m, top + 1, err);
}

static int cpu_forward(void *impl, const epd_step_t *st, int32_t *next, float *logits,
                       epd_err_t *err)
{
    epd_cpu_model_t *m = impl;
    const epd_hf_config_t *c = &m->cfg;
    const int H = c->hidden_size, V = c->vocab_size;
    int T = st->num_tokens, M = st->num_logits;
    epd_err_t bad;
    /* no room for the KV: the rank still joins the step's exchanges, with zero tokens */
    int bad_rc = step_storage(m, st, &bad);
    if (bad_rc) T = M = 0;
    for (int t = 0; t < T; t++)
        memcpy(m->h + (size_t)t * H, m->embed + (size_t)st->tokens[t] * H, sizeof(float) * H);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const epd_layer_w_t *w = &m->layers[l];
        attention_block(m, st, l, T);
        epd_rmsnorm(m->xn, m->h, w->post_norm, T, H, (float)c->rms_norm_eps);
        if (w->is_moe) {
            int rc = epd_moe_forward(m, l, T, st->path == EPD_MOE_HT, err);
            if (rc) return rc;
            if (w->sh_gate) { /* DeepSeek's shared experts: every token, on its own rank */
                int Is = c->moe_intermediate_size * c->n_shared_experts;
                for (int t = 0; t < T; t++)
                    epd_swiglu(m->tmp + (size_t)t * H, m->xn + (size_t)t * H, w->sh_gate, w->sh_up,
                               w->sh_down, 1, H, Is, m->ffn_tmp);
                for (size_t i = 0; i < (size_t)T * H; i++)
                    m->h[i] += m->tmp[i];
            }
        } else {
            for (int t = 0; t < T; t++)
                epd_swiglu(m->tmp + (size_t)t * H, m->xn + (size_t)t * H, w->gate, w->up, w->down,
                           1, H, c->intermediate_size, m->ffn_tmp);
            for (size_t i = 0; i < (size_t)T * H; i++)
                m->h[i] += m->tmp[i];
        }
    }
    if (bad_rc) {
        if (err) *err = bad;
        return bad_rc;
    }
    for (int o = 0; o < M; o++) {
        float *row = m->xn;
        epd_rmsnorm(row, m->h + (size_t)st->logit_rows[o] * H, m->norm, 1, H,
                    (float)c->rms_norm_eps);
        float *lg = logits ? logits + (size_t)o * V : m->logit_row;
        epd_linear(lg, row, m->lm_head, 1, H, V);
        if (next) next[o] = epd_sample_ref(lg, V, &st->sample[o], m->sample_tmp);
    }
    return 0;
}

static void cpu_mem(void *impl, epd_model_mem_t *mem)
{
    const epd_cpu_model_t *m = impl;
    *mem = m->mem;
}

static int cpu_set_group(void *impl, ep_group_t *group, epd_err_t *err)
{
    (void)err;
    epd_cpu_model_t *m = impl;
    m->group = group;
    return 0;
}

static void cpu_expert_tokens(void *impl, uint64_t *counts)
{
    const epd_cpu_model_t *m = impl;
    memcpy(counts, m->expert_tokens, sizeof(uint64_t) * (size_t)m->cfg.num_experts);
}

static const epd_model_ops_t cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .kv_init = cpu_kv_init,
    .forward = cpu_forward,
    .mem = cpu_mem,
    .set_group = cpu_set_group,
    .expert_tokens = cpu_expert_tokens,
};

int epd_cpu_model_load(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                       const epd_model_placement_t *placement, void **impl,
                       const epd_model_ops_t **ops, epd_err_t *err)
{
    int rc;
    epd_st_ckpt_t *ck = NULL;
    *impl = NULL;
    epd_cpu_model_t *m = calloc(1, sizeof(*m));
    if (!m) return epd_err_set(err, -ENOMEM, "out of memory");
    m->cfg = *cfg;
    m->group = o->group;
    m->rank = ep_group_rank(o->group);
    m->nranks = ep_group_size(o->group);
    m->placement = placement;
    m->local = placement->local;
    m->mem.local_experts = m->local;
    m->ll_tokens = ep_group_config(o->group)->ll_max_tokens;
    m->ht_tokens = ep_group_config(o->group)->ht_max_tokens;
    m->max_tokens = m->ht_tokens > m->ll_tokens ? m->ht_tokens : m->ll_tokens;
    m->max_seq_len = o->max_seq_len > 0 ? o->max_seq_len : cfg->max_position_embeddings;
    m->mla = epd_hf_is_mla(cfg);
    m->kv_row = m->mla ? cfg->kv_lora_rank + cfg->qk_rope_head_dim
                       : cfg->num_key_value_heads * cfg->head_dim;
    if (!(m->layers = calloc((size_t)cfg->num_hidden_layers, sizeof(*m->layers)))) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = epd_st_ckpt_open(o->dir, &ck, err)) || (rc = load_weights(m, o, ck, err)) ||
        (rc = alloc_scratch(m, err)))
        goto fail;
    epd_st_ckpt_close(ck);
    *impl = m;
    *ops = &cpu_ops;
    return 0;
fail:
    epd_st_ckpt_close(ck);
    cpu_destroy(m);
    return rc;
}

static void cpu_destroy(void *impl)
{
    epd_cpu_model_t *m = impl;
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
            epd_layer_w_t *w = &m->layers[l];
            float *fs[] = {w->input_norm, w->post_norm, w->q,           w->k,       w->v,
                           w->o,          w->q_norm,    w->k_norm,      w->router,  w->gate,
                           w->up,         w->down,      w->router_bias, w->sh_gate, w->sh_up,
                           w->sh_down,    w->q_a,       w->q_a_norm,    w->q_b,     w->kv_a,
                           w->kv_a_norm,  w->kv_b};
            for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++)
                free(fs[i]);
        }
        free(m->layers);
    }
    for (int l = 0; m->k_pool && l < m->cfg.num_hidden_layers; l++)
        free(m->k_pool[l]);
    for (int l = 0; m->v_pool && l < m->cfg.num_hidden_layers; l++)
        free(m->v_pool[l]);
    free(m->k_pool);
    free(m->v_pool);
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->norm);
    free(m->inv_freq);
    free(m->q_lora);
    float *fs[] = {m->h,         m->xn,        m->q,       m->k,       m->v,
                   m->att,       m->tmp,       m->scores,  m->ffn_tmp, m->router_logits,
                   m->topk_w,    m->row_in,    m->row_out, m->row_acc, m->ht_w,
                   m->logit_row, m->sample_tmp};
    for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++)
        free(fs[i]);
    free(m->topk_idx);
    free(m->xb);
    free(m->comb);
    free(m->expert_y);
    free(m->ht_x);
    free(m->ht_idx);
    free(m->ht_per_expert);
    free(m->ht_y);
    free(m->expert_tokens);
    free(m);
}
