/* The MLA kernels (model/cuda/mla.cu) against their plain-C twins (mla_ref.c) on random inputs:
 * epd_cu_mla_rope_store vs epd_mla_rope_store_ref (q within 1e-5, the latent cache within one
 * bf16 ulp, rows of skipped slots untouched; both pairings, with YaRN's attention factor);
 * epd_cu_mla_attention over a paged bf16 latent cache with shuffled block tables and NaN decoy
 * blocks, sequences of several lengths, a padding token, split_len 16 and 64, vs
 * epd_mla_latent_ref on the widened cache (within a bf16 rounding of the output plus 2e-3
 * max|lat|); and the expanded form (gather, the decompression done here in fp32, expand, pad,
 * epd_cu_attention, unpad) vs epd_mla_expanded_ref (within 2e-2 of the output's scale: keys and
 * values per head are rounded to bf16). Exit 77 (skipped) without a CUDA device. */
#include "test_rng.h"
#include "cuda_harness.h"
#include "cuda_ops.h"
#include "mla_ref.h"
#include "ops.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call) H_CUDA_CHECK(-1, goto fail, call)
#define EXPECT(cond, ...) TEST_CHECK(-1, -1, goto fail, cond, __VA_ARGS__)

static uint64_t rng_state = 0xbb67ae8584caa73bull;

static uint32_t rnd(void)
{
    return (uint32_t)(test_splitmix64(&rng_state) >> 32);
}

static float urand(float a)
{
    return test_rng_sym(&rng_state, a);
}

static void *dev_copy(const void *src, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess) return NULL;
    if (bytes && cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        cudaFree(d);
        return NULL;
    }
    return d;
}

/* ---- rope + latent store ----------------------------------------------------------------------
 */

static int check_rope_store(int interleave, float scale, int nh, int nope, int rope, int kvl)
{
    int rc = -1;
    const int T = 6, rows = 10, qk = nope + rope, row = kvl + rope;
    const size_t nq = (size_t)T * nh * qk, nc = (size_t)rows * row;
    float *q = malloc(nq * 4), *q_ref = malloc(nq * 4), *q_got = malloc(nq * 4);
    float *kv = malloc((size_t)T * row * 4), *w = malloc((size_t)kvl * 4);
    float *inv = malloc((size_t)rope / 2 * 4);
    uint16_t *c_ref = malloc(nc * 2), *c_got = malloc(nc * 2);
    int32_t pos[6] = {0, 5, 63, 1000, 4095, 7}, slot[6] = {2, -1, 9, 0, 5, 3};
    float *dq = NULL, *dkv = NULL, *dw = NULL, *dinv = NULL;
    int32_t *dpos = NULL, *dslot = NULL;
    uint16_t *dc = NULL;
    for (size_t i = 0; i < nq; i++)
        q[i] = urand(2.0f);
    for (size_t i = 0; i < (size_t)T * row; i++)
        kv[i] = urand(3.0f);
    for (int i = 0; i < kvl; i++)
        w[i] = 0.5f + urand(0.4f);
    epd_rope_yarn_inv_freq(inv, rope, 10000.0, 40.0, 4096, 32, 1, 1);
    for (size_t i = 0; i < nc; i++)
        c_ref[i] = 0xdead;
    memcpy(q_ref, q, nq * 4);
    EXPECT(!epd_mla_rope_store_ref(q_ref, kv, w, inv, scale, interleave, pos, slot, T, nh, nope,
                                   rope, kvl, 1e-6f, c_ref),
           "twin refused");
    dq = dev_copy(q, nq * 4), dkv = dev_copy(kv, (size_t)T * row * 4);
    dw = dev_copy(w, (size_t)kvl * 4), dinv = dev_copy(inv, (size_t)rope / 2 * 4);
    dpos = dev_copy(pos, sizeof(pos)), dslot = dev_copy(slot, sizeof(slot));
    for (size_t i = 0; i < nc; i++)
        c_got[i] = 0xdead;
    dc = dev_copy(c_got, nc * 2);
    EXPECT(dq && dkv && dw && dinv && dpos && dslot && dc, "cudaMalloc");
    CK(epd_cu_mla_rope_store(dq, dkv, dw, dinv, scale, interleave, dpos, dslot, T, nh, nope, rope,
                             kvl, 1e-6f, dc, NULL));
    CK(cudaMemcpy(q_got, dq, nq * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(c_got, dc, nc * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < nq; i++)
        EXPECT(fabsf(q_got[i] - q_ref[i]) <= 1e-5f * (1 + fabsf(q_ref[i])), "q[%zu] %g vs %g", i,
               q_got[i], q_ref[i]);
    for (size_t i = 0; i < nc; i++)
        EXPECT(abs((int)c_got[i] - (int)c_ref[i]) <= 1, "cache[%zu] %04x vs %04x", i, c_got[i],
               c_ref[i]);
    printf("rope_store nh %d nope %d rope %d kvl %d interleave %d: ok\n", nh, nope, rope, kvl,
           interleave);
    rc = 0;
fail:
    cudaFree(dq), cudaFree(dkv), cudaFree(dw), cudaFree(dinv), cudaFree(dpos), cudaFree(dslot);
    cudaFree(dc);
    free(q), free(q_ref), free(q_got), free(kv), free(w), free(inv), free(c_ref), free(c_got);
    return rc;
}

/* ---- latent attention and the expanded form ---------------------------------------------------
 */

typedef struct paged {
    int S, max_blocks, nblocks, block_size, row;
    int32_t *bt;
    uint16_t *cache; /* [nblocks][block_size][row] bf16 */
    float *wide;
} paged_t;

static void paged_make(paged_t *p, const int *lens, int S, int block_size, int row)
{
    int maxlen = 0;
    for (int s = 0; s < S; s++)
        if (lens[s] > maxlen) maxlen = lens[s];
    p->S = S, p->block_size = block_size, p->row = row;
    p->max_blocks = (maxlen + block_size - 1) / block_size;
    p->nblocks = S * p->max_blocks + 2;
    p->bt = malloc(sizeof(int32_t) * (size_t)S * p->max_blocks);
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)p->nblocks);
    for (int i = 0; i < p->nblocks; i++)
        perm[i] = i;
    for (int i = p->nblocks - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint32_t)(i + 1)), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    memcpy(p->bt, perm, sizeof(int32_t) * (size_t)S * p->max_blocks);
    size_t n = (size_t)p->nblocks * block_size * row;
    p->cache = malloc(n * 2);
    p->wide = malloc(n * 4);
    for (size_t i = 0; i < n; i++)
        p->cache[i] = 0x7fc0; /* NaN: decoys and unwritten rows */
    for (int s = 0; s < S; s++)
        for (int j = 0; j < lens[s]; j++)
            for (int i = 0; i < row; i++)
                p->cache[((size_t)p->bt[s * p->max_blocks + j / block_size] * block_size +
                          j % block_size) *
                             row +
                         i] = epd_f32_to_bf16(urand(1.0f));
    for (size_t i = 0; i < n; i++)
        p->wide[i] = epd_bf16_to_f32(p->cache[i]);
    free(perm);
}

static void paged_free(paged_t *p)
{
    free(p->bt), free(p->cache), free(p->wide);
}

static int check_latent(int nh, int kvl, int rope, int block_size, int split_len)
{
    int rc = -1;
    enum { S = 3, T = 6 };
    const int lens[S] = {1, 300, 77};
    int32_t seq_idx[T] = {0, 1, 1, -1, 2, 2}, pos[T] = {0, 298, 299, 0, 75, 76};
    const int qk = 24 + rope; /* q layout [T][nh][nope + rope], nope 24 */
    paged_t p;
    paged_make(&p, lens, S, block_size, kvl + rope);
    const int max_splits = (300 + split_len - 1) / split_len, max_len = split_len * max_splits;
    const size_t nl = (size_t)T * nh * kvl;
    float *q_lat = malloc(nl * 4), *q = malloc((size_t)T * nh * qk * 4), *ref = malloc(nl * 4);
    float *scores = malloc((size_t)max_len * 4);
    uint16_t *got = malloc(nl * 2);
    for (size_t i = 0; i < nl; i++)
        q_lat[i] = urand(0.3f);
    for (size_t i = 0; i < (size_t)T * nh * qk; i++)
        q[i] = urand(0.3f);
    float *dql = dev_copy(q_lat, nl * 4), *dq = dev_copy(q, (size_t)T * nh * qk * 4);
    uint16_t *dc = dev_copy(p.cache, (size_t)p.nblocks * block_size * p.row * 2), *dout = NULL;
    int32_t *dbt = dev_copy(p.bt, sizeof(int32_t) * (size_t)S * p.max_blocks);
    int32_t *dseq = dev_copy(seq_idx, sizeof(seq_idx)), *dpos = dev_copy(pos, sizeof(pos));
    void *ws = NULL;
    EXPECT(dql && dq && dc && dbt && dseq && dpos, "cudaMalloc");
    CK(cudaMalloc((void **)&dout, nl * 2));
    CK(cudaMalloc(&ws, epd_cu_mla_workspace(T, nh, kvl, max_splits)));
    const float scale = 0.07f;
    CK(epd_cu_mla_attention(dout, dql, dq + 24, qk, dc, dbt, p.max_blocks, dseq, dpos, T, nh, kvl,
                            rope, scale, block_size, split_len, max_splits, ws, NULL));
    CK(cudaMemcpy(got, dout, nl * 2, cudaMemcpyDeviceToHost));
    epd_mla_latent_ref(ref, q_lat, q + 24, qk, p.wide, p.bt, p.max_blocks, seq_idx, pos, T, nh, kvl,
                       rope, scale, block_size, max_len, scores);
    float worst = 0;
    for (size_t i = 0; i < nl; i++) {
        float g = epd_bf16_to_f32(got[i]), d = fabsf(g - ref[i]);
        EXPECT(d <= fabsf(ref[i]) / 128 + 2e-3f, "o_lat[%zu] %g vs %g", i, g, ref[i]);
        if (d > worst) worst = d;
    }
    printf("latent attention nh %d kvl %d rope %d block %d split %d: max error %.2e\n", nh, kvl,
           rope, block_size, split_len, worst);
    rc = 0;
fail:
    cudaFree(dql), cudaFree(dq), cudaFree(dc), cudaFree(dbt), cudaFree(dseq), cudaFree(dpos);
    cudaFree(dout), cudaFree(ws);
    free(q_lat), free(q), free(ref), free(scores), free(got);
    paged_free(&p);
    return rc;
}

static int check_expanded(int nh, int nope, int rope, int kvl, int vd, int hdp)
{
    int rc = -1;
    enum { S = 2, T = 5, EB = 16 };
    const int lens[S] = {40, 9}, block_size = 16, qk = nope + rope;
    int32_t seq_idx[T] = {0, 0, 0, 1, 1}, pos[T] = {37, 38, 39, 7, 8};
    int32_t base[S] = {0, 48}, seq_len[S] = {40, 9};
    const int rows = 64, exp_cols = rows / EB;
    int32_t ebt[S * 4] = {0, 1, 2, 3, 3, 0, 0, 0};
    paged_t p;
    paged_make(&p, lens, S, block_size, kvl + rope);
    float *kv_b = malloc(sizeof(float) * nh * (nope + vd) * kvl);
    uint16_t *kv_b16 = malloc(2 * (size_t)nh * (nope + vd) * kvl);
    for (size_t i = 0; i < (size_t)nh * (nope + vd) * kvl; i++) {
        kv_b16[i] = epd_f32_to_bf16(urand(0.2f));
        kv_b[i] = epd_bf16_to_f32(kv_b16[i]);
    }
    float *q = malloc(sizeof(float) * T * nh * qk), *ref = malloc(sizeof(float) * T * nh * vd);
    for (size_t i = 0; i < (size_t)T * nh * qk; i++)
        q[i] = urand(1.0f);
    float *scratch = malloc(sizeof(float) * 64 * (nope + 1 + vd));
    uint16_t *lat = malloc((size_t)rows * kvl * 2), *got = malloc((size_t)T * nh * vd * 2);
    float *kvx = calloc((size_t)rows * nh * (nope + vd), 4);
    const float scale = 0.11f;
    uint16_t *dc = dev_copy(p.cache, (size_t)p.nblocks * block_size * p.row * 2), *dlat = NULL;
    uint16_t *dpe = NULL, *dk = NULL, *dv = NULL, *datt = NULL, *dout = NULL;
    int32_t *dbt = dev_copy(p.bt, sizeof(int32_t) * (size_t)S * p.max_blocks);
    int32_t *dbase = dev_copy(base, sizeof(base)), *dlen = dev_copy(seq_len, sizeof(seq_len));
    int32_t *debt = dev_copy(ebt, sizeof(ebt)), *dseq = dev_copy(seq_idx, sizeof(seq_idx));
    int32_t *dpos = dev_copy(pos, sizeof(pos));
    float *dq = dev_copy(q, sizeof(float) * T * nh * qk), *dkvx = NULL, *dqp = NULL;
    void *ws = NULL;
    EXPECT(dc && dbt && dbase && dlen && debt && dseq && dpos && dq, "cudaMalloc");
    CK(cudaMalloc((void **)&dlat, (size_t)rows * kvl * 2));
    CK(cudaMalloc((void **)&dpe, (size_t)rows * rope * 2));
    CK(cudaMemset(dlat, 0, (size_t)rows * kvl * 2));
    CK(epd_cu_mla_gather(dlat, dpe, dc, dbt, p.max_blocks, dbase, dlen, S, 40, kvl, rope,
                         block_size, NULL));
    CK(cudaMemcpy(lat, dlat, (size_t)rows * kvl * 2, cudaMemcpyDeviceToHost));
    for (int s = 0; s < S; s++) /* the gather against the cache */
        for (int j = 0; j < seq_len[s]; j++)
            for (int i = 0; i < kvl; i++)
                EXPECT(lat[(size_t)(base[s] + j) * kvl + i] ==
                           p.cache[((size_t)p.bt[s * p.max_blocks + j / block_size] * block_size +
                                    j % block_size) *
                                       p.row +
                                   i],
                       "gather: sequence %d position %d dim %d", s, j, i);
    for (int r = 0; r < rows; r++) /* the decompression GEMM, here in fp32 */
        for (int o = 0; o < nh * (nope + vd); o++) {
            float a = 0;
            for (int c = 0; c < kvl; c++)
                a += epd_bf16_to_f32(lat[(size_t)r * kvl + c]) * kv_b[(size_t)o * kvl + c];
            kvx[(size_t)r * nh * (nope + vd) + o] = a;
        }
    dkvx = dev_copy(kvx, (size_t)rows * nh * (nope + vd) * 4);
    EXPECT(dkvx, "cudaMalloc");
    CK(cudaMalloc((void **)&dk, (size_t)rows * nh * hdp * 2));
    CK(cudaMalloc((void **)&dv, (size_t)rows * nh * hdp * 2));
    CK(cudaMalloc((void **)&dqp, (size_t)T * nh * hdp * 4));
    CK(cudaMalloc((void **)&datt, (size_t)T * nh * hdp * 2));
    CK(cudaMalloc((void **)&dout, (size_t)T * nh * vd * 2));
    CK(cudaMalloc(&ws, epd_cu_attention_workspace(T, nh, hdp, 1)));
    CK(epd_cu_mla_expand_kv(dk, dv, dkvx, dpe, rows, nh, nope, rope, vd, hdp, NULL));
    CK(epd_cu_mla_pad_q(dqp, dq, T, nh, qk, hdp, scale * sqrtf((float)hdp), NULL));
    CK(epd_cu_attention(datt, dqp, dk, dv, debt, exp_cols, dseq, dpos, T, nh, nh, hdp, EB, 64, 1,
                        ws, NULL));
    CK(epd_cu_mla_unpad(dout, datt, T, nh, vd, hdp, NULL));
    CK(cudaMemcpy(got, dout, (size_t)T * nh * vd * 2, cudaMemcpyDeviceToHost));
    epd_mla_expanded_ref(ref, q, p.wide, kv_b, p.bt, p.max_blocks, seq_idx, pos, T, nh, nope, rope,
                         kvl, vd, scale, block_size, 64, scratch);
    float mx = 0, worst = 0;
    for (int i = 0; i < T * nh * vd; i++)
        if (fabsf(ref[i]) > mx) mx = fabsf(ref[i]);
    for (int i = 0; i < T * nh * vd; i++) {
        float g = epd_bf16_to_f32(got[i]), d = fabsf(g - ref[i]);
        EXPECT(d <= 2e-2f * mx, "out[%d] %g vs %g (scale %g)", i, g, ref[i], mx);
        if (d > worst) worst = d;
    }
    printf("expanded nh %d nope %d rope %d kvl %d vd %d (hd %d): max error %.2e of %.2e\n", nh,
           nope, rope, kvl, vd, hdp, worst, mx);
    rc = 0;
fail:
    cudaFree(dc), cudaFree(dlat), cudaFree(dpe), cudaFree(dk), cudaFree(dv), cudaFree(datt);
    cudaFree(dout), cudaFree(dbt), cudaFree(dbase), cudaFree(dlen), cudaFree(debt);
    cudaFree(dseq), cudaFree(dpos), cudaFree(dq), cudaFree(dkvx), cudaFree(dqp), cudaFree(ws);
    free(kv_b), free(kv_b16), free(q), free(ref), free(scratch), free(lat), free(got), free(kvx);
    paged_free(&p);
    return rc;
}

int main(void)
{
    if (h_skip_without_gpu()) return H_SKIP;
    int fails = 0;
    fails += check_rope_store(0, 1.0f, 4, 32, 16, 48) != 0;
    fails += check_rope_store(1, 1.3465736f, 16, 128, 64, 512) != 0;
    fails += check_latent(4, 48, 16, 1, 16) != 0;
    fails += check_latent(16, 512, 64, 16, 64) != 0;
    fails += check_latent(20, 512, 64, 16, 16) != 0; /* a partial head group */
    fails += check_expanded(4, 32, 16, 48, 24, 64) != 0;
    fails += check_expanded(16, 128, 64, 512, 128, 256) != 0;
    printf(fails ? "FAIL: %d check(s)\n" : "PASS\n", fails);
    return fails ? 1 : 0;
}
