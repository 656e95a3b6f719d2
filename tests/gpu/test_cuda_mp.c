/* GPU test of the cuda backend with ranks in SEPARATE processes: the parent forks one process
 * per rank before touching CUDA; they meet through the TCP bootstrap.
 *
 *   --transport nvlink (default): CUDA IPC handles instead of peer pointers;
 *   --transport tcp | rdma: the internode path, every process treated as its own node: kernels
 *     write put/signal commands into the command ring, the proxy thread runs them over the wire.
 *   --kill: the last rank exits without a word after step 5; rank 0's next LL op must fail
 *     naming it, within the timeout (and without a hang).
 *
 * Every process derives every rank's inputs from the same seeds, so each checks its own outputs
 * against a reference computed here: LL dispatch counts, source info and fp8 rows (bit-exact
 * with kernels/fp8_quant_ref.c), LL combine within two bf16 roundings. Steps alternate
 * fp8/bf16, with and without the receive hook, with and without dispatch weights. HT: over
 * nvlink it must refuse with EP_ERR_UNSUPPORTED (it needs the ranks in one process); over
 * tcp/rdma 12 steps of dispatch (bf16/fp8 input, expert alignment, weights or none, and once an
 * output one row too small on rank 0, which must fail with EP_ERR_INVALID while every rank stays
 * in step), cached dispatch and combine, all bit-exact against the reference. NR (ranks) is a
 * compile-time constant (default 2). Exit 77 (skipped) without a GPU. */
#include "cuda_harness.h"
#include "fp8_quant_ref.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef NR
#define NR 2
#endif
#define E_ (8 * NR)
#define H_ 256
#define K_ 4
#define TM 24
#define L_ (E_ / NR)
#define S_ (TM * NR)

static int g_steps = 40;
static ep_transport_kind_t g_transport = EP_TRANSPORT_AUTO;
static int g_kill;
#define KILL_STEP 5

static int T_of(int step, int r)
{
    return (step + r) % 5 == 0 ? 0 : 1 + (step * 7 + r * 3) % TM;
}

/* routing and data of rank r at a step: a function of (step, r) only */
static void inputs(int step, int r, int32_t *idx, float *w, uint16_t *x)
{
    unsigned seed = 1000u * (unsigned)step + (unsigned)r + 1u;
    for (int t = 0; t < TM; ++t) {
        for (int j = 0; j < K_; ++j) {
            int e, dup;
            do {
                e = (int)(rand_r(&seed) % E_);
                dup = 0;
                for (int q = 0; q < j; ++q)
                    dup |= idx[t * K_ + q] == e;
            } while (dup);
            idx[t * K_ + j] = rand_r(&seed) % 6 == 0 ? -1 : e;
            w[t * K_ + j] = (float)(rand_r(&seed) % 1000) / 999.f;
        }
        for (int h = 0; h < H_; ++h)
            x[t * H_ + h] = h_f_to_bf16((float)(rand_r(&seed) % 2001) / 500.f - 2.f);
    }
}

static uint16_t yval(int ge, int s, int t, int h)
{
    return h_f_to_bf16((float)((ge * 131 + s * 17 + t * 7 + h) % 61) / 16.f - 2.f);
}

static int sel(const int32_t *idx, int t, int ge)
{
    for (int j = 0; j < K_; ++j)
        if (idx[t * K_ + j] == ge) return 1;
    return 0;
}

/* Rows rank `me` must receive in an HT dispatch, in order: (source, token) with an expert on me. */
static int ht_expected(int step, int me, int32_t idx[NR][TM * K_], int *src, int *tok)
{
    int n = 0;
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < T_of(step, r); ++t) {
            int on = 0;
            for (int j = 0; j < K_; ++j)
                on |= idx[r][t * K_ + j] >= me * L_ && idx[r][t * K_ + j] < (me + 1) * L_;
            if (on) {
                src[n] = r;
                tok[n] = t;
                ++n;
            }
        }
    return n;
}

/* HT over the internode path: dispatch (bf16 or fp8 input, expert alignment on some steps, one
 * step where rank 0 passes too small an output), cached dispatch of new data along the same
 * routes, and combine, each checked against the reference built here; returns 0 when all hold. */
static int ht_steps(ep_group_t *g, int rank, cudaStream_t s, int nsteps)
{
    enum { CAP = TM * NR, NS = H_ / 128 };
    static int32_t idx[NR][TM * K_];
    static float w[NR][TM * K_];
    static uint16_t x[NR][TM * H_], x2[NR][TM * H_], y[CAP * H_], out[TM * H_];
    static uint8_t q[NR][TM * H_], rx[CAP * H_ * 2];
    static float qs[NR][TM * NS], rs[CAP * NS], rw[CAP * K_];
    static int32_t ri[CAP * K_], nrpe[L_];
    static int src[CAP], tok[CAP];
    void *d_x = NULL, *d_rx = NULL;
    float *d_xs = NULL, *d_rs = NULL, *d_w = NULL, *d_rw = NULL;
    int32_t *d_idx = NULL, *d_ri = NULL, *d_nrpe = NULL;
    uint16_t *d_y = NULL, *d_out = NULL;
    ep_ht_handle_t *hh = NULL;
    int rc = 1, step = 0;
#define HT_CK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "rank %d HT step %d: ", rank, step);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)
#define CU(call) HT_CK((call) == cudaSuccess, "%s failed", #call)
    CU(cudaMalloc(&d_x, TM * H_ * 2));
    CU(cudaMalloc((void **)&d_xs, sizeof qs[0]));
    CU(cudaMalloc((void **)&d_idx, sizeof idx[0]));
    CU(cudaMalloc((void **)&d_w, sizeof w[0]));
    CU(cudaMalloc(&d_rx, sizeof rx));
    CU(cudaMalloc((void **)&d_rs, sizeof rs));
    CU(cudaMalloc((void **)&d_ri, sizeof ri));
    CU(cudaMalloc((void **)&d_rw, sizeof rw));
    CU(cudaMalloc((void **)&d_nrpe, sizeof nrpe));
    CU(cudaMalloc((void **)&d_y, sizeof y));
    CU(cudaMalloc((void **)&d_out, sizeof out));
    for (step = 0; step < nsteps; ++step) {
        const int fp8 = step & 1, align = step % 3 == 2 ? 4 : 0, squeeze = step == 5;
        const size_t rb = fp8 ? H_ : H_ * 2;
        for (int r = 0; r < NR; ++r) {
            /* x2: new data for the cached dispatch (its routing is overwritten next) */
            inputs(2000 + step, r, idx[r], w[r], x2[r]);
            inputs(1000 + step, r, idx[r], w[r], x[r]);
            for (int t = 0; t < TM; ++t)
                ep_fp8_quant_row_ref(&x[r][t * H_], H_, 0, &q[r][t * H_], &qs[r][t * NS]);
        }
        const int T = T_of(step, rank);
        /* rank 0 is squeezed when it receives rows at all (every rank knows) */
        const int squeezed = squeeze && ht_expected(step, 0, idx, src, tok) > 0;
        const int n_exp = ht_expected(step, rank, idx, src, tok);
        CU(cudaMemcpy(d_x, fp8 ? (void *)q[rank] : (void *)x[rank], TM * rb,
                      cudaMemcpyHostToDevice));
        CU(cudaMemcpy(d_xs, qs[rank], sizeof qs[0], cudaMemcpyHostToDevice));
        CU(cudaMemcpy(d_idx, idx[rank], sizeof idx[0], cudaMemcpyHostToDevice));
        CU(cudaMemcpy(d_w, w[rank], sizeof w[0], cudaMemcpyHostToDevice));
        /* cudaMemcpy from pageable memory may return before its DMA landed, and the legacy
         * stream does not order work on a non-blocking stream: wait for the uploads */
        CU(cudaDeviceSynchronize());
        ep_ht_dispatch_args_t a = {.x = d_x,
                                   .x_scales = d_xs,
                                   .use_fp8 = fp8,
                                   .num_tokens = T,
                                   .topk_idx = d_idx,
                                   .topk_weights = step % 4 == 3 ? NULL : d_w,
                                   .expert_alignment = align,
                                   .stream = s};
        ep_ht_dispatch_out_t o = {.capacity = squeezed && rank == 0 ? n_exp - 1 : CAP,
                                  .recv_x = d_rx,
                                  .recv_scales = d_rs,
                                  .recv_topk_idx = d_ri,
                                  .recv_topk_weights = d_rw,
                                  .num_recv_per_expert = d_nrpe};
        ep_status_t st = ep_ht_dispatch(g, &a, &o, &hh);
        if (o.capacity < CAP) {
            HT_CK(st == EP_ERR_INVALID, "too small an output: status %d, expected %d (%s)", st,
                  EP_ERR_INVALID, ep_group_last_error(g));
            HT_CK(strstr(ep_group_last_error(g), "capacity") != NULL, "message: %s",
                  ep_group_last_error(g));
            continue; /* every rank stayed in step: the next op runs normally */
        }
        HT_CK(st == EP_OK, "dispatch: %s", ep_group_last_error(g));
        if (squeezed) { /* rank 0 has no handle: no cached dispatch or combine this step */
            ep_ht_handle_destroy(hh);
            hh = NULL;
            continue;
        }
        HT_CK(o.num_recv_tokens == n_exp, "received %d rows, expected %d", o.num_recv_tokens,
              n_exp);
        CU(cudaMemcpy(rx, d_rx, (size_t)n_exp * rb, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(rs, d_rs, sizeof rs, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(ri, d_ri, sizeof ri, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(rw, d_rw, sizeof rw, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(nrpe, d_nrpe, sizeof nrpe, cudaMemcpyDeviceToHost));
        for (int e = 0; e < L_; ++e) {
            int m = 0;
            for (int r = 0; r < NR; ++r)
                for (int t = 0; t < T_of(step, r); ++t)
                    m += sel(idx[r], t, rank * L_ + e);
            if (align > 1) m = (m + align - 1) / align * align;
            HT_CK(nrpe[e] == m, "num_recv_per_expert[%d] = %d, expected %d", e, nrpe[e], m);
        }
        for (int n = 0; n < n_exp; ++n) {
            const int r = src[n], t = tok[n];
            const void *want = fp8 ? (const void *)&q[r][t * H_] : (const void *)&x[r][t * H_];
            HT_CK(!memcmp(rx + (size_t)n * rb, want, rb), "row %d (rank %d token %d) differs", n, r,
                  t);
            if (fp8)
                HT_CK(!memcmp(&rs[n * NS], &qs[r][t * NS], NS * 4), "scales of row %d differ", n);
            for (int j = 0; j < K_; ++j) {
                const int e = idx[r][t * K_ + j];
                const int li = e >= rank * L_ && e < (rank + 1) * L_ ? e - rank * L_ : -1;
                const float wv = li >= 0 && step % 4 != 3 ? w[r][t * K_ + j] : 0.f;
                HT_CK(ri[n * K_ + j] == li && rw[n * K_ + j] == wv,
                      "row %d topk %d: (%d, %g), expected (%d, %g)", n, j, ri[n * K_ + j],
                      rw[n * K_ + j], li, wv);
            }
        }
        /* cached: new bf16 data along the same routes */
        CU(cudaMemcpy(d_x, x2[rank], TM * H_ * 2, cudaMemcpyHostToDevice));
        CU(cudaDeviceSynchronize());
        ep_ht_dispatch_args_t a2 = {.x = d_x, .num_tokens = T, .stream = s};
        o.num_recv_tokens = -1;
        HT_CK(ep_ht_dispatch_cached(g, hh, &a2, &o) == EP_OK, "cached: %s", ep_group_last_error(g));
        HT_CK(o.num_recv_tokens == n_exp, "cached: %d rows", o.num_recv_tokens);
        CU(cudaMemcpy(rx, d_rx, (size_t)n_exp * H_ * 2, cudaMemcpyDeviceToHost));
        for (int n = 0; n < n_exp; ++n)
            HT_CK(!memcmp(rx + (size_t)n * H_ * 2, &x2[src[n]][tok[n] * H_], H_ * 2),
                  "cached row %d (rank %d token %d) differs", n, src[n], tok[n]);
        /* combine: this rank returns f(row) = bf16(x2 * (3 rank + 2)); token t's source gets the
         * sum over the ranks it visited, ascending, in fp32 */
        for (int n = 0; n < n_exp; ++n)
            for (int h = 0; h < H_; ++h)
                y[(size_t)n * H_ + h] =
                    h_f_to_bf16(h_bf16_to_f(x2[src[n]][tok[n] * H_ + h]) * (float)(3 * rank + 2));
        CU(cudaMemcpy(d_y, y, (size_t)n_exp * H_ * 2, cudaMemcpyHostToDevice));
        CU(cudaDeviceSynchronize());
        HT_CK(ep_ht_combine(g, hh, d_y, d_out, s) == EP_OK, "combine: %s", ep_group_last_error(g));
        CU(cudaStreamSynchronize(s));
        CU(cudaMemcpy(out, d_out, (size_t)T * H_ * 2, cudaMemcpyDeviceToHost));
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H_; ++h) {
                float acc = 0.f;
                for (int d = 0; d < NR; ++d) {
                    int on = 0;
                    for (int j = 0; j < K_; ++j)
                        on |=
                            idx[rank][t * K_ + j] >= d * L_ && idx[rank][t * K_ + j] < (d + 1) * L_;
                    if (on)
                        acc += h_bf16_to_f(
                            h_f_to_bf16(h_bf16_to_f(x2[rank][t * H_ + h]) * (float)(3 * d + 2)));
                }
                HT_CK(out[t * H_ + h] == h_f_to_bf16(acc),
                      "combine out[%d][%d] = %g (%.3f x the token's value), expected %g", t, h,
                      h_bf16_to_f(out[t * H_ + h]),
                      h_bf16_to_f(out[t * H_ + h]) / h_bf16_to_f(x2[rank][t * H_ + h]), acc);
            }
        ep_ht_handle_destroy(hh);
        hh = NULL;
    }
    rc = 0;
out:
    ep_ht_handle_destroy(hh);
    cudaFree(d_x);
    cudaFree(d_xs);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_rx);
    cudaFree(d_rs);
    cudaFree(d_ri);
    cudaFree(d_rw);
    cudaFree(d_nrpe);
    cudaFree(d_y);
    cudaFree(d_out);
    return rc;
#undef CU
#undef HT_CK
}

static int run_rank(int rank, int port, int ndev)
{
    static int32_t idx[NR][TM * K_];
    static float w[NR][TM * K_];
    static uint16_t x[NR][TM * H_], y[L_ * S_ * H_], out[TM * H_];
    static uint8_t rx[L_ * S_ * H_ * 2], q[H_];
    static float sc[L_ * S_ * (H_ / 128)], qs[H_ / 128];
    static int32_t cnt[L_], src[L_ * S_];
    ep_tcp_bootstrap_t *tb = NULL;
    ep_group_t *g = NULL;
    cudaStream_t s = NULL;
    uint16_t *d_x = NULL, *d_y = NULL, *d_out = NULL;
    int32_t *d_idx = NULL;
    float *d_w = NULL;
    int rc = 1, step = -1;

    if (cudaSetDevice(rank % ndev) != cudaSuccess) return 1;
    if (ep_tcp_bootstrap_create("127.0.0.1", port, rank, NR, 20000, &tb) != EP_OK) {
        fprintf(stderr, "rank %d: tcp bootstrap on port %d failed\n", rank, port);
        return 1;
    }
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(tb, &bs);
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.backend = EP_BACKEND_CUDA;
    cfg.num_experts = E_;
    cfg.hidden = H_;
    cfg.num_topk = K_;
    cfg.ll_max_tokens = TM;
    cfg.ht_max_tokens = TM;
    cfg.num_sms = 4;
    cfg.timeout_ms = g_kill ? 3000 : 20000;
    cfg.device = rank % ndev;
    cfg.transport = g_transport;
    if (ep_group_create(&cfg, &bs, &g) != EP_OK) {
        fprintf(stderr, "rank %d: ep_group_create: %s\n", rank, ep_group_last_error(NULL));
        goto out;
    }
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
        cudaMalloc((void **)&d_x, sizeof x[0]) != cudaSuccess ||
        cudaMalloc((void **)&d_y, sizeof y) != cudaSuccess ||
        cudaMalloc((void **)&d_out, sizeof out) != cudaSuccess ||
        cudaMalloc((void **)&d_idx, sizeof idx[0]) != cudaSuccess ||
        cudaMalloc((void **)&d_w, sizeof w[0]) != cudaSuccess)
        goto out;

    for (step = 0; step < g_steps; ++step) {
        const int fp8 = step % 3 != 2, with_w = step % 4 != 3;
        if (g_kill && step == KILL_STEP + 1 && rank == NR - 1) {
            printf("rank %d: exiting without a word before step %d\n", rank, step);
            fflush(NULL);
            _exit(0);
        }
        for (int r = 0; r < NR; ++r)
            inputs(step, r, idx[r], w[r], x[r]);
        const int T = T_of(step, rank);
        if (cudaMemcpy(d_x, x[rank], sizeof x[0], cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaMemcpy(d_idx, idx[rank], sizeof idx[0], cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaMemcpy(d_w, w[rank], sizeof w[0], cudaMemcpyHostToDevice) != cudaSuccess)
            goto out;
        int exp_cnt[L_];
        for (int e = 0; e < L_; ++e) {
            int row = 0, ge = rank * L_ + e;
            for (int r = 0; r < NR; ++r)
                for (int t = 0; t < T_of(step, r); ++t)
                    if (sel(idx[r], t, ge)) {
                        for (int h = 0; h < H_; ++h)
                            y[((size_t)e * S_ + row) * H_ + h] = yval(ge, r, t, h);
                        ++row;
                    }
            exp_cnt[e] = row;
        }
        if (cudaMemcpy(d_y, y, sizeof y, cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaDeviceSynchronize() != cudaSuccess) /* the uploads, before stream s reads them */
            goto out;
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ep_ll_dispatch_args_t a = {.x = d_x,
                                   .num_tokens = T,
                                   .topk_idx = d_idx,
                                   .topk_weights = with_w ? d_w : NULL,
                                   .use_fp8 = fp8,
                                   .use_hook = step & 1,
                                   .stream = s};
        ep_ll_dispatch_out_t o;
        ep_ll_handle_t *hd;
        ep_hook_t *hk = NULL;
        ep_status_t st = ep_ll_dispatch(g, &a, &o, &hd, &hk);
        if (st == EP_OK && hk) st = ep_hook_run(hk);
        ep_ll_combine_args_t ca = {.handle = hd,
                                   .expert_y = d_y,
                                   .topk_idx = d_idx,
                                   .topk_weights = d_w,
                                   .out = d_out,
                                   .stream = s};
        if (st == EP_OK) st = ep_ll_combine(g, &ca, &hk);
        if (st == EP_OK && cudaStreamSynchronize(s) != cudaSuccess) goto out;
        /* a failure in the last kernels surfaces at the next call */
        if (st == EP_OK && g_kill && step == KILL_STEP + 1)
            st = ep_ll_dispatch(g, &a, &o, &hd, &hk);
        if (g_kill && step == KILL_STEP + 1) {
            struct timespec t1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            const double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
            printf("rank %d: after rank %d died: status %d (%s), failed peer %d, %.0f ms: %s\n",
                   rank, NR - 1, st, ep_strerror(st), ep_group_failed_peer(g), ms,
                   ep_group_last_error(g));
            if (st == EP_OK || (rank == 0 && ep_group_failed_peer(g) != NR - 1) ||
                ms > 3000 + 2000) {
                fprintf(stderr, "rank %d: kill test FAILED\n", rank);
                goto out;
            }
            rc = 0;
            goto out;
        }
        if (st != EP_OK) goto fail_op;
        if (cudaMemcpy(cnt, o.recv_count, sizeof cnt, cudaMemcpyDeviceToHost) != cudaSuccess ||
            cudaMemcpy(src, o.recv_src_info, sizeof src, cudaMemcpyDeviceToHost) != cudaSuccess ||
            cudaMemcpy(rx, o.recv_x, fp8 ? sizeof rx / 2 : sizeof rx, cudaMemcpyDeviceToHost) !=
                cudaSuccess ||
            (fp8 &&
             cudaMemcpy(sc, o.recv_scales, sizeof sc, cudaMemcpyDeviceToHost) != cudaSuccess) ||
            cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost) != cudaSuccess)
            goto out;
        for (int e = 0; e < L_; ++e) {
            if (cnt[e] != exp_cnt[e]) {
                fprintf(stderr, "rank %d step %d: expert %d count %d, expected %d\n", rank, step, e,
                        cnt[e], exp_cnt[e]);
                goto out;
            }
            int row = 0, ge = rank * L_ + e;
            for (int r = 0; r < NR; ++r)
                for (int t = 0; t < T_of(step, r); ++t) {
                    if (!sel(idx[r], t, ge)) continue;
                    const size_t rr = (size_t)e * S_ + row;
                    int same;
                    if (fp8) {
                        ep_fp8_quant_row_ref(&x[r][t * H_], H_, 0, q, qs);
                        same = !memcmp(q, rx + rr * H_, H_) &&
                               !memcmp(qs, sc + rr * (H_ / 128), sizeof qs);
                    } else {
                        same = !memcmp(&x[r][t * H_], rx + rr * H_ * 2, H_ * 2);
                    }
                    if (src[rr] != t || !same) {
                        fprintf(stderr, "rank %d step %d: expert %d row %d differs\n", rank, step,
                                e, row);
                        goto out;
                    }
                    ++row;
                }
        }
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H_; ++h) {
                double ref = 0, mag = 0;
                for (int j = 0; j < K_; ++j) {
                    const int ge = idx[rank][t * K_ + j];
                    if (ge < 0) continue;
                    const double v =
                        (double)w[rank][t * K_ + j] * h_bf16_to_f(yval(ge, rank, t, h));
                    ref += v;
                    mag += fabs(v);
                }
                const double got = h_bf16_to_f(out[t * H_ + h]);
                if (!(fabs(got - ref) <= 8e-3 * mag + 1e-6)) {
                    fprintf(stderr, "rank %d step %d: out[%d][%d] = %g, reference %g\n", rank, step,
                            t, h, got, ref);
                    goto out;
                }
            }
    }
    if (g_transport == EP_TRANSPORT_AUTO) {
        ep_ht_dispatch_args_t ha = {
            .x = d_x, .num_tokens = 1, .topk_idx = d_idx, .topk_weights = d_w, .stream = s};
        ep_ht_dispatch_out_t ho = {.capacity = TM * NR,
                                   .recv_x = d_y,
                                   .recv_topk_idx = (int32_t *)d_y,
                                   .recv_topk_weights = (float *)d_y,
                                   .num_recv_per_expert = (int32_t *)d_out};
        ep_ht_handle_t *hh = NULL;
        ep_status_t st = ep_ht_dispatch(g, &ha, &ho, &hh);
        if (st != EP_ERR_UNSUPPORTED) {
            fprintf(stderr, "rank %d: HT across processes returned %d, expected %d (%s)\n", rank,
                    st, EP_ERR_UNSUPPORTED, ep_group_last_error(g));
            goto out;
        }
    } else if (ht_steps(g, rank, s, 12)) {
        goto out;
    }
    printf("rank %d (pid %d): %d LL steps%s across processes over %s ok\n", rank, (int)getpid(),
           g_steps, g_transport == EP_TRANSPORT_AUTO ? "" : " and 12 HT steps",
           ep_transport_name(g_transport));
    rc = 0;
    goto out;
fail_op:
    fprintf(stderr, "rank %d step %d: %s\n", rank, step, ep_group_last_error(g));
out:
    if (s) cudaStreamSynchronize(s);
    ep_group_destroy(g);
    cudaFree(d_x);
    cudaFree(d_y);
    cudaFree(d_out);
    cudaFree(d_idx);
    cudaFree(d_w);
    if (s) cudaStreamDestroy(s);
    ep_tcp_bootstrap_destroy(tb);
    return rc;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--transport") && i + 1 < argc) {
            const char *t = argv[++i];
            g_transport = !strcmp(t, "tcp")    ? EP_TRANSPORT_TCP
                          : !strcmp(t, "rdma") ? EP_TRANSPORT_RDMA
                                               : EP_TRANSPORT_AUTO;
        } else if (!strcmp(argv[i], "--steps") && i + 1 < argc) {
            g_steps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--kill")) {
            g_kill = 1;
        } else {
            fprintf(stderr, "usage: %s [--transport nvlink|tcp|rdma] [--steps N] [--kill]\n",
                    argv[0]);
            return 2;
        }
    }
    if (g_kill && g_steps < KILL_STEP + 2) g_steps = KILL_STEP + 2;
    /* count devices in a child: the parent must not initialise CUDA before forking */
    int ndev = 0;
    pid_t probe = fork();
    if (probe == 0) _exit(h_device_count() > 9 ? 9 : h_device_count());
    int st = 0;
    if (probe < 0 || waitpid(probe, &st, 0) != probe || !WIFEXITED(st)) return 1;
    ndev = WEXITSTATUS(st);
    if (ndev == 0) {
        printf("SKIP: no CUDA device present\n");
        return H_SKIP;
    }
    const int port = 20000 + (int)(getpid() % 20000);
    pid_t pids[NR];
    for (int r = 0; r < NR; ++r) {
        pids[r] = fork();
        if (pids[r] == 0) {
            const int rc = run_rank(r, port, ndev);
            fflush(NULL);
            _exit(rc);
        }
        if (pids[r] < 0) return 1;
    }
    int failed = 0;
    for (int r = 0; r < NR; ++r) {
        if (waitpid(pids[r], &st, 0) != pids[r] || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            failed = 1;
    }
    printf("%s\n", failed ? "FAILED" : "PASSED");
    return failed;
}
