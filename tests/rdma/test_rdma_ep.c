/* LL and HT dispatch/combine of the cpu backend over the verbs wire, one forked process per
 * rank (ranks alternate between the host's verbs ports, so in the test VM traffic crosses the
 * veth wire between rxe0 and rxe1), checked against a naive reference computed here from every
 * rank's inputs, which every rank regenerates from the seed.
 * usage: test_rdma_ep [NRANKS] (default 2 and 4); exit 77 (skip) without an active verbs port. */
#include "../transport/harness.h"
#include "rdma_world.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define H 256
#define K 3
#define M 16  /* ll_max_tokens = ht_max_tokens */
#define EPR 4 /* experts per rank */
#define ITERS 3

struct inputs {
    int T;
    uint16_t x[M * H];
    int32_t idx[M * K];
    float w[M * K];
};

static void gen(int rank, int nranks, int it, struct inputs *in)
{
    rng_t r = {0x1234567ull + (uint64_t)rank * 7919 + (uint64_t)it * 104729};
    int E = EPR * nranks;
    in->T = rng_int(&r, 1, M);
    for (int i = 0; i < in->T * H; i++)
        in->x[i] = rand_bf16(&r, -3, 3);
    for (int t = 0; t < in->T; t++) {
        for (int j = 0; j < K; j++) {
            int e, dup;
            do { /* distinct experts per token; sometimes no expert in the last slot */
                e = rng_int(&r, 0, E - 1);
                dup = 0;
                for (int q = 0; q < j; q++)
                    dup |= in->idx[t * K + q] == e;
            } while (dup);
            in->idx[t * K + j] = (j == K - 1 && rng_int(&r, 0, 3) == 0) ? -1 : e;
            in->w[t * K + j] = 0.25f + rng_float(&r);
        }
    }
}

/* What expert e makes of a bf16 value: a scale that differs per expert. */
static uint16_t expert_fn(int e, uint16_t x)
{
    return ref_bf16_round(ref_bf16_value(x) * (1.0f + 0.125f * (float)e));
}

static int has_expert(const int32_t *idx, int e)
{
    for (int j = 0; j < K; j++)
        if (idx[j] == e) return 1;
    return 0;
}

static int goes_to(const int32_t *idx, int rank)
{
    for (int j = 0; j < K; j++)
        if (idx[j] >= 0 && idx[j] / EPR == rank) return 1;
    return 0;
}

static int check_ll(ep_group_t *g, int me, int n, struct inputs *in, int it)
{
    const int S = M * n;
    ep_ll_dispatch_args_t da = {
        .x = in[me].x, .num_tokens = in[me].T, .topk_idx = in[me].idx, .topk_weights = in[me].w};
    ep_ll_dispatch_out_t o;
    ep_ll_handle_t *h = NULL;
    ep_status_t st = ep_ll_dispatch(g, &da, &o, &h, NULL);
    CHECK(st == EP_OK, "it %d: ep_ll_dispatch: %s: %s", it, ep_strerror(st),
          ep_group_last_error(g));
    const uint16_t *rx = o.recv_x;
    uint16_t *y = malloc(sizeof(uint16_t) * (size_t)EPR * S * H);
    CHECK(y, "out of memory");
    for (int l = 0; l < EPR; l++) {
        int e = me * EPR + l, row = 0;
        for (int s = 0; s < n; s++) {
            int first = row;
            for (int t = 0; t < in[s].T; t++) {
                if (!has_expert(in[s].idx + t * K, e)) continue;
                CHECK(o.recv_src_info[l * S + row] == t,
                      "it %d expert %d row %d: source token %d, "
                      "expected %d of rank %d",
                      it, e, row, o.recv_src_info[l * S + row], t, s);
                CHECK(!memcmp(rx + ((size_t)l * S + row) * H, in[s].x + t * H, 2 * H),
                      "it %d expert %d row %d (rank %d token %d): wrong data", it, e, row, s, t);
                for (int c = 0; c < H; c++)
                    y[((size_t)l * S + row) * H + c] = expert_fn(e, in[s].x[t * H + c]);
                row++;
            }
            CHECK(o.recv_range[(l * n + s) * 2] == first &&
                      o.recv_range[(l * n + s) * 2 + 1] == row - first,
                  "it %d expert %d: range of rank %d is (%d, %d), expected (%d, %d)", it, e, s,
                  o.recv_range[(l * n + s) * 2], o.recv_range[(l * n + s) * 2 + 1], first,
                  row - first);
        }
        CHECK(o.recv_count[l] == row, "it %d expert %d: %d rows, expected %d", it, e,
              o.recv_count[l], row);
    }
    uint16_t out[M * H];
    ep_ll_combine_args_t ca = {
        .handle = h, .expert_y = y, .topk_idx = in[me].idx, .topk_weights = in[me].w, .out = out};
    st = ep_ll_combine(g, &ca, NULL);
    CHECK(st == EP_OK, "it %d: ep_ll_combine: %s: %s", it, ep_strerror(st), ep_group_last_error(g));
    for (int t = 0; t < in[me].T; t++)
        for (int c = 0; c < H; c++) {
            double ref = 0, mag = 0;
            for (int j = 0; j < K; j++) {
                int e = in[me].idx[t * K + j];
                if (e < 0) continue;
                double term =
                    (double)in[me].w[t * K + j] * ref_bf16_value(expert_fn(e, in[me].x[t * H + c]));
                ref += term;
                mag += fabs(term);
            }
            double got = ref_bf16_value(out[t * H + c]);
            CHECK(fabs(got - ref) <= mag / 128.0 + 1e-30,
                  "it %d combine token %d channel %d: %g, "
                  "expected %g",
                  it, t, c, got, ref);
        }
    free(y);
    return 0;
}

static int check_ht(ep_group_t *g, int me, int n, struct inputs *in, int it)
{
    const int N = ep_ht_max_recv_tokens(g), E = EPR * n;
    int32_t per_rank[EP_MAX_RANKS], per_expert[EPR * EP_MAX_RANKS];
    uint8_t in_rank[M * EP_MAX_RANKS];
    ep_ht_layout_t lay = {per_rank, per_expert, in_rank};
    ep_status_t st = ep_get_dispatch_layout(g, in[me].idx, in[me].T, &lay, NULL);
    CHECK(st == EP_OK, "layout: %s", ep_group_last_error(g));
    for (int r = 0; r < n; r++) {
        int cnt = 0;
        for (int t = 0; t < in[me].T; t++)
            cnt += goes_to(in[me].idx + t * K, r);
        CHECK(per_rank[r] == cnt, "it %d: %d tokens to rank %d, expected %d", it, per_rank[r], r,
              cnt);
    }
    for (int e = 0; e < E; e++) {
        int cnt = 0;
        for (int t = 0; t < in[me].T; t++)
            cnt += has_expert(in[me].idx + t * K, e);
        CHECK(per_expert[e] == cnt, "it %d: %d tokens to expert %d, expected %d", it, per_expert[e],
              e, cnt);
    }
    ep_ht_dispatch_out_t o = {.capacity = N};
    uint16_t *rx = malloc((size_t)N * H * 2), *res = malloc((size_t)M * H * 2);
    int32_t *ridx = malloc((size_t)N * K * 4), nrecv[EPR];
    float *rw = malloc((size_t)N * K * 4);
    CHECK(rx && res && ridx && rw, "out of memory");
    o.recv_x = rx;
    o.recv_topk_idx = ridx;
    o.recv_topk_weights = rw;
    o.num_recv_per_expert = nrecv;
    ep_ht_dispatch_args_t a = {
        .x = in[me].x, .num_tokens = in[me].T, .topk_idx = in[me].idx, .topk_weights = in[me].w};
    ep_ht_handle_t *hd = NULL;
    st = ep_ht_dispatch(g, &a, &o, &hd);
    CHECK(st == EP_OK, "it %d: ep_ht_dispatch: %s: %s", it, ep_strerror(st),
          ep_group_last_error(g));
    int row = 0, count[EPR] = {0};
    for (int s = 0; s < n; s++)
        for (int t = 0; t < in[s].T; t++) {
            const int32_t *idx = in[s].idx + t * K;
            if (!goes_to(idx, me)) continue;
            CHECK(row < o.num_recv_tokens, "it %d: only %d rows received", it, o.num_recv_tokens);
            CHECK(!memcmp(rx + (size_t)row * H, in[s].x + t * H, 2 * H),
                  "it %d row %d (rank %d token %d): wrong data", it, row, s, t);
            for (int j = 0; j < K; j++) {
                int local = idx[j] >= 0 && idx[j] / EPR == me ? idx[j] % EPR : -1;
                CHECK(ridx[row * K + j] == local, "it %d row %d slot %d: expert %d, expected %d",
                      it, row, j, ridx[row * K + j], local);
                CHECK(rw[row * K + j] == (local >= 0 ? in[s].w[t * K + j] : 0.0f),
                      "it %d row %d slot %d: weight %g", it, row, j, rw[row * K + j]);
                if (local >= 0) count[local]++;
            }
            row++;
        }
    CHECK(o.num_recv_tokens == row, "it %d: %d rows received, expected %d", it, o.num_recv_tokens,
          row);
    for (int l = 0; l < EPR; l++)
        CHECK(nrecv[l] == count[l], "it %d: expert %d got %d, expected %d", it, l, nrecv[l],
              count[l]);
    /* Combine the received rows as they are: token t comes back once per rank it went to. */
    st = ep_ht_combine(g, hd, rx, res, NULL);
    CHECK(st == EP_OK, "it %d: ep_ht_combine: %s: %s", it, ep_strerror(st), ep_group_last_error(g));
    for (int t = 0; t < in[me].T; t++)
        for (int c = 0; c < H; c++) {
            float acc = 0.0f;
            for (int r = 0; r < n; r++)
                if (goes_to(in[me].idx + t * K, r)) acc = acc + ref_bf16_value(in[me].x[t * H + c]);
            uint16_t want = ref_bf16_round(acc);
            CHECK(res[t * H + c] == want, "it %d ht combine token %d channel %d: %04x, want %04x",
                  it, t, c, res[t * H + c], want);
        }
    ep_ht_handle_destroy(hd);
    free(rx);
    free(res);
    free(ridx);
    free(rw);
    return 0;
}

static int rank_main(int me, int n, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.transport = EP_TRANSPORT_RDMA;
    cfg.num_experts = EPR * n;
    cfg.hidden = H;
    cfg.num_topk = K;
    cfg.ll_max_tokens = M;
    cfg.ht_max_tokens = M;
    cfg.timeout_ms = 30000;
    ep_group_t *g = NULL;
    ep_status_t st = ep_group_create(&cfg, bs, &g);
    CHECK(st == EP_OK, "ep_group_create: %s: %s", ep_strerror(st), ep_group_last_error(NULL));
    struct inputs *in = calloc((size_t)n, sizeof *in);
    CHECK(in, "out of memory");
    for (int it = 0; it < ITERS; it++) {
        for (int s = 0; s < n; s++)
            gen(s, n, it, &in[s]);
        if (check_ll(g, me, n, in, it) || check_ht(g, me, n, in, it)) return 1;
    }
    free(in);
    ep_group_destroy(g);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (world_rdma_ports() == 0) {
        printf("SKIP: no verbs device with an active port (run scripts/rdma-vm.sh)\n");
        return WORLD_SKIP;
    }
    world_bootstrap_ms = RDMA_WORLD_BOOTSTRAP_MS;
    int sizes[2] = {2, 4}, nsizes = 2, fails = 0;
    if (argc > 1) {
        sizes[0] = atoi(argv[1]);
        nsizes = 1;
        if (sizes[0] < 1 || sizes[0] > 8) {
            fprintf(stderr, "test_rdma_ep: NRANKS '%s' is not in 1..8\n", argv[1]);
            return 2;
        }
    }
    for (int i = 0; i < nsizes; i++) {
        int n = sizes[i], st[8], bad = 0;
        world_run_ep(n, rank_main, NULL, 240000, st);
        for (int r = 0; r < n; r++)
            if (st[r]) {
                fprintf(stderr, "ll_ht_%dranks: rank %d ended with %d\n", n, r, st[r]);
                bad = 1;
            }
        printf("%s ll_ht_%dranks\n", bad ? "FAIL" : "PASS", n);
        fails += bad;
    }
    return fails ? 1 : 0;
}
