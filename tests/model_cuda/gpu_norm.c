/* norm.cu's kernels against their C twins (norm_ref.c, epd_f32_to_bf16) on random data, on the
 * vectorised and the scalar paths: embed, gather_rows, the residual in h and f32_to_bf16 bit for
 * bit; add_rmsnorm's fp32 output within 1e-5 relative, bf16 outputs equal or 1 ulp apart.
 * Exit 77 without a CUDA device. */
#include "test_rng.h"
#include "cuda_harness.h"
#include "cuda_ops.h"
#include "norm_ref.h"
#include "ops.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call) H_CUDA_CHECK(-1, exit(1), call)

static int failures;
#define EXPECT(cond, ...) TEST_CHECK(-1, -1, failures++, cond, __VA_ARGS__)

static uint64_t rng_state = 0xabc0001u;
static uint64_t rng_next(void)
{
    return test_splitmix64(&rng_state);
}
static float rng_sym(float scale)
{
    return scale * (float)((double)(rng_next() >> 11) / 4503599627370496.0 - 1.0);
}

static void *dev_copy(const void *h, size_t bytes)
{
    void *d;
    CK(cudaMalloc(&d, bytes ? bytes : 1));
    if (h && bytes) CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}
static void host_copy(void *h, const void *d, size_t bytes)
{
    CK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

static int ulp_diff(uint16_t a, uint16_t b)
{
    return a > b ? a - b : b - a;
}

static void check_embed(int V, int H, int T)
{
    uint16_t *emb = malloc(sizeof(uint16_t) * (size_t)V * H);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)T);
    float *want = malloc(sizeof(float) * (size_t)T * H),
          *got = malloc(sizeof(float) * (size_t)T * H);
    for (size_t i = 0; i < (size_t)V * H; i++)
        emb[i] = epd_f32_to_bf16(rng_sym(1.0f));
    for (int t = 0; t < T; t++)
        tok[t] = (int32_t)(rng_next() % (uint64_t)V);
    uint16_t *d_emb = dev_copy(emb, sizeof(uint16_t) * (size_t)V * H);
    int32_t *d_tok = dev_copy(tok, sizeof(int32_t) * (size_t)T);
    float *d_h = dev_copy(NULL, sizeof(float) * (size_t)T * H);
    CK(epd_cu_embed(d_h, d_emb, d_tok, T, H, NULL));
    host_copy(got, d_h, sizeof(float) * (size_t)T * H);
    epd_embed_ref(want, emb, tok, T, H);
    EXPECT(memcmp(got, want, sizeof(float) * (size_t)T * H) == 0, "embed V=%d H=%d T=%d", V, H, T);
    cudaFree(d_emb), cudaFree(d_tok), cudaFree(d_h);
    free(emb), free(tok), free(want), free(got);
}

static void check_add_rmsnorm(int T, int H, int with_delta, int want_f32, int want_bf16)
{
    const size_t n = (size_t)T * H;
    float *h = malloc(sizeof(float) * n), *h_gpu = malloc(sizeof(float) * n);
    float *w = malloc(sizeof(float) * (size_t)H), *scratch = malloc(sizeof(float) * (size_t)H);
    float *out = malloc(sizeof(float) * n), *out_gpu = malloc(sizeof(float) * n);
    uint16_t *delta = malloc(sizeof(uint16_t) * n), *ob = malloc(sizeof(uint16_t) * n),
             *ob_gpu = malloc(sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) {
        h[i] = rng_sym(4.0f) * (i % 11 == 0 ? 30.0f : 1.0f);
        delta[i] = epd_f32_to_bf16(rng_sym(2.0f));
    }
    for (int i = 0; i < H; i++)
        w[i] = 1.0f + rng_sym(0.9f);
    const float eps = 1e-6f;
    float *d_h = dev_copy(h, sizeof(float) * n), *d_w = dev_copy(w, sizeof(float) * (size_t)H);
    uint16_t *d_delta = dev_copy(delta, sizeof(uint16_t) * n);
    float *d_out = dev_copy(NULL, sizeof(float) * n);
    uint16_t *d_ob = dev_copy(NULL, sizeof(uint16_t) * n);
    CK(epd_cu_add_rmsnorm(d_h, with_delta ? d_delta : NULL, d_w, eps, T, H, want_f32 ? d_out : NULL,
                          want_bf16 ? d_ob : NULL, NULL));
    epd_add_rmsnorm_ref(h, with_delta ? delta : NULL, w, eps, T, H, want_f32 ? out : NULL,
                        want_bf16 ? ob : NULL, scratch);
    host_copy(h_gpu, d_h, sizeof(float) * n);
    EXPECT(memcmp(h_gpu, h, sizeof(float) * n) == 0, "add_rmsnorm residual T=%d H=%d", T, H);
    int bad_f = 0, bad_b = 0;
    if (want_f32) {
        host_copy(out_gpu, d_out, sizeof(float) * n);
        for (size_t i = 0; i < n; i++)
            bad_f += !(fabsf(out_gpu[i] - out[i]) <= 1e-5f * fabsf(out[i]) + 1e-30f);
    }
    if (want_bf16) {
        host_copy(ob_gpu, d_ob, sizeof(uint16_t) * n);
        for (size_t i = 0; i < n; i++)
            bad_b += ulp_diff(ob_gpu[i], ob[i]) > 1;
    }
    EXPECT(bad_f == 0 && bad_b == 0, "add_rmsnorm T=%d H=%d delta=%d: %d fp32, %d bf16 off", T, H,
           with_delta, bad_f, bad_b);
    cudaFree(d_h), cudaFree(d_w), cudaFree(d_delta), cudaFree(d_out), cudaFree(d_ob);
    free(h), free(h_gpu), free(w), free(scratch), free(out), free(out_gpu), free(delta), free(ob),
        free(ob_gpu);
}

static void check_silu_mul(int T, int I)
{
    const size_t n = (size_t)T * I;
    float *gu = malloc(sizeof(float) * 2 * n);
    uint16_t *want = malloc(sizeof(uint16_t) * n), *got = malloc(sizeof(uint16_t) * n);
    for (size_t i = 0; i < 2 * n; i++)
        gu[i] = rng_sym(10.0f);
    gu[0] = -200.0f;
    float *d_gu = dev_copy(gu, sizeof(float) * 2 * n);
    uint16_t *d_act = dev_copy(NULL, sizeof(uint16_t) * n);
    CK(epd_cu_silu_mul(d_act, d_gu, T, I, NULL));
    host_copy(got, d_act, sizeof(uint16_t) * n);
    epd_silu_mul_ref(want, gu, T, I);
    int bad = 0, off1 = 0;
    for (size_t i = 0; i < n; i++) {
        bad += ulp_diff(got[i], want[i]) > 1;
        off1 += got[i] != want[i];
    }
    EXPECT(bad == 0, "silu_mul T=%d I=%d: %d values more than 1 ulp off", T, I, bad);
    printf("silu_mul T=%d I=%d: %d of %zu values 1 ulp off\n", T, I, off1, n);
    cudaFree(d_gu), cudaFree(d_act);
    free(gu), free(want), free(got);
}

static void check_gather(int R, int C, int N)
{
    float *src = malloc(sizeof(float) * (size_t)R * C),
          *want = malloc(sizeof(float) * (size_t)N * C),
          *got = malloc(sizeof(float) * (size_t)N * C);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)N);
    for (size_t i = 0; i < (size_t)R * C; i++)
        src[i] = rng_sym(50.0f);
    for (int i = 0; i < N; i++)
        rows[i] = (int32_t)(rng_next() % (uint64_t)R);
    float *d_src = dev_copy(src, sizeof(float) * (size_t)R * C);
    float *d_dst = dev_copy(NULL, sizeof(float) * (size_t)N * C);
    int32_t *d_rows = dev_copy(rows, sizeof(int32_t) * (size_t)N);
    CK(epd_cu_gather_rows(d_dst, d_src, d_rows, N, C, NULL));
    host_copy(got, d_dst, sizeof(float) * (size_t)N * C);
    epd_gather_rows_ref(want, src, rows, N, C);
    EXPECT(memcmp(got, want, sizeof(float) * (size_t)N * C) == 0, "gather R=%d C=%d N=%d", R, C, N);
    cudaFree(d_src), cudaFree(d_dst), cudaFree(d_rows);
    free(src), free(want), free(got), free(rows);
}

/* src_off / dst_off shift the bases off 16-byte alignment to take the scalar path. */
static void check_f32_to_bf16(size_t n, int src_off, int dst_off)
{
    float *src = malloc(sizeof(float) * n);
    uint16_t *got = malloc(sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)rng_next();
        if (i % 3 == 0) u = (u & 0x8000ffffu) | 0x3f800000u; /* near 1: many halfway cases */
        memcpy(&src[i], &u, 4);
    }
    float *d_src = dev_copy(NULL, sizeof(float) * (n + 4));
    uint16_t *d_dst = dev_copy(NULL, sizeof(uint16_t) * (n + 4));
    CK(cudaMemcpy(d_src + src_off, src, sizeof(float) * n, cudaMemcpyHostToDevice));
    CK(epd_cu_f32_to_bf16(d_dst + dst_off, d_src + src_off, n, NULL));
    host_copy(got, d_dst + dst_off, sizeof(uint16_t) * n);
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += got[i] != epd_f32_to_bf16(src[i]);
    EXPECT(bad == 0, "f32_to_bf16 n=%zu offsets %d/%d: %d differ", n, src_off, dst_off, bad);
    cudaFree(d_src), cudaFree(d_dst);
    free(src), free(got);
}

int main(void)
{
    if (h_skip_without_gpu()) return H_SKIP;
    check_embed(1000, 4096, 37);
    check_embed(300, 1030, 5); /* H % 8 != 0: scalar */
    const int Hs[] = {4096, 2048, 8192, 1001, 64};
    for (int k = 0; k < 5; k++)
        for (int mode = 0; mode < 4; mode++)
            check_add_rmsnorm(k == 2 ? 16 : 67, Hs[k], mode & 1, mode != 2, mode >= 2 || k == 3);
    check_silu_mul(33, 768);
    check_silu_mul(7, 771);
    check_gather(100, 4096, 60);
    check_gather(50, 151, 9);
    check_f32_to_bf16((1u << 20) + 3, 0, 0);
    check_f32_to_bf16(100003, 1, 0);
    check_f32_to_bf16(5, 0, 1);
    CK(cudaDeviceSynchronize());
    if (failures) {
        fprintf(stderr, "gpu_norm: %d failures\n", failures);
        return 1;
    }
    printf("gpu_norm: ok\n");
    return 0;
}
