/* GPU test of the cuda backend's HT path and routing: R ranks as threads, random routing (some
 * ids -1, some ranks at zero tokens), BF16 and FP8, expert alignment on and off. Checked against
 * the plain-C reference twins (kernels/ht_layout_ref.c, kernels/route_ref.c) and a host model of
 * the contract computed here from every rank's inputs: ep_get_dispatch_layout exact;
 * ep_ht_dispatch rows (order, bytes, scales, local ids, weights, counts) exact;
 * ep_ht_dispatch_cached with new data exact; ep_ht_combine within one bf16 rounding of the sum;
 * ep_route: ids equal to the reference's, weights within 1e-5. Exit 77 (skipped) without a GPU. */
#include "cuda_harness.h"
#include "ht_layout_ref.h"
#include "route_ref.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NR 2
#define E_ 16
#define H_ 256
#define K_ 4
#define TM 300

static struct {
    h_world_t w;
    int ndev, steps;
    int T[NR];
    uint16_t x[NR][TM * H_];
    uint8_t x8[NR][TM * H_];
    float xs[NR][TM * (H_ / 128)];
    int32_t idx[NR][TM * K_];
    float wt[NR][TM * K_];
    int fail[NR];
} S;

#define CK(call) H_CUDA_CHECK(rank, goto fail, call)
#define EPK(call) H_EP_CHECK(rank, g, goto fail, call)
#define EXPECT(cond, ...) TEST_CHECK(rank, step, goto fail, cond, __VA_ARGS__)

static int on_rank(int s, int t, int d)
{
    for (int j = 0; j < K_; ++j) {
        int e = S.idx[s][t * K_ + j];
        if (e >= 0 && e / (E_ / NR) == d) return 1;
    }
    return 0;
}

static void gen(int rank, int step, unsigned *seed)
{
    int T = (step % 5 == rank + 1) ? 0 : (int)(rand_r(seed) % (TM + 1));
    S.T[rank] = T;
    for (int t = 0; t < T; ++t) {
        for (int j = 0; j < K_; ++j) {
            int e, dup;
            do {
                e = (int)(rand_r(seed) % E_);
                dup = 0;
                for (int q = 0; q < j; ++q)
                    dup |= S.idx[rank][t * K_ + q] == e;
            } while (dup);
            S.idx[rank][t * K_ + j] = rand_r(seed) % 8 == 0 ? -1 : e;
            S.wt[rank][t * K_ + j] = (float)(rand_r(seed) % 1000) / 999.f;
        }
        for (int h = 0; h < H_; ++h) {
            S.x[rank][t * H_ + h] = h_f_to_bf16((float)(rand_r(seed) % 4001) / 1000.f - 2.f);
            S.x8[rank][t * H_ + h] =
                (uint8_t)(rand_r(seed) % 0x7f) | (uint8_t)(rand_r(seed) % 2 << 7);
        }
        for (int g = 0; g < H_ / 128; ++g)
            S.xs[rank][t * (H_ / 128) + g] = (float)(rand_r(seed) % 100 + 1) / 64.f;
    }
}

static void *rank_main(void *arg)
{
    const int rank = (int)(intptr_t)arg;
    const int L = E_ / NR, CAP = TM * NR;
    ep_group_t *g = NULL;
    cudaStream_t s = NULL;
    unsigned seed = 99u + (unsigned)rank;
    void *d_x = NULL, *d_rx = NULL;
    float *d_xs = NULL, *d_rs = NULL, *d_w = NULL, *d_rw = NULL, *d_logits = NULL, *d_tw = NULL;
    int32_t *d_idx = NULL, *d_ri = NULL, *d_npe = NULL, *d_pr = NULL, *d_pe = NULL, *d_ti = NULL;
    uint8_t *d_in = NULL;
    uint16_t *d_y = NULL, *d_out = NULL;
    static uint8_t h_rx[NR][TM * NR * H_ * 2];
    static uint16_t h_y[NR][TM * NR * H_], h_out[NR][TM * H_];
    static float h_rs[NR][TM * NR * 2], h_rw[NR][TM * NR * K_];
    static int32_t h_ri[NR][TM * NR * K_];
    int step = -1;

    CK(cudaSetDevice(rank % S.ndev));
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.backend = EP_BACKEND_CUDA;
    cfg.num_experts = E_;
    cfg.hidden = H_;
    cfg.num_topk = K_;
    cfg.ht_max_tokens = TM;
    cfg.ll_max_tokens = 0;
    cfg.num_sms = 4;
    cfg.timeout_ms = 10000;
    cfg.device = rank % S.ndev;
    EPK(h_group_create(&cfg, &S.w, rank, &g));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaMalloc(&d_x, TM * H_ * 2));
    CK(cudaMalloc((void **)&d_xs, TM * 2 * 4));
    CK(cudaMalloc((void **)&d_idx, TM * K_ * 4));
    CK(cudaMalloc((void **)&d_w, TM * K_ * 4));
    CK(cudaMalloc(&d_rx, (size_t)CAP * H_ * 2));
    CK(cudaMalloc((void **)&d_rs, (size_t)CAP * 2 * 4));
    CK(cudaMalloc((void **)&d_ri, (size_t)CAP * K_ * 4));
    CK(cudaMalloc((void **)&d_rw, (size_t)CAP * K_ * 4));
    CK(cudaMalloc((void **)&d_npe, L * 4));
    CK(cudaMalloc((void **)&d_pr, NR * 4));
    CK(cudaMalloc((void **)&d_pe, E_ * 4));
    CK(cudaMalloc((void **)&d_in, TM * NR));
    CK(cudaMalloc((void **)&d_y, (size_t)CAP * H_ * 2));
    CK(cudaMalloc((void **)&d_out, TM * H_ * 2));

    for (step = 0; step < S.steps; ++step) {
        const int fp8 = step & 1, align = (step & 2) ? 4 : 1;
        gen(rank, step, &seed);
        if (h_barrier(&S.w)) goto fail;
        const int T = S.T[rank];
        CK(cudaMemcpy(d_x, fp8 ? (void *)S.x8[rank] : (void *)S.x[rank],
                      (size_t)TM * H_ * (fp8 ? 1 : 2), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_xs, S.xs[rank], sizeof S.xs[rank], cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_idx, S.idx[rank], sizeof S.idx[rank], cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_w, S.wt[rank], sizeof S.wt[rank], cudaMemcpyHostToDevice));
        CK(cudaMemsetAsync(d_rx, 0xee, (size_t)CAP * H_ * 2, s));
        CK(cudaMemsetAsync(d_ri, 0xee, (size_t)CAP * K_ * 4, s));
        CK(cudaStreamSynchronize(s));
        h_barrier(&S.w); /* no peer writes into recv_x before it is poisoned */

        /* layout */
        ep_ht_layout_t lay = {d_pr, d_pe, d_in};
        EPK(ep_get_dispatch_layout(g, d_idx, T, &lay, s));
        CK(cudaStreamSynchronize(s));
        {
            int32_t pr[NR], pe[E_], rpr[NR], rpe[E_];
            uint8_t in[TM * NR], rin[TM * NR];
            CK(cudaMemcpy(pr, d_pr, sizeof pr, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(pe, d_pe, sizeof pe, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(in, d_in, (size_t)T * NR, cudaMemcpyDeviceToHost));
            ep_ht_layout_ref(S.idx[rank], T, K_, E_, NR, rpr, rpe, rin);
            EXPECT(!memcmp(pr, rpr, sizeof pr) && !memcmp(pe, rpe, sizeof pe) &&
                       !memcmp(in, rin, (size_t)T * NR),
                   "dispatch layout differs from ht_layout_ref");
        }

        /* dispatch */
        ep_ht_dispatch_args_t a = {.x = d_x,
                                   .x_scales = d_xs,
                                   .use_fp8 = fp8,
                                   .num_tokens = T,
                                   .topk_idx = d_idx,
                                   .topk_weights = d_w,
                                   .expert_alignment = align,
                                   .stream = s};
        ep_ht_dispatch_out_t o = {.capacity = CAP,
                                  .recv_x = d_rx,
                                  .recv_scales = d_rs,
                                  .recv_topk_idx = d_ri,
                                  .recv_topk_weights = d_rw,
                                  .num_recv_per_expert = d_npe};
        ep_ht_handle_t *hh = NULL;
        EPK(ep_ht_dispatch(g, &a, &o, &hh));
        CK(cudaStreamSynchronize(s));
        const int N = o.num_recv_tokens;
        const size_t rb = fp8 ? H_ : H_ * 2;
        CK(cudaMemcpy(h_rx[rank], d_rx, (size_t)N * rb, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_rs[rank], d_rs, (size_t)N * 2 * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_ri[rank], d_ri, (size_t)N * K_ * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_rw[rank], d_rw, (size_t)N * K_ * 4, cudaMemcpyDeviceToHost));
        int32_t npe[E_ / NR], enpe[E_ / NR] = {0};
        CK(cudaMemcpy(npe, d_npe, sizeof npe, cudaMemcpyDeviceToHost));
        int n = 0;
        for (int src = 0; src < NR; ++src)
            for (int t = 0; t < S.T[src]; ++t) {
                if (!on_rank(src, t, rank)) continue;
                EXPECT(n < N, "fewer rows than expected (%d)", N);
                const void *want =
                    fp8 ? (const void *)&S.x8[src][t * H_] : (const void *)&S.x[src][t * H_];
                EXPECT(!memcmp(h_rx[rank] + (size_t)n * rb, want, rb),
                       "row %d (src %d tok %d) data differs", n, src, t);
                if (fp8)
                    EXPECT(!memcmp(&h_rs[rank][n * 2], &S.xs[src][t * 2], 8),
                           "row %d scales differ", n);
                for (int j = 0; j < K_; ++j) {
                    int e = S.idx[src][t * K_ + j];
                    int li = e >= 0 && e / L == rank ? e - rank * L : -1;
                    EXPECT(h_ri[rank][n * K_ + j] == li, "row %d topk_idx[%d] = %d, expected %d", n,
                           j, h_ri[rank][n * K_ + j], li);
                    float w = li >= 0 ? S.wt[src][t * K_ + j] : 0.f;
                    EXPECT(h_rw[rank][n * K_ + j] == w, "row %d weight[%d] = %g, expected %g", n, j,
                           h_rw[rank][n * K_ + j], w);
                    if (li >= 0) enpe[li]++;
                }
                ++n;
            }
        EXPECT(n == N, "received %d rows, expected %d", N, n);
        for (int e = 0; e < L; ++e) {
            int want = (enpe[e] + align - 1) / align * align;
            EXPECT(npe[e] == want, "num_recv_per_expert[%d] = %d, expected %d", e, npe[e], want);
        }

        /* cached dispatch of new bf16 data: every row again, from the new data */
        if (!fp8) {
            h_barrier(&S.w); /* every rank has checked against the old data */
            for (int t = 0; t < T; ++t)
                for (int h = 0; h < H_; ++h)
                    S.x[rank][t * H_ + h] = h_f_to_bf16((float)((t * 7 + h) % 97) / 16.f - 3.f);
            if (h_barrier(&S.w)) goto fail;
            CK(cudaMemcpy(d_x, S.x[rank], (size_t)TM * H_ * 2, cudaMemcpyHostToDevice));
            CK(cudaMemsetAsync(d_rx, 0xee, (size_t)CAP * H_ * 2, s));
            CK(cudaStreamSynchronize(s));
            if (h_barrier(&S.w)) goto fail;
            EPK(ep_ht_dispatch_cached(g, hh, &a, &o));
            CK(cudaStreamSynchronize(s));
            CK(cudaMemcpy(h_rx[rank], d_rx, (size_t)N * rb, cudaMemcpyDeviceToHost));
            n = 0;
            for (int src = 0; src < NR; ++src)
                for (int t = 0; t < S.T[src]; ++t)
                    if (on_rank(src, t, rank)) {
                        EXPECT(!memcmp(h_rx[rank] + (size_t)n * rb, &S.x[src][t * H_], rb),
                               "cached row %d differs", n);
                        ++n;
                    }
        }

        /* combine: row n of rank d carries y = x * (d + 1); out[t] = sum over visited d */
        for (int r = 0; r < N; ++r)
            for (int h = 0; h < H_; ++h) {
                float v = fp8 ? (float)(r % 13)
                              : h_bf16_to_f(((uint16_t *)h_rx[rank])[(size_t)r * H_ + h]);
                h_y[rank][(size_t)r * H_ + h] =
                    h_f_to_bf16(v * (float)(rank + 1) + (float)h / 64.f);
            }
        if (h_barrier(&S.w)) goto fail;
        CK(cudaMemcpy(d_y, h_y[rank], (size_t)(N ? N : 1) * H_ * 2, cudaMemcpyHostToDevice));
        CK(cudaMemsetAsync(d_out, 0xff, TM * H_ * 2, s));
        EPK(ep_ht_combine(g, hh, d_y, d_out, s));
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(h_out[rank], d_out, (size_t)T * H_ * 2, cudaMemcpyDeviceToHost));
        {
            int rowat[NR] = {0}; /* first row of this rank's block on each rank */
            for (int d = 0; d < NR; ++d)
                for (int src = 0; src < rank; ++src)
                    for (int t = 0; t < S.T[src]; ++t)
                        rowat[d] += on_rank(src, t, d);
            int cnt[NR] = {0};
            for (int t = 0; t < T; ++t)
                for (int h = 0; h < H_; ++h) {
                    float ref = 0.f, mag = 0.f;
                    for (int d = 0; d < NR; ++d) {
                        if (!on_rank(rank, t, d)) continue;
                        float v = h_bf16_to_f(h_y[d][(size_t)(rowat[d] + cnt[d]) * H_ + h]);
                        ref += v;
                        mag += fabsf(v);
                    }
                    float got = h_bf16_to_f(h_out[rank][(size_t)t * H_ + h]);
                    EXPECT(fabsf(got - ref) <= 4e-3f * mag + 1e-6f,
                           "combine out[%d][%d] = %g, expected %g", t, h, got, ref);
                    if (h == H_ - 1)
                        for (int d = 0; d < NR; ++d)
                            cnt[d] += on_rank(rank, t, d);
                }
        }
        ep_ht_handle_destroy(hh);
        if (h_barrier(&S.w)) goto fail;
    }

    /* routing: both kinds against route_ref */
    {
        step = S.steps;
        const int T = 257, E = 64;
        static float logits_r[NR][257 * 64], bias_r[NR][64], w_r[NR][257 * 8], rw_r[NR][257 * 8];
        static int32_t ti_r[NR][257 * 8], rti_r[NR][257 * 8];
        float *logits = logits_r[rank], *bias = bias_r[rank], *w = w_r[rank], *rw = rw_r[rank];
        int32_t *ti = ti_r[rank], *rti = rti_r[rank];
        for (int i = 0; i < T * E; ++i)
            logits[i] = (float)(rand_r(&seed) % 100000) / 25000.f - 2.f;
        for (int e = 0; e < E; ++e)
            bias[e] = (float)(rand_r(&seed) % 1000) / 10000.f;
        float *d_bias = NULL;
        CK(cudaMalloc((void **)&d_logits, sizeof logits_r[0]));
        CK(cudaMalloc((void **)&d_bias, sizeof bias_r[0]));
        CK(cudaMalloc((void **)&d_ti, sizeof ti_r[0]));
        CK(cudaMalloc((void **)&d_tw, sizeof w_r[0]));
        CK(cudaMemcpy(d_logits, logits, sizeof logits_r[0], cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_bias, bias, sizeof bias_r[0], cudaMemcpyHostToDevice));
        static const ep_route_kind_t kinds[3] = {EP_ROUTE_SOFTMAX_TOPK, EP_ROUTE_SIGMOID_GROUP,
                                                 EP_ROUTE_SOFTMAX_GROUP};
        for (int kind = 0; kind < 3; ++kind) {
            ep_route_params_t p = {.kind = kinds[kind],
                                   .num_experts = E,
                                   .topk = 8,
                                   .renormalize = 1,
                                   .routed_scaling_factor = kind ? 2.5f : 1.f,
                                   .num_groups = 8,
                                   .topk_groups = 4,
                                   .bias = d_bias};
            EPK(ep_route(g, &p, d_logits, T, d_ti, d_tw, s));
            CK(cudaStreamSynchronize(s));
            CK(cudaMemcpy(ti, d_ti, sizeof ti_r[0], cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(w, d_tw, sizeof w_r[0], cudaMemcpyDeviceToHost));
            p.bias = bias;
            EXPECT(ep_route_ref(&p, logits, T, rti, rw) == 0, "route_ref failed");
            for (int i = 0; i < T * 8; ++i) {
                EXPECT(ti[i] == rti[i], "route kind %d: topk_idx[%d][%d] = %d, reference %d", kind,
                       i / 8, i % 8, ti[i], rti[i]);
                EXPECT(fabsf(w[i] - rw[i]) <= 1e-5f * fmaxf(1.f, fabsf(rw[i])),
                       "route kind %d: weight[%d][%d] = %g, reference %g", kind, i / 8, i % 8, w[i],
                       rw[i]);
            }
        }
        cudaFree(d_bias);
    }
    printf("rank %d: %d HT steps and routing ok\n", rank, S.steps);
    goto done;
fail:
    S.fail[rank] = 1;
    fprintf(stderr, "rank %d: FAILED\n", rank);
    h_world_break(&S.w); /* peers stop waiting for this rank */
done:
    if (s) cudaStreamSynchronize(s);
    h_barrier(&S.w);
    ep_group_destroy(g);
    cudaFree(d_x);
    cudaFree(d_xs);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_rx);
    cudaFree(d_rs);
    cudaFree(d_ri);
    cudaFree(d_rw);
    cudaFree(d_npe);
    cudaFree(d_pr);
    cudaFree(d_pe);
    cudaFree(d_in);
    cudaFree(d_y);
    cudaFree(d_out);
    cudaFree(d_logits);
    cudaFree(d_ti);
    cudaFree(d_tw);
    if (s) cudaStreamDestroy(s);
    return NULL;
}

int main(int argc, char **argv)
{
    S.steps = argc > 2 && !strcmp(argv[1], "--steps") ? atoi(argv[2]) : 20;
    S.ndev = h_device_count();
    if (S.ndev == 0) {
        printf("SKIP: no CUDA device present\n");
        return H_SKIP;
    }
    if (h_world_init(&S.w, NR) != 0) return 1;
    pthread_t th[NR];
    for (int r = 0; r < NR; ++r)
        pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < NR; ++r)
        pthread_join(th[r], NULL);
    h_world_fini(&S.w);
    int failed = S.fail[0] | S.fail[1];
    printf("%s\n", failed ? "FAILED" : "PASSED");
    return failed;
}
