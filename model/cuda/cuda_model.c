/* The CUDA model: creation on the rank's GPU, one allocation each for weights, workspace and
 * KV pool, memory accounting, and the ops table that model.c drives. */
#include "cuda_model.h"
#include "ops.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN 256
#define CUBLAS_WS_BYTES (32u << 20)

int cu_check(cudaError_t e, const char *what, epd_err_t *err)
{
    if (e == cudaSuccess) return 0;
    return epd_err_set(err, e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO, "CUDA: %s: %s", what,
                       cudaGetErrorString(e));
}

int cu_blas_check(cublasStatus_t s, const char *what, epd_err_t *err)
{
    if (s == CUBLAS_STATUS_SUCCESS) return 0;
    return epd_err_set(err, -EIO, "cuBLAS: %s: %s", what, cublasGetStatusString(s));
}

/* A bump allocator over one block: a first pass with base NULL only sums the sizes. */
typedef struct carver {
    char *base;
    size_t used;
} carver_t;

static void *carve(carver_t *c, size_t bytes)
{
    size_t at = (c->used + ALIGN - 1) / ALIGN * ALIGN;
    c->used = at + bytes;
    return c->base ? c->base + at : NULL;
}

static int any_dense(const epd_hf_config_t *c)
{
    for (int l = 0; l < c->num_hidden_layers; l++)
        if (!epd_hf_layer_is_moe(c, l)) return 1;
    return 0;
}

/* DeepSeek's attention weights of one layer (tensors.c's add_mla). */
static void carve_mla(cu_model_t *m, carver_t *c, cu_layer_t *w)
{
    size_t H = (size_t)m->cfg.hidden_size, nh = (size_t)m->cfg.num_attention_heads;
    size_t ql = (size_t)m->ql, kvl = (size_t)m->kvl;
    if (ql) {
        w->q_a = carve(c, ql * H * 2);
        w->q_a_norm = carve(c, ql * 4);
    }
    w->qkv = carve(c, nh * (size_t)m->qk * (ql ? ql : H) * 2);
    w->kv_a = carve(c, (kvl + (size_t)m->rope) * H * 2);
    w->kv_a_norm = carve(c, kvl * 4);
    w->kv_b = carve(c, nh * (size_t)(m->nope + m->vd) * kvl * 2);
    w->o = carve(c, H * nh * (size_t)m->vd * 2);
}

/* Weights: the same order as the tensor table's accounting (tensors.c, cuda bytes). */
static void carve_weights(cu_model_t *m, carver_t *c)
{
    const epd_hf_config_t *f = &m->cfg;
    size_t H = (size_t)f->hidden_size, V = (size_t)f->vocab_size, hd = (size_t)f->head_dim;
    size_t E = (size_t)f->num_experts, L = (size_t)m->local, I = (size_t)f->moe_intermediate_size;
    size_t Id = (size_t)f->intermediate_size;
    size_t before = c->used;
    m->embed = carve(c, V * H * 2);
    m->lm_head = f->tie_word_embeddings ? m->embed : carve(c, V * H * 2);
    m->final_norm = carve(c, H * 4);
    size_t experts = 0;
    for (int l = 0; l < f->num_hidden_layers; l++) {
        cu_layer_t *w = &m->layers[l];
        w->input_norm = carve(c, H * 4);
        w->post_norm = carve(c, H * 4);
        if (m->mla) {
            carve_mla(m, c, w);
        } else {
            w->q_norm = carve(c, hd * 4);
            w->k_norm = carve(c, hd * 4);
            w->qkv = carve(c, (size_t)m->qkv_dim * H * 2);
            w->o = carve(c, H * (size_t)m->q_dim * 2);
        }
        w->is_moe = epd_hf_layer_is_moe(f, l);
        if (w->is_moe && w->w8) {
            /* e4m3 codes and block scales, as the tensor table counts them */
            const size_t bn = (size_t)f->fp8.block_n, bk = (size_t)f->fp8.block_k;
            const size_t sgu = L * 2 * ((I + bn - 1) / bn) * ((H + bk - 1) / bk) * 4;
            const size_t sdn = L * ((H + bn - 1) / bn) * ((I + bk - 1) / bk) * 4;
            w->router = carve(c, E * H * 4);
            w->gate_up = w->down = NULL;
            w->gate_up8 = carve(c, L * 2 * I * H);
            w->down8 = carve(c, L * H * I);
            w->gate_up_sc = carve(c, sgu);
            w->down_sc = carve(c, sdn);
            experts += L * 3 * I * H + sgu + sdn;
        } else if (w->is_moe) {
            w->router = carve(c, E * H * 4);
            w->router_bias = f->router_bias ? carve(c, E * 4) : NULL;
            w->gate_up = carve(c, L * 2 * I * H * 2);
            w->down = carve(c, L * H * I * 2);
            experts += L * 3 * I * H * 2;
            size_t Is = I * (size_t)f->n_shared_experts;
            w->sh_gate_up = Is ? carve(c, 2 * Is * H * 2) : NULL;
            w->sh_down = Is ? carve(c, H * Is * 2) : NULL;
        } else {
            w->router = NULL;
            w->gate_up = carve(c, 2 * Id * H * 2);
            w->down = carve(c, H * Id * 2);
        }
    }
    m->weights_bytes = c->used - before;
    m->expert_bytes = experts;
    m->replicated_bytes = m->weights_bytes - experts;
}

/* Which MoE layers keep fp8 experts (an FP8 checkpoint's, per the tensor table): all of a
 * layer's experts or none, in blocks whose channels the kernels step through (32 at a time). */
static int fp8_layers(cu_model_t *m, epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    if (!f->fp8.on) return 0;
    epd_tensor_desc_t *t;
    int n, rc;
    if ((rc = epd_tensor_table(f, &t, &n, err))) return rc;
    for (int l = 0; l < f->num_hidden_layers; l++)
        m->layers[l].w8 = -1;
    for (int i = 0; i < n && !rc; i++) {
        if (!epd_tensor_is_expert(&t[i])) continue;
        cu_layer_t *w = &m->layers[t[i].layer];
        const int q = epd_tensor_cuda_fp8(&t[i]);
        if (w->w8 < 0) w->w8 = q;
        if (w->w8 != q)
            rc = epd_err_set(err, -ENOTSUP,
                             "cuda model: '%s' is %s while other experts of layer %d are not "
                             "(modules_to_not_convert): a layer's experts must be all fp8 or "
                             "none",
                             t[i].name, q ? "fp8" : "not fp8", t[i].layer);
    }
    for (int l = 0; l < f->num_hidden_layers; l++)
        if (m->layers[l].w8 < 0) m->layers[l].w8 = 0;
    free(t);
    if (!rc && f->fp8.block_k % 32)
        rc = epd_err_set(err, -ENOTSUP,
                         "cuda model: quantization_config.weight_block_size [%d, %d]: the fp8 "
                         "expert kernels need block_k a multiple of 32",
                         f->fp8.block_n, f->fp8.block_k);
    return rc;
}

/* The largest (tokens x splits) product of an attention call: sizes its workspace. */
static int attn_units(const cu_model_t *m)
{
    int u = m->max_tokens * 4;
    if (u < m->ll_tokens * 64) u = m->ll_tokens * 64;
    if (u < 8192) u = 8192;
    return u;
}

/* MLA's buffers: the absorbed form's for max_tokens rows, the expanded form's for exp_rows
 * context rows. */
static void carve_mla_workspace(cu_model_t *m, carver_t *c)
{
    size_t T = (size_t)m->max_tokens, nh = (size_t)m->cfg.num_attention_heads;
    size_t R = (size_t)m->exp_rows, kvl = (size_t)m->kvl, hdp = (size_t)m->hdp;
    m->q_lora = m->ql ? carve(c, T * (size_t)m->ql * 4) : NULL;
    m->q_lora_bf16 = m->ql ? carve(c, T * (size_t)m->ql * 2) : NULL;
    m->q_bf16 = carve(c, T * nh * (size_t)m->qk * 2);
    m->q_lat = carve(c, T * nh * kvl * 4);
    m->o_lat = carve(c, T * nh * kvl * 2);
    if (!R) return;
    m->lat_g = carve(c, R * kvl * 2);
    m->pe_g = carve(c, R * (size_t)m->rope * 2);
    m->kvx = carve(c, R * nh * (size_t)(m->nope + m->vd) * 4);
    m->k_exp = carve(c, R * nh * hdp * 2);
    m->v_exp = carve(c, R * nh * hdp * 2);
    m->q_pad = carve(c, T * nh * hdp * 4);
    m->att_pad = carve(c, T * nh * hdp * 2);
}

static void carve_exp_inputs(cu_model_t *m, carver_t *c, cu_exp_in_t *in)
{
    size_t S = (size_t)m->max_seqs;
    in->base = carve(c, S * 4);
    in->seq_len = carve(c, S * 4);
    in->bt = carve(c, S * (size_t)m->exp_cols * 4);
}

/* MLA's dimensions, and the expanded form's size: a head dim epd_cu_attention takes that holds
 * nope + rope and vd, room for twice the largest step's rows (at least 2048), within 1 GiB. */
static void mla_dims(cu_model_t *m)
{
    const epd_hf_config_t *f = &m->cfg;
    m->ql = f->q_lora_rank;
    m->kvl = f->kv_lora_rank;
    m->nope = f->qk_nope_head_dim;
    m->rope = f->qk_rope_head_dim;
    m->vd = f->v_head_dim;
    m->qk = m->nope + m->rope;
    int need = m->qk > m->vd ? m->qk : m->vd;
    m->hdp = 0;
    for (int d = 16; d <= 256 && !m->hdp; d *= 2)
        if (d >= need) m->hdp = d;
    if (!m->hdp) return;
    size_t nh = (size_t)f->num_attention_heads;
    size_t per_row = (size_t)m->kvl * 2 + (size_t)m->rope * 2 + nh * (size_t)(m->nope + m->vd) * 4 +
                     2 * nh * (size_t)m->hdp * 2;
    size_t rows = (size_t)(m->max_tokens > 1024 ? 2 * m->max_tokens : 2048);
    if (rows * per_row > (1u << 30)) rows = (1u << 30) / per_row;
    rows = rows / EPD_CU_EXP_BLOCK * EPD_CU_EXP_BLOCK;
    m->exp_rows = (int)rows;
    m->exp_cols = (int)(rows / EPD_CU_EXP_BLOCK);
    if (!rows) m->hdp = 0;
}

static void carve_workspace(cu_model_t *m, carver_t *c)
{
    const epd_hf_config_t *f = &m->cfg;
    size_t T = (size_t)m->max_tokens, H = (size_t)f->hidden_size,
           k = (size_t)f->num_experts_per_tok;
    size_t E = (size_t)f->num_experts, I = (size_t)f->moe_intermediate_size;
    size_t Id = any_dense(f) ? (size_t)f->intermediate_size : 0, V = (size_t)f->vocab_size;
    size_t M = (size_t)m->max_seqs;
    size_t before = c->used;
    m->h = carve(c, T * H * 4);
    m->xn_f32 = carve(c, T * H * 4);
    m->xn_bf16 = carve(c, T * H * 2);
    m->qkv = carve(c, T * (size_t)m->qkv_dim * 4);
    m->q = carve(c, T * (size_t)m->q_dim * 4);
    size_t att_dim = (size_t)m->q_dim;
    if (m->mla && (size_t)f->num_attention_heads * m->vd > att_dim)
        att_dim = (size_t)f->num_attention_heads * m->vd;
    m->att = carve(c, T * att_dim * 2);
    /* dense MLPs and shared experts: one fused gate/up GEMM output */
    size_t Is = (size_t)f->moe_intermediate_size * (size_t)f->n_shared_experts;
    if (Is > Id) Id = Is;
    m->gu = Id ? carve(c, T * 2 * Id * 4) : NULL;
    if (m->mla) carve_mla_workspace(m, c);
    m->router_logits = carve(c, T * E * 4);
    m->topk_idx = carve(c, T * k * 4);
    m->topk_w = carve(c, T * k * 4);
    m->counts = carve(c, E * 4);
    m->offsets = carve(c, E * 4);
    m->row_of = carve(c, T * k * 4);
    m->packed_rows = m->nranks == 1 ? (int)(T * k) : m->local * m->ll_tokens * m->nranks;
    size_t rows = (size_t)m->packed_rows;
    m->packed = m->nranks == 1 ? carve(c, rows * H * 2) : NULL;
    size_t act_rows = rows * I > T * Id ? rows * I : T * Id;
    m->act = carve(c, act_rows * 2);
    m->expert_y = carve(c, rows * H * 2);
    m->moe_out = carve(c, T * H * 2);
    m->final_rows = carve(c, M * H * 4);
    m->final_bf16 = carve(c, M * H * 2);
    m->logits = carve(c, M * V * 4);
    m->next = carve(c, M * 4);
    m->expert_tokens = carve(c, E * 8);
    m->inv_freq = carve(c, (size_t)f->head_dim / 2 * 4);
    m->attn_ws_bytes =
        epd_cu_attention_workspace(attn_units(m), f->num_attention_heads, f->head_dim, 1);
    if (m->mla) {
        size_t a = epd_cu_mla_workspace(attn_units(m), f->num_attention_heads, m->kvl, 1);
        size_t b =
            m->hdp ? epd_cu_attention_workspace(attn_units(m), f->num_attention_heads, m->hdp, 1)
                   : 0;
        m->attn_ws_bytes = a > b ? a : b;
    }
    m->attn_ws = carve(c, m->attn_ws_bytes);
    m->sample_ws = carve(c, epd_cu_sample_workspace((int)M, (int)V));
    m->cublas_ws = carve(c, CUBLAS_WS_BYTES);
    m->ws_bytes = c->used - before;
}

/* Step inputs: the same carving over the device block and its pinned host mirror. */
static void carve_inputs(cu_model_t *m, carver_t *c, cu_step_in_t *in)
{
    size_t T = (size_t)m->max_tokens, S = (size_t)m->max_seqs;
    in->tokens = carve(c, T * 4);
    in->pos = carve(c, T * 4);
    in->seq_idx = carve(c, T * 4);
    in->slot = carve(c, T * 4);
    in->block_table = carve(c, S * (size_t)m->max_blocks * 4);
    in->logit_rows = carve(c, S * 4);
    in->sample = carve(c, S * sizeof(epd_sample_params_t));
    in->n_valid = carve(c, 4);
    in->n_logits = carve(c, 4);
}

int cu_model_alloc(cu_model_t *m, epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    int rc;
    m->qkv_dim = (f->num_attention_heads + 2 * f->num_key_value_heads) * f->head_dim;
    m->q_dim = f->num_attention_heads * f->head_dim;
    m->rope_scale = 1.0f;
    if ((m->mla = epd_hf_is_mla(f))) {
        mla_dims(m);
        m->qkv_dim = m->kvl + m->rope;             /* kv_a's output */
        m->q_dim = f->num_attention_heads * m->qk; /* q */
    }
    if (!(m->layers = calloc((size_t)f->num_hidden_layers, sizeof(*m->layers))))
        return epd_err_set(err, -ENOMEM, "out of memory");
    if ((rc = cu_check(cudaSetDevice(m->device), "cudaSetDevice", err)) ||
        (rc = cu_check(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking),
                       "cudaStreamCreate", err)) ||
        (rc = cu_blas_check(cublasCreate(&m->cublas), "cublasCreate", err)) ||
        (rc = cu_blas_check(cublasSetStream(m->cublas, m->stream), "cublasSetStream", err)))
        return rc;

    if ((rc = fp8_layers(m, err))) return rc;
    carver_t c = {0};
    carve_weights(m, &c);
    size_t wbytes = c.used;
    /* what the rank holds, counted by the tensor table (the allocation adds alignment only) */
    epd_model_mem_t est;
    epd_model_mem_estimate(f, m->nranks, EPD_MODEL_CUDA, &est);
    if (est.replicated_bytes + est.expert_bytes > wbytes || est.expert_bytes != m->expert_bytes)
        return epd_err_set(err, -EPROTO,
                           "cuda model: its weight layout (%zu bytes, experts %zu) disagrees with "
                           "the tensor table (replicated %zu, experts %zu)",
                           wbytes, m->expert_bytes, est.replicated_bytes, est.expert_bytes);
    m->replicated_bytes = est.replicated_bytes;
    m->expert_bytes = est.expert_bytes;
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    carver_t cw = {0};
    carve_workspace(m, &cw);
    if (wbytes + cw.used > free_b)
        return epd_err_set(err, -ENOMEM,
                           "GPU %d: the weights of this rank (%.2f GiB) and the workspace (%.2f "
                           "GiB) need %.2f GiB more than the %.2f GiB free",
                           m->device, wbytes / 1073741824.0, cw.used / 1073741824.0,
                           (wbytes + cw.used - free_b) / 1073741824.0, free_b / 1073741824.0);
    if ((rc = cu_check(cudaMalloc(&m->weights_block, wbytes), "weights", err))) return rc;
    c = (carver_t){.base = m->weights_block};
    carve_weights(m, &c);
    m->replicated_bytes = est.replicated_bytes;
    if ((rc = cu_check(cudaMalloc(&m->ws_block, cw.used), "workspace", err))) return rc;
    cw = (carver_t){.base = m->ws_block};
    carve_workspace(m, &cw);
    if ((rc = cu_blas_check(cublasSetWorkspace(m->cublas, m->cublas_ws, CUBLAS_WS_BYTES),
                            "cublasSetWorkspace", err)))
        return rc;

    /* the step inputs come with the KV pool (ops_kv_init): their block table needs its block
     * size */
    if ((rc = cu_check(cudaMallocHost((void **)&m->next_host, (size_t)m->max_seqs * 4),
                       "pinned tokens", err)) ||
        (rc = cu_check(cudaMallocHost((void **)&m->expert_tokens_host, (size_t)f->num_experts * 8),
                       "pinned expert counts", err)))
        return rc;
    memset(m->expert_tokens_host, 0, (size_t)f->num_experts * 8);
    if ((rc = cu_check(cudaMemsetAsync(m->expert_tokens, 0, (size_t)f->num_experts * 8, m->stream),
                       "memset", err)))
        return rc;

    /* rotary inverse frequencies, the C model's formula */
    int half = f->head_dim / 2;
    float *inv = malloc(sizeof(float) * (size_t)half);
    if (!inv) return epd_err_set(err, -ENOMEM, "out of memory");
    if (f->yarn.on) {
        epd_rope_yarn_inv_freq(inv, f->head_dim, f->rope_theta, f->yarn.factor,
                               f->yarn.original_max_position_embeddings, f->yarn.beta_fast,
                               f->yarn.beta_slow, f->yarn.truncate);
        m->rope_scale = (float)f->yarn.attention_factor;
    } else {
        epd_rope_inv_freq(inv, f->head_dim, f->rope_theta);
    }
    rc =
        cu_check(cudaMemcpy(m->inv_freq, inv, sizeof(float) * (size_t)half, cudaMemcpyHostToDevice),
                 "inv_freq upload", err);
    free(inv);
    return rc;
}

void cu_model_free(cu_model_t *m)
{
    if (!m) return;
    if (m->stream) cudaStreamSynchronize(m->stream);
    cu_graphs_destroy(m);
    cudaFree(m->weights_block);
    cudaFree(m->ws_block);
    cudaFree(m->kv_block);
    cudaFree(m->in_dev);
    cudaFree(m->slot_of_dev);
    cudaFreeHost(m->in_host);
    cudaFree(m->exp_dev);
    cudaFreeHost(m->exp_host);
    cudaFreeHost(m->next_host);
    cudaFreeHost(m->expert_tokens_host);
    if (m->cublas) cublasDestroy(m->cublas);
    if (m->stream) cudaStreamDestroy(m->stream);
    free(m->layers);
    free(m);
}

/* ---- the ops ------------------------------------------------------------------------------ */

static void ops_destroy(void *impl)
{
    cu_model_free(impl);
}

static int ops_kv_init(void *impl, int block_size, int *num_blocks, epd_err_t *err)
{
    cu_model_t *m = impl;
    const epd_hf_config_t *f = &m->cfg;
    int rc;
    m->block_size = block_size;
    m->max_blocks = (m->max_seq_len + block_size - 1) / block_size;
    /* K and V per layer, or MLA's one latent cache */
    size_t per_layer =
        (size_t)block_size * (size_t)f->num_key_value_heads * (size_t)f->head_dim * 2;
    int caches = 2;
    if (m->mla) {
        per_layer = (size_t)block_size * (size_t)(m->kvl + m->rope) * 2;
        caches = 1;
    }
    m->kv_block_bytes = per_layer * (size_t)caches * (size_t)f->num_hidden_layers;
    if ((rc = cu_check(cudaSetDevice(m->device), "cudaSetDevice", err))) return rc;
    if (m->in_dev) return epd_err_set(err, -EALREADY, "cuda model: the KV pool is already set up");
    /* the step inputs: one device block and its pinned mirror, carved alike */
    carver_t ci = {0};
    carve_inputs(m, &ci, &m->in);
    m->in_bytes = ci.used;
    if ((rc = cu_check(cudaMalloc(&m->in_dev, m->in_bytes), "step inputs", err)) ||
        (rc = cu_check(cudaMallocHost(&m->in_host, m->in_bytes), "pinned step inputs", err)))
        return rc;
    ci = (carver_t){.base = m->in_dev};
    carve_inputs(m, &ci, &m->in);
    ci = (carver_t){.base = m->in_host};
    carve_inputs(m, &ci, &m->in_h);
    memset(m->in_host, 0, m->in_bytes);
    m->ws_bytes += m->in_bytes;
    if (m->mla && m->hdp) { /* the expanded form's inputs, carved alike */
        carver_t ce = {0};
        carve_exp_inputs(m, &ce, &m->exp);
        m->exp_bytes = ce.used;
        if ((rc = cu_check(cudaMalloc(&m->exp_dev, m->exp_bytes), "expanded inputs", err)) ||
            (rc = cu_check(cudaMallocHost(&m->exp_host, m->exp_bytes), "pinned expanded inputs",
                           err)))
            return rc;
        ce = (carver_t){.base = m->exp_dev};
        carve_exp_inputs(m, &ce, &m->exp);
        ce = (carver_t){.base = m->exp_host};
        carve_exp_inputs(m, &ce, &m->exp_h);
        memset(m->exp_host, 0, m->exp_bytes);
        m->ws_bytes += m->exp_bytes;
    }

    int n = *num_blocks;
    if (n <= 0) {
        size_t free_b = 0, total_b = 0;
        if ((rc = cu_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo", err))) return rc;
        double frac = m->opts.kv_memory_fraction > 0 ? m->opts.kv_memory_fraction : 0.9;
        int share = m->opts.gpu_share > 0 ? m->opts.gpu_share : 1;
        double mine = (double)total_b * frac / share - (double)(m->weights_bytes + m->ws_bytes);
        /* graphs and cuBLAS take a little more as they come: keep 512 MiB of the free aside */
        double usable = (double)free_b - 512.0 * 1048576.0;
        if (mine < usable) usable = mine;
        n = usable > 0 ? (int)(usable / (double)m->kv_block_bytes) : 0;
        if (n < 1)
            return epd_err_set(err, -ENOMEM,
                               "GPU %d: no room for a KV cache: %.2f GiB free after the weights "
                               "and workspace, a block of %d positions takes %zu bytes",
                               m->device, free_b / 1073741824.0, block_size, m->kv_block_bytes);
    }
    size_t bytes = (size_t)n * m->kv_block_bytes;
    if ((rc = cu_check(cudaMalloc(&m->kv_block, bytes), "KV cache", err))) {
        return epd_err_set(err, -ENOMEM,
                           "GPU %d: the KV cache of %d blocks (%.2f GiB) does not fit", m->device,
                           n, bytes / 1073741824.0);
    }
    char *p = m->kv_block;
    size_t layer_bytes = (size_t)n * per_layer;
    for (int l = 0; l < f->num_hidden_layers; l++) {
        m->layers[l].k_cache = (uint16_t *)(p + (size_t)(caches * l) * layer_bytes);
        m->layers[l].v_cache =
            caches == 2 ? (uint16_t *)(p + (size_t)(2 * l + 1) * layer_bytes) : NULL;
    }
    m->num_blocks = n;
    m->kv_bytes = bytes;
    *num_blocks = n;
    return 0;
}

static void ops_mem(void *impl, epd_model_mem_t *mem)
{
    cu_model_t *m = impl;
    mem->replicated_bytes = m->replicated_bytes;
    mem->expert_bytes = m->expert_bytes;
    mem->kv_bytes = m->kv_bytes;
    mem->workspace_bytes = m->ws_bytes;
    mem->local_experts = m->local;
    mem->kv_block_bytes = m->kv_block_bytes;
    mem->kv_block_size = m->block_size;
    mem->kv_blocks_total = m->num_blocks;
}

static int ops_set_group(void *impl, ep_group_t *group, epd_err_t *err)
{
    cu_model_t *m = impl;
    if (ep_group_rank(group) != m->rank || ep_group_size(group) != m->nranks)
        return epd_err_set(err, -EINVAL,
                           "new EP group is rank %d of %d; the model was loaded as rank %d of %d",
                           ep_group_rank(group), ep_group_size(group), m->rank, m->nranks);
    /* the graphs captured the old group's buffers */
    cudaStreamSynchronize(m->stream);
    cu_graphs_destroy(m);
    m->group = group;
    return 0;
}

static void ops_expert_tokens(void *impl, uint64_t *counts)
{
    cu_model_t *m = impl;
    for (int e = 0; e < m->cfg.num_experts; e++)
        counts[e] = m->expert_tokens_host[e];
}

const epd_model_ops_t epd_cuda_model_ops = {
    .name = "cuda",
    .destroy = ops_destroy,
    .kv_init = ops_kv_init,
    .forward = cu_forward,
    .mem = ops_mem,
    .set_group = ops_set_group,
    .expert_tokens = ops_expert_tokens,
};

/* ---- creation ----------------------------------------------------------------------------- */

static int cu_create(const epd_model_opts_t *o, const epd_hf_config_t *cfg, cu_model_t **out,
                     epd_err_t *err)
{
    *out = NULL;
    cu_model_t *m = calloc(1, sizeof(*m));
    if (!m) return epd_err_set(err, -ENOMEM, "out of memory");
    m->cfg = *cfg;
    m->opts = *o;
    m->group = o->group;
    m->rank = ep_group_rank(o->group);
    m->nranks = ep_group_size(o->group);
    m->device = o->device;
    const ep_config_t *g = ep_group_config(o->group);
    m->ll_tokens = g->ll_max_tokens;
    m->ht_tokens = g->ht_max_tokens;
    m->max_tokens = m->ht_tokens > m->ll_tokens ? m->ht_tokens : m->ll_tokens;
    m->local = cfg->num_experts / m->nranks;
    m->max_seqs = o->max_seqs > 0 ? o->max_seqs : 64;
    if (m->max_seqs > m->max_tokens) m->max_seqs = m->max_tokens;
    m->max_seq_len = o->max_seq_len > 0 ? o->max_seq_len : cfg->max_position_embeddings;
    m->block_size = o->kv_block_size > 0 ? o->kv_block_size : EPD_KV_BLOCK_DEFAULT;
    m->max_blocks = (m->max_seq_len + m->block_size - 1) / m->block_size;
    m->profile = getenv("EPD_CUDA_PROFILE") && atoi(getenv("EPD_CUDA_PROFILE")) > 0;
    int rc = 0;
    if (g->backend != EP_BACKEND_CUDA)
        rc = epd_err_set(err, -EINVAL,
                         "the cuda model needs an EP group on the cuda backend (this one is %s)",
                         ep_backend_name(g->backend));
    else if (m->nranks > 1 && m->ht_tokens > 0)
        rc = epd_err_set(err, -ENOTSUP,
                         "the cuda model runs prefill through LL in chunks of "
                         "model.max_batch_tokens when it has several ranks: set "
                         "model.max_prefill_tokens to at most model.max_batch_tokens (%d)",
                         m->ll_tokens);
    else if (epd_hf_is_mla(cfg) &&
             (cfg->kv_lora_rank % 2 || cfg->kv_lora_rank > 512 ||
              cfg->kv_lora_rank + cfg->qk_rope_head_dim > 640 || cfg->qk_rope_head_dim > 256 ||
              cfg->hidden_size % (o->fp8_dispatch ? 128 : 16) || cfg->moe_intermediate_size % 16))
        rc = epd_err_set(err, -ENOTSUP,
                         "the cuda model's MLA needs kv_lora_rank even and at most 512, "
                         "kv_lora_rank + qk_rope_head_dim at most 640, qk_rope_head_dim at most "
                         "256, hidden_size a multiple of %d and moe_intermediate_size a multiple "
                         "of 16 (config.json has %d, %d, %d and %d)",
                         o->fp8_dispatch ? 128 : 16, cfg->kv_lora_rank, cfg->qk_rope_head_dim,
                         cfg->hidden_size, cfg->moe_intermediate_size);
    else if (!epd_hf_is_mla(cfg) &&
             (cfg->hidden_size % (o->fp8_dispatch ? 128 : 16) ||
              (cfg->head_dim != 16 && cfg->head_dim != 32 && cfg->head_dim != 64 &&
               cfg->head_dim != 128 && cfg->head_dim != 256) ||
              cfg->moe_intermediate_size % 16 ||
              cfg->num_attention_heads % cfg->num_key_value_heads))
        rc = epd_err_set(err, -ENOTSUP,
                         "the cuda model needs hidden_size a multiple of %d, head_dim 16, 32, "
                         "64, 128 or 256 and moe_intermediate_size a multiple of 16 (config.json "
                         "has %d, %d and %d)",
                         o->fp8_dispatch ? 128 : 16, cfg->hidden_size, cfg->head_dim,
                         cfg->moe_intermediate_size);
    if (!rc) rc = cu_model_alloc(m, err);
    if (rc) {
        cu_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

int epd_cuda_model_load(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                        const epd_model_placement_t *placement, void **impl,
                        const epd_model_ops_t **ops, epd_err_t *err)
{
    cu_model_t *m;
    int rc = cu_create(o, cfg, &m, err);
    if (rc) return rc;
    int identity = 1;
    for (int e = 0; placement && e < cfg->num_experts; e++)
        identity &= placement->slot_of[e] == e;
    if (!identity) {
        int32_t *slot = malloc(sizeof(int32_t) * (size_t)cfg->num_experts);
        if (!slot) {
            cu_model_free(m);
            return epd_err_set(err, -ENOMEM, "out of memory");
        }
        for (int e = 0; e < cfg->num_experts; e++)
            slot[e] = placement->slot_of[e];
        rc = cu_check(cudaMalloc((void **)&m->slot_of_dev, sizeof(int32_t) * cfg->num_experts),
                      "placement", err);
        if (!rc)
            rc = cu_check(cudaMemcpy(m->slot_of_dev, slot, sizeof(int32_t) * cfg->num_experts,
                                     cudaMemcpyHostToDevice),
                          "placement upload", err);
        free(slot);
    }
    if (!rc) rc = cu_load_weights(m, placement, err);
    if (rc) {
        cu_model_free(m);
        return rc;
    }
    *impl = m;
    *ops = &epd_cuda_model_ops;
    return 0;
}

int epd_cuda_model_create_random(const epd_model_opts_t *o, const epd_hf_config_t *cfg,
                                 uint64_t seed, int kv_blocks, cu_model_t **out, epd_err_t *err)
{
    cu_model_t *m;
    int rc = cu_create(o, cfg, &m, err);
    if (!rc) rc = cu_random_weights(m, seed, err);
    if (!rc) {
        int n = kv_blocks;
        rc = ops_kv_init(m, m->block_size, &n, err);
    }
    if (rc) {
        cu_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void epd_cuda_model_destroy(cu_model_t *m)
{
    cu_model_free(m);
}
