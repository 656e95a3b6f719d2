/* The verbs wire between forked ranks on real verbs devices (Soft-RoCE in the test VM):
 * puts (staged, zero-copy, chunked) and SET/ADD signals checked byte for byte against data
 * regenerated independently on the receiver; the same over rdma_cm; a wrong rkey, a QP forced
 * into the error state and a killed peer each fail with an error naming that peer within the
 * timeout while the other peers are still served; a bad option string names the option.
 * usage: test_rdma_wire [TEST...]; exit 77 (skip) without an active verbs port. */
#include "rdma/rdma.h"
#include "rdma_world.h"
#include "wire.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NR 3
#define SLOT (1536u << 10)      /* per-source data region */
#define WORDS 64                /* sig[R], ack[R], misc */
#define OUTBOX_OFF (WORDS * 8u) /* zero-copy put sources, then the slots */
#define DATA_OFF (OUTBOX_OFF + SLOT)
#define BUF_BYTES (DATA_OFF + (size_t)NR * SLOT)
#define TIMEOUT_MS 3000u

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Byte i of what src sends dst in round r: a pure function, recomputed by the receiver. */
static uint8_t pattern(int src, int dst, int round, size_t i)
{
    uint64_t word =
        mix(((uint64_t)src << 56) ^ ((uint64_t)dst << 48) ^ ((uint64_t)round << 32) ^ (i / 8));
    return (uint8_t)(word >> (8 * (i % 8)));
}

static size_t round_len(int src, int dst, int round)
{
    if (round == 0) return SLOT - 3; /* larger than a staging chunk: split */
    return 1 + (size_t)(mix((uint64_t)(src * 977 + dst * 31 + round)) % (64u << 10));
}

struct wire_env {
    ep_wire_t *w;
    uint8_t *buf;
};

static int open_wire(int rank, int nranks, const ep_bootstrap_t *bs, const char *opts,
                     unsigned timeout_ms, struct wire_env *e)
{
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.timeout_ms = timeout_ms;
    cfg.rdma_options = opts;
    e->buf = aligned_alloc(64, BUF_BYTES);
    CHECK(e->buf, "out of memory");
    memset(e->buf, 0, BUF_BYTES);
    CHECK(ep_wire_rdma_create(&cfg, rank, nranks, &e->w) == EP_OK, "create");
    ep_status_t st = e->w->ops->connect(e->w, bs, e->buf, BUF_BYTES);
    CHECK(st == EP_OK, "connect: %s: %s", ep_strerror(st), e->w->error);
    const struct rdma_port_sel *s = ep_wire_rdma_port(e->w);
    printf("rank %d: %s port %d gid %d%s\n", rank, s->name, s->port, s->gid_index,
           ep_wire_rdma_uses_cm(e->w) ? " (rdma_cm)" : "");
    return 0;
}

static void close_wire(struct wire_env *e)
{
    if (e->w) e->w->ops->destroy(e->w);
    free(e->buf);
}

/* ---- puts and signals --------------------------------------------------------------------- */

static int rounds_main(int me, int n, const ep_bootstrap_t *bs, void *arg)
{
    const char *opts = arg;
    struct wire_env e;
    if (open_wire(me, n, bs, opts, 20000, &e)) return 1;
    ep_wire_t *w = e.w;
    uint8_t *tmp = malloc(SLOT);
    CHECK(tmp, "out of memory");
    const int rounds = 12;
    for (int round = 0; round < rounds; round++) {
        for (int d = 0; d < n; d++) {
            /* dst acknowledged the previous round (ADD 1 into ack[d]) */
            CHECK(ep_wire_wait(w, 8 * (size_t)(n + d), (uint64_t)round, d) == EP_OK, "ack: %s",
                  w->error);
            size_t len = round_len(me, d, round);
            size_t off = DATA_OFF + (size_t)me * SLOT;
            if (round % 3 == 2 && d != me) {
                /* zero-copy from this rank's outbox; unchanged until the flush below */
                for (size_t i = 0; i < len; i++)
                    e.buf[OUTBOX_OFF + i] = pattern(me, d, round, i);
                CHECK(ep_wire_rdma_put_local(w, d, off, OUTBOX_OFF, len) == EP_OK, "put_local");
                CHECK(w->ops->flush(w) == EP_OK, "flush: %s", w->error);
            } else {
                for (size_t i = 0; i < len; i++)
                    tmp[i] = pattern(me, d, round, i);
                /* split in two puts to check that both land before the signal */
                CHECK(w->ops->put(w, d, off, tmp, len / 2) == EP_OK, "put");
                CHECK(w->ops->put(w, d, off + len / 2, tmp + len / 2, len - len / 2) == EP_OK,
                      "put");
                memset(tmp, 0xee, len); /* the wire copied it: reuse may not change the data */
            }
            CHECK(w->ops->signal(w, d, 8 * (size_t)me, (uint64_t)round + 1, EP_SIGNAL_SET) == EP_OK,
                  "signal");
        }
        CHECK(w->ops->flush(w) == EP_OK, "flush: %s", w->error);
        for (int s = 0; s < n; s++) {
            CHECK(ep_wire_wait(w, 8 * (size_t)s, (uint64_t)round + 1, s) == EP_OK, "sig: %s",
                  w->error);
            size_t len = round_len(s, me, round);
            const uint8_t *got = e.buf + DATA_OFF + (size_t)s * SLOT;
            for (size_t i = 0; i < len; i++)
                CHECK(got[i] == pattern(s, me, round, i),
                      "round %d: byte %zu of %zu from rank %d is 0x%02x, expected 0x%02x", round, i,
                      len, s, got[i], pattern(s, me, round, i));
            CHECK(w->ops->signal(w, s, 8 * (size_t)(n + me), 1, EP_SIGNAL_ADD) == EP_OK, "ack");
        }
        CHECK(w->ops->flush(w) == EP_OK, "flush: %s", w->error);
    }
    /* Everyone's last acks arrived before anyone tears down. */
    for (int d = 0; d < n; d++)
        CHECK(ep_wire_wait(w, 8 * (size_t)(n + d), (uint64_t)rounds, d) == EP_OK, "last ack");
    CHECK(bs->barrier(bs->ctx, 20000) == 0, "barrier");
    free(tmp);
    close_wire(&e);
    return 0;
}

/* ---- failures ----------------------------------------------------------------------------- */

enum fault { FAULT_RKEY, FAULT_QP_ERR, FAULT_KILL };

/* Rank 0 talks to rank 2 after rank 1 failed: rank 2 must still get the data. */
static int serve_rank2(struct wire_env *e, int me)
{
    ep_wire_t *w = e->w;
    uint8_t msg[4096];
    for (size_t i = 0; i < sizeof msg; i++)
        msg[i] = pattern(0, 2, 99, i);
    size_t off = DATA_OFF;
    if (me == 0) {
        CHECK(w->ops->put(w, 2, off, msg, sizeof msg) == EP_OK, "put to healthy rank 2: %s",
              w->error);
        CHECK(w->ops->signal(w, 2, 8 * 40, 7, EP_SIGNAL_SET) == EP_OK, "signal rank 2");
        ep_status_t st = w->ops->flush(w);
        CHECK(st != EP_OK, "flush after rank 1 failed must still report it");
    } else if (me == 2) {
        ep_status_t st = ep_wire_wait(w, 8 * 40, 7, 0);
        CHECK(st == EP_OK, "rank 2 was not served after rank 1 failed: %s", w->error);
        CHECK(!memcmp(e->buf + off, msg, sizeof msg), "rank 2 got the wrong bytes");
    }
    return 0;
}

static int fault_main(int me, int n, const ep_bootstrap_t *bs, void *arg)
{
    enum fault f = *(enum fault *)arg;
    struct wire_env e;
    if (open_wire(me, n, bs, NULL, me == 2 ? 3 * TIMEOUT_MS : TIMEOUT_MS, &e)) return 1;
    ep_wire_t *w = e.w;
    CHECK(bs->barrier(bs->ctx, 20000) == 0, "barrier");
    if (f == FAULT_KILL && me == 1) raise(SIGKILL);
    if (me == 0) {
        uint8_t data[8192];
        memset(data, 0x5a, sizeof data);
        if (f == FAULT_RKEY) ep_wire_rdma_set_rkey(w, 1, ep_wire_rdma_rkey(w, 1) ^ 0xa5);
        if (f == FAULT_QP_ERR) {
            struct ibv_qp_attr a = {.qp_state = IBV_QPS_ERR};
            CHECK(ibv_modify_qp(ep_wire_rdma_qp(w, 1), &a, IBV_QP_STATE) == 0, "modify_qp(ERR)");
        }
        if (f == FAULT_KILL) usleep(200000); /* rank 1 is gone */
        uint64_t t0 = world_now_ms();
        ep_status_t st = EP_OK;
        for (int i = 0; i < 100 && st == EP_OK; i++) {
            st = w->ops->put(w, 1, DATA_OFF, data, sizeof data);
            if (st == EP_OK) st = w->ops->flush(w);
        }
        uint64_t took = world_now_ms() - t0;
        printf("rank 0: fault %d: %s after %llu ms: %s\n", (int)f, ep_strerror(st),
               (unsigned long long)took, w->error);
        CHECK(st != EP_OK, "writes to the failed rank 1 succeeded");
        CHECK(atomic_load(&w->failed_peer) == 1, "failed peer %d, expected 1",
              atomic_load(&w->failed_peer));
        CHECK(strstr(w->error, "rank 1"), "the error does not name rank 1: %s", w->error);
        CHECK(took <= TIMEOUT_MS + 2500, "took %llu ms, timeout %u ms", (unsigned long long)took,
              TIMEOUT_MS);
        if (f == FAULT_RKEY)
            CHECK(strstr(w->error, "access"), "a wrong rkey should be a remote access error: %s",
                  w->error);
        if (f == FAULT_QP_ERR)
            CHECK(strstr(w->error, "error state"), "expected the error state: %s", w->error);
    }
    if (me != 1 && serve_rank2(&e, me)) return 1;
    if (f == FAULT_KILL && me == 2) {
        /* a signal rank 1 will never send: the wait names it */
        ep_status_t st = ep_wire_wait(w, 8 * 41, 1, 1);
        CHECK(st == EP_ERR_TIMEOUT && strstr(w->error, "rank 1"),
              "wait on the dead rank 1: %s (%s)", ep_strerror(st), w->error);
    }
    if (f != FAULT_KILL) CHECK(bs->barrier(bs->ctx, 20000) == 0, "final barrier");
    close_wire(&e);
    return 0;
}

static int bad_option_main(int me, int n, const ep_bootstrap_t *bs, void *arg)
{
    static const char *const cases[][2] = {
        {"mtu=300", "mtu=300"},
        {"device=nosuchdev", "nosuchdev"},
        {"gid_index=9999", "gid_index=9999"},
        {"colour=blue", "unknown key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ep_config_t cfg;
        ep_config_init(&cfg);
        cfg.rdma_options = cases[i][0];
        ep_wire_t *w = NULL;
        uint8_t *buf = aligned_alloc(64, 4096);
        CHECK(buf && ep_wire_rdma_create(&cfg, me, n, &w) == EP_OK, "create");
        ep_status_t st = w->ops->connect(w, bs, buf, 4096);
        printf("rank %d: '%s': %s: %s\n", me, cases[i][0], ep_strerror(st), w->error);
        CHECK(st != EP_OK && strstr(w->error, cases[i][1]), "'%s' gave %s: %s", cases[i][0],
              ep_strerror(st), w->error);
        w->ops->destroy(w);
        free(buf);
    }
    return 0;
}

/* ---- driver ------------------------------------------------------------------------------- */

static int expect(const char *name, int n, const int *status, const int *want)
{
    int bad = 0;
    for (int r = 0; r < n; r++)
        if (status[r] != want[r]) {
            fprintf(stderr, "%s: rank %d ended with %d, expected %d\n", name, r, status[r],
                    want[r]);
            bad = 1;
        }
    printf("%s %s\n", bad ? "FAIL" : "PASS", name);
    return bad;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ports = world_rdma_ports();
    if (ports == 0) {
        printf("SKIP: no verbs device with an active port (run scripts/rdma-vm.sh)\n");
        return WORLD_SKIP;
    }
    world_bootstrap_ms = RDMA_WORLD_BOOTSTRAP_MS;
    int fails = 0, st[NR];
    const int ok[NR] = {0, 0, 0}, killed[NR] = {0, WORLD_SIGNALED(SIGKILL), 0};
    for (int i = 1; i <= argc; i++) {
        const char *t = i < argc ? argv[i] : NULL;
        if (argc > 1 && !t) break;
#define WANT(name) (!t || !strcmp(t, name))
        if (WANT("rounds")) {
            world_run_ep(NR, rounds_main, (void *)"", 120000, st);
            fails += expect("rounds", NR, st, ok);
        }
        if (WANT("rounds_small_stage")) {
            world_run_ep(NR, rounds_main, (void *)"stage_kb=256,sq_depth=16", 120000, st);
            fails += expect("rounds_small_stage", NR, st, ok);
        }
        if (WANT("rdma_cm")) {
            world_run_ep(NR, rounds_main, (void *)"cm=1", 120000, st);
            fails += expect("rdma_cm", NR, st, ok);
        }
        enum fault f;
        if (WANT("wrong_rkey")) {
            f = FAULT_RKEY;
            world_run_ep(NR, fault_main, &f, 60000, st);
            fails += expect("wrong_rkey", NR, st, ok);
        }
        if (WANT("qp_error")) {
            f = FAULT_QP_ERR;
            world_run_ep(NR, fault_main, &f, 60000, st);
            fails += expect("qp_error", NR, st, ok);
        }
        if (WANT("killed_peer")) {
            f = FAULT_KILL;
            world_run_ep(NR, fault_main, &f, 60000, st);
            fails += expect("killed_peer", NR, st, killed);
        }
        if (WANT("bad_option")) {
            world_run_ep(1, bad_option_main, NULL, 30000, st);
            fails += expect("bad_option", 1, st, ok);
        }
        if (!t) break;
    }
    return fails ? 1 : 0;
}
