/* tcp wire: forked ranks on loopback put random bytes into each other's symmetric buffers and
 * signal; receivers compare against an expectation rebuilt from the same seed. Also large puts,
 * puts to self, ordering of many small puts, a peer that dies, a peer that dies while the mesh
 * is built, stray connections to a listener, and malformed frames from a fake rank. */
#include "tcp_test.h"

#include "wire_tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#define SEED 0xc0ffee1234ull

/* ---- random puts, SET and ADD signals ----------------------------------------------------- */

/* Layout: region[src] of REGION bytes per source rank (puts of different sources never
 * overlap, so the result does not depend on how their streams interleave), then one signal
 * word per source. */
#define REGION (256u << 10)
#define ROUNDS 4
#define PUTS_PER_ROUND 40

struct put_desc {
    int dst;
    size_t off; /* inside the source's region */
    size_t len;
};

/* The puts that src makes in round r, and their bytes. Every rank can replay any source. */
static void round_puts(int src, int r, int n, struct put_desc *d, uint8_t **data)
{
    uint64_t s = SEED ^ (uint64_t)src * 0x100000001b3ull ^ (uint64_t)r << 40;
    for (int i = 0; i < PUTS_PER_ROUND; i++) {
        d[i].dst = (int)(world_rand(&s) % (uint64_t)n);
        d[i].off = world_rand(&s) % REGION;
        size_t max = REGION - d[i].off;
        /* Mostly small, some up to 64 KiB, so that both receive paths are taken. */
        size_t cap = world_rand(&s) % 4 == 0 ? (64u << 10) : 300;
        if (cap > max) cap = max;
        d[i].len = 1 + world_rand(&s) % cap;
        world_fill(&s, data[i], d[i].len);
    }
}

static int rank_random_puts(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    size_t sig_base = (size_t)n * REGION;
    if (rank_setup(rank, n, port, sig_base + (size_t)n * 8, 10000, &c) || rank_connect(&c))
        return 1;
    ep_wire_t *w = c.w;
    uint8_t *expect = calloc((size_t)n, REGION);
    struct put_desc d[PUTS_PER_ROUND];
    uint8_t *data[PUTS_PER_ROUND];
    for (int i = 0; i < PUTS_PER_ROUND; i++)
        data[i] = malloc(64u << 10);
    CHECK(expect && data[PUTS_PER_ROUND - 1], "out of memory");

    for (int r = 0; r < ROUNDS; r++) {
        round_puts(rank, r, n, d, data);
        for (int i = 0; i < PUTS_PER_ROUND; i++) {
            ep_status_t st =
                w->ops->put(w, d[i].dst, (size_t)rank * REGION + d[i].off, data[i], d[i].len);
            CHECK(st == EP_OK, "put %d of round %d to rank %d: %d %s", i, r, d[i].dst, st,
                  w->error);
        }
        /* Even rounds SET the word to r + 1, odd rounds ADD 1 to r: both reach r + 1. */
        for (int dst = 0; dst < n; dst++) {
            ep_status_t st =
                w->ops->signal(w, dst, sig_base + (size_t)rank * 8, r % 2 ? 1 : (uint64_t)r + 1,
                               r % 2 ? EP_SIGNAL_ADD : EP_SIGNAL_SET);
            CHECK(st == EP_OK, "signal to rank %d: %d %s", dst, st, w->error);
        }
        CHECK(w->ops->flush(w) == EP_OK, "flush: %s", w->error);

        for (int src = 0; src < n; src++) {
            round_puts(src, r, n, d, data);
            for (int i = 0; i < PUTS_PER_ROUND; i++)
                if (d[i].dst == rank)
                    memcpy(expect + (size_t)src * REGION + d[i].off, data[i], d[i].len);
            ep_status_t st = ep_wire_wait(w, sig_base + (size_t)src * 8, (uint64_t)r + 1, src);
            CHECK(st == EP_OK, "round %d: wait for rank %d: %d %s", r, src, st, w->error);
            uint64_t word;
            memcpy(&word, c.buf + sig_base + (size_t)src * 8, 8);
            CHECK(word == (uint64_t)r + 1, "round %d: signal word of rank %d is %llu", r, src,
                  (unsigned long long)word);
            const uint8_t *got = c.buf + (size_t)src * REGION,
                          *want = expect + (size_t)src * REGION;
            for (size_t b = 0; b < REGION; b++)
                CHECK(got[b] == want[b],
                      "round %d: byte %zu of rank %d's region is %02x, expected %02x", r, b, src,
                      got[b], want[b]);
        }
        if (barrier(&c)) /* nobody overwrites a region before its receiver compared it */
            return 1;
    }
    for (int i = 0; i < PUTS_PER_ROUND; i++)
        free(data[i]);
    free(expect);
    rank_teardown(&c);
    return 0;
}

static void test_random_puts_then_signals(void **state)
{
    for (int n = 2; n <= 4; n++) {
        assert_int_equal(world_run_all(n, rank_random_puts, NULL, 60000), 0);
    }
}

/* Every rank ADDs to one counter word of every rank (itself included) from many signals at
 * once; the sum must be exact. */
#define ADDS 2000

static int rank_add_signals(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 64, 10000, &c) || rank_connect(&c)) return 1;
    ep_wire_t *w = c.w;
    for (int i = 0; i < ADDS; i++)
        for (int dst = 0; dst < n; dst++) {
            ep_status_t st =
                w->ops->signal(w, (dst + rank) % n, 8, (uint64_t)rank + 1, EP_SIGNAL_ADD);
            CHECK(st == EP_OK, "add %d to rank %d: %d %s", i, dst, st, w->error);
        }
    uint64_t want = 0;
    for (int r = 0; r < n; r++)
        want += (uint64_t)ADDS * (uint64_t)(r + 1);
    CHECK(ep_wire_wait(w, 8, want, -1) == EP_OK, "wait for %llu: %s", (unsigned long long)want,
          w->error);
    if (barrier(&c)) return 1;
    uint64_t got;
    memcpy(&got, c.buf + 8, 8);
    CHECK(got == want, "counter is %llu, expected %llu", (unsigned long long)got,
          (unsigned long long)want);
    rank_teardown(&c);
    return 0;
}

static void test_add_signals_sum_exactly(void **state)
{
    assert_int_equal(world_run_all(3, rank_add_signals, NULL, 60000), 0);
}

/* ---- large puts --------------------------------------------------------------------------- */

#define BIG (32u << 20)

static int rank_large_put(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    size_t sig = (size_t)n * BIG;
    if (rank_setup(rank, n, port, sig + 64, 20000, &c) || rank_connect(&c)) return 1;
    ep_wire_t *w = c.w;
    uint8_t *src = malloc(BIG), *want = malloc(BIG);
    CHECK(src && want, "out of memory");
    uint64_t s = SEED + (uint64_t)rank;
    world_fill(&s, src, BIG);
    /* Both ranks send at once: each must keep receiving while its own put is blocked. */
    int peer = (rank + 1) % n;
    CHECK(w->ops->put(w, peer, (size_t)rank * BIG, src, BIG) == EP_OK, "put: %s", w->error);
    CHECK(w->ops->signal(w, peer, sig, 1, EP_SIGNAL_SET) == EP_OK, "signal: %s", w->error);
    int from = (rank + n - 1) % n;
    CHECK(ep_wire_wait(w, sig, 1, from) == EP_OK, "wait: %s", w->error);
    s = SEED + (uint64_t)from;
    world_fill(&s, want, BIG);
    CHECK(memcmp(c.buf + (size_t)from * BIG, want, BIG) == 0, "32 MiB from rank %d differ", from);
    CHECK(w->ops->flush(w) == EP_OK, "flush: %s", w->error);
    if (barrier(&c)) return 1;
    free(src);
    free(want);
    rank_teardown(&c);
    return 0;
}

static void test_large_puts_both_directions(void **state)
{
    assert_int_equal(world_run_all(2, rank_large_put, NULL, 60000), 0);
}

/* ---- put to self -------------------------------------------------------------------------- */

static int rank_self_put(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 4096, 5000, &c) || rank_connect(&c)) return 1;
    ep_wire_t *w = c.w;
    uint8_t src[1000];
    uint64_t s = SEED ^ 77;
    world_fill(&s, src, sizeof src);
    CHECK(w->ops->put(w, rank, 1024, src, sizeof src) == EP_OK, "self put: %s", w->error);
    CHECK(w->ops->signal(w, rank, 64, 5, EP_SIGNAL_SET) == EP_OK, "self signal");
    CHECK(w->ops->signal(w, rank, 64, 3, EP_SIGNAL_ADD) == EP_OK, "self add");
    CHECK(ep_wire_wait(w, 64, 8, rank) == EP_OK, "wait: %s", w->error);
    CHECK(memcmp(c.buf + 1024, src, sizeof src) == 0, "self put bytes differ");
    for (size_t b = 0; b < 1024; b++)
        CHECK(c.buf[b] == (b >= 64 && b < 72 ? c.buf[b] : 0), "byte %zu outside the put touched",
              b);
    /* Out of bounds and misaligned requests are refused without touching the wire. */
    CHECK(w->ops->put(w, rank, 4000, src, 100) == EP_ERR_INVALID, "oob self put accepted");
    CHECK(w->ops->put(w, 1 - rank, 4090, src, 7) == EP_ERR_INVALID, "oob put accepted");
    CHECK(w->ops->signal(w, 1 - rank, 12, 1, EP_SIGNAL_SET) == EP_ERR_INVALID,
          "misaligned signal accepted");
    CHECK(w->ops->put(w, 2, 0, src, 1) == EP_ERR_INVALID, "put to rank 2 of 2 accepted");
    CHECK(atomic_load(&w->failed_peer) == -1, "argument errors failed the wire");
    if (barrier(&c)) return 1;
    rank_teardown(&c);
    return 0;
}

static void test_put_to_self_copies_locally(void **state)
{
    assert_int_equal(world_run_all(2, rank_self_put, NULL, 20000), 0);
}

/* Small puts gather in the send queue until a signal or flush; even without either they
 * leave once the progress thread next looks. */
static int rank_unsignalled(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 4096, 5000, &c) || rank_connect(&c) || barrier(&c)) return 1;
    ep_wire_t *w = c.w;
    uint8_t msg[48];
    memset(msg, 0x5a, sizeof msg);
    if (rank == 0)
        CHECK(w->ops->put(w, 1, 128, msg, sizeof msg) == EP_OK, "put: %s", w->error);
    else {
        uint64_t until = world_now_ms() + 3000;
        while (memcmp(c.buf + 128, msg, sizeof msg) && world_now_ms() < until)
            usleep(1000);
        /* Reading bytes a put writes without a signal is a race in general; here nothing
         * else writes them, and the loop only needs them to appear eventually. */
        CHECK(memcmp(c.buf + 128, msg, sizeof msg) == 0, "an unsignalled put never arrived");
    }
    if (barrier(&c)) return 1;
    rank_teardown(&c);
    return 0;
}

static void test_unsignalled_puts_still_leave(void **state)
{
    assert_int_equal(world_run_all(2, rank_unsignalled, NULL, 20000), 0);
}

/* ---- ordering of many small puts ---------------------------------------------------------- */

/* Each source appends SMALL_PUTS records of 8..64 bytes to a log in every other rank's buffer
 * and publishes the number of records every 37 puts. A receiver that sees count k must see the
 * first k records complete: records are never rewritten, so no check races the wire. */
#define SMALL_PUTS 20000
#define LOG_BYTES (SMALL_PUTS * 64u)

static size_t record_len(int src, int i)
{
    uint64_t s = SEED ^ (uint64_t)src << 20 ^ (uint64_t)i;
    return 8 + world_rand(&s) % 57;
}

static void record_bytes(int src, int i, uint8_t *dst, size_t len)
{
    uint64_t s = SEED ^ 0xabcdull ^ (uint64_t)src << 24 ^ (uint64_t)i << 1;
    world_fill(&s, dst, len);
}

static int rank_ordering(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    size_t sig = (size_t)n * LOG_BYTES;
    if (rank_setup(rank, n, port, sig + (size_t)n * 8, 10000, &c) || rank_connect(&c)) return 1;
    ep_wire_t *w = c.w;
    uint8_t rec[64], want[64];
    size_t pos = 0;
    for (int i = 0; i < SMALL_PUTS; i++) {
        size_t len = record_len(rank, i);
        record_bytes(rank, i, rec, len);
        for (int dst = 0; dst < n; dst++) {
            if (dst == rank) continue;
            CHECK(w->ops->put(w, dst, (size_t)rank * LOG_BYTES + pos, rec, len) == EP_OK,
                  "put %d: %s", i, w->error);
            if (i % 37 == 36 || i == SMALL_PUTS - 1)
                CHECK(w->ops->signal(w, dst, sig + (size_t)rank * 8, (uint64_t)i + 1,
                                     EP_SIGNAL_SET) == EP_OK,
                      "signal %d: %s", i, w->error);
        }
        pos += len;
    }
    for (int src = 0; src < n; src++) {
        if (src == rank) continue;
        uint64_t checked = 0;
        size_t at = 0;
        while (checked < SMALL_PUTS) {
            CHECK(ep_wire_wait(w, sig + (size_t)src * 8, checked + 1, src) == EP_OK,
                  "wait for record %llu of rank %d: %s", (unsigned long long)checked + 1, src,
                  w->error);
            uint64_t seen = atomic_load_explicit(
                (_Atomic uint64_t *)(c.buf + sig + (size_t)src * 8), memory_order_acquire);
            for (; checked < seen; checked++) {
                size_t len = record_len(src, (int)checked);
                record_bytes(src, (int)checked, want, len);
                CHECK(memcmp(c.buf + (size_t)src * LOG_BYTES + at, want, len) == 0,
                      "record %llu of rank %d is not complete when the signal says %llu",
                      (unsigned long long)checked, src, (unsigned long long)seen);
                at += len;
            }
        }
    }
    if (barrier(&c)) return 1;
    rank_teardown(&c);
    return 0;
}

static void test_many_small_puts_arrive_in_order(void **state)
{
    assert_int_equal(world_run_all(3, rank_ordering, NULL, 60000), 0);
}

/* ---- failures ----------------------------------------------------------------------------- */

/* Rank 2 dies (SIGKILL, no goodbye) after the mesh is up. Ranks 0 and 1 waiting for its signal
 * get EP_ERR_PEER naming it well before their timeout; puts between 0 and 1 still land. */
static int rank_peer_dies(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 4096, 8000, &c) || rank_connect(&c) || barrier(&c)) return 1;
    ep_wire_t *w = c.w;
    if (rank == 2) {
        uint8_t half[100] = {1};
        w->ops->put(w, 0, 0, half, sizeof half);
        kill(getpid(), SIGKILL);
    }
    uint64_t t0 = world_now_ms();
    ep_status_t st = ep_wire_wait(w, 2048, 1, 2);
    uint64_t took = world_now_ms() - t0;
    CHECK(st == EP_ERR_PEER, "wait returned %d: %s", st, w->error);
    CHECK(atomic_load(&w->failed_peer) == 2, "failed peer is %d", atomic_load(&w->failed_peer));
    CHECK(strstr(w->error, "from rank 2") != NULL, "error does not name rank 2: %s", w->error);
    CHECK(took < 6000, "EP_ERR_PEER came after %llu ms", (unsigned long long)took);
    fprintf(stderr, "rank %d: as expected: %s\n", rank, w->error);
    CHECK(w->ops->put(w, 2, 0, "x", 1) == EP_ERR_PEER, "put to the dead rank accepted");

    /* The survivors still reach each other. */
    uint8_t msg[32];
    memset(msg, 0x40 + rank, sizeof msg);
    CHECK(w->ops->put(w, 1 - rank, 512, msg, sizeof msg) == EP_OK, "put: %s", w->error);
    CHECK(w->ops->signal(w, 1 - rank, 1024, 9, EP_SIGNAL_SET) == EP_OK, "signal: %s", w->error);
    _Atomic uint64_t *word = (_Atomic uint64_t *)(c.buf + 1024);
    uint64_t until = world_now_ms() + 5000;
    while (atomic_load_explicit(word, memory_order_acquire) != 9 && world_now_ms() < until)
        usleep(1000);
    CHECK(atomic_load(word) == 9, "no signal from rank %d after rank 2 died", 1 - rank);
    for (int i = 0; i < 32; i++)
        CHECK(c.buf[512 + i] == 0x40 + (1 - rank), "byte %d from the survivor differs", i);
    /* No barrier: the bootstrap's star includes the dead rank. */
    rank_teardown(&c);
    return 0;
}

static void test_peer_exit_mid_run_is_named(void **state)
{
    int status[3];
    world_run(3, rank_peer_dies, NULL, 30000, status);
    assert_int_equal(status[0], 0);
    assert_int_equal(status[1], 0);
    assert_int_equal(status[2], WORLD_SIGNALED(SIGKILL));
}

/* Rank 2 dies right after the endpoint exchange: the others' connect times out naming it. */
static int die_after_allgather(void *ctx, const void *in, void *out, size_t len, unsigned ms)
{
    ep_tcp_bootstrap_t *b = ctx;
    ep_bootstrap_t real;
    ep_tcp_bootstrap_get(b, &real);
    int rc = real.allgather(ctx, in, out, len, ms);
    if (rc == 0) kill(getpid(), SIGKILL);
    return rc;
}

static int rank_dies_connecting(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 4096, 1500, &c)) return 1;
    if (rank == 2) c.bs.allgather = die_after_allgather;
    uint64_t t0 = world_now_ms();
    ep_status_t st = c.w->ops->connect(c.w, &c.bs, c.buf, c.bytes);
    uint64_t took = world_now_ms() - t0;
    CHECK(st == EP_ERR_TIMEOUT, "connect returned %d: %s", st, c.w->error);
    CHECK(atomic_load(&c.w->failed_peer) == 2, "failed peer %d: %s", atomic_load(&c.w->failed_peer),
          c.w->error);
    CHECK(strstr(c.w->error, "rank(s) 2 ") != NULL, "error does not name rank 2: %s", c.w->error);
    CHECK(took < 5000, "connect took %llu ms with a 1500 ms timeout", (unsigned long long)took);
    fprintf(stderr, "rank %d: as expected: %s\n", rank, c.w->error);
    rank_teardown(&c);
    return 0;
}

static void test_peer_dying_during_connect_times_out_named(void **state)
{
    int status[4];
    world_run(4, rank_dies_connecting, NULL, 30000, status);
    assert_int_equal(status[0], 0);
    assert_int_equal(status[1], 0);
    assert_int_equal(status[2], WORLD_SIGNALED(SIGKILL));
    assert_int_equal(status[3], 0);
}

static int raw_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
    return rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

/* A HELLO by the documented layout (wire_tcp.h). */
static void hello(uint8_t *b, int kind, int rank, int n, uint64_t nonce, uint64_t bytes)
{
    memset(b, 0, EP_TCP_HELLO_BYTES);
    le32(b, EP_TCP_MAGIC);
    b[4] = EP_TCP_VERSION;
    b[6] = (uint8_t)kind;
    le32(b + 8, (uint32_t)rank);
    le32(b + 12, (uint32_t)n);
    le64(b + 16, nonce);
    le64(b + 24, bytes);
}

/* Rank 0 throws stray connections at rank 1's listener before and after the mesh forms: junk,
 * a HELLO of another group, a silent connection. Rank 1 refuses each and keeps working. */
static int rank_strays(int rank, int n, int port, void *arg)
{
    struct rank_ctx c;
    if (rank_setup(rank, n, port, 4096, 3000, &c)) return 1;
    ep_wire_t *w = c.w;
    int ports[2], mine = ep_wire_tcp_port(w);
    CHECK(c.bs.allgather(c.bs.ctx, &mine, ports, sizeof mine, 5000) == 0, "port exchange");
    int silent = -1, other_group = -1;
    if (rank == 0) {
        int fd = raw_connect(ports[1]);
        CHECK(fd >= 0, "raw connect to rank 1");
        char junk[48];
        memset(junk, 'G', sizeof junk);
        CHECK(write(fd, junk, sizeof junk) == (ssize_t)sizeof junk, "write junk");
        close(fd);
        other_group = raw_connect(ports[1]);
        uint8_t h[EP_TCP_HELLO_BYTES];
        hello(h, EP_TCP_HELLO_CONNECT, 0, n, 0x1234, c.bytes);
        CHECK(write(other_group, h, sizeof h) == (ssize_t)sizeof h, "write hello");
        silent = raw_connect(ports[1]); /* says nothing: refused when its time is up */
        CHECK(silent >= 0, "raw connect");
    }
    if (rank_connect(&c) || barrier(&c)) return 1;
    if (rank == 0) {
        /* Rank 1 closes the other group's connection without an answer. */
        struct pollfd pfd = {.fd = other_group, .events = POLLIN};
        CHECK(poll(&pfd, 1, 5000) == 1, "other group's connection neither answered nor closed");
        char ans;
        CHECK(read(other_group, &ans, 1) <= 0, "rank 1 answered a HELLO of another group");
        close(other_group);
        int fd = raw_connect(ports[1]);
        CHECK(fd >= 0, "raw connect after the mesh formed");
        uint8_t h[EP_TCP_HELLO_BYTES];
        hello(h, EP_TCP_HELLO_CONNECT, 0, n, 99, c.bytes);
        CHECK(write(fd, h, 10) == 10, "write");
        close(fd); /* a HELLO cut short */
    }
    uint8_t msg[200];
    uint64_t s = SEED ^ 5;
    world_fill(&s, msg, sizeof msg);
    if (rank == 0) {
        CHECK(w->ops->put(w, 1, 300, msg, sizeof msg) == EP_OK, "put: %s", w->error);
        CHECK(w->ops->signal(w, 1, 0, 1, EP_SIGNAL_SET) == EP_OK, "signal: %s", w->error);
    } else {
        CHECK(ep_wire_wait(w, 0, 1, 0) == EP_OK, "wait: %s", w->error);
        CHECK(memcmp(c.buf + 300, msg, sizeof msg) == 0, "put bytes differ after strays");
        /* junk, other group, cut-short HELLO; the silent one after its 3000 ms. */
        char why[256];
        uint64_t until = world_now_ms() + 8000;
        while (ep_wire_tcp_refused(w, why, sizeof why) < 4 && world_now_ms() < until)
            usleep(10000);
        unsigned refused = ep_wire_tcp_refused(w, why, sizeof why);
        CHECK(refused == 4, "refused %u connections (last: %s)", refused, why);
        fprintf(stderr, "rank 1: refused 4 strays, the last: %s\n", why);
        CHECK(atomic_load(&w->failed_peer) == -1, "a stray failed the wire: %s", w->error);
    }
    if (barrier(&c)) return 1;
    if (silent >= 0) close(silent);
    rank_teardown(&c);
    return 0;
}

static void test_stray_connections_are_refused(void **state)
{
    assert_int_equal(world_run_all(2, rank_strays, NULL, 30000), 0);
}

/* ---- malformed frames from a fake rank ---------------------------------------------------- */

enum bad_frame { BAD_OOB_PUT, BAD_MISALIGNED_SIGNAL, BAD_TYPE, BAD_SHORT, BAD_SIZE };

struct bad_case {
    enum bad_frame kind;
    const char *expect[2]; /* substrings of the error */
};

#define FAKE_BYTES 8192u
#define FAKE_NONCE 0x0123456789abcdefull

static void frame(uint8_t *f, uint32_t type, uint32_t op, uint64_t off, uint64_t arg)
{
    le32(f, type);
    le32(f + 4, op);
    le64(f + 8, off);
    le64(f + 16, arg);
}

/* Rank 0 is a raw socket speaking the documented protocol; rank 1 is the real wire. */
static int rank_fake_or_real(int rank, int n, int port, void *arg)
{
    const struct bad_case *bc = arg;
    if (rank == 1) {
        struct rank_ctx c;
        if (rank_setup(rank, n, port, FAKE_BYTES, 5000, &c)) return 1;
        ep_wire_t *w = c.w;
        ep_status_t st = w->ops->connect(w, &c.bs, c.buf, c.bytes);
        if (bc->kind == BAD_SIZE) {
            CHECK(st == EP_ERR_INVALID, "connect returned %d: %s", st, w->error);
        } else {
            CHECK(st == EP_OK, "connect: %s", w->error);
            /* The fake tries a second connection as rank 0, then one as rank 1 (itself). */
            static const char *const refusals[] = {"duplicate connection claiming rank 0",
                                                   "names rank 1, expected a rank below 1"};
            for (unsigned i = 0; i < 2; i++) {
                if (barrier(&c)) return 1;
                char why[256];
                unsigned nref = ep_wire_tcp_refused(w, why, sizeof why);
                CHECK(nref == i + 1 && strstr(why, refusals[i]), "refusal %u: %u so far, %s", i,
                      nref, why);
                if (barrier(&c)) return 1;
            }
            /* The fake's valid PUT + SIGNAL land first. */
            CHECK(ep_wire_wait(w, 0, 7, 0) == EP_OK, "wait for the valid signal: %s", w->error);
            for (int i = 0; i < 16; i++)
                CHECK(c.buf[64 + i] == 0xa0 + i, "valid put byte %d", i);
            st = ep_wire_wait(w, 8, 1, 0);
            CHECK(st == EP_ERR_PEER, "wait returned %d: %s", st, w->error);
        }
        CHECK(atomic_load(&w->failed_peer) == 0, "failed peer %d", atomic_load(&w->failed_peer));
        fprintf(stderr, "rank 1: as expected: %s\n", w->error);
        for (int i = 0; i < 2; i++)
            CHECK(!bc->expect[i] || strstr(w->error, bc->expect[i]), "error lacks \"%s\": %s",
                  bc->expect[i], w->error);
        /* Nothing outside the valid put was written (the short put's 10 bytes that did
         * arrive may land: a put means nothing before its signal). */
        for (size_t b = 16; b < FAKE_BYTES; b++)
            CHECK(c.buf[b] == 0 || (b >= 64 && b < 80) ||
                      (bc->kind == BAD_SHORT && b >= 1024 && b < 1034),
                  "byte %zu was written", b);
        if (barrier(&c)) return 1;
        rank_teardown(&c);
        return 0;
    }

    ep_tcp_bootstrap_t *bso;
    CHECK(ep_tcp_bootstrap_create("127.0.0.1", port, 0, n, 10000, &bso) == EP_OK, "bootstrap");
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(bso, &bs);
    uint8_t blobs[2][EP_TCP_BLOB_BYTES], *me = blobs[0];
    memset(me, 0, EP_TCP_BLOB_BYTES);
    le32(me, EP_TCP_MAGIC);
    me[4] = EP_TCP_VERSION;
    le32(me + 12, (uint32_t)n);
    le64(me + 16, FAKE_NONCE);
    le64(me + 24, FAKE_BYTES);
    le32(me + 32, 9); /* never contacted: rank 0 connects, it does not accept */
    strcpy((char *)me + 40, "127.0.0.1");
    CHECK(bs.allgather(bs.ctx, me, blobs, EP_TCP_BLOB_BYTES, 5000) == 0, "allgather");
    int fd = raw_connect((int)rd32(blobs[1] + 32));
    CHECK(fd >= 0, "connect to rank 1");
    uint8_t h[EP_TCP_HELLO_BYTES];
    hello(h, EP_TCP_HELLO_CONNECT, 0, n, FAKE_NONCE,
          bc->kind == BAD_SIZE ? FAKE_BYTES * 2 : FAKE_BYTES);
    CHECK(write(fd, h, sizeof h) == (ssize_t)sizeof h, "hello");
    if (bc->kind != BAD_SIZE) {
        uint8_t ans[EP_TCP_HELLO_BYTES];
        size_t got = 0;
        while (got < sizeof ans) {
            ssize_t r = read(fd, ans + got, sizeof ans - got);
            CHECK(r > 0, "no HELLO answer");
            got += (size_t)r;
        }
        CHECK(rd32(ans) == EP_TCP_MAGIC && rd32(ans + 8) == 1 && rd64(ans + 16) == FAKE_NONCE,
              "bad answer");
        for (int i = 0; i < 2; i++) {
            int extra = raw_connect((int)rd32(blobs[1] + 32));
            CHECK(extra >= 0, "second connection");
            hello(h, EP_TCP_HELLO_CONNECT, i, n, FAKE_NONCE, FAKE_BYTES);
            CHECK(write(extra, h, sizeof h) == (ssize_t)sizeof h, "hello");
            struct pollfd pfd = {.fd = extra, .events = POLLIN};
            CHECK(poll(&pfd, 1, 5000) == 1, "connection %d neither answered nor closed", i);
            CHECK(read(extra, ans, 1) <= 0, "rank 1 answered connection %d", i);
            close(extra);
            CHECK(bs.barrier(bs.ctx, 10000) == 0 && bs.barrier(bs.ctx, 10000) == 0, "barrier");
        }
        uint8_t out[256];
        size_t len = 0;
        frame(out, EP_TCP_FRAME_PUT, 0, 64, 16);
        for (int i = 0; i < 16; i++)
            out[24 + i] = (uint8_t)(0xa0 + i);
        frame(out + 40, EP_TCP_FRAME_SIGNAL, EP_SIGNAL_SET, 0, 7);
        len = 64; /* the bad frame starts at stream byte 64 */
        switch (bc->kind) {
        case BAD_OOB_PUT:
            frame(out + len, EP_TCP_FRAME_PUT, 0, FAKE_BYTES - 8, 16);
            len += 24 + 16;
            break;
        case BAD_MISALIGNED_SIGNAL:
            frame(out + len, EP_TCP_FRAME_SIGNAL, EP_SIGNAL_ADD, 12, 1);
            len += 24;
            break;
        case BAD_TYPE:
            frame(out + len, 9, 0, 8, 1);
            len += 24;
            break;
        case BAD_SHORT:
            frame(out + len, EP_TCP_FRAME_PUT, 0, 1024, 100);
            len += 24 + 10;
            break;
        case BAD_SIZE:
            break;
        }
        CHECK(write(fd, out, len) == (ssize_t)len, "write frames");
        if (bc->kind == BAD_SHORT) close(fd);
    }
    CHECK(bs.barrier(bs.ctx, 10000) == 0, "barrier");
    close(fd);
    ep_tcp_bootstrap_destroy(bso);
    return 0;
}

static void test_malformed_frames_are_rejected_with_offsets(void **state)
{
    static const struct bad_case cases[] = {
        {BAD_OOB_PUT, {"stream byte 64", "16 bytes at offset 8184"}},
        {BAD_MISALIGNED_SIGNAL, {"stream byte 64", "offset 12, not 8-byte aligned"}},
        {BAD_TYPE, {"unknown frame type 9", "stream byte 64"}},
        {BAD_SHORT, {"closed mid-frame at stream byte 98", "begun at byte 64"}},
        {BAD_SIZE, {"rank 0", "16384 bytes"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int status[2];
        world_run(2, rank_fake_or_real, (void *)&cases[i], 30000, status);
        assert_int_equal(status[0], 0);
        assert_int_equal(status[1], 0);
    }
}

/* Create errors name the setting; a wire refuses traffic before connect. */
static void test_create_errors_name_the_setting(void **state)
{
    ep_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    ep_wire_t *w = NULL;
    cfg.tcp_port = 70000;
    assert_int_equal(ep_wire_tcp_create(&cfg, 0, 2, &w), EP_ERR_INVALID);
    assert_non_null(strstr(ep_wire_tcp_create_error(), "tcp_port 70000"));
    cfg.tcp_port = 0;
    assert_int_equal(ep_wire_tcp_create(&cfg, 2, 2, &w), EP_ERR_INVALID);
    assert_non_null(strstr(ep_wire_tcp_create_error(), "rank 2 of 2"));

    /* A port someone else listens on. */
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(l, 1), 0);
    assert_int_equal(getsockname(l, (struct sockaddr *)&a, &al), 0);
    cfg.tcp_host = "127.0.0.1";
    cfg.tcp_port = ntohs(a.sin_port);
    assert_int_equal(ep_wire_tcp_create(&cfg, 0, 2, &w), EP_ERR_IO);
    assert_null(w);
    char want[64];
    snprintf(want, sizeof want, "cannot listen on 127.0.0.1:%d", cfg.tcp_port);
    assert_non_null(strstr(ep_wire_tcp_create_error(), want));
    close(l);

    cfg.tcp_port = 0;
    cfg.tcp_host = "192.0.2.1"; /* TEST-NET-1: no interface of this host has it */
    assert_int_equal(ep_wire_tcp_create(&cfg, 0, 2, &w), EP_ERR_IO);
    assert_non_null(strstr(ep_wire_tcp_create_error(), "cannot listen on 192.0.2.1:0"));

    cfg.tcp_host = NULL; /* default: loopback, ephemeral port */
    assert_int_equal(ep_wire_tcp_create(&cfg, 1, 2, &w), EP_OK);
    assert_string_equal(ep_wire_tcp_create_error(), "");
    assert_true(ep_wire_tcp_port(w) > 0);
    assert_int_equal(w->ops->put(w, 0, 0, "x", 1), EP_ERR_INVALID); /* no buffer yet */
    assert_int_equal(w->ops->put(w, 0, 0, "x", 0), EP_ERR_STATE);
    assert_int_equal(w->ops->flush(w), EP_OK);
    w->ops->destroy(w);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_errors_name_the_setting),
        cmocka_unit_test(test_random_puts_then_signals),
        cmocka_unit_test(test_add_signals_sum_exactly),
        cmocka_unit_test(test_large_puts_both_directions),
        cmocka_unit_test(test_put_to_self_copies_locally),
        cmocka_unit_test(test_unsignalled_puts_still_leave),
        cmocka_unit_test(test_many_small_puts_arrive_in_order),
        cmocka_unit_test(test_peer_exit_mid_run_is_named),
        cmocka_unit_test(test_peer_dying_during_connect_times_out_named),
        cmocka_unit_test(test_stray_connections_are_refused),
        cmocka_unit_test(test_malformed_frames_are_rejected_with_offsets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
