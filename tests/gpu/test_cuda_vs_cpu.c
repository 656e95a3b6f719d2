/* The cuda backend against the cpu backend, row by row on the same inputs: every rank runs
 * one cpu group (shm) and one cuda group side by side and feeds both the same random routing
 * (some ids -1, ranks at zero tokens) and data. LL: recv_count, recv_src_info, recv_range and
 * the fp8 rows + scales bit-exact, combine within three bf16 roundings (3 * 2^-8 of sum |w*y|: two
 * on the cuda side, one on the cpu side). HT: received rows, ids, weights, per-expert counts exact;
 * combine within one bf16 ulp. Exit 77 (skipped) without a GPU. */
#include "cuda_harness.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NR 2
#define E_ 32
#define H_ 384
#define K_ 6
#define TM 40
#define STEPS 30
#define L_ (E_ / NR)
#define S_ (TM * NR)
#define CAP_ (TM * NR)

static h_world_t W;
static int ndev, failed[NR];

#define CK(call) H_CUDA_CHECK(rank, goto fail, call)
#define EPK(grp, call) H_EP_CHECK(rank, grp, goto fail, call)
#define EXPECT(cond, ...) TEST_CHECK(rank, step, goto fail, cond, __VA_ARGS__)

static void *rank_main(void *arg)
{
    const int rank = (int)(intptr_t)arg, L = L_, S = S_, CAP = CAP_;
    ep_group_t *gc = NULL, *gg = NULL;
    cudaStream_t s = NULL;
    unsigned seed = 4242u + (unsigned)rank * 31u;
    int step = -1;
    /* host (cpu group) and device (cuda group) copies of everything */
    static uint16_t x[NR][TM * H_], out_c[NR][TM * H_], out_g[NR][TM * H_];
    static uint16_t y[NR][L_ * S_ * H_ > CAP_ * H_ ? L_ * S_ * H_ : CAP_ * H_];
    static int32_t idx[NR][TM * K_];
    static float w[NR][TM * K_];
    static uint8_t rx_g[NR][L_ * S_ * H_ * 2];
    static float sc_g[NR][L_ * S_ * (H_ / 128)];
    static int32_t cnt_g[NR][L_], src_g[NR][L_ * S_], rng_g[NR][L_ * NR * 2];
    static uint8_t hrx_c[NR][CAP_ * H_ * 2], hrx_g[NR][CAP_ * H_ * 2];
    static int32_t hri_c[NR][CAP_ * K_], hri_g[NR][CAP_ * K_], npe_c[NR][L_], npe_g[NR][L_];
    static float hrw_c[NR][CAP_ * K_], hrw_g[NR][CAP_ * K_];
    uint16_t *d_x = NULL, *d_y = NULL, *d_out = NULL;
    int32_t *d_idx = NULL, *d_ri = NULL, *d_npe = NULL;
    float *d_w = NULL, *d_rw = NULL;
    void *d_rx = NULL;

    CK(cudaSetDevice(rank % ndev));
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.num_experts = E_;
    cfg.hidden = H_;
    cfg.num_topk = K_;
    cfg.ll_max_tokens = TM;
    cfg.ht_max_tokens = TM;
    cfg.num_sms = 4;
    cfg.timeout_ms = 10000;
    cfg.backend = EP_BACKEND_CPU;
    EPK(NULL, h_group_create(&cfg, &W, rank, &gc));
    cfg.backend = EP_BACKEND_CUDA;
    cfg.device = rank % ndev;
    EPK(NULL, h_group_create(&cfg, &W, rank, &gg));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaMalloc((void **)&d_x, sizeof x[0]));
    CK(cudaMalloc((void **)&d_y, sizeof y[0]));
    CK(cudaMalloc((void **)&d_out, sizeof out_g[0]));
    CK(cudaMalloc((void **)&d_idx, sizeof idx[0]));
    CK(cudaMalloc((void **)&d_w, sizeof w[0]));
    CK(cudaMalloc(&d_rx, sizeof hrx_g[0]));
    CK(cudaMalloc((void **)&d_ri, sizeof hri_g[0]));
    CK(cudaMalloc((void **)&d_rw, sizeof hrw_g[0]));
    CK(cudaMalloc((void **)&d_npe, sizeof npe_g[0]));

    for (step = 0; step < STEPS; ++step) {
        const int T = step % 3 == rank ? 0 : 1 + (int)(rand_r(&seed) % TM);
        const int fp8 = step % 2 == 0, rs = step % 4 == 1;
        for (int t = 0; t < T; ++t) {
            for (int j = 0; j < K_; ++j) {
                int e, dup;
                do {
                    e = (int)(rand_r(&seed) % E_);
                    dup = 0;
                    for (int q = 0; q < j; ++q)
                        dup |= idx[rank][t * K_ + q] == e;
                } while (dup);
                idx[rank][t * K_ + j] = rand_r(&seed) % 7 == 0 ? -1 : e;
                w[rank][t * K_ + j] = (float)(rand_r(&seed) % 1000) / 999.f;
            }
            for (int h = 0; h < H_; ++h)
                x[rank][t * H_ + h] = h_f_to_bf16(
                    ldexpf((float)(rand_r(&seed) % 2001) / 1000.f - 1.f, (int)(h / 128) * 3 - 4));
        }
        CK(cudaMemcpy(d_x, x[rank], sizeof x[0], cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_idx, idx[rank], sizeof idx[0], cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_w, w[rank], sizeof w[0], cudaMemcpyHostToDevice));

        /* ---- LL ---- */
        ep_ll_dispatch_args_t ac = {.x = x[rank],
                                    .num_tokens = T,
                                    .topk_idx = idx[rank],
                                    .topk_weights = w[rank],
                                    .use_fp8 = fp8,
                                    .round_scale = rs};
        ep_ll_dispatch_args_t ag = ac;
        ag.x = d_x;
        ag.topk_idx = d_idx;
        ag.topk_weights = d_w;
        ag.stream = s;
        ep_ll_dispatch_out_t oc, og;
        ep_ll_handle_t *hc, *hg;
        ep_hook_t *hk;
        EPK(gc, ep_ll_dispatch(gc, &ac, &oc, &hc, &hk));
        EPK(gg, ep_ll_dispatch(gg, &ag, &og, &hg, &hk));
        CK(cudaStreamSynchronize(s));
        const size_t eb = fp8 ? 1 : 2;
        CK(cudaMemcpy(cnt_g[rank], og.recv_count, sizeof cnt_g[0], cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(src_g[rank], og.recv_src_info, sizeof src_g[0], cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(rng_g[rank], og.recv_range, sizeof rng_g[0], cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(rx_g[rank], og.recv_x, (size_t)L * S * H_ * eb, cudaMemcpyDeviceToHost));
        if (fp8) CK(cudaMemcpy(sc_g[rank], og.recv_scales, sizeof sc_g[0], cudaMemcpyDeviceToHost));
        for (int e = 0; e < L; ++e) {
            EXPECT(cnt_g[rank][e] == oc.recv_count[e], "LL expert %d count cuda %d cpu %d", e,
                   cnt_g[rank][e], oc.recv_count[e]);
            for (int r = 0; r < NR * 2; ++r)
                EXPECT(rng_g[rank][e * NR * 2 + r] == oc.recv_range[e * NR * 2 + r],
                       "LL expert %d recv_range[%d] cuda %d cpu %d", e, r,
                       rng_g[rank][e * NR * 2 + r], oc.recv_range[e * NR * 2 + r]);
            for (int r = 0; r < cnt_g[rank][e]; ++r) {
                const size_t row = (size_t)e * S + r;
                EXPECT(src_g[rank][row] == oc.recv_src_info[row], "LL expert %d row %d src", e, r);
                EXPECT(!memcmp(rx_g[rank] + row * H_ * eb, (uint8_t *)oc.recv_x + row * H_ * eb,
                               H_ * eb),
                       "LL expert %d row %d data differs (fp8 %d)", e, r, fp8);
                if (fp8)
                    EXPECT(!memcmp(&sc_g[rank][row * (H_ / 128)], &oc.recv_scales[row * (H_ / 128)],
                                   (H_ / 128) * 4),
                           "LL expert %d row %d scales differ", e, r);
            }
        }
        /* expert outputs: any function of the received rows, identical for both groups */
        for (size_t i = 0; i < (size_t)L * S * H_; ++i)
            y[rank][i] = h_f_to_bf16((float)((i * 2654435761u) >> 20 & 1023) / 256.f - 2.f);
        CK(cudaMemcpy(d_y, y[rank], (size_t)L * S * H_ * 2, cudaMemcpyHostToDevice));
        ep_ll_combine_args_t cc = {.handle = hc,
                                   .expert_y = y[rank],
                                   .topk_idx = idx[rank],
                                   .topk_weights = w[rank],
                                   .out = out_c[rank]};
        ep_ll_combine_args_t cg = {.handle = hg,
                                   .expert_y = d_y,
                                   .topk_idx = d_idx,
                                   .topk_weights = d_w,
                                   .out = d_out,
                                   .stream = s};
        EPK(gc, ep_ll_combine(gc, &cc, &hk));
        EPK(gg, ep_ll_combine(gg, &cg, &hk));
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(out_g[rank], d_out, (size_t)T * H_ * 2, cudaMemcpyDeviceToHost));
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H_; ++h) {
                const float a = h_bf16_to_f(out_c[rank][t * H_ + h]);
                const float b = h_bf16_to_f(out_g[rank][t * H_ + h]);
                /* |w*y| summed bounds the two roundings; the y values are at most 2 */
                float mag = 0.f;
                for (int j = 0; j < K_; ++j)
                    mag += idx[rank][t * K_ + j] >= 0 ? fabsf(w[rank][t * K_ + j]) * 2.f : 0.f;
                EXPECT(fabsf(a - b) <= ldexpf(3.f * mag, -8) + 1e-6f,
                       "LL out[%d][%d] cuda %g cpu %g", t, h, b, a);
            }

        /* ---- HT ---- */
        ep_ht_dispatch_args_t hac = {.x = x[rank],
                                     .num_tokens = T,
                                     .topk_idx = idx[rank],
                                     .topk_weights = w[rank],
                                     .expert_alignment = 1 + step % 3};
        ep_ht_dispatch_args_t hag = hac;
        hag.x = d_x;
        hag.topk_idx = d_idx;
        hag.topk_weights = d_w;
        hag.stream = s;
        ep_ht_dispatch_out_t hoc = {.capacity = CAP,
                                    .recv_x = hrx_c[rank],
                                    .recv_topk_idx = hri_c[rank],
                                    .recv_topk_weights = hrw_c[rank],
                                    .num_recv_per_expert = npe_c[rank]};
        ep_ht_dispatch_out_t hog = {.capacity = CAP,
                                    .recv_x = d_rx,
                                    .recv_topk_idx = d_ri,
                                    .recv_topk_weights = d_rw,
                                    .num_recv_per_expert = d_npe};
        ep_ht_handle_t *htc = NULL, *htg = NULL;
        EPK(gc, ep_ht_dispatch(gc, &hac, &hoc, &htc));
        EPK(gg, ep_ht_dispatch(gg, &hag, &hog, &htg));
        CK(cudaStreamSynchronize(s));
        const int N = hog.num_recv_tokens;
        EXPECT(N == hoc.num_recv_tokens, "HT rows cuda %d cpu %d", N, hoc.num_recv_tokens);
        CK(cudaMemcpy(hrx_g[rank], d_rx, (size_t)N * H_ * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hri_g[rank], d_ri, (size_t)N * K_ * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hrw_g[rank], d_rw, (size_t)N * K_ * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(npe_g[rank], d_npe, sizeof npe_g[0], cudaMemcpyDeviceToHost));
        EXPECT(!memcmp(hrx_g[rank], hrx_c[rank], (size_t)N * H_ * 2), "HT recv_x differs");
        EXPECT(!memcmp(hri_g[rank], hri_c[rank], (size_t)N * K_ * 4), "HT recv_topk_idx differs");
        EXPECT(!memcmp(hrw_g[rank], hrw_c[rank], (size_t)N * K_ * 4),
               "HT recv_topk_weights differs");
        EXPECT(!memcmp(npe_g[rank], npe_c[rank], sizeof npe_g[0]),
               "HT num_recv_per_expert differs");
        for (size_t i = 0; i < (size_t)N * H_; ++i)
            y[rank][i] = h_f_to_bf16(h_bf16_to_f(((uint16_t *)hrx_c[rank])[i]) * (float)(rank + 2));
        CK(cudaMemcpy(d_y, y[rank], (size_t)(N ? N : 1) * H_ * 2, cudaMemcpyHostToDevice));
        EPK(gc, ep_ht_combine(gc, htc, y[rank], out_c[rank], NULL));
        EPK(gg, ep_ht_combine(gg, htg, d_y, d_out, s));
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(out_g[rank], d_out, (size_t)T * H_ * 2, cudaMemcpyDeviceToHost));
        for (int i = 0; i < T * H_; ++i) {
            const float a = h_bf16_to_f(out_c[rank][i]), b = h_bf16_to_f(out_g[rank][i]);
            EXPECT(fabsf(a - b) <= ldexpf(fabsf(a), -7) + 1e-6f, "HT out[%d][%d] cuda %g cpu %g",
                   i / H_, i % H_, b, a);
        }
        ep_ht_handle_destroy(htc);
        ep_ht_handle_destroy(htg);
        if (h_barrier(&W)) goto fail;
    }
    printf("rank %d: %d steps, cuda == cpu (LL fp8/bf16 bit-exact rows, HT exact rows)\n", rank,
           STEPS);
    goto done;
fail:
    failed[rank] = 1;
    fprintf(stderr, "rank %d: FAILED\n", rank);
    h_world_break(&W); /* peers stop waiting for this rank */
done:
    ep_group_destroy(gg);
    ep_group_destroy(gc);
    cudaFree(d_x);
    cudaFree(d_y);
    cudaFree(d_out);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_rx);
    cudaFree(d_ri);
    cudaFree(d_rw);
    cudaFree(d_npe);
    if (s) cudaStreamDestroy(s);
    return NULL;
}

int main(void)
{
    ndev = h_device_count();
    if (ndev == 0) {
        printf("SKIP: no CUDA device present\n");
        return H_SKIP;
    }
    if (h_world_init(&W, NR) != 0) return 1;
    pthread_t th[NR];
    for (int r = 0; r < NR; ++r)
        pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < NR; ++r)
        pthread_join(th[r], NULL);
    h_world_fini(&W);
    printf("%s\n", failed[0] | failed[1] ? "FAILED" : "PASSED");
    return failed[0] | failed[1];
}
