/* The cuda backend's proxy (transport/cuda/proxy.c) over a real tcp wire, without a GPU: the
 * test plays the kernels' part, writing commands into a ring in host memory exactly as
 * epk_ring_push does (fields, then the slot's sequence number with release), and checks what
 * reaches the peer against a model rebuilt from the same seed:
 *  - puts and ADD signals in ring order, a 64-slot ring wrapped many times (the producer waits
 *    on the head word when it is full), runs of contiguous puts (merged by the proxy) mixed
 *    with scattered ones and with puts whose source and destination offsets differ;
 *  - a peer that dies: the proxy reports it through the kernels' error words (EPK_CODE_PEER,
 *    the rank) while ranks that are alive are still served;
 *  - malformed commands (a rank out of range, an unknown op) are refused with what was wrong;
 *  - drain waits until every issued command ran.
 * With EP_TEST_WIRE=rdma the ranks use the verbs wire instead (scripts/rdma-vm.sh runs it so on
 * two Soft-RoCE devices): the same commands become RDMA WRITEs and fenced atomics. */
#include "tcp_test.h"

#include "proxy.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#define SLOTS 64u

/* A rank's wire: tcp (tcp_test.h), or verbs when EP_TEST_WIRE=rdma. */
static int proxy_rank_setup(int rank, int n, int port, size_t bytes, unsigned timeout_ms,
                            struct rank_ctx *c)
{
    if (rank_setup(rank, n, port, bytes, timeout_ms, c)) return 1;
    const char *w = getenv("EP_TEST_WIRE");
    if (!w || strcmp(w, "rdma")) return 0;
#ifdef EP_HAVE_RDMA
    c->w->ops->destroy(c->w);
    c->w = NULL;
    ep_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.timeout_ms = timeout_ms;
    CHECK(ep_wire_rdma_create(&cfg, rank, n, &c->w) == EP_OK, "rdma wire create");
    return 0;
#else
    CHECK(0, "EP_TEST_WIRE=rdma, but this libep has no rdma wire");
#endif
}
#define REGION (128u << 10) /* data region per source rank */
#define SIG_OFF(n) ((size_t)(n)*REGION + 8 * 64)
#define BYTES(n) (SIG_OFF(n) + 64 * 8)

/* The proxy's ring in host memory, and the producer's side of it. */
struct ring {
    epk_cmd_t slots[SLOTS];
    _Atomic uint64_t head;
    uint64_t tail;
    int err[EPK_ERR_WORDS];
    ep_cuda_proxy_t px;
};

static int ring_start(struct ring *r, ep_wire_t *w)
{
    memset(r, 0, sizeof *r);
    r->px.wire = w;
    r->px.slots = r->slots;
    r->px.head = &r->head;
    r->px.nslots = SLOTS;
    r->px.err = r->err;
    CHECK(ep_cuda_proxy_start(&r->px) == EP_OK, "proxy start");
    return 0;
}

/* What epk_ring_push does on the GPU. */
static int push(struct ring *r, int op, int peer, uint64_t a, uint64_t b, uint32_t len)
{
    const uint64_t slot = r->tail++;
    const uint64_t until = world_now_ms() + 10000;
    while (slot - atomic_load_explicit(&r->head, memory_order_acquire) >= SLOTS) {
        CHECK(world_now_ms() < until, "ring stayed full (head %llu, slot %llu)",
              (unsigned long long)atomic_load(&r->head), (unsigned long long)slot);
        usleep(50);
    }
    epk_cmd_t *c = &r->slots[slot % SLOTS];
    c->a = a;
    c->b = b;
    c->len = len;
    c->peer = (uint16_t)peer;
    c->op = (uint8_t)op;
    __atomic_store_n(&c->seq, (uint32_t)(slot + 1), __ATOMIC_RELEASE);
    return 0;
}

/* ---- ordered, merged puts ------------------------------------------------------------------ */

#define ROUNDS 30

/* One round's puts from rank 0 into region 0 of ranks 1 and 2. Source and destination cursors
 * move on together (contiguous on both sides: the proxy merges them, unless the destination
 * rank changed), or one of them jumps (contiguous on one side only: must not be merged), or
 * both jump. Applies the puts to model[rank - 1] (what that rank's region must hold) as it
 * goes; with r == NULL only that (ranks 1 and 2 replay rank 0's choices from the same seed). */
static int round_puts(uint64_t *seed, struct ring *r, uint8_t (*model)[REGION],
                      const uint8_t *src_buf)
{
    const int pieces = 60 + (int)(world_rand(seed) % 120);
    size_t src = 0, dst = 0;
    int peer = 1;
    for (int i = 0; i < pieces; ++i) {
        const uint32_t len = 1 + (uint32_t)(world_rand(seed) % 2048);
        const unsigned kind = (unsigned)(world_rand(seed) % 5);
        if (i == 0 || kind == 0 || kind == 1 || src + len > REGION)
            src = world_rand(seed) % (REGION - len);
        if (i == 0 || kind == 0 || kind == 2 || dst + len > REGION)
            dst = world_rand(seed) % (REGION - len);
        if (kind == 3) peer = 3 - peer; /* the other rank, cursors running on */
        memcpy(model[peer - 1] + dst, src_buf + src, len);
        if (r && push(r, EPK_CMD_PUT, peer, src, dst, len)) return 1;
        src += len;
        dst += len;
    }
    return 0;
}

static int rank_ordered(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (proxy_rank_setup(rank, n, port, BYTES(n), 8000, &c) || rank_connect(&c) || barrier(&c))
        return 1;
    uint64_t seed = 0x5eedull;
    static uint8_t model[2][REGION];
    memset(model, 0, sizeof model);
    if (rank == 0) {
        static struct ring r;
        if (ring_start(&r, c.w)) return 1;
        for (int round = 1; round <= ROUNDS; ++round) {
            world_fill(&seed, c.buf, REGION); /* new source bytes every round */
            if (round_puts(&seed, &r, model, c.buf)) return 1;
            for (int d = 1; d < n; ++d)
                if (push(&r, EPK_CMD_SIGNAL_ADD, d, 1, SIG_OFF(n), 0)) return 1;
            /* the sources may change once both ranks have seen the round */
            for (int d = 1; d < n; ++d)
                CHECK(ep_wire_wait(c.w, SIG_OFF(n) + 8 * (size_t)d, (uint64_t)round, d) == EP_OK,
                      "ack %d from rank %d: %s", round, d, c.w->error);
        }
        CHECK(ep_cuda_proxy_drain(&r.px, r.tail, 5000) == EP_OK, "drain");
        CHECK(atomic_load(&r.px.done) == r.tail, "done %llu of %llu",
              (unsigned long long)atomic_load(&r.px.done), (unsigned long long)r.tail);
        CHECK(r.err[EPK_ERR_CODE] == EPK_CODE_OK, "error code %d: %s", r.err[EPK_ERR_CODE],
              r.px.error);
        CHECK(r.tail > 10 * SLOTS, "the ring wrapped only %llu commands",
              (unsigned long long)r.tail);
        ep_cuda_proxy_stop(&r.px);
    } else {
        static uint8_t src_model[REGION];
        for (int round = 1; round <= ROUNDS; ++round) {
            world_fill(&seed, src_model, REGION);
            if (round_puts(&seed, NULL, model, src_model)) return 1;
            CHECK(ep_wire_wait(c.w, SIG_OFF(n), (uint64_t)round, 0) == EP_OK, "round %d: %s", round,
                  c.w->error);
            for (size_t i = 0; i < REGION; ++i)
                CHECK(c.buf[i] == model[rank - 1][i], "round %d: byte %zu is %u, expected %u",
                      round, i, c.buf[i], model[rank - 1][i]);
            CHECK(c.w->ops->signal(c.w, 0, SIG_OFF(n) + 8 * (size_t)rank, 1, EP_SIGNAL_ADD) ==
                      EP_OK,
                  "ack");
        }
    }
    if (barrier(&c)) return 1;
    rank_teardown(&c);
    return 0;
}

static void test_puts_and_signals_arrive_in_ring_order(void **state)
{
    assert_int_equal(world_run_all(3, rank_ordered, NULL, 60000), 0);
}

/* ---- failures ----------------------------------------------------------------------------- */

/* Rank 2 dies after the mesh is up; rank 0's proxy reports it to the kernels (err words)
 * naming it, and still carries rank 0's commands to rank 1. */
static int rank_peer_dies(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (proxy_rank_setup(rank, n, port, BYTES(n), 8000, &c) || rank_connect(&c) || barrier(&c))
        return 1;
    if (rank == 2) kill(getpid(), SIGKILL);
    if (rank == 0) {
        static struct ring r;
        if (ring_start(&r, c.w)) return 1;
        const uint64_t t0 = world_now_ms();
        /* tcp sees the close at once; verbs only when its retries run out (within timeout) */
        while (r.err[EPK_ERR_CODE] == EPK_CODE_OK && world_now_ms() - t0 < 8000 + 4000) {
            if (push(&r, EPK_CMD_PUT, 2, 0, 0, 64)) return 1;
            usleep(2000);
        }
        CHECK(r.err[EPK_ERR_CODE] == EPK_CODE_PEER, "error code %d after %llu ms",
              r.err[EPK_ERR_CODE], (unsigned long long)(world_now_ms() - t0));
        CHECK(r.err[EPK_ERR_PEER] == 2, "blamed rank %d", r.err[EPK_ERR_PEER]);
        fprintf(stderr, "rank 0: as expected: peer %d, %s\n", r.err[EPK_ERR_PEER],
                r.px.error[0] ? r.px.error : c.w->error);
        memset(c.buf, 0x5a, 256);
        if (push(&r, EPK_CMD_PUT, 1, 0, 1024, 256) ||
            push(&r, EPK_CMD_SIGNAL_ADD, 1, 1, SIG_OFF(n), 0))
            return 1;
        CHECK(ep_cuda_proxy_drain(&r.px, r.tail, 5000) == EP_ERR_PEER,
              "drain after a failure must say so");
        ep_cuda_proxy_stop(&r.px);
    } else {
        /* polled directly: this rank's own waits give up once its wire lost rank 2 too */
        _Atomic uint64_t *word = (_Atomic uint64_t *)(c.buf + SIG_OFF(n));
        const uint64_t until = world_now_ms() + 10000;
        while (atomic_load_explicit(word, memory_order_acquire) < 1 && world_now_ms() < until)
            usleep(1000);
        CHECK(atomic_load(word) == 1, "no signal from rank 0 after rank 2 died");
        for (int i = 0; i < 256; ++i)
            CHECK(c.buf[1024 + i] == 0x5a, "byte %d from rank 0 differs", i);
    }
    rank_teardown(&c);
    return 0;
}

static void test_dead_peer_is_reported_to_the_kernels(void **state)
{
    int status[3];
    world_run(3, rank_peer_dies, NULL, 40000, status);
    assert_int_equal(status[0], 0);
    assert_int_equal(status[1], 0);
    assert_int_equal(status[2], WORLD_SIGNALED(SIGKILL));
}

/* Commands a kernel should never write are refused, the first one described. */
static int rank_malformed(int rank, int n, int port, void *arg)
{
    const int which = *(const int *)arg;
    struct rank_ctx c;
    if (proxy_rank_setup(rank, n, port, BYTES(n), 4000, &c) || rank_connect(&c) || barrier(&c))
        return 1;
    if (rank == 0) {
        static struct ring r;
        if (ring_start(&r, c.w)) return 1;
        if (which == 0 && push(&r, EPK_CMD_PUT, 7, 0, 0, 8)) return 1;
        if (which == 1 && push(&r, 99, 1, 0, 0, 8)) return 1;
        if (which == 2 && push(&r, EPK_CMD_PUT, 1, 0, BYTES(n) - 4, 8)) return 1;
        const uint64_t t0 = world_now_ms();
        while (r.err[EPK_ERR_CODE] == EPK_CODE_OK && world_now_ms() - t0 < 3000)
            usleep(1000);
        CHECK(r.err[EPK_ERR_CODE] == EPK_CODE_PEER, "error code %d", r.err[EPK_ERR_CODE]);
        const char *want[] = {"command 1 for rank 7", "unknown command 99 for rank 1",
                              "put of 8 bytes to rank 1"};
        CHECK(strstr(r.px.error, want[which]) != NULL, "message: %s", r.px.error);
        fprintf(stderr, "rank 0: as expected: %s\n", r.px.error);
        ep_cuda_proxy_stop(&r.px);
    }
    if (barrier(&c)) return 1;
    rank_teardown(&c);
    return 0;
}

static void test_malformed_commands_are_refused(void **state)
{
    for (int which = 0; which < 3; ++which) {
        int status[2];
        world_run(2, rank_malformed, &which, 20000, status);
        assert_int_equal(status[0], 0);
        assert_int_equal(status[1], 0);
    }
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_puts_and_signals_arrive_in_ring_order),
        cmocka_unit_test(test_dead_peer_is_reported_to_the_kernels),
        cmocka_unit_test(test_malformed_commands_are_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
