/* Cluster membership over real loopback TCP, several nodes in one process on one libuv loop:
 * formation and rank assignment, libep bootstrap (allgather/barrier from engine threads),
 * a crashed node detected and rejoining at a new epoch, coordinator failover, graceful leave,
 * wrong secret and differing config refused, garbage on the control port rejected and counted.
 * Expected ranks and gathered bytes are computed here from the test's own node list. */
#include <setjmp.h>
#include <errno.h>
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

#define MAXN 4
#define HB_MS 50
#define TO_MS 250

typedef struct node {
    epd_config_t cfg;
    epd_cluster_t *c;
    epd_metrics_t *m;
    int ready;
    char reason[512];
    int downs[64];
    int stopped;
    int ranks;
    char settings[64];
} node_t;

typedef struct world {
    uv_loop_t loop;
    int n;
    int ports[MAXN];
    int ids[MAXN];
    node_t nodes[MAXN];
    epd_ctl_secret_t secret;
} world_t;

/* A free loopback port, or the test fails. */
static int free_port(void)
{
    int port = test_free_port();
    assert_true(port > 0);
    return port;
}

static void on_ready(void *ctx, int ready, const char *reason)
{
    node_t *n = ctx;
    n->ready = ready;
    snprintf(n->reason, sizeof n->reason, "%s", reason);
}

static void on_peer_down(void *ctx, int id, const char *reason)
{
    node_t *n = ctx;
    if (id >= 0 && id < 64) n->downs[id]++;
}

static void on_stopped(void *ctx)
{
    node_t *n = ctx;
    n->stopped = 1;
}

/* Settings blob "key=value"; the diff names the key when values differ. */
static int diff_settings(void *ctx, const void *peer, size_t len, char *why, size_t wl)
{
    node_t *n = ctx;
    if (len == strlen(n->settings) && memcmp(peer, n->settings, len) == 0) return 0;
    const char *eq = memchr(peer, '=', len);
    snprintf(why, wl, "model.max_batch_tokens: this node %s, peer %.*s", n->settings + 19,
             (int)(len - (size_t)(eq ? eq + 1 - (const char *)peer : 0)),
             eq ? eq + 1 : (const char *)peer);
    return 1;
}

static void world_init(world_t *w, int n, int ranks)
{
    memset(w, 0, sizeof *w);
    uv_loop_init(&w->loop);
    w->n = n;
    assert_int_equal(epd_ctl_secret_set(&w->secret, "test-cluster-secret-0123456789", 30), 0);
    for (int i = 0; i < n; i++) {
        w->ports[i] = free_port();
        w->ids[i] = 10 + 7 * i; /* ids need not be dense */
        w->nodes[i].ranks = ranks;
        snprintf(w->nodes[i].settings, sizeof w->nodes[i].settings, "max_batch_tokens = 128");
    }
}

static void node_start(world_t *w, int i, const epd_ctl_secret_t *secret)
{
    node_t *nd = &w->nodes[i];
    epd_cluster_t *c = NULL;
    epd_err_t err = {0};
    epd_config_t *cfg = &nd->cfg;
    memset(cfg, 0, sizeof *cfg);
    cfg->node_id = w->ids[i];
    snprintf(cfg->name, sizeof cfg->name, "node%d", i);
    snprintf(cfg->cluster_name, sizeof cfg->cluster_name, "test");
    snprintf(cfg->listen.host, sizeof cfg->listen.host, "127.0.0.1");
    cfg->listen.port = w->ports[i];
    /* The same peer list on every node, self included (the cluster skips itself). */
    for (int j = 0; j < w->n; j++) {
        cfg->peers[j].node_id = w->ids[j];
        snprintf(cfg->peers[j].addr.host, sizeof cfg->peers[j].addr.host, "127.0.0.1");
        cfg->peers[j].addr.port = w->ports[j];
    }
    cfg->num_peers = w->n;
    cfg->connect_timeout_ms = 500;
    cfg->heartbeat_interval_ms = HB_MS;
    cfg->heartbeat_timeout_ms = TO_MS;
    cfg->shutdown_timeout_ms = 500;
    nd->m = epd_metrics_create();
    nd->ready = 0;
    nd->stopped = 0;
    memset(nd->downs, 0, sizeof nd->downs);
    epd_cluster_opts_t o;
    memset(&o, 0, sizeof o);
    o.loop = &w->loop;
    o.cfg = cfg;
    o.metrics = nd->m;
    o.secret = secret;
    o.local_ranks = nd->ranks;
    o.num_gpus = 1;
    o.gpus[0].ordinal = i;
    snprintf(o.gpus[0].pci_bus_id, sizeof o.gpus[0].pci_bus_id, "0000:%02x:00.0", i);
    o.backend = "cpu";
    o.transport_caps = 1u << EP_TRANSPORT_TCP;
    o.fingerprint = nd->settings;
    o.fingerprint_len = strlen(nd->settings);
    o.settings = nd->settings;
    o.settings_len = strlen(nd->settings);
    o.config_diff = diff_settings;
    char ep[32];
    snprintf(ep, sizeof ep, "endpoint-of-%d", w->ids[i]);
    o.endpoint = ep;
    o.endpoint_len = strlen(ep);
    o.on_ready = on_ready;
    o.on_peer_down = on_peer_down;
    o.on_stopped = on_stopped;
    o.cb_ctx = nd;
    if (epd_cluster_create(&o, &c, &err) != 0) fail_msg("epd_cluster_create: %s", err.msg);
    if (epd_cluster_start(c, &err) != 0) fail_msg("epd_cluster_start: %s", err.msg);
    nd->c = c;
}

typedef int (*pred_fn)(world_t *w, void *arg);

typedef struct waiter {
    world_t *w;
    pred_fn f;
    void *arg;
    int ok;
} waiter_t;

static void poll_cb(uv_timer_t *t)
{
    waiter_t *wt = t->data;
    if (wt->f(wt->w, wt->arg)) {
        wt->ok = 1;
        uv_stop(t->loop);
    }
}

static void deadline_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

static void close_noop(uv_handle_t *h) {}

/* Runs the loop until f holds or timeout_ms passes; returns whether it held. */
static int run_until(world_t *w, pred_fn f, void *arg, int timeout_ms)
{
    waiter_t wt = {w, f, arg, 0};
    uv_timer_t poll, dl;
    uv_timer_init(&w->loop, &poll);
    uv_timer_init(&w->loop, &dl);
    poll.data = &wt;
    uv_timer_start(&poll, poll_cb, 5, 5);
    uv_timer_start(&dl, deadline_cb, (uint64_t)timeout_ms, 0);
    if (f(w, arg))
        wt.ok = 1;
    else
        uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&poll, close_noop);
    uv_close((uv_handle_t *)&dl, close_noop);
    uv_run(&w->loop, UV_RUN_NOWAIT);
    return wt.ok;
}

static int is_stopped(world_t *w, void *arg)
{
    return w->nodes[(intptr_t)arg].stopped;
}

static void node_stop(world_t *w, int i, int graceful)
{
    node_t *nd = &w->nodes[i];
    epd_cluster_stop(nd->c, graceful, graceful ? "test stop" : NULL);
    if (!run_until(w, is_stopped, (void *)(intptr_t)i, 3000)) {
        uv_print_all_handles(&w->loop, stderr);
        fail();
    }
    epd_cluster_destroy(nd->c);
    epd_metrics_destroy(nd->m);
    nd->c = NULL;
    nd->m = NULL;
}

static void world_fini(world_t *w)
{
    for (int i = 0; i < w->n; i++)
        if (w->nodes[i].c) node_stop(w, i, 1);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&w->loop), 0);
}

/* All running nodes (mask) ready at one common epoch greater than *(uint64_t *)arg. */
typedef struct formed_arg {
    unsigned mask;
    uint64_t after;
} formed_arg_t;

static int all_formed(world_t *w, void *arg)
{
    formed_arg_t *fa = arg;
    uint64_t e = 0;
    for (int i = 0; i < w->n; i++) {
        if (!(fa->mask & (1u << i))) continue;
        node_t *nd = &w->nodes[i];
        if (!nd->c || !nd->ready || !epd_cluster_is_formed(nd->c)) return 0;
        uint64_t ne = epd_cluster_epoch(nd->c);
        if (ne <= fa->after || (e && ne != e)) return 0;
        e = ne;
    }
    return 1;
}

/* A world of n nodes (ranks each), all started in id order, that has formed. */
static void world_form(world_t *w, int n, int ranks)
{
    world_init(w, n, ranks);
    for (int i = 0; i < n; i++)
        node_start(w, i, &w->secret);
    formed_arg_t fa = {(1u << n) - 1, 0};
    assert_true(run_until(w, all_formed, &fa, 5000));
}

static double metric(node_t *nd, const char *name, const char *labels)
{
    epd_metric_t *m = epd_metrics_counter(
        nd->m, name, "Control-plane frames rejected (the link was closed), by reason", labels);
    return epd_metric_value(m);
}

static void check_ranks(world_t *w, unsigned mask)
{
    /* Reference: nodes ordered by id, rank = index * ranks_per_node. */
    int order[MAXN], k = 0;
    for (int i = 0; i < w->n; i++)
        if (mask & (1u << i)) order[k++] = i;
    for (int a = 0; a < k; a++)
        for (int b = a + 1; b < k; b++)
            if (w->ids[order[b]] < w->ids[order[a]]) {
                int t = order[a];
                order[a] = order[b];
                order[b] = t;
            }
    for (int idx = 0; idx < k; idx++) {
        node_t *nd = &w->nodes[order[idx]];
        assert_int_equal(epd_cluster_first_rank(nd->c), idx * nd->ranks);
        assert_int_equal(epd_cluster_nranks(nd->c), k * nd->ranks);
    }
}

static void test_forms_and_assigns_ranks(void **state)
{
    world_t w;
    world_init(&w, 3, 2);
    for (int i = 2; i >= 0; i--)
        node_start(&w, i, &w.secret);
    formed_arg_t fa = {0x7, 0};
    assert_true(run_until(&w, all_formed, &fa, 5000));
    check_ranks(&w, 0x7);
    /* Every node reports the same table through the status document. */
    for (int i = 0; i < 3; i++) {
        cJSON *s = epd_cluster_status_json(w.nodes[i].c);
        cJSON *t = cJSON_GetObjectItem(s, "rank_table");
        assert_non_null(t);
        assert_true(cJSON_IsTrue(cJSON_GetObjectItem(t, "complete")));
        assert_int_equal(cJSON_GetObjectItem(t, "coordinator")->valueint, w.ids[0]);
        cJSON *nodes = cJSON_GetObjectItem(t, "nodes");
        assert_int_equal(cJSON_GetArraySize(nodes), 3);
        cJSON *n2 = cJSON_GetArrayItem(nodes, 2);
        assert_int_equal(cJSON_GetObjectItem(n2, "node_id")->valueint, w.ids[2]);
        assert_string_equal(
            cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(n2, "gpus"), 0),
                                "pci_bus_id")
                ->valuestring,
            "0000:02:00.0");
        assert_int_equal(cJSON_GetObjectItem(n2, "endpoint_bytes")->valueint,
                         (int)strlen("endpoint-of-24"));
        cJSON *peers = cJSON_GetObjectItem(s, "peers");
        assert_int_equal(cJSON_GetArraySize(peers), 2);
        cJSON_Delete(s);
    }
    for (int i = 0; i < 3; i++) {
        epd_metric_t *g = epd_metrics_gauge(w.nodes[i].m, "epd_cluster_epoch",
                                            "Epoch of the rank table this node holds", NULL);
        double epoch = epd_metric_value(g);
        assert_true(epoch == (double)epd_cluster_epoch(w.nodes[i].c));
    }
    world_fini(&w);
}

/* ---- bootstrap from engine threads ---- */

typedef struct engine {
    ep_bootstrap_t bs;
    uint8_t out[MAXN * 4 * 16];
    int st_gather;
    int st_barrier;
    unsigned timeout_ms;
    int skip;
} engine_t;

static void pattern(int rank, uint8_t *p)
{
    for (int i = 0; i < 16; i++)
        p[i] = (uint8_t)(rank * 31 + i * 7 + 1);
}

static void *engine_main(void *arg)
{
    engine_t *e = arg;
    uint8_t in[16];
    pattern(e->bs.rank, in);
    e->st_gather = e->bs.allgather(e->bs.ctx, in, e->out, sizeof in, e->timeout_ms);
    e->st_barrier = e->st_gather ? e->st_gather : e->bs.barrier(e->bs.ctx, e->timeout_ms);
    return NULL;
}

typedef struct threads_arg {
    int n;
    int *done;
} threads_arg_t;

static int threads_done(world_t *w, void *arg)
{
    threads_arg_t *ta = arg;
    return __atomic_load_n(ta->done, __ATOMIC_ACQUIRE) == ta->n;
}

typedef struct runner {
    engine_t *e;
    int *done;
} runner_t;

static void *runner_main(void *arg)
{
    runner_t *r = arg;
    engine_main(r->e);
    __atomic_add_fetch(r->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_bootstrap_allgather(void **state)
{
    world_t w;
    world_form(&w, 3, 2);
    engine_t eng[6];
    runner_t run[6];
    pthread_t th[6];
    int done = 0;
    memset(eng, 0, sizeof eng);
    for (int i = 0; i < 3; i++)
        for (int l = 0; l < 2; l++) {
            engine_t *e = &eng[i * 2 + l];
            assert_int_equal(epd_cluster_bootstrap(w.nodes[i].c, l, &e->bs), 0);
            e->timeout_ms = 5000;
        }
    for (int k = 0; k < 6; k++) {
        run[k].e = &eng[k];
        run[k].done = &done;
        pthread_create(&th[k], NULL, runner_main, &run[k]);
    }
    threads_arg_t ta = {6, &done};
    assert_true(run_until(&w, threads_done, &ta, 10000));
    for (int k = 0; k < 6; k++)
        pthread_join(th[k], NULL);
    uint8_t want[6 * 16];
    for (int r = 0; r < 6; r++)
        pattern(r, want + r * 16);
    for (int k = 0; k < 6; k++) {
        assert_int_equal(eng[k].st_gather, 0);
        assert_int_equal(eng[k].st_barrier, 0);
        assert_int_equal(eng[k].bs.nranks, 6);
        assert_memory_equal(eng[k].out, want, sizeof want);
    }

    /* Only node 0's ranks take part: they time out, and say so, within their timeout. */
    done = 0;
    for (int l = 0; l < 2; l++) {
        eng[l].timeout_ms = 300;
        run[l].e = &eng[l];
        pthread_create(&th[l], NULL, runner_main, &run[l]);
    }
    threads_arg_t ta2 = {2, &done};
    assert_true(run_until(&w, threads_done, &ta2, 5000));
    for (int l = 0; l < 2; l++) {
        pthread_join(th[l], NULL);
        assert_int_equal(eng[l].st_gather, EP_ERR_TIMEOUT);
    }
    world_fini(&w);
}

static void test_bootstrap_wait_bounded(void **state)
{
    world_t w;
    epd_err_t err;
    ep_bootstrap_t bs;
    world_init(&w, 2, 1);
    node_start(&w, 0, &w.secret);
    /* node 1 is not running: the wait ends at its bound and says why */
    assert_int_equal(epd_cluster_bootstrap_wait(w.nodes[0].c, 0, 0, 200, &bs, &err), -ETIMEDOUT);
    assert_non_null(strstr(err.msg, "did not form within 200 ms"));
    assert_int_equal(epd_cluster_bootstrap(w.nodes[0].c, 0, &bs), EP_ERR_STATE);
    node_start(&w, 1, &w.secret);
    formed_arg_t fa = {0x3, 0};
    assert_true(run_until(&w, all_formed, &fa, 5000));
    assert_int_equal(epd_cluster_bootstrap_wait(w.nodes[1].c, 0, 7, 200, &bs, &err), 0);
    assert_int_equal(bs.rank, 1);
    assert_int_equal(bs.nranks, 2);
    world_fini(&w);
}

/* ---- failures ---- */

typedef struct peer_arg {
    unsigned observers;
    int peer_id;
    epd_peer_state_t st;
} peer_arg_t;

static int peer_in_state(world_t *w, void *arg)
{
    peer_arg_t *pa = arg;
    for (int i = 0; i < w->n; i++)
        if ((pa->observers & (1u << i)) &&
            epd_cluster_peer_state(w->nodes[i].c, pa->peer_id) != pa->st)
            return 0;
    return 1;
}

static void test_crash_detected_and_rejoin(void **state)
{
    world_t w;
    world_form(&w, 4, 1);
    uint64_t e1 = epd_cluster_epoch(w.nodes[0].c);

    /* Crash node 2: no BYE, its sockets just close. */
    node_stop(&w, 2, 0);
    peer_arg_t pa = {0xb, w.ids[2], EPD_PEER_DOWN};
    /* Down rule: 2 x heartbeat timeout of silence, checked every interval. */
    assert_true(run_until(&w, peer_in_state, &pa, 2 * TO_MS + 4 * HB_MS + 500));
    for (int i = 0; i < 4; i++) {
        if (i == 2) continue;
        assert_false(w.nodes[i].ready);
        char want[32];
        snprintf(want, sizeof want, "node %d down", w.ids[2]);
        assert_non_null(strstr(w.nodes[i].reason, want));
        assert_int_equal(w.nodes[i].downs[w.ids[2]], 1);
    }
    /* The coordinator replaced the table with one without node 2. */
    uint64_t e2 = epd_cluster_epoch(w.nodes[0].c);
    assert_true(e2 > e1);
    assert_int_equal(epd_cluster_nranks(w.nodes[0].c), 3);

    /* Restart: it rejoins and the cluster forms again at a newer epoch. */
    node_start(&w, 2, &w.secret);
    formed_arg_t fb = {0xf, e2};
    assert_true(run_until(&w, all_formed, &fb, 5000));
    check_ranks(&w, 0xf);
    world_fini(&w);
}

static void test_quick_restart_reforms(void **state)
{
    /* Restarted faster than the down rule fires: the peers never see it down, but the new
     * process (new incarnation) holds no table, so the cluster must form again anew. */
    world_t w;
    world_form(&w, 3, 1);
    uint64_t e1 = epd_cluster_epoch(w.nodes[0].c);
    for (int victim = 2; victim >= 0; victim -= 2) { /* a member, then the coordinator */
        node_stop(&w, victim, 0);
        node_start(&w, victim, &w.secret);
        formed_arg_t fb = {0x7, e1};
        assert_true(run_until(&w, all_formed, &fb, 5000));
        for (int i = 0; i < 3; i++)
            if (i != victim) assert_int_equal(w.nodes[i].downs[w.ids[victim]], 1);
        e1 = epd_cluster_epoch(w.nodes[0].c);
    }
    check_ranks(&w, 0x7);
    world_fini(&w);
}

static void test_coordinator_failover(void **state)
{
    world_t w;
    world_form(&w, 3, 1);
    uint64_t e1 = epd_cluster_epoch(w.nodes[1].c);
    node_stop(&w, 0, 0); /* the coordinator crashes */
    peer_arg_t pa = {0x6, w.ids[0], EPD_PEER_DOWN};
    assert_true(run_until(&w, peer_in_state, &pa, 2000));
    /* Node 1 (now lowest) re-tables; then node 0 returns and takes over again. */
    node_start(&w, 0, &w.secret);
    formed_arg_t fb = {0x7, e1};
    assert_true(run_until(&w, all_formed, &fb, 5000));
    cJSON *s = epd_cluster_status_json(w.nodes[2].c);
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(s, "rank_table"), "coordinator")->valueint,
        w.ids[0]);
    cJSON_Delete(s);
    check_ranks(&w, 0x7);
    world_fini(&w);
}

static void test_graceful_leave_is_immediate(void **state)
{
    world_t w;
    world_form(&w, 2, 1);
    node_stop(&w, 1, 1);
    peer_arg_t pa = {0x1, w.ids[1], EPD_PEER_DOWN};
    /* Well before the silence rule could fire (2 x timeout). */
    assert_true(run_until(&w, peer_in_state, &pa, TO_MS));
    assert_non_null(strstr(w.nodes[0].reason, "left the cluster"));
    world_fini(&w);
}

static void test_wrong_secret_refused_and_counted(void **state)
{
    world_t w;
    epd_ctl_secret_t bad;
    world_init(&w, 2, 1);
    assert_int_equal(epd_ctl_secret_set(&bad, "not-the-cluster-secret-at-all!", 30), 0);
    node_start(&w, 0, &w.secret);
    node_start(&w, 1, &bad);
    /* Node 0 (lower id) connects; node 1 answers with a proof node 0 cannot verify. Both keep
     * retrying; neither ever sees the other up. */
    peer_arg_t up = {0x1, w.ids[1], EPD_PEER_UP};
    assert_false(run_until(&w, peer_in_state, &up, 1500));
    assert_int_equal(epd_cluster_peer_state(w.nodes[0].c, w.ids[1]), EPD_PEER_UNKNOWN);
    assert_int_equal(epd_cluster_peer_state(w.nodes[1].c, w.ids[0]), EPD_PEER_UNKNOWN);
    assert_false(w.nodes[0].ready);
    assert_true(metric(&w.nodes[0], "epd_ctl_rejected_frames_total", "reason=\"auth_failed\"") >=
                1);
    world_fini(&w);
}

static void test_config_difference_named(void **state)
{
    world_t w;
    world_init(&w, 2, 1);
    snprintf(w.nodes[1].settings, sizeof w.nodes[1].settings, "max_batch_tokens = 256");
    node_start(&w, 0, &w.secret);
    node_start(&w, 1, &w.secret);
    peer_arg_t pa = {0x1, w.ids[1], EPD_PEER_REFUSED};
    assert_true(run_until(&w, peer_in_state, &pa, 2000));
    peer_arg_t pb = {0x2, w.ids[0], EPD_PEER_REFUSED};
    assert_true(run_until(&w, peer_in_state, &pb, 2000));
    for (int i = 0; i < 2; i++) {
        assert_false(w.nodes[i].ready);
        assert_non_null(strstr(w.nodes[i].reason, "model.max_batch_tokens"));
    }
    world_fini(&w);
}

static int raw_connect(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    assert_int_equal(connect(s, (struct sockaddr *)&a, sizeof a), 0);
    return s;
}

typedef struct count_arg {
    node_t *nd;
    const char *labels;
    double want;
} count_arg_t;

static int counted(world_t *w, void *arg)
{
    count_arg_t *ca = arg;
    return metric(ca->nd, "epd_ctl_rejected_frames_total", ca->labels) >= ca->want;
}

static void test_garbage_rejected_and_counted(void **state)
{
    world_t w;
    world_init(&w, 1, 1);
    node_start(&w, 0, &w.secret);
    node_t *nd = &w.nodes[0];
    int port = epd_cluster_listen_port(nd->c);

    int s = raw_connect(port);
    assert_int_equal(write(s, "GET / HTTP/1.1\r\n\r\n", 18), 18);
    count_arg_t c1 = {nd, "reason=\"bad_magic\"", 1};
    assert_true(run_until(&w, counted, &c1, 2000));
    close(s);

    uint8_t hdr[12] = {0x45, 0x50, 0x44, 0x43, 1, EPD_CTL_BOOT_CONTRIB, 0, 0, 0x7f, 0, 0, 0};
    s = raw_connect(port);
    assert_int_equal(write(s, hdr, sizeof hdr), (ssize_t)sizeof hdr);
    count_arg_t c2 = {nd, "reason=\"oversize\"", 1};
    assert_true(run_until(&w, counted, &c2, 2000));
    close(s);

    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_COMMIT);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, 99);
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    s = raw_connect(port);
    assert_int_equal(write(s, b.p, b.len), (ssize_t)b.len);
    count_arg_t c3 = {nd, "reason=\"unauthenticated\"", 1};
    assert_true(run_until(&w, counted, &c3, 2000));
    close(s);

    /* Half a frame, then the peer hangs up. */
    s = raw_connect(port);
    assert_int_equal(write(s, b.p, b.len - 3), (ssize_t)b.len - 3);
    close(s);
    count_arg_t c4 = {nd, "reason=\"truncated\"", 1};
    assert_true(run_until(&w, counted, &c4, 2000));
    epd_ctl_buf_fini(&b);
    /* Still serving: a single-node cluster forms on its own. */
    formed_arg_t fa = {0x1, 0};
    assert_true(run_until(&w, all_formed, &fa, 2000));
    world_fini(&w);
}

int main(void)
{
    epd_log_init("test_cluster_loop");
    if (!getenv("EPD_TEST_LOG")) epd_log_set_level(EPD_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forms_and_assigns_ranks),
        cmocka_unit_test(test_bootstrap_allgather),
        cmocka_unit_test(test_bootstrap_wait_bounded),
        cmocka_unit_test(test_crash_detected_and_rejoin),
        cmocka_unit_test(test_quick_restart_reforms),
        cmocka_unit_test(test_coordinator_failover),
        cmocka_unit_test(test_graceful_leave_is_immediate),
        cmocka_unit_test(test_wrong_secret_refused_and_counted),
        cmocka_unit_test(test_config_difference_named),
        cmocka_unit_test(test_garbage_rejected_and_counted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
