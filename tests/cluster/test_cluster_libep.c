/* libep bootstrapped through the control plane: two nodes (one process, one libuv loop) with two
 * ranks each form a cluster; four engine threads create an EP group (cpu backend, tcp wire)
 * from epd_cluster_bootstrap() and run one LL dispatch + combine. With identity experts and
 * top-2 weights of 0.5 each, combine must return every token unchanged (exact in bf16), which
 * the test checks against its own input. Then the ranks of the two nodes run one allgather of
 * the same size under different purposes (epd_cluster_bootstrap_purpose): every rank's fails,
 * and the reason names both purposes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "free_port.h"
#include "cluster.h"
#include "log.h"

#define NODES 2
#define LOCAL 2
#define RANKS (NODES * LOCAL)
#define EXPERTS 8
#define HIDDEN 128
#define TOKENS 3
#define TOPK 2

typedef struct engine {
    ep_bootstrap_t bs;
    int status;
    int rank, size;
    int mismatches;
    char err[256];
} engine_t;

static int done;

static uint16_t bf16_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16); /* the inputs below are exact in bf16 */
}

static void *engine_main(void *arg)
{
    engine_t *e = arg;
    ep_config_t cfg;
    ep_group_t *g = NULL;
    ep_config_init(&cfg);
    cfg.backend = EP_BACKEND_CPU;
    cfg.transport = EP_TRANSPORT_TCP;
    cfg.num_experts = EXPERTS;
    cfg.hidden = HIDDEN;
    cfg.num_topk = TOPK;
    cfg.ll_max_tokens = TOKENS;
    cfg.ht_max_tokens = 0;
    cfg.timeout_ms = 10000;
    cfg.tcp_host = "127.0.0.1";
    cfg.tcp_port = 0;
    e->status = ep_group_create(&cfg, &e->bs, &g);
    if (e->status != EP_OK) {
        snprintf(e->err, sizeof e->err, "ep_group_create: %s", ep_strerror(e->status));
        goto out;
    }
    e->rank = ep_group_rank(g);
    e->size = ep_group_size(g);
    uint16_t x[TOKENS * HIDDEN], out[TOKENS * HIDDEN];
    int32_t idx[TOKENS * TOPK];
    float w[TOKENS * TOPK];
    for (int t = 0; t < TOKENS; t++) {
        for (int h = 0; h < HIDDEN; h++)
            x[t * HIDDEN + h] = bf16_of((float)(e->rank * 8 + t + h % 5));
        /* two distinct experts, on this rank and on the next one */
        idx[t * TOPK] = (e->rank * 2 + t) % EXPERTS;
        idx[t * TOPK + 1] = (e->rank * 2 + t + 3) % EXPERTS;
        w[t * TOPK] = w[t * TOPK + 1] = 0.5f;
    }
    ep_ll_dispatch_args_t da = {.x = x, .num_tokens = TOKENS, .topk_idx = idx, .topk_weights = w};
    ep_ll_dispatch_out_t dout;
    ep_ll_handle_t *h = NULL;
    e->status = ep_ll_dispatch(g, &da, &dout, &h, NULL);
    if (e->status != EP_OK) {
        snprintf(e->err, sizeof e->err, "dispatch: %s", ep_group_last_error(g));
        goto out;
    }
    ep_ll_combine_args_t ca = {.handle = h,
                               .expert_y = (const uint16_t *)dout.recv_x,
                               .topk_idx = idx,
                               .topk_weights = w,
                               .out = out};
    e->status = ep_ll_combine(g, &ca, NULL);
    if (e->status != EP_OK) {
        snprintf(e->err, sizeof e->err, "combine: %s", ep_group_last_error(g));
        goto out;
    }
    for (int i = 0; i < TOKENS * HIDDEN; i++)
        e->mismatches += out[i] != x[i];
out:
    if (g) ep_group_destroy(g);
    __atomic_add_fetch(&done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Ranks out of step: node 0's ranks think they run a step, node 1's a join. */
static void *out_of_step_main(void *arg)
{
    engine_t *e = arg;
    uint64_t in = 7, out[RANKS];
    epd_cluster_bootstrap_purpose(&e->bs, e->rank < LOCAL ? "test: step" : "test: join");
    e->status = e->bs.allgather(e->bs.ctx, &in, out, sizeof in, 10000);
    snprintf(e->err, sizeof e->err, "%s", epd_cluster_bootstrap_last_error());
    __atomic_add_fetch(&done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* A free loopback port, or the test fails. */
static int free_port(void)
{
    int port = test_free_port();
    assert_true(port > 0);
    return port;
}

typedef struct ctx {
    uv_loop_t loop;
    epd_cluster_t *c[NODES];
    int stopped;
    int want; /* 1: wait until formed, 2: until the engines finished, 3: until stopped */
} ctx_t;

static void on_stopped(void *arg)
{
    ((ctx_t *)arg)->stopped++;
}

static void poll_cb(uv_timer_t *t)
{
    ctx_t *x = t->data;
    int ok = 0;
    if (x->want == 1)
        ok = epd_cluster_is_formed(x->c[0]) && epd_cluster_is_formed(x->c[1]) &&
             epd_cluster_epoch(x->c[0]) == epd_cluster_epoch(x->c[1]);
    if (x->want == 2) ok = __atomic_load_n(&done, __ATOMIC_ACQUIRE) == RANKS;
    if (x->want == 3) ok = x->stopped == NODES;
    if (ok) uv_stop(t->loop);
}

static void deadline_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

static void run_for(ctx_t *x, int want, int ms)
{
    uv_timer_t p, d;
    x->want = want;
    uv_timer_init(&x->loop, &p);
    uv_timer_init(&x->loop, &d);
    p.data = x;
    uv_timer_start(&p, poll_cb, 5, 5);
    uv_timer_start(&d, deadline_cb, (uint64_t)ms, 0);
    uv_run(&x->loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&p, NULL);
    uv_close((uv_handle_t *)&d, NULL);
    uv_run(&x->loop, UV_RUN_NOWAIT);
}

static void test_ep_group_over_cluster_bootstrap(void **state)
{
    static ctx_t x;
    static epd_config_t cfg[NODES];
    epd_ctl_secret_t secret;
    int ports[NODES];
    epd_err_t err = {0};
    memset(&x, 0, sizeof x);
    uv_loop_init(&x.loop);
    assert_int_equal(epd_ctl_secret_set(&secret, "libep-over-cluster-secret-42", 28), 0);
    for (int i = 0; i < NODES; i++)
        ports[i] = free_port();
    for (int i = 0; i < NODES; i++) {
        memset(&cfg[i], 0, sizeof cfg[i]);
        cfg[i].node_id = i;
        snprintf(cfg[i].cluster_name, sizeof cfg[i].cluster_name, "libep");
        snprintf(cfg[i].listen.host, sizeof cfg[i].listen.host, "127.0.0.1");
        cfg[i].listen.port = ports[i];
        cfg[i].peers[0].node_id = 1 - i;
        snprintf(cfg[i].peers[0].addr.host, sizeof cfg[i].peers[0].addr.host, "127.0.0.1");
        cfg[i].peers[0].addr.port = ports[1 - i];
        cfg[i].num_peers = 1;
        cfg[i].connect_timeout_ms = 1000;
        cfg[i].heartbeat_interval_ms = 100;
        cfg[i].heartbeat_timeout_ms = 2000;
        epd_cluster_opts_t o;
        memset(&o, 0, sizeof o);
        o.loop = &x.loop;
        o.cfg = &cfg[i];
        o.secret = &secret;
        o.local_ranks = LOCAL;
        o.backend = "cpu";
        o.transport_caps = 1u << EP_TRANSPORT_TCP;
        o.fingerprint = "same";
        o.fingerprint_len = 4;
        o.on_stopped = on_stopped;
        o.cb_ctx = &x;
        if (epd_cluster_create(&o, &x.c[i], &err) != 0) fail_msg("node %d: %s", i, err.msg);
        if (epd_cluster_start(x.c[i], &err) != 0) fail_msg("node %d: %s", i, err.msg);
    }
    run_for(&x, 1, 5000);
    assert_true(epd_cluster_is_formed(x.c[0]) && epd_cluster_is_formed(x.c[1]));

    engine_t eng[RANKS];
    pthread_t th[RANKS];
    memset(eng, 0, sizeof eng);
    for (int i = 0; i < NODES; i++)
        for (int l = 0; l < LOCAL; l++)
            assert_int_equal(epd_cluster_bootstrap(x.c[i], l, &eng[i * LOCAL + l].bs), 0);
    for (int k = 0; k < RANKS; k++)
        pthread_create(&th[k], NULL, engine_main, &eng[k]);
    run_for(&x, 2, 30000);
    assert_int_equal(__atomic_load_n(&done, __ATOMIC_ACQUIRE), RANKS);
    for (int k = 0; k < RANKS; k++) {
        pthread_join(th[k], NULL);
        if (eng[k].status != EP_OK) fail_msg("rank %d: %s", k, eng[k].err);
        assert_int_equal(eng[k].rank, k); /* node_index * ranks_per_node + local */
        assert_int_equal(eng[k].size, RANKS);
        assert_int_equal(eng[k].mismatches, 0);
    }
    __atomic_store_n(&done, 0, __ATOMIC_RELEASE);
    for (int k = 0; k < RANKS; k++)
        pthread_create(&th[k], NULL, out_of_step_main, &eng[k]);
    run_for(&x, 2, 15000);
    assert_int_equal(__atomic_load_n(&done, __ATOMIC_ACQUIRE), RANKS);
    for (int k = 0; k < RANKS; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(eng[k].status, EP_ERR_BOOTSTRAP);
        /* either node's contribution may reach the coordinator first */
        const char *m = eng[k].err;
        if (!strstr(m, "out of step") ||
            !((strstr(m, "node 1 is at test: join") && strstr(m, "node 0 at test: step")) ||
              (strstr(m, "node 0 is at test: step") && strstr(m, "node 1 at test: join"))))
            fail_msg("rank %d: unexpected reason: %s", k, m);
    }
    for (int i = 0; i < NODES; i++)
        epd_cluster_stop(x.c[i], 1, "test done");
    run_for(&x, 3, 5000);
    assert_int_equal(x.stopped, NODES);
    for (int i = 0; i < NODES; i++)
        epd_cluster_destroy(x.c[i]);
    uv_run(&x.loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&x.loop), 0);
}

int main(void)
{
    epd_log_init("test_cluster_libep");
    if (!getenv("EPD_TEST_LOG")) epd_log_set_level(EPD_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ep_group_over_cluster_bootstrap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
