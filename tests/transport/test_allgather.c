/* ep_group_allgather on the cpu backend with ranks as threads (shm wire): every rank's bytes in
 * rank order over many calls of varying length while ranks drift apart, argument checks, a
 * length that differs between ranks, a rank that stops calling (the others time out naming it)
 * and abort. The multi-process (tcp wire) twin is tests/transport_tcp/test_tcp_allgather.c. */
#include "check.h"
#include "harness.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#define CALLS 2000

static void base_cfg(ep_config_t *c, unsigned timeout_ms)
{
    ep_config_init(c);
    c->transport = EP_TRANSPORT_SHM;
    c->num_experts = 12;
    c->hidden = 128;
    c->num_topk = 2;
    c->ll_max_tokens = 4;
    c->timeout_ms = timeout_ms;
}

/* Byte i of rank r's word in call n (from 1), and the length of call n. */
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

#define EXPECT(st_expected, call, needle) TEST_CHECK_EP(rank, g, fails++, st_expected, call, needle)

static int many_calls_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const int R = *(const int *)arg;
    ep_config_t c;
    ep_group_t *g;
    uint8_t in[EP_ALLGATHER_MAX], out[EP_MAX_RANKS * EP_ALLGATHER_MAX];
    rng_t rng = {0x5eed0000u + (uint64_t)rank};
    int fails = 0;
    base_cfg(&c, 5000);
    if (ep_group_create(&c, bs, &g)) return 1;
    for (int n = 1; n <= CALLS && fails < 5; n++) {
        size_t len = call_len(n);
        for (size_t i = 0; i < len; i++)
            in[i] = word_byte(rank, n, (int)i);
        memset(out, 0xee, sizeof out);
        /* ranks drift: one may be a call or more ahead of another when it puts its word */
        if (rng_int(&rng, 0, 15) == 0) nap_us(rng_int(&rng, 1, 300));
        ep_status_t st = ep_group_allgather(g, in, out, len);
        if (st) {
            fprintf(stderr, "rank %d call %d: %s (%s)\n", rank, n, ep_strerror(st),
                    ep_group_last_error(g));
            fails++;
            break;
        }
        for (int r = 0; r < R; r++)
            for (size_t i = 0; i < len; i++)
                if (out[(size_t)r * len + i] != word_byte(r, n, (int)i)) {
                    fprintf(stderr, "rank %d call %d: byte %zu of rank %d is %u, want %u\n", rank,
                            n, i, r, out[(size_t)r * len + i], word_byte(r, n, (int)i));
                    fails++;
                    r = R;
                    break;
                }
        if (out[(size_t)R * len] != 0xee) {
            fprintf(stderr, "rank %d call %d: wrote past out[%d * %zu]\n", rank, n, R, len);
            fails++;
        }
    }
    ep_group_destroy(g);
    return fails;
}

static void values_of_every_rank_in_rank_order(void **state)
{
    (void)state;
    for (int R = 1; R <= 4; R++) {
        int arg = R;
        assert_int_equal(run_ranks(R, many_calls_rank, &arg), 0);
    }
}

static int bad_args_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    uint8_t in[EP_ALLGATHER_MAX + 1] = {0}, out[2 * (EP_ALLGATHER_MAX + 1)];
    int fails = 0;
    base_cfg(&c, 5000);
    if (ep_group_create(&c, bs, &g)) return 1;
    EXPECT(EP_ERR_INVALID, ep_group_allgather(NULL, in, out, 4), NULL);
    EXPECT(EP_ERR_INVALID, ep_group_allgather(g, NULL, out, 4), "in is NULL");
    EXPECT(EP_ERR_INVALID, ep_group_allgather(g, in, NULL, 4), "out is NULL");
    EXPECT(EP_ERR_INVALID, ep_group_allgather(g, in, out, 0), "len 0");
    EXPECT(EP_ERR_INVALID, ep_group_allgather(g, in, out, EP_ALLGATHER_MAX + 1), "len 65");
    /* rejected calls send nothing: the next valid one still pairs up */
    in[0] = (uint8_t)(10 + rank);
    EXPECT(EP_OK, ep_group_allgather(g, in, out, 1), NULL);
    if (out[0] != 10 || out[1] != 11) fails++;
    ep_group_destroy(g);
    return fails;
}

static void bad_arguments_are_rejected(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(2, bad_args_rank, NULL), 0);
}

static int len_mismatch_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    uint8_t in[16] = {0}, out[64];
    int fails = 0;
    base_cfg(&c, 2000);
    if (ep_group_create(&c, bs, &g)) return 1;
    EXPECT(EP_OK, ep_group_allgather(g, in, out, 8), NULL);
    EXPECT(EP_ERR_INVALID, ep_group_allgather(g, in, out, rank ? 16 : 8),
           rank ? "rank 0 gave 8 bytes, this rank 16" : "rank 1 gave 16 bytes, this rank 8");
    if (ep_group_failed_peer(g) != 1 - rank) fails++;
    ep_group_destroy(g);
    return fails;
}

static void a_length_that_differs_between_ranks_fails(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(2, len_mismatch_rank, NULL), 0);
}

static int absent_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    uint8_t in[8] = {0}, out[3 * 8];
    int fails = 0;
    base_cfg(&c, 300);
    if (ep_group_create(&c, bs, &g)) return 1;
    for (int n = 0; n < 5; n++)
        EXPECT(EP_OK, ep_group_allgather(g, in, out, 8), NULL);
    if (rank != 2) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        EXPECT(EP_ERR_TIMEOUT, ep_group_allgather(g, in, out, 8), "no signal from rank 2");
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms < 250 || ms > 3000) {
            fprintf(stderr, "rank %d: the timeout came after %ld ms (timeout_ms 300)\n", rank, ms);
            fails++;
        }
        if (ep_group_failed_peer(g) != 2) fails++;
        /* the group stays failed: the next call fails fast, still naming rank 2 */
        EXPECT(EP_ERR_PEER, ep_group_allgather(g, in, out, 8), "rank 2");
    } else {
        /* come to the teardown within the others' timeout (its barrier frees the buffers) */
        nap_us(400000);
    }
    ep_group_destroy(g);
    return fails;
}

static void a_rank_that_does_not_call_is_named(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(3, absent_rank, NULL), 0);
}

static void *aborter(void *p)
{
    nap_us(100000);
    ep_group_abort(p, 1);
    return NULL;
}

static int abort_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    uint8_t in[8] = {0}, out[2 * 8];
    int fails = 0;
    base_cfg(&c, 20000);
    if (ep_group_create(&c, bs, &g)) return 1;
    EXPECT(EP_OK, ep_group_allgather(g, in, out, 8), NULL);
    if (rank == 0) {
        pthread_t th;
        pthread_create(&th, NULL, aborter, g);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        EXPECT(EP_ERR_ABORTED, ep_group_allgather(g, in, out, 8), "rank 1 marked down");
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (t1.tv_sec - t0.tv_sec > 5) fails++;
        EXPECT(EP_ERR_ABORTED, ep_group_allgather(g, in, out, 8), NULL);
        if (ep_group_failed_peer(g) != 1) fails++;
        pthread_join(th, NULL);
    }
    ep_group_destroy(g);
    return fails;
}

static void abort_releases_a_waiting_rank(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(2, abort_rank, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(values_of_every_rank_in_rank_order),
        cmocka_unit_test(bad_arguments_are_rejected),
        cmocka_unit_test(a_length_that_differs_between_ranks_fails),
        cmocka_unit_test(a_rank_that_does_not_call_is_named),
        cmocka_unit_test(abort_releases_a_waiting_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
