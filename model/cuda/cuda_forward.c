/* The CUDA model's step: inputs uploaded in one copy, the layers (attention data-parallel,
 * MoE expert-parallel through libep's LL dispatch/combine, or locally in a one-rank group),
 * the final norm and lm_head for the rows that want a token, sampling on the GPU; only token
 * ids come back. Decode steps (one token per sequence, LL) replay a CUDA graph captured once
 * per (token bucket, context bucket); other steps run eagerly.
 *
 * Per layer (T rows, fp32 residual h):
 *   xn = rmsnorm(h [+ previous MoE output])         add_rmsnorm   (bf16 out)
 *   qkv = xn . Wqkv^T                               cuBLAS         (fp32 out)
 *   q/k norm + rope, k/v -> paged cache              qk_norm_rope_store
 *   att = paged causal attention                     attention      (bf16 out)
 *   h += att . Wo^T                                  cuBLAS, beta 1
 *   xn = rmsnorm(h)                                  add_rmsnorm   (fp32 for the router, bf16)
 *   MoE: router (fp32 cuBLAS) -> ep_route top-k -> fix-ups ->
 *        one rank: local packing -> experts -> h += weighted sum
 *        several: ep_ll_dispatch -> experts on the packed layout -> ep_ll_combine (added to h
 *        by the next layer's add_rmsnorm)
 *   or dense SwiGLU: gu = xn . Wgu^T, act = silu(g) u, h += act . Wd^T. */
#include "cuda_model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY_CU(call, what)                                                                         \
    do {                                                                                           \
        int e_ = (int)(call);                                                                      \
        if (e_) return cu_check((cudaError_t)e_, (what), err);                                     \
    } while (0)
#define TRY(call)                                                                                  \
    do {                                                                                           \
        int r_ = (call);                                                                           \
        if (r_) return r_;                                                                         \
    } while (0)

enum { PH_NORM, PH_ATTN_GEMM, PH_ATTN, PH_EXPERTS, PH_EXCHANGE, PH_REST };
#define MAX_MARKS 2048

/* phase marks of a profiled step */
static _Thread_local struct {
    cudaEvent_t ev[MAX_MARKS];
    int phase[MAX_MARKS];
    int n, created;
} prof;

static void mark(cu_model_t *m, int capturing, int phase)
{
    if (!m->profile || capturing || prof.n >= MAX_MARKS) return;
    if (prof.n >= prof.created) {
        cudaEventCreate(&prof.ev[prof.n]);
        prof.created++;
    }
    prof.phase[prof.n] = phase;
    cudaEventRecord(prof.ev[prof.n++], m->stream);
}

static void profile_collect(cu_model_t *m)
{
    if (!m->profile || prof.n < 2) {
        prof.n = 0;
        return;
    }
    cudaEventSynchronize(prof.ev[prof.n - 1]);
    for (int i = 0; i + 1 < prof.n; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, prof.ev[i], prof.ev[i + 1]);
        m->phase_ms[prof.phase[i]] += ms;
    }
    m->profiled_steps++;
    prof.n = 0;
}

static const cublasComputeType_t COMPUTE = CUBLAS_COMPUTE_32F;

/* C[T][N] (fp32) = X[T][K] (bf16) . W[N][K]^T (bf16) + beta C */
static int gemm_bf16(cu_model_t *m, float *C, const uint16_t *X, const uint16_t *W, int T, int N,
                     int K, float beta, epd_err_t *err)
{
    const float one = 1.0f;
    return cu_blas_check(cublasGemmEx(m->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W,
                                      CUDA_R_16BF, K, X, CUDA_R_16BF, K, &beta, C, CUDA_R_32F, N,
                                      COMPUTE, CUBLAS_GEMM_DEFAULT),
                         "GEMM", err);
}

/* C[T][N] = X[T][K] . W[N][K]^T, all fp32 (the router) */
static int gemm_f32(cu_model_t *m, float *C, const float *X, const float *W, int T, int N, int K,
                    epd_err_t *err)
{
    const float one = 1.0f, zero = 0.0f;
    return cu_blas_check(
        cublasSgemm(m->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, K, X, K, &zero, C, N),
        "router GEMM", err);
}

int cu_experts(cu_model_t *m, const cu_layer_t *w, const void *x, const float *x_scales,
               const int32_t *counts, const int32_t *offsets, int stride, int L, int max_rows,
               epd_err_t *err)
{
    const int H = m->cfg.hidden_size, I = m->cfg.moe_intermediate_size;
    const int bn = m->cfg.fp8.block_n, bk = m->cfg.fp8.block_k;
    epd_stream_t st = (epd_stream_t)m->stream;
    if (w->w8) {
        TRY_CU(epd_cu_expert_gate_up_w8(m->act, x, x_scales, counts, offsets, stride, w->gate_up8,
                                        w->gate_up_sc, bn, bk, L, H, I, max_rows, st),
               "expert gate/up (fp8 weights)");
        TRY_CU(epd_cu_expert_down_w8(m->expert_y, m->act, counts, offsets, stride, w->down8,
                                     w->down_sc, bn, bk, L, H, I, max_rows, st),
               "expert down (fp8 weights)");
        return 0;
    }
    TRY_CU(epd_cu_expert_gate_up(m->act, x, x_scales, counts, offsets, stride, w->gate_up, L, H, I,
                                 max_rows, st),
           "expert gate/up");
    TRY_CU(epd_cu_expert_down(m->expert_y, m->act, counts, offsets, stride, w->down, L, H, I,
                              max_rows, st),
           "expert down");
    return 0;
}

/* A bad argument to libep stays -EINVAL; any other failure of libep (a timeout, a peer gone,
 * an abort the kernels saw) is EPD_EEXCHANGE: the group must be re-formed. */
static int ep_fail(cu_model_t *m, const char *what, ep_status_t st, int layer, epd_err_t *err)
{
    int rc = st == EP_ERR_INVALID ? -EINVAL : EPD_EEXCHANGE;
    return epd_err_set(err, rc, "layer %d: %s: %s (%s)", layer, what, ep_strerror(st),
                       ep_group_last_error(m->group));
}

/* The MoE block of layer l on rows xn (xn_f32 for the router, xn_bf16 for the experts).
 * Returns the bf16 output still to be added to h (LL exchange), or NULL when it was added. */
static int moe(cu_model_t *m, int l, int T, int capturing, const uint16_t **delta, epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    const cu_layer_t *w = &m->layers[l];
    const int H = f->hidden_size, E = f->num_experts, k = f->num_experts_per_tok;
    epd_stream_t st = (epd_stream_t)m->stream;
    *delta = NULL;
    mark(m, capturing, PH_EXCHANGE);
    if (T > 0) {
        TRY(gemm_f32(m, m->router_logits, m->xn_f32, w->router, T, E, H, err));
        ep_route_params_t rp = {
            .kind = EP_ROUTE_SOFTMAX_TOPK,
            .num_experts = E,
            .topk = k,
            .renormalize = f->norm_topk_prob,
            .routed_scaling_factor = 1.0f,
        };
        ep_status_t es =
            ep_route(m->group, &rp, m->router_logits, T, m->topk_idx, m->topk_w, m->stream);
        if (es != EP_OK) return ep_fail(m, "ep_route", es, l, err);
        TRY_CU(epd_cu_route_fixup(m->topk_idx, m->topk_w, T, k, E, m->in.n_valid, m->slot_of_dev,
                                  m->expert_tokens, st),
               "route fix-up");
    }
    if (m->nranks == 1) {
        if (T == 0) return 0;
        TRY_CU(epd_cu_moe_local_dispatch(m->packed, m->counts, m->offsets, m->row_of, m->xn_bf16,
                                         m->topk_idx, T, k, E, H, st),
               "local dispatch");
        mark(m, capturing, PH_EXPERTS);
        TRY(cu_experts(m, w, m->packed, NULL, m->counts, m->offsets, 0, E, T, err));
        mark(m, capturing, PH_EXCHANGE);
        TRY_CU(epd_cu_moe_local_combine(m->h, m->expert_y, m->row_of, m->topk_w, T, k, H, st),
               "local combine");
        return 0;
    }
    ep_ll_dispatch_args_t da = {
        .x = m->xn_bf16,
        .num_tokens = T,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
        .use_fp8 = m->opts.fp8_dispatch,
        .use_hook = 1,
        .stream = m->stream,
    };
    ep_ll_dispatch_out_t dout;
    ep_ll_handle_t *handle = NULL;
    ep_hook_t *hook = NULL;
    /* send half, then the receive half at once: two launches, but no kernel that sends and
     * then waits with its whole grid resident, which ranks sharing a GPU (or any kernel on
     * another stream of it) can starve into the timeout (docs/cuda-notes.md) */
    ep_status_t es = ep_ll_dispatch(m->group, &da, &dout, &handle, &hook);
    if (es == EP_OK) es = ep_hook_run(hook);
    if (es != EP_OK) return ep_fail(m, "ep_ll_dispatch", es, l, err);
    const int S = m->ll_tokens * m->nranks;
    mark(m, capturing, PH_EXPERTS);
    TRY(cu_experts(m, w, dout.recv_x, m->opts.fp8_dispatch ? dout.recv_scales : NULL,
                   dout.recv_count, NULL, S, m->local, S, err));
    mark(m, capturing, PH_EXCHANGE);
    ep_ll_combine_args_t ca = {
        .handle = handle,
        .expert_y = m->expert_y,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
        .out = m->moe_out,
        .use_hook = 1,
        .stream = m->stream,
    };
    es = ep_ll_combine(m->group, &ca, &hook);
    if (es == EP_OK) es = ep_hook_run(hook);
    if (es != EP_OK) return ep_fail(m, "ep_ll_combine", es, l, err);
    *delta = m->moe_out;
    return 0;
}

/* Every kernel of a step on T rows (padded in graphs) and M logit rows. */
static int run_layers(cu_model_t *m, int T, int M, int split_len, int max_splits, int capturing,
                      epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    const int H = f->hidden_size, nh = f->num_attention_heads, nkv = f->num_key_value_heads;
    const int hd = f->head_dim, V = f->vocab_size;
    const float eps = (float)f->rms_norm_eps;
    epd_stream_t st = (epd_stream_t)m->stream;
    const uint16_t *delta = NULL;
    mark(m, capturing, PH_REST);
    if (T > 0) TRY_CU(epd_cu_embed(m->h, m->embed, m->in.tokens, T, H, st), "embedding");
    for (int l = 0; l < f->num_hidden_layers; l++) {
        const cu_layer_t *w = &m->layers[l];
        if (T > 0) {
            mark(m, capturing, PH_NORM);
            TRY_CU(epd_cu_add_rmsnorm(m->h, delta, w->input_norm, eps, T, H, NULL, m->xn_bf16, st),
                   "input norm");
            mark(m, capturing, PH_ATTN_GEMM);
            TRY(gemm_bf16(m, m->qkv, m->xn_bf16, w->qkv, T, m->qkv_dim, H, 0.0f, err));
            mark(m, capturing, PH_ATTN);
            TRY_CU(epd_cu_qk_norm_rope_store(m->qkv, w->q_norm, w->k_norm, m->inv_freq, m->in.pos,
                                             m->in.slot, T, nh, nkv, hd, eps, m->q, w->k_cache,
                                             w->v_cache, st),
                   "q/k norm and rope");
            TRY_CU(epd_cu_attention(m->att, m->q, w->k_cache, w->v_cache, m->in.block_table,
                                    m->max_blocks, m->in.seq_idx, m->in.pos, T, nh, nkv, hd,
                                    m->block_size, split_len, max_splits, m->attn_ws, st),
                   "attention");
            mark(m, capturing, PH_ATTN_GEMM);
            TRY(gemm_bf16(m, m->h, m->att, w->o, T, H, m->q_dim, 1.0f, err));
            mark(m, capturing, PH_NORM);
            TRY_CU(epd_cu_add_rmsnorm(m->h, NULL, w->post_norm, eps, T, H,
                                      w->is_moe ? m->xn_f32 : NULL, m->xn_bf16, st),
                   "post-attention norm");
        }
        delta = NULL;
        if (w->is_moe) {
            TRY(moe(m, l, T, capturing, &delta, err));
        } else if (T > 0) {
            const int Id = f->intermediate_size;
            mark(m, capturing, PH_EXPERTS);
            TRY(gemm_bf16(m, m->gu, m->xn_bf16, w->gate_up, T, 2 * Id, H, 0.0f, err));
            TRY_CU(epd_cu_silu_mul(m->act, m->gu, T, Id, st), "dense activation");
            TRY(gemm_bf16(m, m->h, m->act, w->down, T, H, Id, 1.0f, err));
        }
    }
    if (T == 0 || M == 0) return 0;
    mark(m, capturing, PH_REST);
    TRY_CU(epd_cu_add_rmsnorm(m->h, delta, m->final_norm, eps, T, H, m->xn_f32, NULL, st),
           "final norm");
    TRY_CU(epd_cu_gather_rows(m->final_rows, m->xn_f32, m->in.logit_rows, M, H, st), "gather");
    TRY_CU(epd_cu_f32_to_bf16(m->final_bf16, m->final_rows, (size_t)M * H, st), "convert");
    TRY(gemm_bf16(m, m->logits, m->final_bf16, m->lm_head, M, V, H, 0.0f, err));
    TRY_CU(epd_cu_sample(m->next, m->logits, m->in.sample, M, V, m->in.n_logits, m->sample_ws, st),
           "sampling");
    mark(m, capturing, PH_REST);
    return 0;
}

static int pow2_at_least(int x, int floor)
{
    int p = floor;
    while (p < x)
        p *= 2;
    return p;
}

/* Splits of the attention for T rows over contexts up to ctx: enough blocks to fill the GPU
 * (about two per SM) without exceeding the workspace. */
static void pick_splits(const cu_model_t *m, int T, int ctx, int *split_len, int *max_splits)
{
    int units = T * m->cfg.num_key_value_heads;
    int want = (264 + units - 1) / units;
    int sl = ctx / (want > 0 ? want : 1);
    int p = 64; /* the kernel walks 64 positions per block pass */
    while (p * 2 <= sl)
        p *= 2;
    sl = p;
    if (sl > ctx) sl = ctx;
    int budget = m->max_tokens * 4 > m->ll_tokens * 64 ? m->max_tokens * 4 : m->ll_tokens * 64;
    if (budget < 8192) budget = 8192;
    while ((long)T * ((ctx + sl - 1) / sl) > budget)
        sl *= 2;
    *split_len = sl;
    *max_splits = (ctx + sl - 1) / sl;
}

static int stage_inputs(cu_model_t *m, const epd_step_t *s, int Tpad, int Mpad, epd_err_t *err)
{
    cu_step_in_t *h = &m->in_h;
    const int bs = m->block_size;
    for (int t = 0; t < s->num_tokens; t++) {
        int q = s->seq_idx[t], p = s->pos[t];
        h->tokens[t] = s->tokens[t];
        h->pos[t] = p;
        h->seq_idx[t] = q;
        h->slot[t] = s->block_table[(size_t)q * s->max_blocks + p / bs] * bs + p % bs;
    }
    for (int t = s->num_tokens; t < Tpad; t++) { /* padding: no KV store, no attention */
        h->tokens[t] = 0;
        h->pos[t] = 0;
        h->seq_idx[t] = -1;
        h->slot[t] = -1;
    }
    int cols = s->max_blocks < m->max_blocks ? s->max_blocks : m->max_blocks;
    for (int q = 0; q < s->num_seqs; q++) {
        int used = (s->seq_len[q] + bs - 1) / bs;
        if (used > cols) used = cols;
        memcpy(h->block_table + (size_t)q * m->max_blocks,
               s->block_table + (size_t)q * s->max_blocks, sizeof(int32_t) * (size_t)used);
    }
    for (int i = 0; i < s->num_logits; i++) {
        h->logit_rows[i] = s->logit_rows[i];
        h->sample[i] = s->sample[i];
    }
    for (int i = s->num_logits; i < Mpad; i++) {
        h->logit_rows[i] = 0;
        h->sample[i] = (epd_sample_params_t){.top_p = 1};
    }
    *h->n_valid = s->num_tokens;
    *h->n_logits = s->num_logits;
    /* the whole block in one copy (the block-table rows of absent sequences are stale, unread) */
    TRY_CU(cudaMemcpyAsync(m->in_dev, m->in_host, m->in_bytes, cudaMemcpyHostToDevice, m->stream),
           "step inputs");
    return 0;
}

void cu_graphs_destroy(cu_model_t *m)
{
    for (int i = 0; i < m->num_graphs; i++)
        cudaGraphExecDestroy(m->graphs[i].exec);
    m->num_graphs = 0;
}

static int graph_for(cu_model_t *m, int Tpad, int ctx, cu_graph_t **out, epd_err_t *err)
{
    for (int i = 0; i < m->num_graphs; i++)
        if (m->graphs[i].tokens == Tpad && m->graphs[i].ctx == ctx) {
            *out = &m->graphs[i];
            return 0;
        }
    if (m->num_graphs == EPD_CU_MAX_GRAPHS) cu_graphs_destroy(m);
    cu_graph_t *g = &m->graphs[m->num_graphs];
    memset(g, 0, sizeof(*g));
    g->tokens = Tpad;
    g->ctx = ctx;
    pick_splits(m, Tpad, ctx, &g->split_len, &g->max_splits);
    cudaGraph_t graph;
    TRY_CU(cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeThreadLocal), "graph capture");
    int rc = run_layers(m, Tpad, Tpad, g->split_len, g->max_splits, 1, err);
    cudaError_t ce = cudaStreamEndCapture(m->stream, &graph);
    if (rc) {
        if (ce == cudaSuccess) cudaGraphDestroy(graph);
        return rc;
    }
    TRY_CU(ce, "graph capture");
    ce = cudaGraphInstantiate(&g->exec, graph, 0);
    cudaGraphDestroy(graph);
    TRY_CU(ce, "graph instantiation");
    m->num_graphs++;
    *out = g;
    return 0;
}

int cu_forward(void *impl, const epd_step_t *s, int32_t *next, float *logits, epd_err_t *err)
{
    cu_model_t *m = impl;
    const int T = s->num_tokens, M = s->num_logits;
    TRY_CU(cudaSetDevice(m->device), "cudaSetDevice");
    if (T > m->max_tokens || s->num_seqs > m->max_seqs || M > m->max_seqs)
        return epd_err_set(err, -EINVAL,
                           "cuda model: a step of %d tokens, %d sequences and %d logit rows "
                           "exceeds its bounds (%d tokens, %d sequences)",
                           T, s->num_seqs, M, m->max_tokens, m->max_seqs);
    if (T == 0 && m->nranks == 1) return 0;
    int maxlen = 0;
    for (int q = 0; q < s->num_seqs; q++)
        if (s->seq_len[q] > maxlen) maxlen = s->seq_len[q];
    int ctx = pow2_at_least(maxlen, EPD_CU_CTX_MIN);

    /* a decode step: one token per sequence, each wanting its next token, on the LL path */
    int decode = T > 0 && T == s->num_seqs && M == T && s->path == EPD_MOE_LL && T <= m->ll_tokens;
    for (int i = 0; decode && i < M; i++)
        decode = s->logit_rows[i] == i;
    int use_graph = decode && !m->opts.no_graphs && !m->profile;
    int Tpad = use_graph ? pow2_at_least(T, 1) : T;
    if (Tpad > m->ll_tokens) Tpad = m->ll_tokens;
    if (Tpad > m->max_seqs) use_graph = 0, Tpad = T;
    int Mpad = use_graph ? Tpad : M;

    TRY(stage_inputs(m, s, Tpad, Mpad, err));
    if (use_graph) {
        cu_graph_t *g = NULL;
        TRY(graph_for(m, Tpad, ctx, &g, err));
        TRY_CU(cudaGraphLaunch(g->exec, m->stream), "graph launch");
        g->replays++;
        m->graph_steps++;
    } else {
        int split_len, max_splits;
        pick_splits(m, T > 0 ? T : 1, ctx, &split_len, &max_splits);
        TRY(run_layers(m, T, M, split_len, max_splits, 0, err));
        m->eager_steps++;
    }
    if (M > 0) {
        TRY_CU(cudaMemcpyAsync(m->next_host, m->next, sizeof(int32_t) * (size_t)M,
                               cudaMemcpyDeviceToHost, m->stream),
               "tokens");
        if (logits)
            TRY_CU(cudaMemcpyAsync(logits, m->logits, sizeof(float) * (size_t)M * m->cfg.vocab_size,
                                   cudaMemcpyDeviceToHost, m->stream),
                   "logits");
    }
    TRY_CU(cudaMemcpyAsync(m->expert_tokens_host, m->expert_tokens,
                           sizeof(unsigned long long) * (size_t)m->cfg.num_experts,
                           cudaMemcpyDeviceToHost, m->stream),
           "expert counts");
    TRY_CU(cudaStreamSynchronize(m->stream), "step");
    if (m->nranks > 1) {
        ep_status_t es = ep_group_check(m->group);
        if (es != EP_OK) return ep_fail(m, "the step's exchanges", es, -1, err);
    }
    profile_collect(m);
    memcpy(next, m->next_host, sizeof(int32_t) * (size_t)M);
    return 0;
}
