/* The CUDA model's weights: this rank's tensors of the table (tensors.h) read from the mmapped
 * safetensors files, converted to bf16 (norms and routers fp32; an FP8 checkpoint's experts kept
 * as e4m3 codes with fp32 block scales, its other fp8 weights dequantised) into pinned staging
 * buffers and copied to the GPU asynchronously, two buffers in flight, so conversion, disk reads
 * and copies overlap; or random weights made on the GPU for benchmarks. */
#include "cuda_model.h"
#include "ops.h"
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STAGE_BYTES (64u << 20)
#define NSTAGE 2

typedef struct loader {
    cu_model_t *m;
    epd_err_t *err;
    char *stage[NSTAGE];
    cudaEvent_t done[NSTAGE];
    int used[NSTAGE];
    int next;
    uint64_t total, landed, reported;
} loader_t;

/* A tensor to stream: t's elements, dequantised with sc in blocks bn x bk where sc is set. */
typedef struct src {
    const epd_st_tensor_t *t, *sc;
    int bn, bk;
} src_t;

/* Converts elements [i0, i0 + n) of s into dst: bf16 (esize 2), fp32 (esize 4) or the stored
 * bytes (esize 1: e4m3 codes kept). */
static void convert(const src_t *s, size_t i0, size_t n, void *dst, int esize)
{
    const epd_st_tensor_t *t = s->t;
    if (esize == 1) {
        memcpy(dst, (const char *)t->data + i0, n);
    } else if (s->sc) { /* fp8 dequantised: W = e4m3(q) * scale[r / bn][c / bk] */
        const size_t cols = (size_t)t->shape[1], sc = (size_t)s->sc->shape[1];
        const uint8_t *q = t->data;
        for (size_t i = i0; i < i0 + n; i++) {
            const size_t r = i / cols, c = i % cols;
            float v = epd_e4m3_to_f32(q[i]) *
                      epd_st_elem_f32(s->sc, r / (size_t)s->bn * sc + c / (size_t)s->bk);
            if (esize == 2)
                ((uint16_t *)dst)[i - i0] = epd_f32_to_bf16(v);
            else
                ((float *)dst)[i - i0] = v;
        }
    } else if (esize == 2 && t->dtype == EPD_ST_BF16) {
        memcpy(dst, (const char *)t->data + 2 * i0, 2 * n);
    } else if (esize == 4 && t->dtype == EPD_ST_F32) {
        memcpy(dst, (const char *)t->data + 4 * i0, 4 * n);
    } else if (esize == 2) {
        uint16_t *o = dst;
        for (size_t i = 0; i < n; i++)
            o[i] = epd_f32_to_bf16(epd_st_elem_f32(t, i0 + i));
    } else {
        float *o = dst;
        for (size_t i = 0; i < n; i++)
            o[i] = epd_st_elem_f32(t, i0 + i);
    }
}

/* Streams s (already checked) to dst on the GPU. */
static int upload(loader_t *ld, const src_t *s, void *dst, int esize)
{
    cu_model_t *m = ld->m;
    size_t n = (size_t)s->t->numel, per = STAGE_BYTES / (size_t)esize;
    for (size_t i0 = 0; i0 < n; i0 += per) {
        size_t c = n - i0 < per ? n - i0 : per;
        int b = ld->next;
        ld->next = (b + 1) % NSTAGE;
        int rc;
        if (ld->used[b] &&
            (rc = cu_check(cudaEventSynchronize(ld->done[b]), "weights upload", ld->err)))
            return rc;
        convert(s, i0, c, ld->stage[b], esize);
        if ((rc = cu_check(cudaMemcpyAsync((char *)dst + i0 * (size_t)esize, ld->stage[b],
                                           c * (size_t)esize, cudaMemcpyHostToDevice, m->stream),
                           "weights upload", ld->err)) ||
            (rc = cu_check(cudaEventRecord(ld->done[b], m->stream), "cudaEventRecord", ld->err)))
            return rc;
        ld->used[b] = 1;
        ld->landed += c * (size_t)esize;
        if (m->opts.progress &&
            (ld->landed - ld->reported >= (256u << 20) || ld->landed == ld->total)) {
            ld->reported = ld->landed;
            m->opts.progress(m->opts.progress_arg, ld->landed, ld->total);
        }
    }
    return 0;
}

/* Where the tensor goes on this rank (NULL: another rank's expert) and its element size (1: an
 * fp8 expert's codes, whose block scales go to *scale_dst). */
static void *destination(cu_model_t *m, const epd_model_placement_t *pl, const epd_tensor_desc_t *d,
                         int *esize, float **scale_dst)
{
    const epd_hf_config_t *f = &m->cfg;
    size_t H = (size_t)f->hidden_size, hd = (size_t)f->head_dim;
    size_t I = (size_t)f->moe_intermediate_size, Id = (size_t)f->intermediate_size;
    cu_layer_t *w = d->layer >= 0 ? &m->layers[d->layer] : NULL;
    *esize = 2;
    *scale_dst = NULL;
    switch (d->role) {
    case EPD_W_EMBED:
        return m->embed;
    case EPD_W_LM_HEAD:
        return m->lm_head;
    case EPD_W_FINAL_NORM:
        *esize = 4;
        return m->final_norm;
    case EPD_W_INPUT_NORM:
        *esize = 4;
        return w->input_norm;
    case EPD_W_POST_NORM:
        *esize = 4;
        return w->post_norm;
    case EPD_W_Q_NORM:
        *esize = 4;
        return w->q_norm;
    case EPD_W_K_NORM:
        *esize = 4;
        return w->k_norm;
    case EPD_W_ROUTER:
        *esize = 4;
        return w->router;
    case EPD_W_Q:
    case EPD_W_Q_B: /* MLA: qkv holds q_proj or q_b_proj */
        return w->qkv;
    case EPD_W_K:
        return w->qkv + (size_t)m->q_dim * H;
    case EPD_W_V:
        return w->qkv + ((size_t)m->q_dim + (size_t)f->num_key_value_heads * hd) * H;
    case EPD_W_O:
        return w->o;
    case EPD_W_Q_A:
        return w->q_a;
    case EPD_W_KV_A:
        return w->kv_a;
    case EPD_W_KV_B:
        return w->kv_b;
    case EPD_W_Q_A_NORM:
        *esize = 4;
        return w->q_a_norm;
    case EPD_W_KV_A_NORM:
        *esize = 4;
        return w->kv_a_norm;
    case EPD_W_ROUTER_BIAS:
        *esize = 4;
        return w->router_bias;
    case EPD_W_SHARED_GATE:
        return w->sh_gate_up;
    case EPD_W_SHARED_UP:
        return w->sh_gate_up + I * (size_t)f->n_shared_experts * H;
    case EPD_W_SHARED_DOWN:
        return w->sh_down;
    case EPD_W_DENSE_GATE:
        return w->gate_up;
    case EPD_W_DENSE_UP:
        return w->gate_up + Id * H;
    case EPD_W_DENSE_DOWN:
        return w->down;
    case EPD_W_EXPERT_GATE:
    case EPD_W_EXPERT_UP:
    case EPD_W_EXPERT_DOWN: {
        int slot = pl ? pl->slot_of[d->expert] : d->expert;
        if (slot / m->local != m->rank) return NULL;
        size_t l = (size_t)(slot % m->local);
        if (w->w8) {
            /* codes [L][2I][H] and [L][H][I]; scales [L][2][nbr][nbk] and [L][nbr][nbk]: the
             * table's scale shape of each projection */
            const size_t ns = (size_t)d->scale_shape[0] * (size_t)d->scale_shape[1];
            *esize = 1;
            if (d->role == EPD_W_EXPERT_DOWN) {
                *scale_dst = w->down_sc + l * ns;
                return w->down8 + l * H * I;
            }
            const size_t up = d->role == EPD_W_EXPERT_UP;
            *scale_dst = w->gate_up_sc + (l * 2 + up) * ns;
            return w->gate_up8 + l * 2 * I * H + up * I * H;
        }
        if (d->role == EPD_W_EXPERT_GATE) return w->gate_up + l * 2 * I * H;
        if (d->role == EPD_W_EXPERT_UP) return w->gate_up + l * 2 * I * H + I * H;
        return w->down + l * H * I;
    }
    default: /* DeepSeek's MLA and shared experts: the cuda model refuses MLA before loading */
        break;
    }
    return NULL;
}

int cu_load_weights(cu_model_t *m, const epd_model_placement_t *pl, epd_err_t *err)
{
    epd_tensor_desc_t *tab = NULL;
    int n = 0, rc;
    epd_st_ckpt_t *ck = NULL;
    loader_t ld = {.m = m, .err = err};
    if ((rc = epd_tensor_table(&m->cfg, &tab, &n, err))) return rc;
    if ((rc = epd_st_ckpt_open(m->opts.dir, &ck, err))) goto out;
    /* find and check every tensor first: a broken checkpoint fails before any copy */
    for (int i = 0; i < n; i++) {
        const epd_st_tensor_t *t, *sc;
        if ((rc = epd_tensor_find(ck, &tab[i], &t, &sc, err))) goto out;
        int es;
        float *sd;
        if (destination(m, pl, &tab[i], &es, &sd)) {
            ld.total += (uint64_t)t->numel * (uint64_t)es;
            if (sd) ld.total += (uint64_t)sc->numel * 4;
        }
    }
    for (int b = 0; b < NSTAGE; b++) {
        if ((rc = cu_check(cudaMallocHost((void **)&ld.stage[b], STAGE_BYTES), "pinned staging",
                           err)) ||
            (rc = cu_check(cudaEventCreateWithFlags(&ld.done[b], cudaEventDisableTiming),
                           "cudaEventCreate", err)))
            goto out;
    }
    for (int i = 0; i < n; i++) {
        int es;
        float *sd;
        void *dst = destination(m, pl, &tab[i], &es, &sd);
        if (!dst) continue;
        src_t s = {.bn = tab[i].block[0], .bk = tab[i].block[1]};
        if ((rc = epd_tensor_find(ck, &tab[i], &s.t, &s.sc, err))) goto out;
        if (es == 1) { /* kept fp8: the codes, then the scales as fp32 */
            const src_t codes = {.t = s.t}, scales = {.t = s.sc};
            if ((rc = upload(&ld, &codes, dst, 1)) || (rc = upload(&ld, &scales, sd, 4))) goto out;
            continue;
        }
        if ((rc = upload(&ld, &s, dst, es))) goto out;
    }
    rc = cu_check(cudaStreamSynchronize(m->stream), "weights upload", err);
out:
    for (int b = 0; b < NSTAGE; b++) {
        if (ld.done[b]) {
            cudaEventSynchronize(ld.done[b]);
            cudaEventDestroy(ld.done[b]);
        }
        cudaFreeHost(ld.stage[b]);
    }
    epd_st_ckpt_close(ck);
    free(tab);
    return rc;
}

int cu_random_weights(cu_model_t *m, uint64_t seed, epd_err_t *err)
{
    const epd_hf_config_t *f = &m->cfg;
    size_t H = (size_t)f->hidden_size, V = (size_t)f->vocab_size, hd = (size_t)f->head_dim;
    size_t E = (size_t)f->num_experts, L = (size_t)m->local, I = (size_t)f->moe_intermediate_size;
    size_t Id = (size_t)f->intermediate_size;
    const float a = 0.0346f; /* uniform of standard deviation 0.02, transformers' init */
    cudaStream_t s = m->stream;
    int e = 0;
#define BF(p, n) (e = e ? e : epd_cu_fill_uniform_bf16((p), (n), seed++, -a, a, s))
#define ONE(p, n) (e = e ? e : epd_cu_fill_uniform_f32((p), (n), seed++, 1.0f, 1.0f, s))
    BF(m->embed, V * H);
    if (m->lm_head != m->embed) BF(m->lm_head, V * H);
    ONE(m->final_norm, H);
    for (int l = 0; l < f->num_hidden_layers; l++) {
        cu_layer_t *w = &m->layers[l];
        ONE(w->input_norm, H);
        ONE(w->post_norm, H);
        if (m->mla) {
            size_t nh = (size_t)f->num_attention_heads, ql = (size_t)m->ql;
            if (ql) {
                BF(w->q_a, ql * H);
                ONE(w->q_a_norm, ql);
            }
            BF(w->qkv, nh * (size_t)m->qk * (ql ? ql : H));
            BF(w->kv_a, (size_t)(m->kvl + m->rope) * H);
            ONE(w->kv_a_norm, (size_t)m->kvl);
            BF(w->kv_b, nh * (size_t)(m->nope + m->vd) * (size_t)m->kvl);
            BF(w->o, H * nh * (size_t)m->vd);
        } else {
            ONE(w->q_norm, hd);
            ONE(w->k_norm, hd);
            BF(w->qkv, (size_t)m->qkv_dim * H);
            BF(w->o, H * (size_t)m->q_dim);
        }
        if (w->is_moe) {
            size_t Is = I * (size_t)f->n_shared_experts;
            if (!e) e = epd_cu_fill_uniform_f32(w->router, E * H, seed++, -a, a, s);
            if (w->router_bias && !e)
                e = epd_cu_fill_uniform_f32(w->router_bias, E, seed++, 0.0f, 0.0f, s);
            if (Is) {
                BF(w->sh_gate_up, 2 * Is * H);
                BF(w->sh_down, H * Is);
            }
            if (w->w8) {
                /* codes of +-448 times scales of a / 448: the same uniform weights in fp8 */
                const size_t bn = (size_t)f->fp8.block_n, bk = (size_t)f->fp8.block_k;
                const size_t sgu = L * 2 * ((I + bn - 1) / bn) * ((H + bk - 1) / bk);
                const size_t sdn = L * ((H + bn - 1) / bn) * ((I + bk - 1) / bk);
                if (!e)
                    e = epd_cu_fill_uniform_e4m3(w->gate_up8, L * 2 * I * H, seed++, -448, 448, s);
                if (!e) e = epd_cu_fill_uniform_e4m3(w->down8, L * H * I, seed++, -448, 448, s);
                if (!e)
                    e = epd_cu_fill_uniform_f32(w->gate_up_sc, sgu, seed++, a / 448, a / 448, s);
                if (!e) e = epd_cu_fill_uniform_f32(w->down_sc, sdn, seed++, a / 448, a / 448, s);
            } else {
                BF(w->gate_up, L * 2 * I * H);
                BF(w->down, L * H * I);
            }
        } else {
            BF(w->gate_up, 2 * Id * H);
            BF(w->down, H * Id);
        }
    }
#undef BF
#undef ONE
    int rc = cu_check((cudaError_t)e, "random weights", err);
    if (!rc) rc = cu_check(cudaStreamSynchronize(s), "random weights", err);
    return rc;
}
