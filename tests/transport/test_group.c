/* Group creation, config checks, argument validation of every op, op order (hooks, LL buffer
 * alternation), timeouts that name the missing rank, and abort. */
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
#include <unistd.h>

#include <cmocka.h>

static void base_cfg(ep_config_t *c)
{
    ep_config_init(c);
    c->num_experts = 24;
    c->hidden = 256;
    c->num_topk = 4;
    c->ll_max_tokens = 8;
    c->ht_max_tokens = 8;
    c->timeout_ms = 5000;
}

static void basics(void **state)
{
    (void)state;
    ep_config_t c;
    ep_config_init(&c);
    assert_int_equal(c.backend, EP_BACKEND_CPU);
    assert_int_equal(c.transport, EP_TRANSPORT_AUTO);
    assert_int_equal(c.timeout_ms, 10000);
    assert_int_equal(c.num_sms, 24);
    for (int s = 0; s >= -10; s--) {
        assert_non_null(ep_strerror((ep_status_t)s));
        for (int t = s + 1; t <= 0; t++)
            assert_string_not_equal(ep_strerror((ep_status_t)s), ep_strerror((ep_status_t)t));
    }
    assert_string_equal(ep_backend_name(EP_BACKEND_CPU), "cpu");
    assert_string_equal(ep_transport_name(EP_TRANSPORT_SHM), "shm");
    base_cfg(&c);
    size_t a = ep_buffer_size_hint(&c, 2);
    assert_true(a > 0 && a % 64 == 0);
    c.hidden = 512;
    assert_true(ep_buffer_size_hint(&c, 2) > a);
    c.num_experts = 15;
    assert_int_equal(ep_buffer_size_hint(&c, 2), 0);
}

struct bad_cfg {
    const char *field;
    ep_status_t st;
    void (*apply)(ep_config_t *c);
};

static void b_experts(ep_config_t *c)
{
    c->num_experts = 25;
}
static void b_experts0(ep_config_t *c)
{
    c->num_experts = 0;
}
static void b_hidden(ep_config_t *c)
{
    c->hidden = 0;
}
static void b_topk0(ep_config_t *c)
{
    c->num_topk = 0;
}
static void b_topk17(ep_config_t *c)
{
    c->num_topk = 17;
}
static void b_topk_e(ep_config_t *c)
{
    c->num_experts = 4;
    c->num_topk = 5;
}
static void b_ll(ep_config_t *c)
{
    c->ll_max_tokens = -1;
}
static void b_ht(ep_config_t *c)
{
    c->ht_max_tokens = -5;
}
static void b_timeout(ep_config_t *c)
{
    c->timeout_ms = 0;
}
static void b_backend(ep_config_t *c)
{
    c->backend = (ep_backend_t)7;
}
static void b_transport(ep_config_t *c)
{
    c->transport = EP_TRANSPORT_NVLINK;
}
#ifndef EP_HAVE_CUDA
static void b_cuda(ep_config_t *c)
{
    c->backend = EP_BACKEND_CUDA;
}
#endif

static int create_bad(int rank, const ep_bootstrap_t *bs, void *arg)
{
    const struct bad_cfg *b = arg;
    ep_config_t c;
    ep_group_t *g = (ep_group_t *)1;
    base_cfg(&c);
    b->apply(&c);
    ep_status_t st = ep_group_create(&c, bs, &g);
    if (st != b->st || g != NULL || !strstr(ep_group_last_error(NULL), b->field)) {
        fprintf(stderr, "%s: status %d, message '%s'\n", b->field, st, ep_group_last_error(NULL));
        return 1;
    }
    return 0;
}

static void bad_configs_are_rejected(void **state)
{
    (void)state;
    const struct bad_cfg cases[] = {
        {"num_experts", EP_ERR_INVALID, b_experts},     {"num_experts", EP_ERR_INVALID, b_experts0},
        {"hidden", EP_ERR_INVALID, b_hidden},           {"num_topk", EP_ERR_INVALID, b_topk0},
        {"num_topk", EP_ERR_INVALID, b_topk17},         {"num_topk", EP_ERR_INVALID, b_topk_e},
        {"ll_max_tokens", EP_ERR_INVALID, b_ll},        {"ht_max_tokens", EP_ERR_INVALID, b_ht},
        {"timeout_ms", EP_ERR_INVALID, b_timeout},      {"backend", EP_ERR_INVALID, b_backend},
        {"transport", EP_ERR_UNSUPPORTED, b_transport},
#ifndef EP_HAVE_CUDA
        {"cuda", EP_ERR_UNSUPPORTED, b_cuda},
#endif
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_int_equal(run_ranks(2, create_bad, (void *)&cases[i]), 0);

    ep_config_t c;
    base_cfg(&c);
    ep_inproc_world_t *w;
    ep_bootstrap_t bs;
    ep_group_t *g;
    assert_int_equal(ep_inproc_world_create(1, &w), EP_OK);
    ep_inproc_bootstrap(w, 0, &bs);
    assert_int_equal(ep_group_create(NULL, &bs, &g), EP_ERR_INVALID);
    assert_int_equal(ep_group_create(&c, NULL, &g), EP_ERR_INVALID);
    assert_int_equal(ep_group_create(&c, &bs, NULL), EP_ERR_INVALID);
    ep_bootstrap_t bad = bs;
    bad.rank = 3;
    assert_int_equal(ep_group_create(&c, &bad, &g), EP_ERR_INVALID);
    assert_non_null(strstr(ep_group_last_error(NULL), "rank 3"));
    ep_inproc_world_destroy(w);
}

static int create_mismatch(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    base_cfg(&c);
    if (rank == 1) c.hidden = 384;
    ep_status_t st = ep_group_create(&c, bs, &g);
    if (st != EP_ERR_INVALID || !strstr(ep_group_last_error(NULL), "hidden")) {
        fprintf(stderr, "rank %d: status %d, '%s'\n", rank, st, ep_group_last_error(NULL));
        if (st == EP_OK) ep_group_destroy(g);
        return 1;
    }
    return 0;
}

static void config_mismatch_between_ranks(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(3, create_mismatch, NULL), 0);
}

/* Every rank makes the same calls, so that rejected calls (which never communicate) and
 * valid ones stay in step. */
#define EXPECT(st_expected, call, needle) TEST_CHECK_EP(rank, g, fails++, st_expected, call, needle)

static int bad_args_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g = NULL;
    int fails = 0;
    base_cfg(&c);
    c.hidden = 200; /* not a multiple of 128: no fp8 */
    if (ep_group_create(&c, bs, &g)) return 1;
    enum { T = 4, K = 4, H = 200 };
    uint16_t x[T * H] = {0}, out[T * H];
    int32_t idx[T * K], idx2[T * K];
    float w[T * K];
    for (int i = 0; i < T * K; i++) {
        idx[i] = i % 24;
        w[i] = 0.5f;
    }
    ep_ll_dispatch_out_t o;
    ep_ll_handle_t *h = NULL;
    ep_hook_t *hook = NULL;
    ep_ll_dispatch_args_t a = {.x = x, .num_tokens = T, .topk_idx = idx, .topk_weights = w};

    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, NULL, &o, &h, NULL), "a is NULL");
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, NULL, &h, NULL), "out is NULL");
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, NULL, NULL), "handle is NULL");
    a.num_tokens = 9;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "num_tokens 9");
    a.num_tokens = -1;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "num_tokens -1");
    a.num_tokens = T;
    a.x = NULL;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "x is NULL");
    a.x = x;
    a.use_fp8 = 1;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "multiple of 128");
    a.use_fp8 = 0;
    a.use_hook = 1;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "hook is NULL");
    a.use_hook = 0;
    memcpy(idx2, idx, sizeof idx);
    a.topk_idx = idx2;
    idx2[6] = 24;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "topk_idx[1][2] = 24");
    idx2[6] = -2;
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "topk_idx[1][2] = -2");
    idx2[6] = idx2[5];
    EXPECT(EP_ERR_INVALID, ep_ll_dispatch(g, &a, &o, &h, NULL), "twice");
    a.topk_idx = idx;

    /* Out of order: a hook that already ran, a stale handle, a pending hook two ops on. */
    a.use_hook = 1;
    EXPECT(EP_OK, ep_ll_dispatch(g, &a, &o, &h, &hook), NULL);
    ep_ll_handle_t *h0 = h;
    ep_ll_combine_args_t ca = {
        .handle = h, .expert_y = NULL, .topk_idx = idx, .topk_weights = w, .out = out};
    EXPECT(EP_ERR_STATE, ep_ll_combine(g, &ca, NULL), "has not received");
    EXPECT(EP_OK, ep_hook_run(hook), NULL);
    EXPECT(EP_ERR_STATE, ep_hook_run(hook), "already ran");
    uint16_t *y = calloc((size_t)24 * 8 * H, 2); /* [L][S][H]: L * S = E * M */
    ca.expert_y = y;
    memcpy(idx2, idx, sizeof idx);
    idx2[0] = 23;
    ca.topk_idx = idx2;
    EXPECT(EP_ERR_INVALID, ep_ll_combine(g, &ca, NULL), "differs from the dispatch");
    ca.topk_idx = idx;
    ca.topk_weights = NULL;
    EXPECT(EP_ERR_INVALID, ep_ll_combine(g, &ca, NULL), "topk_weights is NULL");
    ca.topk_weights = w;
    ca.use_hook = 1;
    EXPECT(EP_OK, ep_ll_combine(g, &ca, &hook), NULL); /* buffer 1, hook pending */
    a.use_hook = 0;
    EXPECT(EP_OK, ep_ll_dispatch(g, &a, &o, &h, NULL), NULL); /* buffer 0 */
    /* buffer 1 again while its combine hook is pending */
    EXPECT(EP_ERR_STATE, ep_ll_dispatch(g, &a, &o, &h, NULL), "pending hook");
    EXPECT(EP_OK, ep_hook_run(hook), NULL);
    ca.use_hook = 0;
    (void)h0;
    EXPECT(EP_OK, ep_ll_dispatch(g, &a, &o, &h, NULL), NULL); /* buffer 1 */
    EXPECT(EP_OK, ep_ll_dispatch(g, &a, &o, &h, NULL), NULL); /* buffer 0 */
    ca.handle = h;
    EXPECT(EP_OK, ep_ll_combine(g, &ca, NULL), NULL);

    /* HT */
    ep_ht_layout_t lay = {NULL, NULL, NULL};
    int32_t per_rank[4], per_expert[24];
    uint8_t in_rank[T * 4];
    EXPECT(EP_ERR_INVALID, ep_get_dispatch_layout(g, idx, T, &lay, NULL), "NULL");
    lay = (ep_ht_layout_t){per_rank, per_expert, in_rank};
    EXPECT(EP_ERR_INVALID, ep_get_dispatch_layout(g, idx, 9, &lay, NULL), "num_tokens 9");
    idx2[0] = 99;
    EXPECT(EP_ERR_INVALID, ep_get_dispatch_layout(g, idx2, T, &lay, NULL), "= 99");
    EXPECT(EP_OK, ep_get_dispatch_layout(g, idx, T, &lay, NULL), NULL);
    ep_ht_dispatch_args_t ha = {.x = x, .num_tokens = T, .topk_idx = idx, .topk_weights = w};
    int cap = ep_ht_max_recv_tokens(g);
    ep_ht_dispatch_out_t ho = {.capacity = cap};
    ep_ht_handle_t *hh = NULL;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch(g, &ha, &ho, &hh), "recv_x is NULL");
    ho.recv_x = calloc((size_t)cap * H, 2);
    ho.recv_topk_idx = calloc((size_t)cap * K, 4);
    ho.recv_topk_weights = calloc((size_t)cap * K, 4);
    ho.num_recv_per_expert = calloc(24, 4);
    ho.capacity = -1;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch(g, &ha, &ho, &hh), "capacity -1");
    ho.capacity = cap;
    ha.expert_alignment = -4;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch(g, &ha, &ho, &hh), "expert_alignment");
    ha.expert_alignment = 0;
    ha.use_fp8 = 1;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch(g, &ha, &ho, &hh), "multiple of 128");
    ha.use_fp8 = 0;
    ha.num_tokens = 100;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch(g, &ha, &ho, &hh), "num_tokens 100");
    ha.num_tokens = T;
    EXPECT(EP_OK, ep_ht_dispatch(g, &ha, &ho, &hh), NULL);
    ha.num_tokens = T - 1;
    EXPECT(EP_ERR_INVALID, ep_ht_dispatch_cached(g, hh, &ha, &ho), "differs from the handle");
    ha.num_tokens = T;
    EXPECT(EP_ERR_INVALID, ep_ht_combine(g, hh, ho.recv_x, NULL, NULL), "out is NULL");
    EXPECT(EP_OK, ep_ht_combine(g, hh, ho.recv_x, out, NULL), NULL);
    ep_ht_handle_destroy(hh);
    free(ho.recv_x);
    free(ho.recv_topk_idx);
    free(ho.recv_topk_weights);
    free(ho.num_recv_per_expert);
    free(y);
    ep_group_destroy(g);
    return fails;
}

static void bad_arguments_are_rejected(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(1, bad_args_rank, NULL), 0);
    assert_int_equal(run_ranks(4, bad_args_rank, NULL), 0);
}

static int absent_at_create(int rank, const ep_bootstrap_t *bs, void *arg)
{
    if (rank == 2) return 0; /* never shows up */
    ep_config_t c;
    ep_group_t *g;
    base_cfg(&c);
    c.timeout_ms = 300;
    ep_status_t st = ep_group_create(&c, bs, &g);
    if (st != EP_ERR_TIMEOUT || ep_group_failed_peer(NULL) != 2 ||
        !strstr(ep_group_last_error(NULL), "rank(s) 2 did not join")) {
        fprintf(stderr, "rank %d: status %d peer %d '%s'\n", rank, st, ep_group_failed_peer(NULL),
                ep_group_last_error(NULL));
        return 1;
    }
    return 0;
}

static void missing_rank_at_create_times_out(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(3, absent_at_create, NULL), 0);
}

static int absent_at_op(int rank, const ep_bootstrap_t *bs, void *arg)
{
    ep_config_t c;
    ep_group_t *g;
    int fails = 0;
    base_cfg(&c);
    c.timeout_ms = 300;
    if (ep_group_create(&c, bs, &g)) return 1;
    if (rank != 2) {
        uint16_t x[2 * 256] = {0};
        int32_t idx[2 * 4] = {0, 4, 8, 12, 1, 5, 9, 13};
        ep_ll_dispatch_args_t a = {.x = x, .num_tokens = 2, .topk_idx = idx};
        ep_ll_dispatch_out_t o;
        ep_ll_handle_t *h;
        EXPECT(EP_ERR_TIMEOUT, ep_ll_dispatch(g, &a, &o, &h, NULL), "no signal from rank 2");
        if (ep_group_failed_peer(g) != 2) fails++;
        /* The group stays failed: the next op fails fast. */
        EXPECT(EP_ERR_PEER, ep_ll_dispatch(g, &a, &o, &h, NULL), "rank 2");
    } else {
        /* Come to the teardown late but within the others' timeout, so that the barrier of
         * destroy completes and every buffer is freed. */
        struct timespec ts = {0, 400 * 1000000L};
        nanosleep(&ts, NULL);
    }
    ep_group_destroy(g);
    return fails;
}

static void missing_rank_at_op_times_out(void **state)
{
    (void)state;
    assert_int_equal(run_ranks(3, absent_at_op, NULL), 0);
}

struct abort_arg {
    ep_group_t *g0;
    int done;
};

static void *aborter(void *p)
{
    struct abort_arg *a = p;
    struct timespec ts = {0, 100 * 1000000L};
    nanosleep(&ts, NULL);
    ep_group_abort(a->g0, 1);
    return NULL;
}

static int abort_rank(int rank, const ep_bootstrap_t *bs, void *arg)
{
    struct abort_arg *aa = arg;
    ep_config_t c;
    ep_group_t *g;
    int fails = 0;
    base_cfg(&c);
    c.timeout_ms = 20000;
    if (ep_group_create(&c, bs, &g)) return 1;
    if (rank == 0) {
        pthread_t th;
        aa->g0 = g;
        pthread_create(&th, NULL, aborter, aa);
        uint16_t x[256] = {0};
        int32_t idx[4] = {0, 4, 8, 12};
        ep_ll_dispatch_args_t a = {.x = x, .num_tokens = 1, .topk_idx = idx};
        ep_ll_dispatch_out_t o;
        ep_ll_handle_t *h;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        EXPECT(EP_ERR_ABORTED, ep_ll_dispatch(g, &a, &o, &h, NULL), "rank 1 marked down");
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (t1.tv_sec - t0.tv_sec > 5) fails++;
        EXPECT(EP_ERR_ABORTED, ep_ll_dispatch(g, &a, &o, &h, NULL), NULL);
        pthread_join(th, NULL);
    }
    ep_group_destroy(g);
    return fails;
}

static void abort_releases_a_waiting_rank(void **state)
{
    (void)state;
    struct abort_arg aa = {0};
    assert_int_equal(run_ranks(2, abort_rank, &aa), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(basics),
        cmocka_unit_test(bad_configs_are_rejected),
        cmocka_unit_test(config_mismatch_between_ranks),
        cmocka_unit_test(bad_arguments_are_rejected),
        cmocka_unit_test(missing_rank_at_create_times_out),
        cmocka_unit_test(missing_rank_at_op_times_out),
        cmocka_unit_test(abort_releases_a_waiting_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
