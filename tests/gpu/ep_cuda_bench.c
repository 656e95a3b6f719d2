/* ep-cuda-bench: LL and HT timings of the cuda backend with DeepEP's test settings and byte
 * accounting (see docs/cuda-notes.md). One host thread per rank, one GPU per rank (or every
 * rank on GPU 0 when there is only one: correctness only, not for figures).
 *   LL: 128 tokens/rank, H 7168, top-8 of 288 experts, FP8 dispatch, BF16 combine.
 *       Full ops are timed as CUDA-graph replays of 20 back-to-back ops (median over replays,
 *       per op); send halves with events around the send launch (median over iterations).
 *   HT: 4096 tokens/rank, H 7168, top-8 of 256 experts, BF16 and FP8 dispatch, BF16 combine,
 *       events around each call (the count exchange and its host sync included). */
#include "cuda_harness.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXR 8
#define GRAPH_OPS 20
#define BUSY_BYTES (256u << 20)
#define BUSY() CK(cudaMemsetAsync(d_busy, it & 0xff, BUSY_BYTES, s))

static struct {
    h_world_t w;
    int nranks, ndev, iters, num_sms, ht, ll;
    double res[MAXR][16];
} B;

enum { R_LL_D, R_LL_C, R_LL_DC, R_LL_DS, R_LL_CS, R_HT_D, R_HT_DF8, R_HT_C, R_HT_N, R_NRES };
static const char *res_name[R_NRES] = {
    "LL dispatch (us)",           "LL combine (us)",           "LL dispatch+combine (us)",
    "LL dispatch send half (us)", "LL combine send half (us)", "HT dispatch bf16 (us)",
    "HT dispatch fp8 (us)",       "HT combine (us)",           "HT rows received"};

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmpd);
    return n ? v[n / 2] : 0;
}

#define CK(call) H_CUDA_CHECK(rank, goto fail, call)
#define EPK(call) H_EP_CHECK(rank, g, goto fail, call)

static void rand_topk(int32_t *idx, float *w, int T, int k, int E, unsigned *seed)
{
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
            int e, dup;
            do {
                e = (int)(rand_r(seed) % (unsigned)E);
                dup = 0;
                for (int q = 0; q < j; ++q)
                    dup |= idx[t * k + q] == e;
            } while (dup);
            idx[t * k + j] = e;
            w[t * k + j] = 0.1f + (float)(rand_r(seed) % 100) / 100.f;
        }
}

/* DeepSeek-V3's shapes (hidden 7168, top-8) on the cuda backend with the bench's SM count. */
static void bench_config(ep_config_t *cfg, int experts, int ll_max, int ht_max, int dev)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->backend = EP_BACKEND_CUDA;
    cfg->num_experts = experts;
    cfg->hidden = 7168;
    cfg->num_topk = 8;
    cfg->ll_max_tokens = ll_max;
    cfg->ht_max_tokens = ht_max;
    cfg->num_sms = B.num_sms;
    cfg->timeout_ms = 20000;
    cfg->device = dev;
}

static void *rank_main(void *arg)
{
    const int rank = (int)(intptr_t)arg;
    ep_group_t *g = NULL;
    cudaStream_t s = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    void *d_x = NULL, *d_y = NULL, *d_out = NULL, *d_rx = NULL, *d_rs = NULL, *d_ri = NULL,
         *d_rw = NULL, *d_npe = NULL, *d_sc = NULL, *d_busy = NULL;
    int32_t *d_idx = NULL, *h_idx = NULL;
    float *d_w = NULL, *h_w = NULL;
    uint16_t *h_x = NULL;
    double *t = calloc((size_t)B.iters + 1, sizeof *t);
    unsigned seed = 77u + (unsigned)rank;
    const int dev = rank % B.ndev;

    CK(cudaSetDevice(dev));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    /* A memset of BUSY_BYTES (~0.1 ms) queued before the start event keeps the GPU busy while
     * the host submits the timed op, so single-call timings exclude host launch latency. */
    CK(cudaMalloc(&d_busy, BUSY_BYTES));

    if (B.ll) {
        ep_config_t cfg;
        bench_config(&cfg, 288, 128, 0, dev);
        const int T = 128, H = 7168, k = 8, L = 288 / B.nranks, S = 128 * B.nranks;
        EPK(h_group_create(&cfg, &B.w, rank, &g));
        h_x = malloc((size_t)T * H * 2);
        h_idx = malloc((size_t)T * k * 4);
        h_w = malloc((size_t)T * k * 4);
        for (size_t i = 0; i < (size_t)T * H; ++i)
            h_x[i] = h_f_to_bf16((float)(rand_r(&seed) % 2001) / 1000.f - 1.f);
        rand_topk(h_idx, h_w, T, k, 288, &seed);
        CK(cudaMalloc(&d_x, (size_t)T * H * 2));
        CK(cudaMalloc((void **)&d_idx, (size_t)T * k * 4));
        CK(cudaMalloc((void **)&d_w, (size_t)T * k * 4));
        CK(cudaMalloc(&d_y, (size_t)L * S * H * 2));
        CK(cudaMalloc(&d_out, (size_t)T * H * 2));
        CK(cudaMemset(d_y, 0x3c, (size_t)L * S * H * 2));
        CK(cudaMemcpy(d_x, h_x, (size_t)T * H * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_idx, h_idx, (size_t)T * k * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_w, h_w, (size_t)T * k * 4, cudaMemcpyHostToDevice));
        ep_ll_dispatch_args_t a = {.x = d_x,
                                   .num_tokens = T,
                                   .topk_idx = d_idx,
                                   .topk_weights = d_w,
                                   .use_fp8 = 1,
                                   .stream = s};
        ep_ll_combine_args_t ca = {
            .expert_y = d_y, .topk_idx = d_idx, .topk_weights = d_w, .out = d_out, .stream = s};
        ep_ll_dispatch_out_t o;
        ep_ll_handle_t *hd;
        ep_hook_t *hk;
        cudaGraphExec_t gd = NULL, gdc = NULL;
        for (int pass = 0; pass < 2; ++pass) {
            cudaGraph_t gr;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            for (int i = 0; i < GRAPH_OPS; ++i) {
                EPK(h_ll_dispatch(g, &a, &o, &hd, &hk));
                if (pass == 1) {
                    ca.handle = hd;
                    EPK(h_ll_combine(g, &ca, &hk));
                }
            }
            CK(cudaStreamEndCapture(s, &gr));
            CK(cudaGraphInstantiate(pass ? &gdc : &gd, gr, 0));
            cudaGraphDestroy(gr);
        }
        for (int pass = 0; pass < 2; ++pass) {
            cudaGraphExec_t ge = pass ? gdc : gd;
            for (int it = -3; it < B.iters; ++it) {
                h_barrier(&B.w);
                CK(cudaEventRecord(e0, s));
                CK(cudaGraphLaunch(ge, s));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                if (it >= 0) t[it] = ms * 1000.0 / GRAPH_OPS;
            }
            B.res[rank][pass ? R_LL_DC : R_LL_D] = median(t, B.iters);
        }
        B.res[rank][R_LL_C] = B.res[rank][R_LL_DC] - B.res[rank][R_LL_D];
        /* send halves */
        a.use_hook = 1;
        ca.use_hook = 1;
        double tc[1024];
        for (int it = -3; it < B.iters && it < 1024; ++it) {
            float ms;
            h_barrier(&B.w);
            BUSY();
            CK(cudaEventRecord(e0, s));
            EPK(h_ll_dispatch(g, &a, &o, &hd, &hk));
            CK(cudaEventRecord(e1, s));
            EPK(h_hook_run(g, hk));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (it >= 0) t[it] = ms * 1000.0;
            CK(cudaStreamSynchronize(s));
            h_barrier(&B.w);
            ca.handle = hd;
            BUSY();
            CK(cudaEventRecord(e0, s));
            EPK(h_ll_combine(g, &ca, &hk));
            CK(cudaEventRecord(e1, s));
            EPK(h_hook_run(g, hk));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (it >= 0) tc[it] = ms * 1000.0;
            CK(cudaStreamSynchronize(s));
        }
        B.res[rank][R_LL_DS] = median(t, B.iters);
        B.res[rank][R_LL_CS] = median(tc, B.iters);
        cudaGraphExecDestroy(gd);
        cudaGraphExecDestroy(gdc);
        CK(cudaStreamSynchronize(s));
        h_barrier(&B.w);
        h_group_destroy(g);
        g = NULL;
        cudaFree(d_x);
        cudaFree(d_idx);
        cudaFree(d_w);
        cudaFree(d_y);
        cudaFree(d_out);
        d_x = d_y = d_out = NULL;
        d_idx = NULL;
        d_w = NULL;
        free(h_x);
        free(h_idx);
        free(h_w);
        h_x = NULL;
        h_idx = NULL;
        h_w = NULL;
    }

    if (B.ht) {
        ep_config_t cfg;
        bench_config(&cfg, 256, 0, 4096, dev);
        const int T = 4096, H = 7168, k = 8, L = 256 / B.nranks, cap = T * B.nranks;
        EPK(h_group_create(&cfg, &B.w, rank, &g));
        h_x = malloc((size_t)T * H * 2);
        h_idx = malloc((size_t)T * k * 4);
        h_w = malloc((size_t)T * k * 4);
        for (size_t i = 0; i < (size_t)T * H; ++i)
            h_x[i] = h_f_to_bf16((float)(rand_r(&seed) % 2001) / 1000.f - 1.f);
        rand_topk(h_idx, h_w, T, k, 256, &seed);
        CK(cudaMalloc(&d_x, (size_t)T * H * 2));
        CK(cudaMalloc(&d_sc, (size_t)T * (H / 128) * 4));
        CK(cudaMemset(d_sc, 0, (size_t)T * (H / 128) * 4));
        CK(cudaMalloc((void **)&d_idx, (size_t)T * k * 4));
        CK(cudaMalloc((void **)&d_w, (size_t)T * k * 4));
        CK(cudaMalloc(&d_rx, (size_t)cap * H * 2));
        CK(cudaMalloc(&d_rs, (size_t)cap * (H / 128) * 4));
        CK(cudaMalloc(&d_ri, (size_t)cap * k * 4));
        CK(cudaMalloc(&d_rw, (size_t)cap * k * 4));
        CK(cudaMalloc(&d_npe, (size_t)L * 4));
        CK(cudaMalloc(&d_out, (size_t)T * H * 2));
        CK(cudaMemcpy(d_x, h_x, (size_t)T * H * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_idx, h_idx, (size_t)T * k * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_w, h_w, (size_t)T * k * 4, cudaMemcpyHostToDevice));
        ep_ht_dispatch_out_t o = {.capacity = cap,
                                  .recv_x = d_rx,
                                  .recv_scales = d_rs,
                                  .recv_topk_idx = d_ri,
                                  .recv_topk_weights = d_rw,
                                  .num_recv_per_expert = d_npe};
        for (int fp8 = 0; fp8 < 2; ++fp8) {
            ep_ht_dispatch_args_t a = {.x = d_x,
                                       .x_scales = d_sc,
                                       .use_fp8 = fp8,
                                       .num_tokens = T,
                                       .topk_idx = d_idx,
                                       .topk_weights = d_w,
                                       .stream = s};
            double tcomb[1024];
            for (int it = -3; it < B.iters && it < 1024; ++it) {
                ep_ht_handle_t *hh = NULL;
                float ms;
                h_barrier(&B.w);
                BUSY();
                CK(cudaEventRecord(e0, s));
                EPK(ep_ht_dispatch(g, &a, &o, &hh));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms, e0, e1));
                if (it >= 0) t[it] = ms * 1000.0;
                if (!fp8) {
                    h_barrier(&B.w);
                    BUSY();
                    CK(cudaEventRecord(e0, s));
                    EPK(ep_ht_combine(g, hh, d_rx, d_out, s));
                    CK(cudaEventRecord(e1, s));
                    CK(cudaEventSynchronize(e1));
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    if (it >= 0) tcomb[it] = ms * 1000.0;
                }
                CK(cudaStreamSynchronize(s));
                ep_ht_handle_destroy(hh);
            }
            B.res[rank][fp8 ? R_HT_DF8 : R_HT_D] = median(t, B.iters);
            if (!fp8) B.res[rank][R_HT_C] = median(tcomb, B.iters);
            B.res[rank][R_HT_N] = o.num_recv_tokens;
        }
    }
    if (g) {
        cudaStreamSynchronize(s);
        h_barrier(&B.w);
    }
fail:
    h_group_destroy(g);
    cudaFree(d_x);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_y);
    cudaFree(d_out);
    cudaFree(d_rx);
    cudaFree(d_rs);
    cudaFree(d_ri);
    cudaFree(d_rw);
    cudaFree(d_npe);
    cudaFree(d_sc);
    cudaFree(d_busy);
    free(h_x);
    free(h_idx);
    free(h_w);
    free(t);
    return NULL;
}

int main(int argc, char **argv)
{
    B.iters = 50;
    B.num_sms = 24;
    B.ll = B.ht = 1;
    B.nranks = 0;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            B.iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--num-sms") && i + 1 < argc)
            B.num_sms = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ranks") && i + 1 < argc)
            B.nranks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ll-only"))
            B.ht = 0;
        else if (!strcmp(argv[i], "--ht-only"))
            B.ll = 0;
        else {
            fprintf(stderr,
                    "usage: %s [--iters N] [--num-sms N] [--ranks R] [--ll-only|--ht-only]\n",
                    argv[0]);
            return 2;
        }
    }
    if (B.iters < 1 || B.iters > 1000) B.iters = 50;
    B.ndev = h_device_count();
    if (B.ndev == 0) {
        printf("SKIP: no CUDA device present\n");
        return H_SKIP;
    }
    if (B.nranks <= 0) B.nranks = B.ndev >= 2 ? (B.ndev > MAXR ? MAXR : B.ndev) : 2;
    if (h_world_init(&B.w, B.nranks) != 0) return 1;
    pthread_t th[MAXR];
    for (int r = 0; r < B.nranks; ++r)
        pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < B.nranks; ++r)
        pthread_join(th[r], NULL);
    h_world_fini(&B.w);

    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("\nep-cuda-bench: %d ranks on %d x %s, num_sms %d, %d iterations (median)\n", B.nranks,
           B.ndev < B.nranks ? 1 : B.nranks, prop.name, B.num_sms, B.iters);
    for (int i = 0; i < R_NRES; ++i) {
        if ((i <= R_LL_CS && !B.ll) || (i >= R_HT_D && !B.ht)) continue;
        printf("  %-28s", res_name[i]);
        for (int r = 0; r < B.nranks; ++r)
            printf(" %10.1f", B.res[r][i]);
        printf("\n");
    }
    if (B.ht) {
        const double H = 7168;
        for (int r = 0; r < B.nranks; ++r) {
            double n = B.res[r][R_HT_N];
            printf("  rank %d HT GB/s (DeepEP accounting): dispatch bf16 %.0f, fp8 %.0f, combine "
                   "%.0f\n",
                   r, n * H * 2 / (B.res[r][R_HT_D] * 1e3),
                   n * H * (1 + 4.0 / 128) / (B.res[r][R_HT_DF8] * 1e3),
                   n * H * 2 / (B.res[r][R_HT_C] * 1e3));
        }
    }
    return 0;
}
