/* The control plane inside epd: the cluster built from the config, its readiness component,
 * and the /v1/cluster and /v1/admin/{drain,undrain,down} endpoints (interface in
 * cluster_daemon.h). */
#include "cluster_daemon.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "log.h"

#define SUB "cluster"

struct epd_cluster_daemon {
    epd_cluster_daemon_opts_t o;
    epd_cluster_t *cluster;
    char *settings;      /* our config as JSON, sent in HELLO */
    char http_addr[300]; /* a copy: the caller's string need not outlive start */
    int draining;
    int ready;
    char reason[512];
    void (*peer_down)(void *ctx, int node_id, const char *reason);
    void *peer_down_ctx;
    epd_engine_cluster_t hooks;
    epd_engine_t *engine;
};

/* How long an engine rank waits for the cluster to form before its group creation fails (the
 * load then fails with this message, or a re-formation tries again): nodes of one cluster are
 * expected to start within minutes of each other. */
#define ENGINE_FORM_WAIT_MS 120000u

/* Global rank of node `id`'s first rank in the complete table (nodes ordered by id). */
static int first_rank_of(const epd_config_t *cfg, int id, int ranks)
{
    int below = cfg->node_id < id;
    for (int i = 0; i < cfg->num_peers; i++)
        below += cfg->peers[i].node_id < id && cfg->peers[i].node_id != cfg->node_id;
    return below * ranks;
}

/* The drain itself is the node's (epd_state_set_drained): the component reports the cluster. */
static void publish(epd_cluster_daemon_t *d)
{
    if (!d->cluster)
        epd_state_set(d->o.state, d->o.component, 1, "single node");
    else
        epd_state_set(d->o.state, d->o.component, d->ready, "%s", d->ready ? "formed" : d->reason);
}

static void on_ready(void *ctx, int ready, const char *reason)
{
    epd_cluster_daemon_t *d = ctx;
    d->ready = ready;
    snprintf(d->reason, sizeof d->reason, "%s", reason);
    /* Heartbeats tell peers (and their /v1/cluster) whether this node serves. */
    if (!d->draining && d->cluster)
        epd_cluster_set_state(d->cluster, ready ? EPD_NODE_SERVING : EPD_NODE_STARTING);
    publish(d);
}

static int local_ranks(const epd_config_t *cfg);

static void on_peer_down(void *ctx, int node_id, const char *reason)
{
    epd_cluster_daemon_t *d = ctx;
    if (d->engine) {
        char why[400];
        snprintf(why, sizeof why, "node %d: %s", node_id, reason);
        epd_engine_peer_down(d->engine, first_rank_of(d->o.cfg, node_id, local_ranks(d->o.cfg)),
                             why);
    }
    if (d->peer_down) d->peer_down(d->peer_down_ctx, node_id, reason);
}

static void on_wake(void *ctx, int node_id)
{
    epd_cluster_daemon_t *d = ctx;
    if (d->engine) epd_engine_wake(d->engine);
}

static int engine_bootstrap(void *ctx, int local, unsigned epoch, ep_bootstrap_t *out,
                            epd_err_t *err)
{
    epd_cluster_daemon_t *d = ctx;
    int rc = epd_cluster_bootstrap_wait(d->cluster, local, epoch, ENGINE_FORM_WAIT_MS, out, err);
    if (rc != 0) return rc;
    if (out->rank != d->hooks.rank_base + local || out->nranks != d->hooks.nranks)
        return epd_err_set(
            err, -EPROTO, "rank table gives local rank %d global rank %d of %d, expected %d of %d",
            local, out->rank, out->nranks, d->hooks.rank_base + local, d->hooks.nranks);
    return 0;
}

static void engine_purpose(void *ctx, const ep_bootstrap_t *bs, const char *what)
{
    (void)ctx;
    epd_cluster_bootstrap_purpose(bs, what);
}

static void engine_wake_peers(void *ctx)
{
    epd_cluster_daemon_t *d = ctx;
    epd_cluster_wake_peers(d->cluster);
}

/* Names the first cluster-wide setting that differs from a peer's config (its JSON dump). */
static int diff_settings(void *ctx, const void *peer, size_t len, char *why, size_t wl)
{
    epd_cluster_daemon_t *d = ctx;
    epd_config_t *pc = malloc(sizeof *pc);
    epd_config_errors_t errs = {0};
    int rc;
    if (!pc) {
        snprintf(why, wl, "out of memory");
        return -1;
    }
    if (epd_config_parse_ex(peer, len, "peer config", EPD_CONFIG_SKIP_FS_CHECKS, pc, &errs) != 0) {
        snprintf(why, wl, "unreadable (%s)", errs.count ? errs.msgs[0] : "invalid");
        rc = -1;
    } else {
        rc = epd_config_diff(d->o.cfg, pc, why, wl);
        if (rc == 0) snprintf(why, wl, "a setting this version does not compare");
        if (rc == 0) rc = -1;
    }
    epd_config_errors_free(&errs);
    free(pc);
    return rc;
}

static void respond_json(epd_http_res_t *res, int status, cJSON *doc)
{
    epd_http_respond_json(res, status, doc, 503, EPD_HTTP_OOM_JSON);
}

static int local_ranks(const epd_config_t *cfg)
{
    return cfg->backend == EPD_BACKEND_CUDA ? cfg->num_gpus : cfg->ranks_per_node;
}

/* A cluster of one: the same document shape as a formed cluster's. */
static cJSON *single_node_json(const epd_cluster_daemon_t *d)
{
    const epd_config_t *cfg = d->o.cfg;
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "node_id", cfg->node_id);
    cJSON_AddStringToObject(o, "name", cfg->name);
    cJSON_AddStringToObject(o, "cluster", cfg->cluster_name);
    cJSON_AddStringToObject(o, "state", d->draining ? "draining" : "serving");
    cJSON_AddNumberToObject(o, "epoch", 0);
    cJSON_AddBoolToObject(o, "formed", 1);
    cJSON_AddBoolToObject(o, "ready", !d->draining);
    cJSON_AddStringToObject(o, "reason", d->draining ? "draining" : "");
    cJSON_AddNumberToObject(o, "coordinator", cfg->node_id);
    cJSON_AddNumberToObject(o, "first_rank", 0);
    cJSON_AddNumberToObject(o, "local_ranks", local_ranks(cfg));
    cJSON *t = cJSON_AddObjectToObject(o, "rank_table");
    cJSON_AddNumberToObject(t, "epoch", 0);
    cJSON_AddNumberToObject(t, "coordinator", cfg->node_id);
    cJSON_AddBoolToObject(t, "complete", 1);
    cJSON_AddNumberToObject(t, "nranks", local_ranks(cfg));
    cJSON *nodes = cJSON_AddArrayToObject(t, "nodes");
    cJSON *n = cJSON_CreateObject();
    cJSON_AddNumberToObject(n, "node_id", cfg->node_id);
    cJSON_AddStringToObject(n, "name", cfg->name);
    cJSON_AddNumberToObject(n, "first_rank", 0);
    cJSON_AddNumberToObject(n, "ranks", local_ranks(cfg));
    cJSON_AddStringToObject(n, "backend", epd_backend_name(cfg->backend));
    cJSON_AddStringToObject(n, "http", d->o.http_addr ? d->o.http_addr : "");
    cJSON_AddItemToArray(nodes, n);
    cJSON_AddArrayToObject(o, "peers");
    return o;
}

static void h_cluster(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_cluster_daemon_t *d = ctx;
    cJSON *doc = d->cluster ? epd_cluster_status_json(d->cluster) : single_node_json(d);
    if (doc && d->cluster && d->draining) {
        cJSON_ReplaceItemInObject(doc, "ready", cJSON_CreateFalse());
        cJSON_ReplaceItemInObject(doc, "reason", cJSON_CreateString("draining"));
    }
    respond_json(res, 200, doc);
    cJSON_Delete(doc);
}

static void set_draining(epd_cluster_daemon_t *d, int on)
{
    d->draining = on;
    epd_state_set_drained(d->o.state, on);
    /* heartbeats tell peers (and their /v1/cluster) whether this node takes work */
    if (d->cluster)
        epd_cluster_set_state(d->cluster, on         ? EPD_NODE_DRAINING
                                          : d->ready ? EPD_NODE_SERVING
                                                     : EPD_NODE_STARTING);
    publish(d);
}

/* New work is refused (503 "draining") from now on; in-flight requests finish. */
static void h_drain(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_cluster_daemon_t *d = ctx;
    if (!d->draining) {
        EPD_INFO(SUB, "drain requested over HTTP: new work is refused until POST "
                      "/v1/admin/undrain; in-flight requests finish");
        set_draining(d, 1);
    }
    static const char body[] = "{\"state\":\"draining\"}\n";
    epd_http_respond(res, 200, "application/json", body, sizeof body - 1);
}

static void h_undrain(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_cluster_daemon_t *d = ctx;
    if (epd_state_phase(d->o.state) != EPD_PHASE_RUNNING) {
        static const char stopping[] =
            "{\"error\":{\"message\":\"the node is stopping; a stop cannot be undone\","
            "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"stopping\"}}\n";
        epd_http_respond(res, 409, "application/json", stopping, sizeof stopping - 1);
        return;
    }
    if (d->draining) {
        EPD_INFO(SUB, "undrain requested over HTTP: taking new work again");
        set_draining(d, 0);
    }
    cJSON *doc = cJSON_CreateObject();
    if (doc) cJSON_AddStringToObject(doc, "state", epd_state_name(d->o.state));
    respond_json(res, 200, doc);
    cJSON_Delete(doc);
}

static void h_down(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_cluster_daemon_t *d = ctx;
    static const char body[] = "{\"state\":\"stopping\"}\n";
    EPD_INFO(SUB, "stop requested over HTTP (POST /v1/admin/down)");
    epd_http_respond(res, 202, "application/json", body, sizeof body - 1);
    if (d->o.request_stop) d->o.request_stop(d->o.ctx, "POST /v1/admin/down");
}

static int add_routes(epd_cluster_daemon_t *d, epd_err_t *err)
{
    int rc;
    if ((rc = epd_http_route(d->o.http, "GET", "/v1/cluster", h_cluster, d)) ||
        (rc = epd_http_route(d->o.http, "POST", "/v1/admin/drain", h_drain, d)) ||
        (rc = epd_http_route(d->o.http, "POST", "/v1/admin/undrain", h_undrain, d)) ||
        (rc = epd_http_route(d->o.http, "POST", "/v1/admin/down", h_down, d)))
        epd_err_set(err, rc, "cluster: registering HTTP routes: %s", strerror(-rc));
    return rc;
}

int epd_cluster_daemon_start(const epd_cluster_daemon_opts_t *o, epd_cluster_daemon_t **out,
                             epd_err_t *err)
{
    epd_cluster_daemon_t *d = calloc(1, sizeof *d);
    const epd_config_t *cfg = o->cfg;
    uint8_t fp[EPD_CFG_FINGERPRINT_LEN];
    int rc;
    *out = NULL;
    if (!d) return epd_err_set(err, -ENOMEM, "cluster: out of memory");
    d->o = *o;
    snprintf(d->http_addr, sizeof d->http_addr, "%s", o->http_addr ? o->http_addr : "");
    d->o.http_addr = d->http_addr;
    if (cfg->num_peers == 0) {
        if ((rc = add_routes(d, err)) != 0) goto fail;
        publish(d);
        *out = d;
        return 0;
    }
    if (epd_config_fingerprint(cfg, fp) != 0) {
        rc = epd_err_set(err, -EIO, "cluster: computing the config fingerprint failed");
        goto fail;
    }
    d->settings = epd_config_dump_json(cfg);
    if (!d->settings) {
        rc = epd_err_set(err, -ENOMEM, "cluster: out of memory");
        goto fail;
    }
    epd_cluster_opts_t co;
    memset(&co, 0, sizeof co);
    co.loop = o->loop;
    co.cfg = cfg;
    co.metrics = o->metrics;
    co.local_ranks = local_ranks(cfg);
    co.num_gpus = cfg->num_gpus;
    for (int i = 0; i < cfg->num_gpus && i < EPD_CFG_MAX_GPUS; i++)
        co.gpus[i].ordinal = cfg->gpus[i];
    co.backend = epd_backend_name(cfg->backend);
    static const ep_transport_kind_t kinds[] = {
        [EPD_TRANSPORT_TCP] = EP_TRANSPORT_TCP,
        [EPD_TRANSPORT_NVLINK] = EP_TRANSPORT_NVLINK,
        [EPD_TRANSPORT_RDMA] = EP_TRANSPORT_RDMA,
    };
    co.transport_caps = (1u << EP_TRANSPORT_TCP) | (1u << kinds[cfg->transport]);
    co.http_addr = d->http_addr;
    co.fingerprint = fp;
    co.fingerprint_len = sizeof fp;
    co.settings = d->settings;
    co.settings_len = strlen(d->settings);
    co.config_diff = diff_settings;
    co.on_ready = on_ready;
    co.on_peer_down = on_peer_down;
    co.on_wake = on_wake;
    co.cb_ctx = d;
    snprintf(d->reason, sizeof d->reason, "starting");
    if ((rc = epd_cluster_create(&co, &d->cluster, err)) != 0) goto fail;
    publish(d);
    if ((rc = add_routes(d, err)) != 0) {
        epd_cluster_destroy(d->cluster); /* not started: no handle is open yet but the async */
        goto fail;
    }
    if ((rc = epd_cluster_start(d->cluster, err)) != 0) {
        epd_cluster_stop(d->cluster, 0, "start failed");
        *out = d; /* handles are closing: destroy after the loop ran */
        return rc;
    }
    *out = d;
    return 0;
fail:
    free(d->settings);
    free(d);
    return rc;
}

void epd_cluster_daemon_on_peer_down(epd_cluster_daemon_t *d,
                                     void (*fn)(void *ctx, int node_id, const char *reason),
                                     void *ctx)
{
    d->peer_down = fn;
    d->peer_down_ctx = ctx;
}

epd_cluster_t *epd_cluster_daemon_cluster(epd_cluster_daemon_t *d)
{
    return d ? d->cluster : NULL;
}

const epd_engine_cluster_t *epd_cluster_daemon_engine_hooks(epd_cluster_daemon_t *d)
{
    if (!d || !d->cluster) return NULL;
    const epd_config_t *cfg = d->o.cfg;
    int peers = 0;
    for (int i = 0; i < cfg->num_peers; i++)
        peers += cfg->peers[i].node_id != cfg->node_id;
    d->hooks.rank_base = first_rank_of(cfg, cfg->node_id, local_ranks(cfg));
    d->hooks.nranks = (peers + 1) * local_ranks(cfg);
    d->hooks.bootstrap = engine_bootstrap;
    d->hooks.wake_peers = engine_wake_peers;
    d->hooks.purpose = engine_purpose;
    d->hooks.ctx = d;
    return &d->hooks;
}

void epd_cluster_daemon_set_engine(epd_cluster_daemon_t *d, epd_engine_t *e)
{
    if (d) d->engine = e;
}

void epd_cluster_daemon_stop(epd_cluster_daemon_t *d, int graceful, const char *why)
{
    if (d && d->cluster) epd_cluster_stop(d->cluster, graceful, why);
}

void epd_cluster_daemon_destroy(epd_cluster_daemon_t *d)
{
    if (!d) return;
    epd_cluster_destroy(d->cluster);
    free(d->settings);
    free(d);
}
