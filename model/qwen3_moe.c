/* Qwen3-MoE on one rank: loading (config, placement, fp32 conversion of the replicated weights
 * and of this rank's experts), memory accounting and the batched forward pass with its choice
 * of libep path per step. */
#include "model_internal.h"
#include "ops.h"
#include "safetensors.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void epd_model_ep_config(const epd_hf_config_t *cfg, int max_batch_tokens, int max_prefill_tokens,
                         ep_config_t *ep)
{
    ep->num_experts = cfg->num_experts;
    ep->hidden = cfg->hidden_size;
    ep->num_topk = cfg->num_experts_per_tok;
    ep->ll_max_tokens = max_batch_tokens;
    ep->ht_max_tokens = max_prefill_tokens > max_batch_tokens ? max_prefill_tokens : 0;
}

static size_t replicated_floats(const epd_hf_config_t *c)
{
    size_t H = (size_t)c->hidden_size, V = (size_t)c->vocab_size, hd = (size_t)c->head_dim;
    size_t qd = (size_t)c->num_attention_heads * hd, kvd = (size_t)c->num_key_value_heads * hd;
    size_t n = V * H + H + (c->tie_word_embeddings ? 0 : V * H);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        n += 2 * H + 2 * hd + qd * H + 2 * kvd * H + H * qd;
        if (epd_hf_layer_is_moe(c, l))
            n += (size_t)c->num_experts * H;
        else
            n += 3 * (size_t)c->intermediate_size * H;
    }
    return n;
}

void epd_model_mem_estimate(const epd_hf_config_t *cfg, int nranks, epd_model_mem_t *mem)
{
    int moe_layers = 0;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        moe_layers += epd_hf_layer_is_moe(cfg, l);
    mem->local_experts = nranks > 0 ? cfg->num_experts / nranks : 0;
    mem->replicated_bytes = replicated_floats(cfg) * sizeof(float);
    mem->expert_bytes = (size_t)moe_layers * (size_t)mem->local_experts * 3 *
                        (size_t)cfg->moe_intermediate_size * (size_t)cfg->hidden_size *
                        sizeof(float);
}

/* ---- loading ------------------------------------------------------------------------------ */

typedef struct loader {
    epd_model_t *m;
    const epd_st_ckpt_t *ck;
    epd_err_t *err;
} loader_t;

/* Allocates and loads one tensor of the given shape; counts its bytes as replicated or expert. */
static int load(loader_t *ld, float **dst, int expert, int ndim, int64_t d0, int64_t d1,
                const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static int load(loader_t *ld, float **dst, int expert, int ndim, int64_t d0, int64_t d1,
                const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    int64_t shape[2] = {d0, d1};
    size_t n = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1);
    if (!*dst && !(*dst = malloc(n * sizeof(float))))
        return epd_err_set(ld->err, -ENOMEM, "out of memory for tensor '%s' (%zu bytes)", name,
                           n * sizeof(float));
    int rc = epd_st_ckpt_load_f32(ld->ck, name, ndim, shape, *dst, ld->err);
    if (rc == 0) {
        if (expert)
            ld->m->mem.expert_bytes += n * sizeof(float);
        else
            ld->m->mem.replicated_bytes += n * sizeof(float);
    }
    return rc;
}

static int load_experts(loader_t *ld, int l)
{
    epd_model_t *m = ld->m;
    const epd_hf_config_t *c = &m->cfg;
    epd_layer_w_t *w = &m->layers[l];
    const int64_t H = c->hidden_size, I = c->moe_intermediate_size;
    size_t per = (size_t)I * (size_t)H;
    w->gate = malloc(sizeof(float) * per * (size_t)m->local);
    w->up = malloc(sizeof(float) * per * (size_t)m->local);
    w->down = malloc(sizeof(float) * per * (size_t)m->local);
    if (!w->gate || !w->up || !w->down)
        return epd_err_set(ld->err, -ENOMEM, "out of memory for the experts of layer %d", l);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int e = 0; e < c->num_experts; e++) {
        int slot = m->placement.slot_of[e];
        int mine = slot / m->local == m->rank;
        for (int p = 0; p < 3; p++) {
            int64_t d0 = p == 2 ? H : I, d1 = p == 2 ? I : H;
            int rc;
            if (mine) {
                float *dst = (p == 0   ? w->gate
                              : p == 1 ? w->up
                                       : w->down) +
                             (size_t)(slot % m->local) * per;
                rc = load(ld, &dst, 1, 2, d0, d1, "model.layers.%d.mlp.experts.%d.%s.weight", l, e,
                          proj[p]);
            } else { /* other ranks' experts: only checked, so every rank refuses a bad file */
                char name[256];
                int64_t shape[2] = {d0, d1};
                snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s.weight", l, e,
                         proj[p]);
                rc = epd_st_ckpt_load_f32(ld->ck, name, 2, shape, NULL, ld->err);
            }
            if (rc) return rc;
        }
    }
    return 0;
}

static int load_weights(epd_model_t *m, const epd_st_ckpt_t *ck, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    loader_t ld = {m, ck, err};
    const int64_t H = c->hidden_size, V = c->vocab_size, hd = c->head_dim;
    const int64_t qd = (int64_t)c->num_attention_heads * hd;
    const int64_t kvd = (int64_t)c->num_key_value_heads * hd;
    int rc;
    if ((rc = load(&ld, &m->embed, 0, 2, V, H, "model.embed_tokens.weight")) ||
        (rc = load(&ld, &m->norm, 0, 1, H, 0, "model.norm.weight")))
        return rc;
    if (c->tie_word_embeddings)
        m->lm_head = m->embed;
    else if ((rc = load(&ld, &m->lm_head, 0, 2, V, H, "lm_head.weight")))
        return rc;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        epd_layer_w_t *w = &m->layers[l];
        const char *pre = "model.layers";
        if ((rc = load(&ld, &w->input_norm, 0, 1, H, 0, "%s.%d.input_layernorm.weight", pre, l)) ||
            (rc = load(&ld, &w->post_norm, 0, 1, H, 0, "%s.%d.post_attention_layernorm.weight", pre,
                       l)) ||
            (rc = load(&ld, &w->q, 0, 2, qd, H, "%s.%d.self_attn.q_proj.weight", pre, l)) ||
            (rc = load(&ld, &w->k, 0, 2, kvd, H, "%s.%d.self_attn.k_proj.weight", pre, l)) ||
            (rc = load(&ld, &w->v, 0, 2, kvd, H, "%s.%d.self_attn.v_proj.weight", pre, l)) ||
            (rc = load(&ld, &w->o, 0, 2, H, qd, "%s.%d.self_attn.o_proj.weight", pre, l)) ||
            (rc = load(&ld, &w->q_norm, 0, 1, hd, 0, "%s.%d.self_attn.q_norm.weight", pre, l)) ||
            (rc = load(&ld, &w->k_norm, 0, 1, hd, 0, "%s.%d.self_attn.k_norm.weight", pre, l)))
            return rc;
        w->is_moe = epd_hf_layer_is_moe(c, l);
        if (w->is_moe) {
            if ((rc = load(&ld, &w->router, 0, 2, c->num_experts, H, "%s.%d.mlp.gate.weight", pre,
                           l)) ||
                (rc = load_experts(&ld, l)))
                return rc;
        } else {
            const int64_t Id = c->intermediate_size;
            if ((rc = load(&ld, &w->gate, 0, 2, Id, H, "%s.%d.mlp.gate_proj.weight", pre, l)) ||
                (rc = load(&ld, &w->up, 0, 2, Id, H, "%s.%d.mlp.up_proj.weight", pre, l)) ||
                (rc = load(&ld, &w->down, 0, 2, H, Id, "%s.%d.mlp.down_proj.weight", pre, l)))
                return rc;
        }
    }
    return 0;
}

static int alloc_scratch(epd_model_t *m, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    size_t T = (size_t)m->max_tokens, H = (size_t)c->hidden_size;
    size_t qd = (size_t)c->num_attention_heads * c->head_dim;
    size_t kvd = (size_t)c->num_key_value_heads * c->head_dim;
    size_t inter =
        (size_t)(c->intermediate_size > c->moe_intermediate_size ? c->intermediate_size
                                                                 : c->moe_intermediate_size);
    size_t S = (size_t)m->ll_tokens * (size_t)m->nranks;
    m->h = malloc(sizeof(float) * T * H);
    m->xn = malloc(sizeof(float) * T * H);
    m->q = malloc(sizeof(float) * T * qd);
    m->k = malloc(sizeof(float) * T * kvd);
    m->v = malloc(sizeof(float) * T * kvd);
    m->att = malloc(sizeof(float) * T * qd);
    m->tmp = malloc(sizeof(float) * T * H);
    m->scores = malloc(sizeof(float) * (size_t)m->max_seq_len);
    m->ffn_tmp = malloc(sizeof(float) * 2 * inter);
    m->pos = malloc(sizeof(int32_t) * T);
    m->tok_item = malloc(sizeof(int32_t) * T);
    m->router_logits = malloc(sizeof(float) * T * (size_t)c->num_experts);
    m->topk_idx = malloc(sizeof(int32_t) * T * (size_t)c->num_experts_per_tok);
    m->topk_w = malloc(sizeof(float) * T * (size_t)c->num_experts_per_tok);
    m->xb = malloc(sizeof(uint16_t) * T * H);
    m->comb = malloc(sizeof(uint16_t) * T * H);
    m->expert_y = malloc(sizeof(uint16_t) * (size_t)m->local * S * H);
    m->row_in = malloc(sizeof(float) * H);
    m->row_out = malloc(sizeof(float) * H);
    m->row_acc = malloc(sizeof(float) * H);
    m->inv_freq = malloc(sizeof(float) * (size_t)(c->head_dim / 2));
    m->expert_tokens = calloc((size_t)c->num_experts, sizeof(uint64_t));
    if (!m->expert_tokens || !m->h || !m->xn || !m->q || !m->k || !m->v || !m->att || !m->tmp ||
        !m->scores || !m->ffn_tmp || !m->pos || !m->tok_item || !m->router_logits || !m->topk_idx ||
        !m->topk_w || !m->xb || !m->comb || !m->expert_y || !m->row_in || !m->row_out ||
        !m->row_acc || !m->inv_freq)
        return epd_err_set(err, -ENOMEM, "out of memory for the scratch of %zu tokens", T);
    if (m->ht_tokens > 0) {
        size_t N = (size_t)ep_ht_max_recv_tokens(m->group), K = (size_t)c->num_experts_per_tok;
        m->ht_cap = (int)N;
        m->ht_x = malloc(sizeof(uint16_t) * N * H);
        m->ht_idx = malloc(sizeof(int32_t) * N * K);
        m->ht_w = malloc(sizeof(float) * N * K);
        m->ht_per_expert = malloc(sizeof(int32_t) * (size_t)m->local);
        m->ht_y = malloc(sizeof(uint16_t) * N * H);
        if (!m->ht_x || !m->ht_idx || !m->ht_w || !m->ht_per_expert || !m->ht_y)
            return epd_err_set(err, -ENOMEM,
                               "out of memory for the HT buffers of %zu received tokens", N);
    }
    epd_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta);
    return 0;
}

static int check_group(epd_model_t *m, epd_err_t *err)
{
    const ep_config_t *g = ep_group_config(m->group);
    const epd_hf_config_t *c = &m->cfg;
    if (g->num_experts != c->num_experts || g->hidden != c->hidden_size ||
        g->num_topk != c->num_experts_per_tok)
        return epd_err_set(err, -EINVAL,
                           "EP group (experts %d, hidden %d, top-k %d) does not match the model "
                           "(num_experts %d, hidden_size %d, num_experts_per_tok %d)",
                           g->num_experts, g->hidden, g->num_topk, c->num_experts, c->hidden_size,
                           c->num_experts_per_tok);
    if (g->ll_max_tokens < 1)
        return epd_err_set(err, -EINVAL, "EP group has LL disabled (ll_max_tokens %d)",
                           g->ll_max_tokens);
    if (g->ht_max_tokens > 0 && g->ht_max_tokens < g->ll_max_tokens)
        return epd_err_set(err, -EINVAL,
                           "EP group's ht_max_tokens %d is below its ll_max_tokens %d: an HT step "
                           "must carry at least what an LL step does",
                           g->ht_max_tokens, g->ll_max_tokens);
    return 0;
}

int epd_model_load(const epd_model_opts_t *o, epd_model_t **out, epd_err_t *err)
{
    int rc;
    epd_st_ckpt_t *ck = NULL;
    char path[4096];
    *out = NULL;
    epd_model_t *m = calloc(1, sizeof(*m));
    if (!m) return epd_err_set(err, -ENOMEM, "out of memory");
    if (!o->group) {
        rc = epd_err_set(err, -EINVAL, "model: no EP group given");
        goto fail;
    }
    m->group = o->group;
    m->rank = ep_group_rank(o->group);
    m->nranks = ep_group_size(o->group);
    if (snprintf(path, sizeof(path), "%s/config.json", o->dir) >= (int)sizeof(path)) {
        rc = epd_err_set(err, -ENAMETOOLONG, "%s: path too long", o->dir);
        goto fail;
    }
    if ((rc = epd_hf_config_load(path, &m->cfg, err)) || (rc = check_group(m, err))) goto fail;
    const epd_hf_config_t *c = &m->cfg;
    m->ll_tokens = ep_group_config(o->group)->ll_max_tokens;
    m->ht_tokens = ep_group_config(o->group)->ht_max_tokens;
    m->max_tokens = m->ht_tokens > m->ll_tokens ? m->ht_tokens : m->ll_tokens;
    if (o->ht_min_tokens < 0 || o->ht_min_tokens > m->ll_tokens + 1) {
        rc = epd_err_set(err, -EINVAL,
                         "ht_min_tokens %d is not in 1..%d (ll_max_tokens + 1; 0 for that): "
                         "steps below it go through LL",
                         o->ht_min_tokens, m->ll_tokens + 1);
        goto fail;
    }
    m->ht_min = o->ht_min_tokens ? o->ht_min_tokens : m->ll_tokens + 1;
    m->max_seq_len = o->max_seq_len > 0 ? o->max_seq_len : c->max_position_embeddings;
    if (o->placement) {
        if (o->placement->num_experts != c->num_experts || o->placement->nranks != m->nranks) {
            rc = epd_err_set(err, -EINVAL,
                             "placement is for %d experts over %d ranks; the model has %d experts "
                             "over %d ranks",
                             o->placement->num_experts, o->placement->nranks, c->num_experts,
                             m->nranks);
            goto fail;
        }
        const int *rank_of = NULL;
        int *tmp = malloc(sizeof(int) * (size_t)c->num_experts);
        if (!tmp) {
            rc = epd_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        for (int e = 0; e < c->num_experts; e++)
            tmp[e] = epd_model_placement_rank(o->placement, e);
        rank_of = tmp;
        rc = epd_model_placement_explicit(c->num_experts, m->nranks, rank_of, c->num_experts,
                                          &m->placement, err);
        free(tmp);
    } else {
        rc = epd_model_placement_contiguous(c->num_experts, m->nranks, &m->placement, err);
    }
    if (rc) goto fail;
    m->local = m->placement.local;
    m->mem.local_experts = m->local;
    if (!(m->layers = calloc((size_t)c->num_hidden_layers, sizeof(*m->layers)))) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = epd_st_ckpt_open(o->dir, &ck, err)) || (rc = load_weights(m, ck, err)) ||
        (rc = alloc_scratch(m, err)))
        goto fail;
    epd_st_ckpt_close(ck);
    *out = m;
    return 0;
fail:
    epd_st_ckpt_close(ck);
    epd_model_destroy(m);
    return rc;
}

void epd_model_destroy(epd_model_t *m)
{
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
            epd_layer_w_t *w = &m->layers[l];
            free(w->input_norm);
            free(w->post_norm);
            free(w->q);
            free(w->k);
            free(w->v);
            free(w->o);
            free(w->q_norm);
            free(w->k_norm);
            free(w->router);
            free(w->gate);
            free(w->up);
            free(w->down);
        }
        free(m->layers);
    }
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->norm);
    free(m->inv_freq);
    float *fs[] = {m->h,      m->xn,     m->q,       m->k,       m->v,
                   m->att,    m->tmp,    m->scores,  m->ffn_tmp, m->router_logits,
                   m->topk_w, m->row_in, m->row_out, m->row_acc, m->ht_w};
    for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++)
        free(fs[i]);
    free(m->pos);
    free(m->tok_item);
    free(m->topk_idx);
    free(m->xb);
    free(m->comb);
    free(m->expert_y);
    free(m->ht_x);
    free(m->ht_idx);
    free(m->ht_per_expert);
    free(m->ht_y);
    free(m->expert_tokens);
    epd_model_placement_fini(&m->placement);
    free(m);
}

const epd_hf_config_t *epd_model_config(const epd_model_t *m)
{
    return &m->cfg;
}

void epd_model_mem(const epd_model_t *m, epd_model_mem_t *mem)
{
    *mem = m->mem;
}

int epd_model_max_batch_tokens(const epd_model_t *m)
{
    return m->ll_tokens;
}

int epd_model_max_prefill_tokens(const epd_model_t *m)
{
    return m->max_tokens;
}

epd_moe_path_t epd_model_step_path(const epd_model_t *m, int step_max_tokens)
{
    return m->ht_tokens > 0 && step_max_tokens >= m->ht_min ? EPD_MOE_HT : EPD_MOE_LL;
}

void epd_model_path_counts(const epd_model_t *m, uint64_t counts[2])
{
    counts[0] = m->steps[0];
    counts[1] = m->steps[1];
}

int epd_model_set_group(epd_model_t *m, ep_group_t *group, epd_err_t *err)
{
    if (!group) return epd_err_set(err, -EINVAL, "model: no EP group given");
    if (ep_group_rank(group) != m->rank || ep_group_size(group) != m->nranks)
        return epd_err_set(err, -EINVAL,
                           "new EP group is rank %d of %d; the model was loaded as rank %d of %d",
                           ep_group_rank(group), ep_group_size(group), m->rank, m->nranks);
    if (ep_group_config(group)->ll_max_tokens != m->ll_tokens ||
        ep_group_config(group)->ht_max_tokens != m->ht_tokens)
        return epd_err_set(err, -EINVAL,
                           "new EP group has ll_max_tokens %d and ht_max_tokens %d; the model's "
                           "scratch is for %d and %d",
                           ep_group_config(group)->ll_max_tokens,
                           ep_group_config(group)->ht_max_tokens, m->ll_tokens, m->ht_tokens);
    ep_group_t *old = m->group;
    m->group = group;
    int rc = check_group(m, err);
    if (rc) m->group = old;
    return rc;
}

void epd_model_expert_tokens(const epd_model_t *m, uint64_t *counts)
{
    memcpy(counts, m->expert_tokens, sizeof(uint64_t) * (size_t)m->cfg.num_experts);
}

/* ---- forward ------------------------------------------------------------------------------ */

static int check_items(epd_model_t *m, const epd_batch_item_t *items, int n, int bound,
                       const char *path, int *total, epd_err_t *err)
{
    int T = 0;
    if (n < 0 || (n > 0 && !items))
        return epd_err_set(err, -EINVAL, "forward: bad item count %d", n);
    for (int i = 0; i < n; i++) {
        const epd_batch_item_t *it = &items[i];
        if (!it->seq || it->seq->m != m)
            return epd_err_set(err, -EINVAL, "forward: item %d has no sequence of this model", i);
        if (it->num_tokens < 1 || !it->tokens)
            return epd_err_set(err, -EINVAL, "forward: item %d has %d tokens", i, it->num_tokens);
        for (int j = 0; j < it->num_tokens; j++)
            if (it->tokens[j] < 0 || it->tokens[j] >= m->cfg.vocab_size)
                return epd_err_set(err, -EINVAL,
                                   "forward: item %d token %d: id %d outside the vocabulary "
                                   "(0..%d)",
                                   i, j, it->tokens[j], m->cfg.vocab_size - 1);
        for (int p = 0; p < i; p++)
            if (items[p].seq == it->seq)
                return epd_err_set(err, -EINVAL, "forward: items %d and %d share a sequence", p, i);
        if (it->num_tokens > bound - T)
            return epd_err_set(err, -E2BIG,
                               "forward: more than %d tokens in one call on rank %d (item %d; "
                               "%s)",
                               bound, m->rank, i, path);
        T += it->num_tokens;
        int rc = epd_seq_reserve(it->seq, it->seq->len + it->num_tokens, err);
        if (rc) return rc;
    }
    *total = T;
    return 0;
}

static void attention_block(epd_model_t *m, const epd_batch_item_t *items, int l, int T)
{
    const epd_hf_config_t *c = &m->cfg;
    const epd_layer_w_t *w = &m->layers[l];
    const int H = c->hidden_size, nh = c->num_attention_heads, nkv = c->num_key_value_heads;
    const int hd = c->head_dim, qd = nh * hd, kvd = nkv * hd;
    const float eps = (float)c->rms_norm_eps;

    epd_rmsnorm(m->xn, m->h, w->input_norm, T, H, eps);
    epd_linear(m->q, m->xn, w->q, T, H, qd);
    epd_linear(m->k, m->xn, w->k, T, H, kvd);
    epd_linear(m->v, m->xn, w->v, T, H, kvd);
    epd_rmsnorm(m->q, m->q, w->q_norm, T * nh, hd, eps);
    epd_rmsnorm(m->k, m->k, w->k_norm, T * nkv, hd, eps);
    epd_rope_apply(m->q, m->pos, T, nh, hd, m->inv_freq);
    epd_rope_apply(m->k, m->pos, T, nkv, hd, m->inv_freq);
    /* the whole chunk enters the caches first: a token attends to the chunk's earlier tokens */
    for (int t = 0; t < T; t++) {
        epd_seq_t *s = items[m->tok_item[t]].seq;
        memcpy(s->k[l] + (size_t)m->pos[t] * kvd, m->k + (size_t)t * kvd, sizeof(float) * kvd);
        memcpy(s->v[l] + (size_t)m->pos[t] * kvd, m->v + (size_t)t * kvd, sizeof(float) * kvd);
    }
    for (int t = 0; t < T; t++) {
        const epd_seq_t *s = items[m->tok_item[t]].seq;
        epd_attention_token(m->att + (size_t)t * qd, m->q + (size_t)t * qd, s->k[l], s->v[l],
                            m->pos[t] + 1, nh, nkv, hd, m->scores);
    }
    epd_linear(m->tmp, m->att, w->o, T, qd, H);
    for (size_t i = 0; i < (size_t)T * H; i++)
        m->h[i] += m->tmp[i];
}

/* bound: this rank's tokens for this step; path: how it was set, for the message. */
static int forward(epd_model_t *m, const epd_batch_item_t *items, int n, int ht, int bound,
                   const char *path, float *logits, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    const int H = c->hidden_size;
    int T = 0;
    epd_err_t bad;
    /* Bad input on this rank still joins every MoE exchange, with zero tokens, so that the
     * other ranks' step completes instead of timing out; the error is returned afterwards. */
    int bad_rc = check_items(m, items, n, bound, path, &T, &bad);
    if (bad_rc) {
        n = 0;
        T = 0;
    }
    for (int i = 0, t = 0; i < n; i++)
        for (int j = 0; j < items[i].num_tokens; j++, t++) {
            m->pos[t] = items[i].seq->len + j;
            m->tok_item[t] = i;
            memcpy(m->h + (size_t)t * H, m->embed + (size_t)items[i].tokens[j] * H,
                   sizeof(float) * H);
        }
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const epd_layer_w_t *w = &m->layers[l];
        attention_block(m, items, l, T);
        epd_rmsnorm(m->xn, m->h, w->post_norm, T, H, (float)c->rms_norm_eps);
        if (w->is_moe) {
            int rc = epd_moe_forward(m, l, T, ht, err);
            if (rc) return rc;
        } else {
            for (int t = 0; t < T; t++)
                epd_swiglu(m->tmp + (size_t)t * H, m->xn + (size_t)t * H, w->gate, w->up, w->down,
                           1, H, c->intermediate_size, m->ffn_tmp);
            for (size_t i = 0; i < (size_t)T * H; i++)
                m->h[i] += m->tmp[i];
        }
    }
    m->steps[ht]++;
    if (bad_rc) {
        if (err) *err = bad;
        return bad_rc;
    }
    for (int i = 0, t = 0, o = 0; i < n; i++) {
        t += items[i].num_tokens;
        items[i].seq->len += items[i].num_tokens;
        if (!items[i].want_logits) continue;
        float *row = m->xn; /* the last token of the item: row t - 1 */
        epd_rmsnorm(row, m->h + (size_t)(t - 1) * H, m->norm, 1, H, (float)c->rms_norm_eps);
        epd_linear(logits + (size_t)o * c->vocab_size, row, m->lm_head, 1, H, c->vocab_size);
        o++;
    }
    return 0;
}

int epd_model_forward_step(epd_model_t *m, const epd_batch_item_t *items, int n,
                           int step_max_tokens, float *logits, epd_err_t *err)
{
    char path[96];
    int ht = epd_model_step_path(m, step_max_tokens) == EPD_MOE_HT;
    int bound = ht ? m->ht_tokens : m->ll_tokens;
    if (step_max_tokens < bound) bound = step_max_tokens < 0 ? 0 : step_max_tokens;
    snprintf(path, sizeof(path), "%s step, largest rank batch %d", ht ? "HT" : "LL",
             step_max_tokens);
    return forward(m, items, n, ht, bound, path, logits, err);
}

int epd_model_forward(epd_model_t *m, const epd_batch_item_t *items, int n, float *logits,
                      epd_err_t *err)
{
    return forward(m, items, n, 0, m->ll_tokens, "LL step", logits, err);
}
