/* tcp bootstrap: allgather of distinct blobs and barriers across forked ranks, a rank that never
 * starts, a rank that skips a collective, ranks that call different collectives, and a stray
 * connection to rank 0's listener. */
#include "tcp_test.h"

#include "ep.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#define SEED 0x5eedb007ull

/* Rank r's blob for round i: len bytes derived from (seed, r, i) only. */
static void blob_of(int r, int i, uint8_t *dst, size_t len)
{
    uint64_t s = SEED ^ ((uint64_t)r << 32) ^ (uint64_t)i * 7919u;
    world_fill(&s, dst, len);
}

static const size_t lens[] = {1, 8, 100, 4096, 70001, 0, 3};

static int rank_allgather(int rank, int n, int port, void *arg)
{
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 10000, &b);
    CHECK(st == EP_OK, "create: %d %s", st, ep_tcp_bootstrap_last_error());
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    CHECK(bs.rank == rank && bs.nranks == n, "bootstrap says rank %d of %d", bs.rank, bs.nranks);

    for (int i = 0; i < (int)(sizeof lens / sizeof lens[0]); i++) {
        size_t len = lens[i];
        uint8_t *in = malloc(len + 1), *out = malloc(len * (size_t)n + 1), *want = malloc(len + 1);
        CHECK(in && out && want, "out of memory");
        blob_of(rank, i, in, len);
        memset(out, 0xee, len * (size_t)n);
        int rc = bs.allgather(bs.ctx, in, out, len, 5000);
        CHECK(rc == 0, "allgather %d (len %zu): %d %s", i, len, rc, ep_tcp_bootstrap_last_error());
        for (int r = 0; r < n; r++) {
            blob_of(r, i, want, len);
            CHECK(memcmp(out + (size_t)r * len, want, len) == 0,
                  "allgather %d: slot of rank %d differs", i, r);
        }
        free(in);
        free(out);
        free(want);
        rc = bs.barrier(bs.ctx, 5000);
        CHECK(rc == 0, "barrier %d: %d %s", i, rc, ep_tcp_bootstrap_last_error());
    }
    ep_tcp_bootstrap_destroy(b);
    return 0;
}

static void test_allgather_distinct_blobs_and_barriers(void **state)
{
    for (int n = 1; n <= 4; n++) {
        assert_int_equal(world_run_all(n, rank_allgather, NULL, 30000), 0);
    }
}

/* Rank n-1 never starts: every other rank's create fails within the timeout, naming it. */
static int rank_missing(int rank, int n, int port, void *arg)
{
    if (rank == n - 1) return 0;
    ep_tcp_bootstrap_t *b = NULL;
    uint64_t t0 = world_now_ms();
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 1500, &b);
    uint64_t took = world_now_ms() - t0;
    const char *err = ep_tcp_bootstrap_last_error();
    CHECK(st == EP_ERR_TIMEOUT, "create returned %d (%s)", st, err);
    CHECK(b == NULL, "no object on failure");
    char want[48];
    snprintf(want, sizeof want, "rank(s) %d did not join", n - 1);
    CHECK(strstr(err, want) != NULL, "error does not name rank %d: %s", n - 1, err);
    CHECK(took < 6000, "create took %llu ms with a 1500 ms timeout", (unsigned long long)took);
    fprintf(stderr, "rank %d: as expected: %s\n", rank, err);
    return 0;
}

static void test_rank_that_never_starts_times_out_named(void **state)
{
    assert_int_equal(world_run_all(3, rank_missing, NULL, 20000), 0);
}

/* Rank 2 joins but skips the allgather: rank 0 names it, rank 1 hears rank 0's reason. */
static int rank_skips(int rank, int n, int port, void *arg)
{
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 5000, &b);
    CHECK(st == EP_OK, "create: %s", ep_tcp_bootstrap_last_error());
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    if (rank == 2) {
        usleep(2500 * 1000); /* holds its connection open but never takes part */
        ep_tcp_bootstrap_destroy(b);
        return 0;
    }
    uint64_t in = (uint64_t)rank, out[3];
    int rc = bs.allgather(bs.ctx, &in, out, sizeof in, 800);
    const char *err = ep_tcp_bootstrap_last_error();
    if (rank == 0)
        CHECK(rc == EP_ERR_TIMEOUT && strstr(err, "rank 2 did not take part"), "rank 0 got %d: %s",
              rc, err);
    else
        CHECK(rc == EP_ERR_TIMEOUT && strstr(err, "rank 0 aborted") && strstr(err, "rank 2"),
              "rank 1 got %d: %s", rc, err);
    /* The star is out of step now: later calls fail at once instead of mixing data. */
    rc = bs.barrier(bs.ctx, 800);
    CHECK(rc == EP_ERR_STATE, "barrier after a failed allgather returned %d", rc);
    ep_tcp_bootstrap_destroy(b);
    return 0;
}

static void test_rank_skipping_a_collective_is_named(void **state)
{
    assert_int_equal(world_run_all(3, rank_skips, NULL, 20000), 0);
}

/* Rank 1 calls barrier while the others allgather. */
static int rank_mismatch(int rank, int n, int port, void *arg)
{
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 5000, &b);
    CHECK(st == EP_OK, "create: %s", ep_tcp_bootstrap_last_error());
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    uint32_t in = 1, out[3];
    int rc = rank == 1 ? bs.barrier(bs.ctx, 3000) : bs.allgather(bs.ctx, &in, out, sizeof in, 3000);
    const char *err = ep_tcp_bootstrap_last_error();
    CHECK(rc == EP_ERR_BOOTSTRAP, "got %d: %s", rc, err);
    CHECK(strstr(err, "rank 1 sent barrier") != NULL, "error does not say what rank 1 did: %s",
          err);
    ep_tcp_bootstrap_destroy(b);
    return 0;
}

static void test_different_collectives_are_detected(void **state)
{
    assert_int_equal(world_run_all(3, rank_mismatch, NULL, 20000), 0);
}

/* Rank 3 is not a rank: it connects to rank 0's listener and speaks garbage while the others
 * are still joining; the world of ranks 0..2 forms anyway. */
static int rank_or_stray(int rank, int n, int port, void *arg)
{
    if (rank == 3) {
        for (int i = 0; i < 100; i++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = {.sin_family = AF_INET,
                                    .sin_port = htons((uint16_t)port),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
                static const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
                CHECK(write(fd, junk, sizeof junk) == (ssize_t)sizeof junk, "write");
                char c;
                /* Rank 0 closes us without an answer. */
                CHECK(read(fd, &c, 1) <= 0, "rank 0 answered a stray connection");
                close(fd);
                return 0;
            }
            close(fd);
            usleep(10000);
        }
        CHECK(0, "rank 0 never listened");
    }
    n = 3;
    if (rank == 1) usleep(300 * 1000); /* the stray arrives while rank 0 still waits for rank 1 */
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 5000, &b);
    CHECK(st == EP_OK, "create: %s", ep_tcp_bootstrap_last_error());
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    uint32_t in = 100u + (uint32_t)rank, out[3];
    int rc = bs.allgather(bs.ctx, &in, out, sizeof in, 3000);
    CHECK(rc == 0, "allgather: %s", ep_tcp_bootstrap_last_error());
    for (int r = 0; r < n; r++)
        CHECK(out[r] == 100u + (uint32_t)r, "slot %d holds %u", r, out[r]);
    ep_tcp_bootstrap_destroy(b);
    return 0;
}

static void test_stray_connection_is_refused(void **state)
{
    assert_int_equal(world_run_all(4, rank_or_stray, NULL, 20000), 0);
}

static void test_bad_arguments(void **state)
{
    ep_tcp_bootstrap_t *b = (ep_tcp_bootstrap_t *)0x1;
    assert_int_equal(ep_tcp_bootstrap_create("127.0.0.1", 0, 0, 2, 100, &b), EP_ERR_INVALID);
    assert_null(b);
    assert_non_null(strstr(ep_tcp_bootstrap_last_error(), "port 0"));
    assert_int_equal(ep_tcp_bootstrap_create("127.0.0.1", 5000, 2, 2, 100, &b), EP_ERR_INVALID);
    assert_non_null(strstr(ep_tcp_bootstrap_last_error(), "rank 2 of 2"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_allgather_distinct_blobs_and_barriers),
        cmocka_unit_test(test_rank_that_never_starts_times_out_named),
        cmocka_unit_test(test_rank_skipping_a_collective_is_named),
        cmocka_unit_test(test_different_collectives_are_detected),
        cmocka_unit_test(test_stray_connection_is_refused),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
