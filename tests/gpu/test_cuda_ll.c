/* GPU test of the cuda backend's LL dispatch/combine: R ranks as threads (one GPU each, or all
 * on one GPU), random routing with some ranks at zero tokens, checked every step against a
 * host reference computed here from every rank's inputs: fp8 rows and scales bit-exact, counts,
 * source info and ranges exact, combine within a bf16 tolerance. Modes: --hook (send and
 * receive halves), --graph (the step captured once into a CUDA graph and replayed with new
 * routing), --timeout (one rank never dispatches: the other must get EP_ERR_TIMEOUT naming it).
 * --dump FILE writes rank 0's first-step fp8 rows for tests/gpu/check_torch.py.
 * Exit 77 (skipped) without a GPU. */
#include "cuda_harness.h"
#include "fp8_quant_ref.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NR 2

static struct {
    h_world_t w;
    ep_config_t cfg;
    int steps, hook, graph, timeout_mode, ndev;
    const char *dump;
    int T[NR];
    uint16_t *x[NR];
    int32_t *idx[NR];
    float *wt[NR];
    int fail[NR];
} S;

#define CK(call) H_CUDA_CHECK(rank, goto fail, call)
#define EPK(call) H_EP_CHECK(rank, g, goto fail, call)

static uint32_t hash3(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t h =
        a * 0x9e3779b1u ^ (b + 0x7f4a7c15u) * 0x85ebca6bu ^ (c + 0x165667b1u) * 0xc2b2ae35u;
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    return h;
}

/* expert output value of global expert ge for token (s, t), channel h */
static uint16_t yval(int ge, int s, int t, int h)
{
    float v =
        ((float)(hash3((uint32_t)ge * 131u + (uint32_t)s, (uint32_t)t, (uint32_t)h) & 0xffff) /
         32768.f) -
        1.f;
    return h_f_to_bf16(v * 2.f);
}

static void gen_inputs(int rank, int step, unsigned *seed)
{
    const ep_config_t *c = &S.cfg;
    const int H = c->hidden, k = c->num_topk, E = c->num_experts, Tm = c->ll_max_tokens;
    int T;
    if (S.graph)
        T = rank == NR - 1 ? 0 : Tm; /* fixed per graph: one rank always at zero */
    else
        T = (step % 4 == rank) ? 0 : (int)(rand_r(seed) % (unsigned)(Tm + 1));
    S.T[rank] = T;
    for (int t = 0; t < T; ++t) {
        for (int j = 0; j < k; ++j) {
            int e;
            for (;;) {
                e = (int)(rand_r(seed) % (unsigned)E);
                int dup = 0;
                for (int q = 0; q < j; ++q)
                    dup |= S.idx[rank][t * k + q] == e;
                if (!dup) break;
            }
            if (rand_r(seed) % 10 == 0) e = -1;
            S.idx[rank][t * k + j] = e;
            S.wt[rank][t * k + j] = (float)(rand_r(seed) % 1000) / 1000.f;
        }
        for (int g0 = 0; g0 < H; g0 += 128) {
            float mag = ldexpf(1.f, (int)(rand_r(seed) % 16) - 8);
            for (int h = g0; h < g0 + 128; ++h) {
                float u = (float)(rand_r(seed) % 20001) / 10000.f - 1.f;
                S.x[rank][(size_t)t * H + h] = h_f_to_bf16(u * mag);
            }
        }
    }
}

static int selects(int s, int t, int ge)
{
    for (int j = 0; j < S.cfg.num_topk; ++j)
        if (S.idx[s][t * S.cfg.num_topk + j] == ge) return 1;
    return 0;
}

/* The fp8 cast of the reference twin (kernels/fp8_quant_ref.c): the bytes must match. */
static void quant_row(const uint16_t *x, int H, int round_scale, uint8_t *q, float *sc)
{
    ep_fp8_quant_row_ref(x, H, round_scale, q, sc);
}

static void *rank_main(void *arg)
{
    const int rank = (int)(intptr_t)arg;
    const ep_config_t *c = &S.cfg;
    const int H = c->hidden, k = c->num_topk, Tm = c->ll_max_tokens, L = c->num_experts / NR;
    const int Sl = Tm * NR;
    ep_group_t *g = NULL;
    cudaStream_t stream = NULL;
    cudaGraphExec_t gexec = NULL;
    uint16_t *d_x = NULL, *d_y = NULL, *d_out = NULL;
    int32_t *d_idx = NULL;
    float *d_w = NULL;
    uint16_t *h_y = NULL, *h_out = NULL;
    uint8_t *h_rx = NULL;
    float *h_sc = NULL;
    int32_t *h_cnt = NULL, *h_src = NULL, *h_rng = NULL;
    uint8_t *q = NULL;
    float *qs = NULL;
    unsigned seed = 1234u + (unsigned)rank * 7u;
    int ok = 0;

    CK(cudaSetDevice(rank % S.ndev));
    {
        ep_config_t cfg = *c;
        cfg.device = rank % S.ndev;
        EPK(h_group_create(&cfg, &S.w, rank, &g));
    }
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CK(cudaMalloc((void **)&d_x, (size_t)Tm * H * 2 + 16));
    CK(cudaMalloc((void **)&d_idx, (size_t)Tm * k * 4 + 16));
    CK(cudaMalloc((void **)&d_w, (size_t)Tm * k * 4 + 16));
    CK(cudaMalloc((void **)&d_y, (size_t)L * Sl * H * 2));
    CK(cudaMalloc((void **)&d_out, (size_t)Tm * H * 2 + 16));
    h_y = malloc((size_t)L * Sl * H * 2);
    h_out = malloc((size_t)Tm * H * 2 + 16);
    h_rx = malloc((size_t)L * Sl * H);
    h_sc = malloc((size_t)L * Sl * (H / 128) * 4);
    h_cnt = malloc((size_t)L * 4);
    h_src = malloc((size_t)L * Sl * 4);
    h_rng = malloc((size_t)L * NR * 8);
    q = malloc((size_t)H);
    qs = malloc((size_t)(H / 128) * 4);
    if (!h_y || !h_out || !h_rx || !h_sc || !h_cnt || !h_src || !h_rng || !q || !qs) goto fail;

    if (S.timeout_mode) {
        /* rank 1 never dispatches; rank 0's dispatch must time out naming it, without a hang */
        if (rank == 0) {
            S.T[0] = Tm;
            gen_inputs(0, 1, &seed);
            CK(cudaMemcpy(d_x, S.x[0], (size_t)Tm * H * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(d_idx, S.idx[0], (size_t)Tm * k * 4, cudaMemcpyHostToDevice));
            ep_ll_dispatch_args_t a = {.x = d_x,
                                       .num_tokens = S.T[0],
                                       .topk_idx = d_idx,
                                       .topk_weights = d_w,
                                       .use_fp8 = 1,
                                       .stream = stream};
            ep_ll_dispatch_out_t o;
            ep_ll_handle_t *hd;
            ep_hook_t *hk;
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            EPK(h_ll_dispatch(g, &a, &o, &hd, &hk));
            CK(cudaStreamSynchronize(stream));
            ep_ll_combine_args_t ca = {.handle = hd,
                                       .expert_y = d_y,
                                       .topk_idx = d_idx,
                                       .topk_weights = d_w,
                                       .out = d_out,
                                       .stream = stream};
            ep_status_t st = h_ll_combine(g, &ca, &hk);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
            printf("timeout test: status %d, failed peer %d, %.0f ms: %s\n", st,
                   ep_group_failed_peer(g), ms, ep_group_last_error(g));
            if (st != EP_ERR_TIMEOUT || ep_group_failed_peer(g) != 1 || ms > 5000) {
                fprintf(stderr, "timeout test FAILED\n");
                goto fail_nobar;
            }
        }
        if (h_barrier(&S.w)) goto fail;
        ok = 1;
        goto fail_nobar;
    }

    for (int step = 0; step < S.steps; ++step) {
        const int round_scale = step % 3 == 2;
        gen_inputs(rank, step, &seed);
        if (h_barrier(&S.w)) goto fail;
        const int T = S.T[rank];
        /* expected rows of every local expert, and the expert outputs laid out the same way */
        for (size_t i = 0; i < (size_t)L * Sl * H; ++i)
            h_y[i] = 0x7fc0; /* NaN: a row the kernel must never read */
        int exp_cnt[64];
        for (int e = 0; e < L; ++e) {
            int row = 0, ge = rank * L + e;
            for (int s = 0; s < NR; ++s)
                for (int t = 0; t < S.T[s]; ++t)
                    if (selects(s, t, ge)) {
                        for (int h = 0; h < H; ++h)
                            h_y[((size_t)e * Sl + row) * H + h] = yval(ge, s, t, h);
                        ++row;
                    }
            exp_cnt[e] = row;
        }
        if (T > 0) {
            CK(cudaMemcpyAsync(d_x, S.x[rank], (size_t)T * H * 2, cudaMemcpyHostToDevice, stream));
            CK(cudaMemcpyAsync(d_idx, S.idx[rank], (size_t)T * k * 4, cudaMemcpyHostToDevice,
                               stream));
            CK(cudaMemcpyAsync(d_w, S.wt[rank], (size_t)T * k * 4, cudaMemcpyHostToDevice, stream));
        }
        CK(cudaMemcpyAsync(d_y, h_y, (size_t)L * Sl * H * 2, cudaMemcpyHostToDevice, stream));
        CK(cudaMemsetAsync(d_out, 0xff, (size_t)Tm * H * 2, stream));
        CK(cudaStreamSynchronize(stream));

        ep_ll_dispatch_args_t a = {.x = d_x,
                                   .num_tokens = T,
                                   .topk_idx = d_idx,
                                   .topk_weights = (step & 1) ? d_w : NULL,
                                   .use_fp8 = 1,
                                   .round_scale = round_scale,
                                   .use_hook = S.hook,
                                   .stream = stream};
        static ep_ll_dispatch_out_t o_r[NR];
        ep_ll_dispatch_out_t *o = &o_r[rank];
        ep_ll_handle_t *hd;
        ep_hook_t *hk = NULL;
        ep_ll_combine_args_t ca = {.expert_y = d_y,
                                   .topk_idx = d_idx,
                                   .topk_weights = d_w,
                                   .out = d_out,
                                   .use_hook = S.hook,
                                   .stream = stream};
        if (S.graph) {
            a.topk_weights = d_w;
            a.round_scale = 0;
            if (!gexec) {
                cudaGraph_t graph;
                CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
                EPK(h_ll_dispatch(g, &a, o, &hd, &hk));
                if (S.hook) EPK(h_hook_run(g, hk));
                ca.handle = hd;
                EPK(h_ll_combine(g, &ca, &hk));
                if (S.hook) EPK(h_hook_run(g, hk));
                CK(cudaStreamEndCapture(stream, &graph));
                CK(cudaGraphInstantiate(&gexec, graph, 0));
                cudaGraphDestroy(graph);
            }
            CK(cudaGraphLaunch(gexec, stream));
        } else {
            EPK(h_ll_dispatch(g, &a, o, &hd, &hk));
            if (S.hook) EPK(h_hook_run(g, hk));
            ca.handle = hd;
            EPK(h_ll_combine(g, &ca, &hk));
            if (S.hook) EPK(h_hook_run(g, hk));
        }
        CK(cudaStreamSynchronize(stream));
        const int rs = S.graph ? 0 : round_scale;

        CK(cudaMemcpy(h_cnt, o->recv_count, (size_t)L * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_src, o->recv_src_info, (size_t)L * Sl * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_rng, o->recv_range, (size_t)L * NR * 8, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_rx, o->recv_x, (size_t)L * Sl * H, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_sc, o->recv_scales, (size_t)L * Sl * (H / 128) * 4,
                      cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_out, d_out, (size_t)Tm * H * 2, cudaMemcpyDeviceToHost));
        int bad = 0;
        for (int e = 0; e < L && bad < 5; ++e) {
            const int ge = rank * L + e;
            if (h_cnt[e] != exp_cnt[e]) {
                fprintf(stderr, "rank %d step %d: expert %d count %d, expected %d\n", rank, step, e,
                        h_cnt[e], exp_cnt[e]);
                ++bad;
                continue;
            }
            int row = 0;
            for (int s = 0; s < NR; ++s) {
                const int first = row;
                for (int t = 0; t < S.T[s]; ++t) {
                    if (!selects(s, t, ge)) continue;
                    const size_t r = (size_t)e * Sl + row;
                    if (h_src[r] != t) {
                        fprintf(stderr, "rank %d step %d: expert %d row %d src %d, expected %d\n",
                                rank, step, e, row, h_src[r], t);
                        ++bad;
                    }
                    quant_row(S.x[s] + (size_t)t * H, H, rs, q, qs);
                    if (memcmp(q, h_rx + r * H, (size_t)H) != 0 ||
                        memcmp(qs, h_sc + r * (H / 128), (size_t)(H / 128) * 4) != 0) {
                        int h = 0;
                        while (h < H && q[h] == h_rx[r * H + h])
                            ++h;
                        fprintf(stderr,
                                "rank %d step %d: expert %d row %d (src %d tok %d) fp8 differs at "
                                "channel %d: %02x vs %02x; scale %g vs %g\n",
                                rank, step, e, row, s, t, h, h < H ? h_rx[r * H + h] : 0,
                                h < H ? q[h] : 0, h_sc[r * (H / 128)], qs[0]);
                        ++bad;
                    }
                    if (S.dump && rank == 0 && step == 0) {
                        FILE *f = fopen(S.dump, "ab");
                        if (f) {
                            fwrite(S.x[s] + (size_t)t * H, 2, (size_t)H, f);
                            fwrite(h_rx + r * H, 1, (size_t)H, f);
                            fwrite(h_sc + r * (H / 128), 4, (size_t)H / 128, f);
                            fclose(f);
                        }
                    }
                    ++row;
                }
                if (h_rng[(e * NR + s) * 2] != first ||
                    h_rng[(e * NR + s) * 2 + 1] != row - first) {
                    fprintf(
                        stderr,
                        "rank %d step %d: expert %d range from %d = (%d,%d), expected (%d,%d)\n",
                        rank, step, e, s, h_rng[(e * NR + s) * 2], h_rng[(e * NR + s) * 2 + 1],
                        first, row - first);
                    ++bad;
                }
            }
        }
        double worst = 0;
        for (int t = 0; t < T && bad < 5; ++t) {
            for (int h = 0; h < H; ++h) {
                double ref = 0, mag = 0;
                for (int j = 0; j < k; ++j) {
                    int ge = S.idx[rank][t * k + j];
                    if (ge < 0) continue;
                    double v = (double)S.wt[rank][t * k + j] * h_bf16_to_f(yval(ge, rank, t, h));
                    ref += v;
                    mag += fabs(v);
                }
                double got = h_bf16_to_f(h_out[(size_t)t * H + h]);
                double err = fabs(got - ref), tol = 8e-3 * mag + 1e-6;
                if (!(err <= tol)) {
                    fprintf(stderr, "rank %d step %d: out[%d][%d] = %g, reference %g (tol %g)\n",
                            rank, step, t, h, got, ref, tol);
                    ++bad;
                    break;
                }
                if (mag > 0 && err / mag > worst) worst = err / mag;
            }
        }
        if (bad) {
            S.fail[rank] = 1;
        }
        if (h_barrier(&S.w)) goto fail;
        if (S.fail[0] || S.fail[1]) goto fail_nobar;
        if (step == S.steps - 1)
            printf(
                "rank %d: %d steps ok (hook %d, graph %d), worst combine error %.2e of sum|w*y|\n",
                rank, S.steps, S.hook, S.graph, worst);
    }
    ok = 1;
    goto fail_nobar;
fail:
    S.fail[rank] = 1;
    fprintf(stderr, "rank %d: aborting\n", rank);
    h_world_break(&S.w); /* peers stop waiting for this rank */
fail_nobar:
    if (gexec) cudaGraphExecDestroy(gexec);
    if (stream) cudaStreamSynchronize(stream);
    h_group_destroy(g);
    cudaFree(d_x);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_y);
    cudaFree(d_out);
    if (stream) cudaStreamDestroy(stream);
    free(h_y);
    free(h_out);
    free(h_rx);
    free(h_sc);
    free(h_cnt);
    free(h_src);
    free(h_rng);
    free(q);
    free(qs);
    if (!ok) S.fail[rank] = 1;
    return NULL;
}

int main(int argc, char **argv)
{
    S.steps = 50;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--hook"))
            S.hook = 1;
        else if (!strcmp(argv[i], "--graph"))
            S.graph = 1;
        else if (!strcmp(argv[i], "--timeout"))
            S.timeout_mode = 1;
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            S.steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc)
            S.dump = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--hook] [--graph] [--timeout] [--steps N] [--dump FILE]\n",
                    argv[0]);
            return 2;
        }
    }
    S.ndev = h_device_count();
    if (S.ndev == 0) {
        printf("SKIP: no CUDA device present\n");
        return H_SKIP;
    }
    if (S.dump) remove(S.dump);
    memset(&S.cfg, 0, sizeof S.cfg);
    S.cfg.backend = EP_BACKEND_CUDA;
    S.cfg.num_experts = 16;
    S.cfg.hidden = 512;
    S.cfg.num_topk = 4;
    S.cfg.ll_max_tokens = 32;
    S.cfg.ht_max_tokens = 64;
    S.cfg.num_sms = 8;
    S.cfg.timeout_ms = S.timeout_mode ? 300 : 10000;
    if (h_world_init(&S.w, NR) != 0) return 1;
    for (int r = 0; r < NR; ++r) {
        S.x[r] = malloc((size_t)S.cfg.ll_max_tokens * S.cfg.hidden * 2);
        S.idx[r] = malloc((size_t)S.cfg.ll_max_tokens * S.cfg.num_topk * 4);
        S.wt[r] = malloc((size_t)S.cfg.ll_max_tokens * S.cfg.num_topk * 4);
    }
    pthread_t th[NR];
    for (int r = 0; r < NR; ++r)
        pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < NR; ++r)
        pthread_join(th[r], NULL);
    int failed = 0;
    for (int r = 0; r < NR; ++r) {
        failed |= S.fail[r];
        free(S.x[r]);
        free(S.idx[r]);
        free(S.wt[r]);
    }
    h_world_fini(&S.w);
    printf("%s\n", failed ? "FAILED" : "PASSED");
    return failed ? 1 : 0;
}
