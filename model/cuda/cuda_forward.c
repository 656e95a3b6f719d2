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
 *   or dense SwiGLU: gu = xn . Wgu^T, act = silu(g) u, h += act . Wd^T.
 *
 * DeepSeek (MLA) replaces the attention part (mla_attention below):
 *   q = xn . Wq^T, or rmsnorm(xn . Wqa^T) . Wqb^T   cuBLAS (+ add_rmsnorm)   (fp32 out)
 *   kv = xn . Wkva^T                                cuBLAS         (fp32 [T][kvl + rope])
 *   q's rope part rotated; latent normed, key part rotated, both -> latent cache  mla_rope_store
 *   absorbed (decode, and any step whose context the expanded buffers cannot hold):
 *     q_lat[h] = q_nope[h] . Wkb[h]                 cuBLAS, batched over heads
 *     o_lat = latent attention over the cache       mla_attention
 *     att[h] = o_lat[h] . Wvb[h]^T                  cuBLAS, batched over heads (bf16 out)
 *   expanded (prefill steps): the context's latents gathered, k_nope/v = lat . Wkvb^T (cuBLAS),
 *     keys (k_nope, pe) and values padded to a head dim of epd_cu_attention, which runs causal
 *     over them (the scale folded into q)
 *   h += att . Wo^T
 * and its MoE layers add the shared experts (a dense SwiGLU on every token) to the routed ones,
 * routed by the checkpoint's router (epd_moe_route_params: softmax or V3's sigmoid + bias,
 * group-limited, scaled). */
#include "cuda_model.h"

#include <errno.h>
#include <math.h>
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

/* Per head h < batch: C_h[T][m] = op(A_h) . B_h over column-major views (cuBLAS's convention),
 * A and B bf16, C of type ctype, fp32 accumulation: MLA's absorption GEMMs. */
static int gemm_batched(cu_model_t *m, cublasOperation_t opa, int M, int N, int K, const void *A,
                        int lda, long long sa, const void *B, int ldb, long long sb, void *C,
                        cudaDataType_t ctype, int ldc, long long sc, int batch, epd_err_t *err)
{
    const float one = 1.0f, zero = 0.0f;
    return cu_blas_check(cublasGemmStridedBatchedEx(m->cublas, opa, CUBLAS_OP_N, M, N, K, &one, A,
                                                    CUDA_R_16BF, lda, sa, B, CUDA_R_16BF, ldb, sb,
                                                    &zero, C, ctype, ldc, sc, batch, COMPUTE,
                                                    CUBLAS_GEMM_DEFAULT),
                         "batched GEMM", err);
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
        ep_route_params_t rp = epd_moe_route_params(f, w->router_bias);
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

/* How a step runs MLA's attention: absorbed (exp_rows 0) or expanded over exp_rows context
 * rows of S sequences, the longest max_len, with its own splits. */
typedef struct mla_plan {
    int exp_rows, S, max_len, split_len, max_splits;
} mla_plan_t;

/* DeepSeek's attention of layer w on T rows: h += MLA(xn_bf16). */
static int mla_attention(cu_model_t *m, const cu_layer_t *w, int T, int split_len, int max_splits,
                         const mla_plan_t *plan, int capturing, epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    const int H = f->hidden_size, nh = f->num_attention_heads, kvl = m->kvl, rope = m->rope;
    const int nope = m->nope, vd = m->vd, qk = m->qk, ql = m->ql;
    const float eps = 1e-6f; /* transformers' q_a/kv_a layernorms, whatever rms_norm_eps says */
    epd_stream_t st = (epd_stream_t)m->stream;
    mark(m, capturing, PH_ATTN_GEMM);
    if (ql) {
        TRY(gemm_bf16(m, m->q_lora, m->xn_bf16, w->q_a, T, ql, H, 0.0f, err));
        TRY_CU(
            epd_cu_add_rmsnorm(m->q_lora, NULL, w->q_a_norm, eps, T, ql, NULL, m->q_lora_bf16, st),
            "q_a norm");
        TRY(gemm_bf16(m, m->q, m->q_lora_bf16, w->qkv, T, nh * qk, ql, 0.0f, err));
    } else {
        TRY(gemm_bf16(m, m->q, m->xn_bf16, w->qkv, T, nh * qk, H, 0.0f, err));
    }
    TRY(gemm_bf16(m, m->qkv, m->xn_bf16, w->kv_a, T, kvl + rope, H, 0.0f, err));
    mark(m, capturing, PH_ATTN);
    TRY_CU(epd_cu_mla_rope_store(m->q, m->qkv, w->kv_a_norm, m->inv_freq, m->rope_scale,
                                 f->rope_interleave, m->in.pos, m->in.slot, T, nh, nope, rope, kvl,
                                 eps, w->k_cache, st),
           "MLA rope and latent store");
    const long long kvb_head = (long long)(nope + vd) * kvl;
    if (plan->exp_rows > 0) {
        const int hdp = m->hdp;
        TRY_CU(epd_cu_mla_gather(m->lat_g, m->pe_g, w->k_cache, m->in.block_table, m->max_blocks,
                                 m->exp.base, m->exp.seq_len, plan->S, plan->max_len, kvl, rope,
                                 m->block_size, st),
               "MLA gather");
        mark(m, capturing, PH_ATTN_GEMM);
        TRY(gemm_bf16(m, m->kvx, m->lat_g, w->kv_b, plan->exp_rows, nh * (nope + vd), kvl, 0.0f,
                      err));
        mark(m, capturing, PH_ATTN);
        TRY_CU(epd_cu_mla_expand_kv(m->k_exp, m->v_exp, m->kvx, m->pe_g, plan->exp_rows, nh, nope,
                                    rope, vd, hdp, st),
               "MLA expand");
        /* epd_cu_attention scales by 1/sqrt(hdp): fold the model's scale into q */
        TRY_CU(epd_cu_mla_pad_q(m->q_pad, m->q, T, nh, qk, hdp,
                                (float)f->attn_scale * sqrtf((float)hdp), st),
               "MLA q");
        TRY_CU(epd_cu_attention(m->att_pad, m->q_pad, m->k_exp, m->v_exp, m->exp.bt, m->exp_cols,
                                m->in.seq_idx, m->in.pos, T, nh, nh, hdp, EPD_CU_EXP_BLOCK,
                                plan->split_len, plan->max_splits, m->attn_ws, st),
               "MLA expanded attention");
        TRY_CU(epd_cu_mla_unpad(m->att, m->att_pad, T, nh, vd, hdp, st), "MLA unpad");
    } else {
        TRY_CU(epd_cu_f32_to_bf16(m->q_bf16, m->q, (size_t)T * nh * qk, st), "convert");
        mark(m, capturing, PH_ATTN_GEMM);
        /* q_lat[t][h][:] = Wkb[h]^T q_nope[t][h]: Wkb[h] = kv_b[h][:nope] ([nope][kvl]) */
        TRY(gemm_batched(m, CUBLAS_OP_N, kvl, T, nope, w->kv_b, kvl, kvb_head, m->q_bf16, nh * qk,
                         qk, m->q_lat, CUDA_R_32F, nh * kvl, kvl, nh, err));
        mark(m, capturing, PH_ATTN);
        TRY_CU(epd_cu_mla_attention(m->o_lat, m->q_lat, m->q + nope, qk, w->k_cache,
                                    m->in.block_table, m->max_blocks, m->in.seq_idx, m->in.pos, T,
                                    nh, kvl, rope, (float)f->attn_scale, m->block_size, split_len,
                                    max_splits, m->attn_ws, st),
               "MLA attention");
        mark(m, capturing, PH_ATTN_GEMM);
        /* att[t][h][:] = Wvb[h] o_lat[t][h]: Wvb[h] = kv_b[h][nope:] ([vd][kvl]) */
        TRY(gemm_batched(m, CUBLAS_OP_T, vd, T, kvl, w->kv_b + (size_t)nope * kvl, kvl, kvb_head,
                         m->o_lat, nh * kvl, kvl, m->att, CUDA_R_16BF, nh * vd, vd, nh, err));
    }
    mark(m, capturing, PH_ATTN_GEMM);
    return gemm_bf16(m, m->h, m->att, w->o, T, H, nh * vd, 1.0f, err);
}

/* A dense SwiGLU MLP on xn_bf16: h += down(silu(xn Wg) * (xn Wu)); gate_up [2I][H]. */
static int dense_mlp(cu_model_t *m, const uint16_t *gate_up, const uint16_t *down, int T, int I,
                     epd_err_t *err)
{
    const int H = m->cfg.hidden_size;
    TRY(gemm_bf16(m, m->gu, m->xn_bf16, gate_up, T, 2 * I, H, 0.0f, err));
    TRY_CU(epd_cu_silu_mul(m->act, m->gu, T, I, (epd_stream_t)m->stream), "dense activation");
    return gemm_bf16(m, m->h, m->act, down, T, H, I, 1.0f, err);
}

/* Every kernel of a step on T rows (padded in graphs) and M logit rows. */
static int run_layers(cu_model_t *m, int T, int M, int split_len, int max_splits,
                      const mla_plan_t *plan, int capturing, epd_err_t *err)
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
            if (m->mla) {
                TRY(mla_attention(m, w, T, split_len, max_splits, plan, capturing, err));
            } else {
                mark(m, capturing, PH_ATTN_GEMM);
                TRY(gemm_bf16(m, m->qkv, m->xn_bf16, w->qkv, T, m->qkv_dim, H, 0.0f, err));
                mark(m, capturing, PH_ATTN);
                TRY_CU(epd_cu_qk_norm_rope_store(m->qkv, w->q_norm, w->k_norm, m->inv_freq,
                                                 m->in.pos, m->in.slot, T, nh, nkv, hd, eps, m->q,
                                                 w->k_cache, w->v_cache, st),
                       "q/k norm and rope");
                TRY_CU(epd_cu_attention(m->att, m->q, w->k_cache, w->v_cache, m->in.block_table,
                                        m->max_blocks, m->in.seq_idx, m->in.pos, T, nh, nkv, hd,
                                        m->block_size, split_len, max_splits, m->attn_ws, st),
                       "attention");
                mark(m, capturing, PH_ATTN_GEMM);
                TRY(gemm_bf16(m, m->h, m->att, w->o, T, H, m->q_dim, 1.0f, err));
            }
            mark(m, capturing, PH_NORM);
            TRY_CU(epd_cu_add_rmsnorm(m->h, NULL, w->post_norm, eps, T, H,
                                      w->is_moe ? m->xn_f32 : NULL, m->xn_bf16, st),
                   "post-attention norm");
        }
        delta = NULL;
        if (w->is_moe) {
            TRY(moe(m, l, T, capturing, &delta, err));
            if (w->sh_gate_up && T > 0) { /* DeepSeek's shared experts, on every token */
                mark(m, capturing, PH_EXPERTS);
                TRY(dense_mlp(m, w->sh_gate_up, w->sh_down, T,
                              f->moe_intermediate_size * f->n_shared_experts, err));
            }
        } else if (T > 0) {
            mark(m, capturing, PH_EXPERTS);
            TRY(dense_mlp(m, w->gate_up, w->down, T, f->intermediate_size, err));
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

/* A prefill step of MLA (some sequence brings several tokens) takes the expanded form when its
 * sequences' contexts, each rounded up to EPD_CU_EXP_BLOCK rows, fit the expanded buffers;
 * then their bases and block tables go up in one more copy. Otherwise plan stays absorbed. */
static int stage_expanded(cu_model_t *m, const epd_step_t *s, int T, int ctx, mla_plan_t *plan,
                          epd_err_t *err)
{
    if (!m->hdp || s->num_seqs > m->max_seqs) return 0;
    int rows = 0, maxlen = 0;
    for (int q = 0; q < s->num_seqs; q++) {
        int len = s->seq_len[q];
        if (len > maxlen) maxlen = len;
        rows += (len + EPD_CU_EXP_BLOCK - 1) / EPD_CU_EXP_BLOCK * EPD_CU_EXP_BLOCK;
        if (rows > m->exp_rows) return 0;
    }
    cu_exp_in_t *h = &m->exp_h;
    int at = 0;
    for (int q = 0; q < s->num_seqs; q++) {
        int nb = (s->seq_len[q] + EPD_CU_EXP_BLOCK - 1) / EPD_CU_EXP_BLOCK;
        h->base[q] = at;
        h->seq_len[q] = s->seq_len[q];
        for (int b = 0; b < nb; b++)
            h->bt[(size_t)q * m->exp_cols + b] = at / EPD_CU_EXP_BLOCK + b;
        at += nb * EPD_CU_EXP_BLOCK;
    }
    /* base and seq_len whole, then the table rows of the step's sequences */
    size_t bytes = (size_t)((char *)h->bt - (char *)m->exp_host) +
                   sizeof(int32_t) * (size_t)s->num_seqs * (size_t)m->exp_cols;
    TRY_CU(cudaMemcpyAsync(m->exp_dev, m->exp_host, bytes, cudaMemcpyHostToDevice, m->stream),
           "expanded inputs");
    plan->exp_rows = rows;
    plan->S = s->num_seqs;
    plan->max_len = maxlen;
    pick_splits(m, T, ctx, &plan->split_len, &plan->max_splits);
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
    const mla_plan_t absorbed = {0};
    int rc = run_layers(m, Tpad, Tpad, g->split_len, g->max_splits, &absorbed, 1, err);
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
        mla_plan_t plan = {0};
        if (m->mla && T > s->num_seqs) TRY(stage_expanded(m, s, T, ctx, &plan, err));
        TRY(run_layers(m, T, M, split_len, max_splits, &plan, 0, err));
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
