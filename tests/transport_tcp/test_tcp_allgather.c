/* ep_group_allgather on the cpu backend over the tcp wire, one forked process per rank: every
 * rank's bytes in rank order over many calls while ranks drift apart, a rank that stops calling
 * (the others time out naming it), a rank that is killed (the others fail fast naming it), and
 * abort from another thread. */
#include "tcp_test.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#define CALLS 1000

static uint8_t word_byte(int r, int n, int i)
{
    return (uint8_t)(r * 131 + n * 7 + i * 13 + 1);
}

static size_t call_len(int n)
{
    return (size_t)(1 + (n * 37) % EP_ALLGATHER_MAX);
}

static void nap_us(long us)
{
    struct timespec ts = {us / 1000000, us % 1000000 * 1000};
    nanosleep(&ts, NULL);
}

static int create(const ep_bootstrap_t *bs, unsigned timeout_ms, ep_group_t **g)
{
    ep_config_t cfg;
    world_ep_config(&cfg, 12, 128, 2, 4, 0, timeout_ms);
    ep_status_t st = ep_group_create(&cfg, bs, g);
    CHECK(st == EP_OK, "ep_group_create: %s: %s", ep_strerror(st), ep_group_last_error(NULL));
    return 0;
}

static int many_calls_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    ep_group_t *g;
    uint8_t in[EP_ALLGATHER_MAX], out[EP_MAX_RANKS * EP_ALLGATHER_MAX];
    uint64_t s = 0xa11ca11cull + (uint64_t)rank;
    if (create(bs, 5000, &g)) return 1;
    int rc = 0;
    for (int n = 1; n <= CALLS && !rc; n++) {
        size_t len = call_len(n);
        for (size_t i = 0; i < len; i++)
            in[i] = word_byte(rank, n, (int)i);
        if (world_rand(&s) % 16 == 0) nap_us((long)(world_rand(&s) % 300));
        ep_status_t st = ep_group_allgather(g, in, out, len);
        if (st) {
            fprintf(stderr, "rank %d call %d: %s: %s\n", rank, n, ep_strerror(st),
                    ep_group_last_error(g));
            rc = 1;
            break;
        }
        for (int r = 0; r < nranks && !rc; r++)
            for (size_t i = 0; i < len; i++)
                if (out[(size_t)r * len + i] != word_byte(r, n, (int)i)) {
                    fprintf(stderr, "rank %d call %d: byte %zu of rank %d is %u, want %u\n", rank,
                            n, i, r, out[(size_t)r * len + i], word_byte(r, n, (int)i));
                    rc = 1;
                    break;
                }
    }
    ep_group_destroy(g);
    return rc;
}

static void values_of_every_rank_in_rank_order(void **state)
{
    (void)state;
    int status[EP_MAX_RANKS];
    for (int R = 2; R <= 3; R++)
        assert_int_equal(world_run_ep(R, many_calls_rank, NULL, 60000, status), 0);
}

/* arg: 0 the victim (rank 2) stops calling, 1 it is killed. */
static int absent_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    const int kill = *(const int *)arg;
    const unsigned timeout_ms = 500;
    ep_group_t *g;
    uint8_t in[8] = {0}, out[3 * 8];
    if (create(bs, timeout_ms, &g)) return 1;
    for (int n = 0; n < 10; n++) {
        ep_status_t st = ep_group_allgather(g, in, out, 8);
        CHECK(st == EP_OK, "call %d: %s: %s", n, ep_strerror(st), ep_group_last_error(g));
    }
    if (rank == 2) {
        if (kill) raise(SIGKILL);
        nap_us(700000); /* then the teardown, which the others may have left already */
        ep_group_destroy(g);
        return 0;
    }
    uint64_t t0 = world_now_ms();
    ep_status_t st = ep_group_allgather(g, in, out, 8);
    uint64_t took = world_now_ms() - t0;
    const char *msg = ep_group_last_error(g);
    printf("rank %d: allgather with rank 2 %s: %s in %llu ms: %s\n", rank,
           kill ? "killed" : "not calling", ep_strerror(st), (unsigned long long)took, msg);
    if (kill)
        CHECK(st == EP_ERR_PEER || st == EP_ERR_TIMEOUT, "status %d (%s)", st, ep_strerror(st));
    else
        CHECK(st == EP_ERR_TIMEOUT && took + 5 >= timeout_ms, "status %d (%s) after %llu ms", st,
              ep_strerror(st), (unsigned long long)took);
    CHECK(took < timeout_ms + 2000, "took %llu ms", (unsigned long long)took);
    CHECK(ep_group_failed_peer(g) == 2, "failed peer %d: %s", ep_group_failed_peer(g), msg);
    CHECK(strstr(msg, "rank 2"), "the message does not name rank 2: %s", msg);
    /* the group stays failed */
    st = ep_group_allgather(g, in, out, 8);
    CHECK(st == EP_ERR_PEER || st == EP_ERR_TIMEOUT, "second call: %d", st);
    ep_group_destroy(g);
    return 0;
}

static void a_rank_that_does_not_call_is_named(void **state)
{
    (void)state;
    int status[EP_MAX_RANKS], kill = 0;
    assert_int_equal(world_run_ep(3, absent_rank, &kill, 20000, status), 0);
}

static void a_killed_rank_is_named(void **state)
{
    (void)state;
    int status[EP_MAX_RANKS], kill = 1;
    world_run_ep(3, absent_rank, &kill, 20000, status);
    assert_int_equal(status[0], 0);
    assert_int_equal(status[1], 0);
    assert_int_equal(status[2], WORLD_SIGNALED(SIGKILL));
}

static void *aborter(void *p)
{
    nap_us(100000);
    ep_group_abort(p, 1);
    return NULL;
}

static int abort_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    ep_group_t *g;
    uint8_t in[8] = {0}, out[2 * 8];
    if (create(bs, 20000, &g)) return 1;
    ep_status_t st = ep_group_allgather(g, in, out, 8);
    CHECK(st == EP_OK, "first call: %s", ep_strerror(st));
    if (rank == 0) {
        pthread_t th;
        pthread_create(&th, NULL, aborter, g);
        uint64_t t0 = world_now_ms();
        st = ep_group_allgather(g, in, out, 8);
        uint64_t took = world_now_ms() - t0;
        pthread_join(th, NULL);
        CHECK(st == EP_ERR_ABORTED, "status %d (%s)", st, ep_strerror(st));
        CHECK(took < 5000, "the abort took %llu ms", (unsigned long long)took);
        CHECK(strstr(ep_group_last_error(g), "rank 1 marked down"), "%s", ep_group_last_error(g));
    }
    ep_group_destroy(g);
    return 0;
}

static void abort_releases_a_waiting_rank(void **state)
{
    (void)state;
    int status[EP_MAX_RANKS];
    assert_int_equal(world_run_ep(2, abort_rank, NULL, 30000, status), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(values_of_every_rank_in_rank_order),
        cmocka_unit_test(a_rank_that_does_not_call_is_named),
        cmocka_unit_test(a_killed_rank_is_named),
        cmocka_unit_test(abort_releases_a_waiting_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
