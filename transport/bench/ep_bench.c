/* ep-bench: latency and bandwidth of libep's LL and HT ops with DeepEP's settings and byte
 * accounting. Ranks are threads of this process by default; with --rank/--nranks/--bootstrap
 * each process is one rank and they meet over the tcp bootstrap.
 *
 * Byte accounting (DeepEP's, local traffic included), per rank:
 *   LL dispatch: valid selections x (H + H/128*4 + 16) for fp8, x (2H + 16) for bf16
 *   LL combine:  valid selections x 2H
 *   HT dispatch/combine: received rows x 2H, fp8 dispatch x (1 + 4/128) / 2
 * Latency: per iteration the slowest rank's time of the op (ranks start each op together
 * after a bootstrap barrier); median and p10/p90 over the iterations. In multi-process mode
 * each process prints its own rank's times. */
#include "ep.h"
#include "epd_clock.h"

#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef EP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

enum { MODE_LL = 1, MODE_HT = 2 };
enum {
    T_LL_DISP,
    T_LL_DISP_SEND,
    T_LL_DISP_RECV,
    T_LL_COMB,
    T_LL_COMB_SEND,
    T_LL_COMB_RECV,
    T_LL_BOTH,
    T_HT_LAYOUT,
    T_HT_DISP,
    T_HT_CACHED,
    T_HT_COMB,
    T_COUNT
};
static const char *const t_names[T_COUNT] = {
    "LL dispatch",     "LL dispatch send",   "LL dispatch recv",    "LL combine",
    "LL combine send", "LL combine recv",    "LL dispatch+combine", "HT layout",
    "HT dispatch",     "HT dispatch cached", "HT combine"};

struct opts {
    int ranks, tokens, hidden, topk, experts, modes, fp8, hook, iters, warmup;
    int tokens_set, experts_set;
    ep_backend_t backend;
    ep_transport_kind_t transport;
    unsigned timeout_ms;
    int rank, nranks; /* multi-process mode when rank >= 0 */
    char host[256];
    int port;
    const char *tcp_host; /* data-plane address of this rank (tcp wire) */
    uint64_t seed;
};

struct shared {
    const struct opts *o;
    double *times;         /* [T_COUNT][ranks][iters] seconds, <0 where not measured */
    double bytes[T_COUNT]; /* rank 0's bytes per op */
    int failed;
};

static uint64_t rng(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- memory in the backend's space -------------------------------------------------------- */

static int on_gpu(const struct opts *o)
{
    return o->backend == EP_BACKEND_CUDA;
}

static void *mem_alloc(const struct opts *o, size_t n)
{
#ifdef EP_HAVE_CUDA
    if (on_gpu(o)) {
        void *p = NULL;
        return cudaMalloc(&p, n ? n : 1) == cudaSuccess ? p : NULL;
    }
#endif
    return malloc(n ? n : 1);
}

static void mem_free(const struct opts *o, void *p)
{
#ifdef EP_HAVE_CUDA
    if (on_gpu(o)) {
        cudaFree(p);
        return;
    }
#endif
    free(p);
}

/* Copies host data into the backend's space (and back with to_host). */
static void mem_copy(const struct opts *o, void *dst, const void *src, size_t n, int to_host)
{
#ifdef EP_HAVE_CUDA
    if (on_gpu(o)) {
        cudaMemcpy(dst, src, n, to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice);
        return;
    }
#endif
    (void)to_host;
    memcpy(dst, src, n);
}

/* Waits for the rank's own stream only: ranks that share a GPU must not wait for each other's
 * kernels (a peer's kernel may be waiting for this rank's next op). */
static void sync_stream(const struct opts *o, void *stream)
{
#ifdef EP_HAVE_CUDA
    if (on_gpu(o)) cudaStreamSynchronize((cudaStream_t)stream);
#endif
    (void)o;
    (void)stream;
}

/* ---- one rank ----------------------------------------------------------------------------- */

struct rank_arg {
    struct shared *sh;
    int rank;
    ep_bootstrap_t bs;
};

#define RECORD(id, t) sh->times[((size_t)(id)*R + slot) * o->iters + it] = (t)

#define TRY(call)                                                                                  \
    do {                                                                                           \
        ep_status_t st_ = (call);                                                                  \
        if (st_ != EP_OK) {                                                                        \
            fprintf(stderr, "ep-bench: rank %d: %s: %s (%s)\n", rank, #call, ep_strerror(st_),     \
                    ep_group_last_error(g));                                                       \
            rc = 1;                                                                                \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

static void gen_routing(const struct opts *o, int rank, int T, int32_t *idx, float *w)
{
    uint64_t s = o->seed * 1000003ull + (uint64_t)rank;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < o->topk; j++) {
            int32_t e;
            int dup;
            do {
                e = (int32_t)(rng(&s) % (uint64_t)o->experts);
                dup = 0;
                for (int i = 0; i < j; i++)
                    dup |= idx[(size_t)t * o->topk + i] == e;
            } while (dup);
            idx[(size_t)t * o->topk + j] = e;
            w[(size_t)t * o->topk + j] = (float)(rng(&s) >> 40) / 16777216.0f;
        }
}

static void gen_bf16(uint64_t *s, uint16_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (uint16_t)(0x3c00 + (rng(s) & 0x3ff)) | (uint16_t)((rng(s) & 1) << 15);
}

static int bench_rank(struct rank_arg *ra)
{
    struct shared *sh = ra->sh;
    const struct opts *o = sh->o;
    int rank = ra->rank, R = o->rank >= 0 ? 1 : o->ranks, rc = 0;
    int nranks = o->rank >= 0 ? o->nranks : o->ranks;
    int H = o->hidden, k = o->topk, T = o->tokens, L = o->experts / nranks;
    int slot = o->rank >= 0 ? 0 : rank; /* index into the time table */
    uint64_t s = o->seed * 7919ull + (uint64_t)rank;
    ep_group_t *g = NULL;
    ep_config_t cfg;
    size_t S = (size_t)T * nranks, N = (size_t)T * nranks;

    int32_t *h_idx = malloc(sizeof(int32_t) * (size_t)T * k);
    float *h_w = malloc(sizeof(float) * (size_t)T * k);
    uint16_t *h_x = malloc(2 * (size_t)T * H);
    void *x = NULL, *idx = NULL, *w = NULL, *y = NULL, *out = NULL, *xs = NULL;
    void *stream = NULL; /* cuda: this rank's own non-blocking stream */
    ep_ht_layout_t lay = {0};
    ep_ht_dispatch_out_t ho = {0};
    ep_ht_handle_t *hh = NULL;
    if (!h_idx || !h_w || !h_x) {
        fprintf(stderr, "ep-bench: rank %d: out of host memory\n", rank);
        return 1;
    }
#ifdef EP_HAVE_CUDA
    if (on_gpu(o)) {
        int n = 0;
        cudaGetDeviceCount(&n);
        cudaSetDevice(n ? rank % n : 0);
        cudaStream_t cs;
        if (cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking) != cudaSuccess) {
            fprintf(stderr, "ep-bench: rank %d: cudaStreamCreateWithFlags failed\n", rank);
            free(h_idx);
            free(h_w);
            free(h_x);
            return 1;
        }
        stream = cs;
    }
#endif
    gen_routing(o, rank, T, h_idx, h_w);
    gen_bf16(&s, h_x, (size_t)T * H);
    long sel = 0, recv_rows = 0;
    for (int i = 0; i < T * k; i++)
        sel += h_idx[i] >= 0;

    ep_config_init(&cfg);
    cfg.backend = o->backend;
    cfg.transport = o->transport;
    cfg.num_experts = o->experts;
    cfg.hidden = H;
    cfg.num_topk = k;
    /* A bound of 0 would disable the mode: --tokens 0 measures ops with no tokens. */
    cfg.ll_max_tokens = (o->modes & MODE_LL) ? (T > 0 ? T : 1) : 0;
    cfg.ht_max_tokens = (o->modes & MODE_HT) ? (T > 0 ? T : 1) : 0;
    cfg.timeout_ms = o->timeout_ms;
    if (o->tcp_host) cfg.tcp_host = o->tcp_host;
    TRY(ep_group_create(&cfg, &ra->bs, &g));

    x = mem_alloc(o, 2 * (size_t)T * H);
    idx = mem_alloc(o, sizeof(int32_t) * (size_t)T * k);
    w = mem_alloc(o, sizeof(float) * (size_t)T * k);
    out = mem_alloc(o, 2 * (size_t)T * H);
    if (!x || !idx || !w || !out) {
        fprintf(stderr, "ep-bench: rank %d: out of memory for the inputs\n", rank);
        rc = 1;
        goto out;
    }
    mem_copy(o, x, h_x, 2 * (size_t)T * H, 0);
    mem_copy(o, idx, h_idx, sizeof(int32_t) * (size_t)T * k, 0);
    mem_copy(o, w, h_w, sizeof(float) * (size_t)T * k, 0);

    if (o->modes & MODE_LL) {
        y = mem_alloc(o, 2 * (size_t)L * S * H);
        if (!y) {
            fprintf(stderr, "ep-bench: rank %d: out of memory for %d x %zu expert rows\n", rank, L,
                    S);
            rc = 1;
            goto out;
        }
        if (!on_gpu(o)) /* the values do not matter; touch the pages once */
            memset(y, 0, 2 * (size_t)L * S * H);
        for (int it = -o->warmup; it < o->iters; it++) {
            ep_ll_dispatch_out_t dout;
            ep_ll_handle_t *h;
            ep_hook_t *hook = NULL;
            ep_ll_dispatch_args_t da = {.x = x,
                                        .num_tokens = T,
                                        .topk_idx = idx,
                                        .topk_weights = w,
                                        .use_fp8 = o->fp8,
                                        .use_hook = o->hook,
                                        .stream = stream};
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            double t0 = epd_now_s();
            TRY(ep_ll_dispatch(g, &da, &dout, &h, &hook));
            sync_stream(o, stream);
            double t1 = epd_now_s();
            if (o->hook) TRY(ep_hook_run(hook));
            sync_stream(o, stream);
            double t2 = epd_now_s();
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            ep_ll_combine_args_t ca = {.handle = h,
                                       .expert_y = y,
                                       .topk_idx = idx,
                                       .topk_weights = w,
                                       .out = out,
                                       .use_hook = o->hook,
                                       .stream = stream};
            double t3 = epd_now_s();
            TRY(ep_ll_combine(g, &ca, &hook));
            sync_stream(o, stream);
            double t4 = epd_now_s();
            if (o->hook) TRY(ep_hook_run(hook));
            sync_stream(o, stream);
            double t5 = epd_now_s();
            if (it < 0) continue;
            RECORD(T_LL_DISP, t2 - t0);
            RECORD(T_LL_COMB, t5 - t3);
            RECORD(T_LL_BOTH, (t2 - t0) + (t5 - t3));
            if (o->hook) {
                RECORD(T_LL_DISP_SEND, t1 - t0);
                RECORD(T_LL_DISP_RECV, t2 - t1);
                RECORD(T_LL_COMB_SEND, t4 - t3);
                RECORD(T_LL_COMB_RECV, t5 - t4);
            }
        }
        if (rank == 0 || o->rank >= 0) {
            double per = o->fp8 ? H + H / 128.0 * 4 + 16 : 2.0 * H + 16;
            sh->bytes[T_LL_DISP] = sh->bytes[T_LL_DISP_SEND] = sel * per;
            sh->bytes[T_LL_COMB] = sh->bytes[T_LL_COMB_SEND] = sel * 2.0 * H;
            sh->bytes[T_LL_BOTH] = sel * (per + 2.0 * H);
        }
    }

    if (o->modes & MODE_HT) {
        int use_fp8 = o->fp8;
        lay.num_tokens_per_rank = mem_alloc(o, sizeof(int32_t) * (size_t)nranks);
        lay.num_tokens_per_expert = mem_alloc(o, sizeof(int32_t) * (size_t)o->experts);
        lay.is_token_in_rank = mem_alloc(o, (size_t)T * nranks);
        ho.capacity = (int)N;
        ho.recv_x = mem_alloc(o, 2 * N * H);
        ho.recv_scales = mem_alloc(o, sizeof(float) * N * (H / 128 + 1));
        ho.recv_topk_idx = mem_alloc(o, sizeof(int32_t) * N * k);
        ho.recv_topk_weights = mem_alloc(o, sizeof(float) * N * k);
        ho.num_recv_per_expert = mem_alloc(o, sizeof(int32_t) * (size_t)L);
        if (use_fp8) {
            /* fp8 input: random finite e4m3 bytes and scales */
            uint8_t *q = malloc((size_t)T * H);
            float *sc = malloc(sizeof(float) * (size_t)T * (H / 128 + 1));
            xs = mem_alloc(o, sizeof(float) * (size_t)T * (H / 128 + 1));
            if (!q || !sc || !xs) {
                free(q);
                free(sc);
                fprintf(stderr, "ep-bench: rank %d: out of memory\n", rank);
                rc = 1;
                goto out;
            }
            for (size_t i = 0; i < (size_t)T * H; i++)
                q[i] = (uint8_t)(rng(&s) % 0x7e) | (uint8_t)((rng(&s) & 1) << 7);
            for (int i = 0; i < T * (H / 128); i++)
                sc[i] = 0.01f;
            mem_copy(o, x, q, (size_t)T * H, 0);
            mem_copy(o, xs, sc, sizeof(float) * (size_t)T * (H / 128), 0);
            free(q);
            free(sc);
        }
        uint16_t *yb = ho.recv_x; /* combine the bf16 rows as received (or any N x H data) */
        void *ybuf = NULL;
        if (use_fp8) {
            ybuf = mem_alloc(o, 2 * N * H);
            yb = ybuf;
        }
        for (int it = -o->warmup; it < o->iters; it++) {
            ep_ht_dispatch_args_t a = {.x = x,
                                       .x_scales = xs,
                                       .use_fp8 = use_fp8,
                                       .num_tokens = T,
                                       .topk_idx = idx,
                                       .topk_weights = w,
                                       .stream = stream};
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            double t0 = epd_now_s();
            TRY(ep_get_dispatch_layout(g, idx, T, &lay, stream));
            sync_stream(o, stream);
            double t1 = epd_now_s();
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            double t2 = epd_now_s();
            TRY(ep_ht_dispatch(g, &a, &ho, &hh));
            sync_stream(o, stream);
            double t3 = epd_now_s();
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            double t4 = epd_now_s();
            TRY(ep_ht_dispatch_cached(g, hh, &a, &ho));
            sync_stream(o, stream);
            double t5 = epd_now_s();
            ra->bs.barrier(ra->bs.ctx, o->timeout_ms);
            double t6 = epd_now_s();
            TRY(ep_ht_combine(g, hh, yb, out, stream));
            sync_stream(o, stream);
            double t7 = epd_now_s();
            recv_rows = ho.num_recv_tokens;
            ep_ht_handle_destroy(hh);
            hh = NULL;
            if (it < 0) continue;
            RECORD(T_HT_LAYOUT, t1 - t0);
            RECORD(T_HT_DISP, t3 - t2);
            RECORD(T_HT_CACHED, t5 - t4);
            RECORD(T_HT_COMB, t7 - t6);
        }
        mem_free(o, ybuf);
        if (rank == 0 || o->rank >= 0) {
            double per = use_fp8 ? 2.0 * H * (1 + 4.0 / 128) / 2 : 2.0 * H;
            sh->bytes[T_HT_DISP] = sh->bytes[T_HT_CACHED] = recv_rows * per;
            sh->bytes[T_HT_COMB] = recv_rows * 2.0 * H;
        }
    }
out:
    ep_ht_handle_destroy(hh);
    ep_group_destroy(g);
    mem_free(o, lay.num_tokens_per_rank);
    mem_free(o, lay.num_tokens_per_expert);
    mem_free(o, lay.is_token_in_rank);
    mem_free(o, ho.recv_x);
    mem_free(o, ho.recv_scales);
    mem_free(o, ho.recv_topk_idx);
    mem_free(o, ho.recv_topk_weights);
    mem_free(o, ho.num_recv_per_expert);
    mem_free(o, x);
    mem_free(o, xs);
    mem_free(o, idx);
    mem_free(o, w);
    mem_free(o, y);
    mem_free(o, out);
    free(h_idx);
    free(h_w);
    free(h_x);
#ifdef EP_HAVE_CUDA
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
#endif
    return rc;
}

static void *rank_thread(void *p)
{
    struct rank_arg *ra = p;
    if (bench_rank(ra)) __atomic_store_n(&ra->sh->failed, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* ---- report ------------------------------------------------------------------------------- */

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const struct shared *sh, int R)
{
    const struct opts *o = sh->o;
    double *v = malloc(sizeof(double) * (size_t)o->iters);
    printf("%-22s %12s %12s %12s %14s\n", "op", "median us", "p10 us", "p90 us", "GB/s (median)");
    for (int id = 0; id < T_COUNT; id++) {
        int n = 0;
        for (int it = 0; it < o->iters; it++) {
            double m = -1;
            for (int r = 0; r < R; r++) {
                double t = sh->times[((size_t)id * R + r) * o->iters + it];
                if (t > m) m = t;
            }
            if (m >= 0) v[n++] = m;
        }
        if (!n) continue;
        qsort(v, (size_t)n, sizeof v[0], cmp_d);
        double med = v[n / 2], p10 = v[n / 10], p90 = v[(n * 9) / 10 < n ? (n * 9) / 10 : n - 1];
        if (sh->bytes[id] > 0)
            printf("%-22s %12.1f %12.1f %12.1f %14.2f\n", t_names[id], med * 1e6, p10 * 1e6,
                   p90 * 1e6, sh->bytes[id] / med / 1e9);
        else
            printf("%-22s %12.1f %12.1f %12.1f %14s\n", t_names[id], med * 1e6, p10 * 1e6,
                   p90 * 1e6, "-");
    }
    free(v);
}

/* ---- main --------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ep-bench [options]\n"
            "Measures libep's LL and HT dispatch/combine (DeepEP's settings and byte accounting).\n"
            "  --mode ll|ht|all     ops to run (default all)\n"
            "  --ranks N            ranks as threads of this process (default 2)\n"
            "  --tokens T           tokens per rank (default LL 128, HT 4096)\n"
            "  --hidden H           hidden size (default 7168)\n"
            "  --topk K             experts per token (default 8)\n"
            "  --experts E          experts (default LL 288, HT 256)\n"
            "  --fp8 | --bf16       dispatch format (default fp8)\n"
            "  --hook               LL: split send and receive halves (receive hook)\n"
            "  --iters N            measured iterations (default 20)\n"
            "  --warmup N           unmeasured iterations first (default 3)\n"
            "  --backend cpu|cuda   compute backend (default cpu)\n"
            "  --transport auto|shm|tcp|nvlink|rdma  (default auto)\n"
            "  --timeout-ms MS      bound on every wait (default 30000)\n"
            "  --seed S             routing and data seed (default 1)\n"
            "  --rank R --nranks N --bootstrap HOST:PORT\n"
            "                       multi-process mode: this process is rank R of N; rank 0\n"
            "                       listens on HOST:PORT, the others connect (tcp bootstrap)\n"
            "  --tcp-host ADDR      address this rank's tcp wire listens on and advertises\n"
            "                       (default 127.0.0.1)\n"
            "  --help               this text\n");
}

static int parse_transport(const char *s, ep_transport_kind_t *t)
{
    static const char *const names[] = {"auto", "shm", "tcp", "nvlink", "rdma"};
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, names[i])) {
            *t = (ep_transport_kind_t)i;
            return 0;
        }
    return -1;
}

static int parse_int(const char *name, const char *s, int lo, int hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > hi) {
        fprintf(stderr, "ep-bench: --%s %s: expected an integer in %d..%d\n", name, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int run_one(struct opts *o, int mode)
{
    struct opts m = *o;
    m.modes = mode;
    if (!m.tokens_set) m.tokens = mode == MODE_LL ? 128 : 4096;
    if (!m.experts_set) m.experts = mode == MODE_LL ? 288 : 256;
    int R = m.rank >= 0 ? 1 : m.ranks;
    int nranks = m.rank >= 0 ? m.nranks : m.ranks;
    struct shared sh = {.o = &m};
    int rc = 0;

    printf("== %s: ranks %d, tokens/rank %d, hidden %d, top-%d, experts %d, %s%s, backend %s, "
           "transport %s, %d iterations (+%d warmup)\n",
           mode == MODE_LL ? "LL" : "HT", nranks, m.tokens, m.hidden, m.topk, m.experts,
           m.fp8 ? "fp8" : "bf16", mode == MODE_LL && m.hook ? ", hook" : "",
           ep_backend_name(m.backend), ep_transport_name(m.transport), m.iters, m.warmup);
    sh.times = malloc(sizeof(double) * T_COUNT * (size_t)R * (size_t)m.iters);
    if (!sh.times) return 1;
    for (size_t i = 0; i < T_COUNT * (size_t)R * (size_t)m.iters; i++)
        sh.times[i] = -1;

    if (m.rank >= 0) {
        ep_tcp_bootstrap_t *tb = NULL;
        struct rank_arg ra = {&sh, m.rank, {0}};
        ep_status_t st =
            ep_tcp_bootstrap_create(m.host, m.port, m.rank, m.nranks, m.timeout_ms, &tb);
        if (st) {
            fprintf(stderr, "ep-bench: tcp bootstrap %s:%d as rank %d of %d: %s (%s)\n", m.host,
                    m.port, m.rank, m.nranks, ep_strerror(st), ep_tcp_bootstrap_last_error());
            rc = 1;
        } else {
            ep_tcp_bootstrap_get(tb, &ra.bs);
            sh.failed = bench_rank(&ra);
            ep_tcp_bootstrap_destroy(tb);
        }
    } else {
        ep_inproc_world_t *w;
        pthread_t th[EP_MAX_RANKS];
        struct rank_arg ra[EP_MAX_RANKS];
        if (ep_inproc_world_create(R, &w)) {
            free(sh.times);
            return 1;
        }
        for (int r = 0; r < R; r++) {
            ra[r] = (struct rank_arg){&sh, r, {0}};
            ep_inproc_bootstrap(w, r, &ra[r].bs);
            pthread_create(&th[r], NULL, rank_thread, &ra[r]);
        }
        for (int r = 0; r < R; r++)
            pthread_join(th[r], NULL);
        ep_inproc_world_destroy(w);
    }
    if (!rc && !sh.failed)
        report(&sh, R);
    else
        rc = 1;
    free(sh.times);
    return rc;
}

int main(int argc, char **argv)
{
    struct opts o = {.ranks = 2,
                     .hidden = 7168,
                     .topk = 8,
                     .modes = MODE_LL | MODE_HT,
                     .fp8 = 1,
                     .iters = 20,
                     .warmup = 3,
                     .backend = EP_BACKEND_CPU,
                     .transport = EP_TRANSPORT_AUTO,
                     .timeout_ms = 30000,
                     .rank = -1,
                     .nranks = 0,
                     .seed = 1};
    static const struct option lo[] = {{"mode", required_argument, 0, 'm'},
                                       {"ranks", required_argument, 0, 'r'},
                                       {"tokens", required_argument, 0, 't'},
                                       {"hidden", required_argument, 0, 'H'},
                                       {"topk", required_argument, 0, 'k'},
                                       {"experts", required_argument, 0, 'e'},
                                       {"fp8", no_argument, 0, 'f'},
                                       {"bf16", no_argument, 0, 'b'},
                                       {"hook", no_argument, 0, 'h'},
                                       {"iters", required_argument, 0, 'i'},
                                       {"warmup", required_argument, 0, 'w'},
                                       {"backend", required_argument, 0, 'B'},
                                       {"transport", required_argument, 0, 'T'},
                                       {"timeout-ms", required_argument, 0, 'o'},
                                       {"seed", required_argument, 0, 's'},
                                       {"rank", required_argument, 0, 'R'},
                                       {"nranks", required_argument, 0, 'N'},
                                       {"bootstrap", required_argument, 0, 'S'},
                                       {"tcp-host", required_argument, 0, 'A'},
                                       {"help", no_argument, 0, '?'},
                                       {0, 0, 0, 0}};
    int c, v;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            if (!strcmp(optarg, "ll"))
                o.modes = MODE_LL;
            else if (!strcmp(optarg, "ht"))
                o.modes = MODE_HT;
            else if (!strcmp(optarg, "all"))
                o.modes = MODE_LL | MODE_HT;
            else {
                fprintf(stderr, "ep-bench: --mode %s: expected ll, ht or all\n", optarg);
                return 2;
            }
            break;
        case 'r':
            if (parse_int("ranks", optarg, 1, EP_MAX_RANKS, &o.ranks)) return 2;
            break;
        case 't':
            if (parse_int("tokens", optarg, 0, 1 << 20, &o.tokens)) return 2;
            o.tokens_set = 1;
            break;
        case 'H':
            if (parse_int("hidden", optarg, 1, 1 << 16, &o.hidden)) return 2;
            break;
        case 'k':
            if (parse_int("topk", optarg, 1, EP_MAX_TOPK, &o.topk)) return 2;
            break;
        case 'e':
            if (parse_int("experts", optarg, 1, 1 << 16, &o.experts)) return 2;
            o.experts_set = 1;
            break;
        case 'f':
            o.fp8 = 1;
            break;
        case 'b':
            o.fp8 = 0;
            break;
        case 'h':
            o.hook = 1;
            break;
        case 'i':
            if (parse_int("iters", optarg, 1, 1 << 20, &o.iters)) return 2;
            break;
        case 'w':
            if (parse_int("warmup", optarg, 0, 1 << 20, &o.warmup)) return 2;
            break;
        case 'B':
            if (!strcmp(optarg, "cpu"))
                o.backend = EP_BACKEND_CPU;
            else if (!strcmp(optarg, "cuda"))
                o.backend = EP_BACKEND_CUDA;
            else {
                fprintf(stderr, "ep-bench: --backend %s: expected cpu or cuda\n", optarg);
                return 2;
            }
            break;
        case 'T':
            if (parse_transport(optarg, &o.transport)) {
                fprintf(stderr,
                        "ep-bench: --transport %s: expected auto, shm, tcp, nvlink or "
                        "rdma\n",
                        optarg);
                return 2;
            }
            break;
        case 'o':
            if (parse_int("timeout-ms", optarg, 1, 1 << 30, &v)) return 2;
            o.timeout_ms = (unsigned)v;
            break;
        case 's':
            if (parse_int("seed", optarg, 0, 1 << 30, &v)) return 2;
            o.seed = (uint64_t)v;
            break;
        case 'R':
            if (parse_int("rank", optarg, 0, EP_MAX_RANKS - 1, &o.rank)) return 2;
            break;
        case 'N':
            if (parse_int("nranks", optarg, 1, EP_MAX_RANKS, &o.nranks)) return 2;
            break;
        case 'A':
            o.tcp_host = optarg;
            break;
        case 'S': {
            const char *colon = strrchr(optarg, ':');
            if (!colon || colon == optarg || (size_t)(colon - optarg) >= sizeof o.host ||
                parse_int("bootstrap port", colon + 1, 1, 65535, &o.port)) {
                fprintf(stderr, "ep-bench: --bootstrap %s: expected HOST:PORT\n", optarg);
                return 2;
            }
            memcpy(o.host, optarg, (size_t)(colon - optarg));
            o.host[colon - optarg] = 0;
            break;
        }
        default:
            usage(c == '?' && optind > 0 && !strcmp(argv[optind - 1], "--help") ? stdout : stderr);
            return c == '?' && optind > 0 && !strcmp(argv[optind - 1], "--help") ? 0 : 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "ep-bench: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    if ((o.rank >= 0) != (o.nranks > 0) || (o.rank >= 0 && !o.host[0]) ||
        (o.rank >= 0 && o.rank >= o.nranks)) {
        fprintf(stderr, "ep-bench: multi-process mode needs --rank R --nranks N --bootstrap "
                        "HOST:PORT with R < N\n");
        return 2;
    }
    int nranks = o.rank >= 0 ? o.nranks : o.ranks;
    int emax = o.experts_set ? o.experts : 256;
    if ((o.experts_set && o.experts % nranks) ||
        (!o.experts_set && (288 % nranks || 256 % nranks))) {
        fprintf(stderr, "ep-bench: the number of experts (%s) must be a multiple of the %d ranks\n",
                o.experts_set ? "--experts" : "288 for LL, 256 for HT", nranks);
        return 2;
    }
    if (o.topk > emax) {
        fprintf(stderr, "ep-bench: --topk %d exceeds the %d experts\n", o.topk, emax);
        return 2;
    }
    if (o.fp8 && o.hidden % 128) {
        fprintf(stderr, "ep-bench: fp8 needs --hidden to be a multiple of 128 (use --bf16)\n");
        return 2;
    }
    int rc = 0;
    if (o.modes & MODE_LL) rc |= run_one(&o, MODE_LL);
    /* After a failed mode the ranks of a multi-process run are out of step: stop. */
    if ((o.modes & MODE_HT) && !rc) rc |= run_one(&o, MODE_HT);
    return rc;
}
