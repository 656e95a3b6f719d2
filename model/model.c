/* The model interface (model.h) over its implementations (model_impl.h): config and placement,
 * the choice of implementation, the KV block pool and the sequences' block tables, and the
 * step: argument checks, the KV reservation, the flat step batch and the lockstep rule. */
#include "model_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SEQS_DEFAULT 64

struct epd_model {
    epd_hf_config_t cfg;
    epd_model_backend_t backend;
    void *impl;
    const epd_model_ops_t *ops;
    ep_group_t *group;
    int rank, nranks;
    int ll_tokens, ht_tokens, ht_min, max_seq_len, max_seqs;
    uint64_t steps[2]; /* forward calls that took LL ([0]) and HT ([1]) */
    epd_model_placement_t placement;

    /* KV pool: free block ids in a binary min-heap, so the lowest free id goes out first */
    int block_size, num_blocks, max_blocks;
    int32_t *heap;
    int heap_n;

    /* the flat step, for up to max_tokens tokens of max_seqs sequences */
    int max_tokens;
    int32_t *tokens, *pos, *seq_idx, *seq_len, *block_table, *logit_rows, *grew;
    epd_sample_params_t *sample;
};

struct epd_seq {
    epd_model_t *m;
    int len, nblocks;
    int32_t *blocks; /* [max_blocks] */
};

/* ---- the block pool ----------------------------------------------------------------------- */

static void heap_push(epd_model_t *m, int32_t b)
{
    int i = m->heap_n++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (m->heap[p] <= b) break;
        m->heap[i] = m->heap[p];
        i = p;
    }
    m->heap[i] = b;
}

static int32_t heap_pop(epd_model_t *m)
{
    int32_t top = m->heap[0], last = m->heap[--m->heap_n];
    int i = 0, n = m->heap_n;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && m->heap[c + 1] < m->heap[c]) c++;
        if (m->heap[c] >= last) break;
        m->heap[i] = m->heap[c];
        i = c;
    }
    if (n > 0) m->heap[i] = last;
    return top;
}

/* Gives back the sequence's blocks from index `keep` on. */
static void seq_release(epd_seq_t *s, int keep)
{
    while (s->nblocks > keep)
        heap_push(s->m, s->blocks[--s->nblocks]);
}

int epd_model_kv_blocks_free(const epd_model_t *m)
{
    return m->heap_n;
}

int epd_model_kv_blocks_total(const epd_model_t *m)
{
    return m->num_blocks;
}

int epd_model_kv_block_size(const epd_model_t *m)
{
    return m->block_size;
}

int epd_model_kv_blocks_for(const epd_model_t *m, int len)
{
    return len <= 0 ? 0 : (len + m->block_size - 1) / m->block_size;
}

int epd_seq_create(epd_model_t *m, epd_seq_t **out, epd_err_t *err)
{
    *out = NULL;
    epd_seq_t *s = calloc(1, sizeof(*s));
    if (!s || !(s->blocks = malloc(sizeof(int32_t) * (size_t)m->max_blocks))) {
        free(s);
        return epd_err_set(err, -ENOMEM, "sequence: out of memory");
    }
    s->m = m;
    *out = s;
    return 0;
}

void epd_seq_destroy(epd_seq_t *s)
{
    if (!s) return;
    seq_release(s, 0);
    free(s->blocks);
    free(s);
}

int epd_seq_len(const epd_seq_t *s)
{
    return s->len;
}

void epd_seq_truncate(epd_seq_t *s, int len)
{
    if (len < 0 || len >= s->len) return;
    s->len = len;
    seq_release(s, epd_model_kv_blocks_for(s->m, len));
}

int epd_seq_blocks(const epd_seq_t *s)
{
    return s->nblocks;
}

size_t epd_seq_bytes(const epd_seq_t *s)
{
    epd_model_mem_t mem;
    epd_model_mem(s->m, &mem);
    return (size_t)s->nblocks * mem.kv_block_bytes;
}

/* ---- load --------------------------------------------------------------------------------- */

void epd_model_ep_config(const epd_hf_config_t *cfg, int max_batch_tokens, int max_prefill_tokens,
                         ep_config_t *ep)
{
    ep->num_experts = cfg->num_experts;
    ep->hidden = cfg->hidden_size;
    ep->num_topk = cfg->num_experts_per_tok;
    ep->ll_max_tokens = max_batch_tokens;
    ep->ht_max_tokens = max_prefill_tokens > max_batch_tokens ? max_prefill_tokens : 0;
}

static int check_group(const epd_hf_config_t *c, ep_group_t *group, epd_err_t *err)
{
    const ep_config_t *g = ep_group_config(group);
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

static int load_placement(epd_model_t *m, const epd_model_placement_t *p, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    if (!p) return epd_model_placement_contiguous(c->num_experts, m->nranks, &m->placement, err);
    if (p->num_experts != c->num_experts || p->nranks != m->nranks)
        return epd_err_set(err, -EINVAL,
                           "placement is for %d experts over %d ranks; the model has %d experts "
                           "over %d ranks",
                           p->num_experts, p->nranks, c->num_experts, m->nranks);
    int *rank_of = malloc(sizeof(int) * (size_t)c->num_experts);
    if (!rank_of) return epd_err_set(err, -ENOMEM, "out of memory");
    for (int e = 0; e < c->num_experts; e++)
        rank_of[e] = epd_model_placement_rank(p, e);
    int rc = epd_model_placement_explicit(c->num_experts, m->nranks, rank_of, c->num_experts,
                                          &m->placement, err);
    free(rank_of);
    return rc;
}

static int load_impl(epd_model_t *m, const epd_model_opts_t *o, epd_err_t *err)
{
    switch (o->backend) {
    case EPD_MODEL_CPU:
        return epd_cpu_model_load(o, &m->cfg, &m->placement, &m->impl, &m->ops, err);
    case EPD_MODEL_CUDA:
#ifdef EPD_MODEL_HAVE_CUDA
        return epd_cuda_model_load(o, &m->cfg, &m->placement, &m->impl, &m->ops, err);
#else
        return epd_err_set(err, -ENOTSUP,
                           "compute.backend \"cuda\": this epd was built without CUDA");
#endif
    }
    return epd_err_set(err, -EINVAL, "model: unknown backend %d", (int)o->backend);
}

static int alloc_step(epd_model_t *m, epd_err_t *err)
{
    size_t T = (size_t)m->max_tokens, S = (size_t)m->max_seqs;
    m->heap = malloc(sizeof(int32_t) * (size_t)m->num_blocks);
    m->tokens = malloc(sizeof(int32_t) * T);
    m->pos = malloc(sizeof(int32_t) * T);
    m->seq_idx = malloc(sizeof(int32_t) * T);
    m->seq_len = malloc(sizeof(int32_t) * S);
    m->grew = malloc(sizeof(int32_t) * S);
    m->logit_rows = malloc(sizeof(int32_t) * S);
    m->sample = malloc(sizeof(epd_sample_params_t) * S);
    m->block_table = malloc(sizeof(int32_t) * S * (size_t)m->max_blocks);
    if (!m->heap || !m->tokens || !m->pos || !m->seq_idx || !m->seq_len || !m->grew ||
        !m->logit_rows || !m->sample || !m->block_table)
        return epd_err_set(err, -ENOMEM, "out of memory for the step of %zu tokens", T);
    for (int b = 0; b < m->num_blocks; b++) /* ascending: already a min-heap */
        m->heap[b] = b;
    m->heap_n = m->num_blocks;
    return 0;
}

int epd_model_load(const epd_model_opts_t *o, epd_model_t **out, epd_err_t *err)
{
    int rc;
    char path[4096];
    *out = NULL;
    epd_model_t *m = calloc(1, sizeof(*m));
    if (!m) return epd_err_set(err, -ENOMEM, "out of memory");
    if (!o->group) {
        rc = epd_err_set(err, -EINVAL, "model: no EP group given");
        goto fail;
    }
    m->backend = o->backend;
    m->group = o->group;
    m->rank = ep_group_rank(o->group);
    m->nranks = ep_group_size(o->group);
    if (snprintf(path, sizeof(path), "%s/config.json", o->dir) >= (int)sizeof(path)) {
        rc = epd_err_set(err, -ENAMETOOLONG, "%s: path too long", o->dir);
        goto fail;
    }
    if ((rc = epd_hf_config_load(path, &m->cfg, err)) || (rc = check_group(&m->cfg, m->group, err)))
        goto fail;
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
    m->max_seq_len = o->max_seq_len > 0 ? o->max_seq_len : m->cfg.max_position_embeddings;
    m->max_seqs = o->max_seqs > 0 ? o->max_seqs : MAX_SEQS_DEFAULT;
    m->block_size = o->kv_block_size > 0 ? o->kv_block_size : EPD_KV_BLOCK_DEFAULT;
    if (o->max_seqs < 0 || o->kv_block_size < 0 || o->kv_blocks < 0 || o->kv_memory_fraction < 0 ||
        o->kv_memory_fraction > 1 || m->max_seq_len < 1) {
        rc = epd_err_set(err, -EINVAL,
                         "model options: max_seqs %d, kv_block_size %d, kv_blocks %d, "
                         "kv_memory_fraction %g, max_seq_len %d: none may be negative (and the "
                         "fraction at most 1, the length at least 1)",
                         o->max_seqs, o->kv_block_size, o->kv_blocks, o->kv_memory_fraction,
                         m->max_seq_len);
        goto fail;
    }
    m->max_blocks = epd_model_kv_blocks_for(m, m->max_seq_len);
    if ((rc = load_placement(m, o->placement, err)) || (rc = load_impl(m, o, err))) goto fail;
    m->num_blocks = o->kv_blocks;
    /* cpu: enough for max_seqs sequences of max_seq_len (taken lazily); cuda picks for 0 */
    if (m->num_blocks == 0 && o->backend == EPD_MODEL_CPU)
        m->num_blocks = m->max_seqs * m->max_blocks;
    if ((rc = m->ops->kv_init(m->impl, m->block_size, &m->num_blocks, err))) goto fail;
    if ((rc = alloc_step(m, err))) goto fail;
    *out = m;
    return 0;
fail:
    epd_model_destroy(m);
    return rc;
}

void epd_model_destroy(epd_model_t *m)
{
    if (!m) return;
    if (m->impl) m->ops->destroy(m->impl);
    epd_model_placement_fini(&m->placement);
    free(m->heap);
    free(m->tokens);
    free(m->pos);
    free(m->seq_idx);
    free(m->seq_len);
    free(m->grew);
    free(m->logit_rows);
    free(m->sample);
    free(m->block_table);
    free(m);
}

epd_model_backend_t epd_model_backend(const epd_model_t *m)
{
    return m->backend;
}

const epd_hf_config_t *epd_model_config(const epd_model_t *m)
{
    return &m->cfg;
}

void epd_model_mem(const epd_model_t *m, epd_model_mem_t *mem)
{
    *mem = (epd_model_mem_t){0};
    m->ops->mem(m->impl, mem);
    mem->local_experts = m->placement.local;
    mem->kv_blocks_total = m->num_blocks;
    mem->kv_blocks_free = m->heap_n;
    mem->kv_block_size = m->block_size;
}

int epd_model_max_batch_tokens(const epd_model_t *m)
{
    return m->ll_tokens;
}

int epd_model_max_prefill_tokens(const epd_model_t *m)
{
    return m->max_tokens;
}

int epd_model_max_seqs(const epd_model_t *m)
{
    return m->max_seqs;
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
    int rc = check_group(&m->cfg, group, err);
    if (rc) return rc;
    if ((rc = m->ops->set_group(m->impl, group, err))) return rc;
    m->group = group;
    return 0;
}

void epd_model_expert_tokens(const epd_model_t *m, uint64_t *counts)
{
    m->ops->expert_tokens(m->impl, counts);
}

/* ---- the step ----------------------------------------------------------------------------- */

/* Checks the items; *total gets their tokens. */
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
        if (i >= m->max_seqs)
            return epd_err_set(err, -E2BIG,
                               "forward: %d items in one call on rank %d; the model takes at "
                               "most %d sequences per step (max_seqs)",
                               n, m->rank, m->max_seqs);
        if (it->seq->len + it->num_tokens > m->max_seq_len)
            return epd_err_set(err, -ERANGE,
                               "sequence of %d tokens exceeds max_seq_len %d (the KV cache "
                               "bound)",
                               it->seq->len + it->num_tokens, m->max_seq_len);
        if (it->want_logits) {
            epd_err_t se;
            int rc = epd_sample_check(&it->sample, &se);
            if (rc) return epd_err_set(err, rc, "forward: item %d: %s", i, se.msg);
        }
        T += it->num_tokens;
    }
    *total = T;
    return 0;
}

/* All or nothing: blocks for every item's new positions; m->grew[i] = blocks item i had. */
static int reserve(epd_model_t *m, const epd_batch_item_t *items, int n, epd_err_t *err)
{
    long need = 0;
    for (int i = 0; i < n; i++) {
        const epd_seq_t *s = items[i].seq;
        need += epd_model_kv_blocks_for(m, s->len + items[i].num_tokens) - s->nblocks;
    }
    if (need > m->heap_n)
        return epd_err_set(err, -ENOSPC, "KV cache: the batch needs %ld more blocks, %d free of %d",
                           need, m->heap_n, m->num_blocks);
    for (int i = 0; i < n; i++) {
        epd_seq_t *s = items[i].seq;
        m->grew[i] = s->nblocks;
        int want = epd_model_kv_blocks_for(m, s->len + items[i].num_tokens);
        while (s->nblocks < want)
            s->blocks[s->nblocks++] = heap_pop(m);
    }
    return 0;
}

static int forward(epd_model_t *m, const epd_batch_item_t *items, int n, int step_max, int ht,
                   int bound, const char *path, int32_t *next, float *logits, epd_err_t *err)
{
    int T = 0;
    epd_err_t bad;
    /* Bad input on this rank still joins every MoE exchange, with zero tokens, so that the
     * other ranks' step completes instead of timing out; the error is returned afterwards. */
    int bad_rc = check_items(m, items, n, bound, path, &T, &bad);
    if (!bad_rc) bad_rc = reserve(m, items, n, &bad);
    if (bad_rc) n = T = 0;
    int M = 0;
    for (int i = 0, t = 0; i < n; i++) {
        const epd_batch_item_t *it = &items[i];
        for (int j = 0; j < it->num_tokens; j++, t++) {
            m->tokens[t] = it->tokens[j];
            m->pos[t] = it->seq->len + j;
            m->seq_idx[t] = i;
        }
        m->seq_len[i] = it->seq->len + it->num_tokens;
        memcpy(m->block_table + (size_t)i * m->max_blocks, it->seq->blocks,
               sizeof(int32_t) * (size_t)it->seq->nblocks);
        if (it->want_logits) {
            m->logit_rows[M] = t - 1;
            m->sample[M++] = it->sample;
        }
    }
    epd_step_t st = {
        .num_tokens = T,
        .step_max_tokens = step_max,
        .path = ht ? EPD_MOE_HT : EPD_MOE_LL,
        .tokens = m->tokens,
        .pos = m->pos,
        .seq_idx = m->seq_idx,
        .num_seqs = n,
        .seq_len = m->seq_len,
        .block_table = m->block_table,
        .max_blocks = m->max_blocks,
        .num_logits = M,
        .logit_rows = m->logit_rows,
        .sample = m->sample,
    };
    int rc = m->ops->forward(m->impl, &st, next, logits, err);
    if (!rc) m->steps[ht]++;
    if (rc || bad_rc) {
        for (int i = 0; i < n; i++) /* nothing grows: this step's blocks go back */
            seq_release(items[i].seq, m->grew[i]);
        if (!rc && err) *err = bad;
        return rc ? rc : bad_rc;
    }
    for (int i = 0; i < n; i++)
        items[i].seq->len += items[i].num_tokens;
    return 0;
}

int epd_model_forward_step(epd_model_t *m, const epd_batch_item_t *items, int n,
                           int step_max_tokens, int32_t *next, float *logits, epd_err_t *err)
{
    char path[96];
    int ht = epd_model_step_path(m, step_max_tokens) == EPD_MOE_HT;
    int bound = ht ? m->ht_tokens : m->ll_tokens;
    if (step_max_tokens < bound) bound = step_max_tokens < 0 ? 0 : step_max_tokens;
    snprintf(path, sizeof(path), "%s step, largest rank batch %d", ht ? "HT" : "LL",
             step_max_tokens);
    return forward(m, items, n, step_max_tokens, ht, bound, path, next, logits, err);
}

int epd_model_forward(epd_model_t *m, const epd_batch_item_t *items, int n, int32_t *next,
                      float *logits, epd_err_t *err)
{
    return forward(m, items, n, m->ll_tokens, 0, m->ll_tokens, "LL step", next, logits, err);
}
