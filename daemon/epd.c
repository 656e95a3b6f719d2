/* epd's main: arguments, config, the loop with its HTTP server, signals (stop, reload),
 * systemd notification (READY, STATUS, STOPPING, WATCHDOG) and the built-in endpoints
 * (/healthz, /readyz, /metrics, /v1/status). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <uv.h>

#include "cluster_daemon.h"
#include "api_openai.h"
#include "engine.h"
#include "epd_config.h"
#include "http.h"
#include "http_auth.h"
#include "log.h"
#include "metrics.h"
#include "procstats.h"
#include "state.h"

#define SUB "main"
#define EPD_DEFAULT_CONFIG "/etc/epd/epd.json"

typedef struct daemon {
    uv_loop_t loop;
    const char *config_path;
    epd_config_t *cfg;
    epd_metrics_t *metrics;
    epd_procstats_t ps;
    epd_state_t *state;
    int cluster_id;
    epd_cluster_daemon_t *cluster; /* the control plane (cluster_daemon.c) */
    epd_http_server_t *http;
    epd_http_auth_t *auth; /* the guard of d->http */
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t watchdog;
    uv_timer_t shutdown_timer;
    int loop_ok;
    int watchdog_on;
    int stopping;
    int exit_code;
    epd_metric_t *reload_ok, *reload_failed;
    /* serving (engine.c, api_openai.c): NULL without model.path */
    epd_engine_t *engine;
    epd_api_t *api;
    /* why start() failed, in the words of the part that failed: main logs it and tells systemd
     * (a bare status code's errno text, "operation not supported on socket" for a model's
     * ENOTSUP, would stand in for the reason) */
    char start_err[1200];
} daemon_t;

static void usage(FILE *out)
{
    fprintf(out, "Usage: epd [-c FILE] [--check]\n"
                 "       epd --version | --help\n"
                 "\n"
                 "The epd node daemon: serves MoE models with expert parallelism.\n"
                 "\n"
                 "  -c, --config FILE  configuration file (default " EPD_DEFAULT_CONFIG ")\n"
                 "      --check        validate the configuration, print every error, and exit\n"
                 "      --version      print the version and exit\n"
                 "  -h, --help         print this help and exit\n"
                 "\n"
                 "Signals: SIGTERM/SIGINT stop gracefully (in-flight requests get\n"
                 "timeouts.shutdown_ms); SIGHUP re-reads the configuration file.\n"
                 "\n"
                 "Exit status: 0 stopped cleanly or config valid, 1 runtime failure,\n"
                 "2 usage error or invalid configuration.\n");
}

/* ---- endpoints ---- */

static void respond_json(epd_http_res_t *res, int status, cJSON *doc)
{
    epd_http_respond_json(res, status, doc, 503, EPD_HTTP_OOM_JSON);
}

static void h_healthz(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    static const char ok[] = "{\"status\":\"ok\"}\n";
    epd_http_respond(res, 200, "application/json", ok, sizeof(ok) - 1);
}

static void h_readyz(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    daemon_t *d = ctx;
    cJSON *st = epd_state_to_cjson(d->state);
    cJSON *doc = cJSON_CreateObject();
    int ready = epd_state_ready(d->state);
    if (st && doc) {
        cJSON_AddBoolToObject(doc, "ready", ready);
        if (!ready) {
            cJSON *reasons = cJSON_DetachItemFromObject(st, "reasons");
            if (reasons) cJSON_AddItemToObject(doc, "reasons", reasons);
        }
    }
    respond_json(res, ready ? 200 : 503, st && doc ? doc : NULL);
    cJSON_Delete(st);
    cJSON_Delete(doc);
}

static void h_metrics(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    daemon_t *d = ctx;
    char *text = NULL;
    size_t len = 0;
    epd_procstats_update(&d->ps);
    if (epd_metrics_render(d->metrics, &text, &len) != 0) {
        static const char oom[] = "{\"error\":\"out of memory\"}\n";
        epd_http_respond(res, 503, "application/json", oom, sizeof(oom) - 1);
        return;
    }
    epd_http_respond(res, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

static void h_status(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    daemon_t *d = ctx;
    cJSON *doc = cJSON_CreateObject();
    cJSON *st = epd_state_to_cjson(d->state);
    cJSON *cfg = epd_config_to_cjson(d->cfg);
    if (!doc || !st || !cfg) {
        cJSON_Delete(doc);
        cJSON_Delete(st);
        cJSON_Delete(cfg);
        respond_json(res, 503, NULL);
        return;
    }
    cJSON *node = cJSON_AddObjectToObject(doc, "node");
    if (node) {
        cJSON_AddNumberToObject(node, "id", d->cfg->node_id);
        cJSON_AddStringToObject(node, "name", d->cfg->name);
        cJSON_AddStringToObject(node, "cluster", d->cfg->cluster_name);
    }
    cJSON_AddStringToObject(doc, "version", EPD_VERSION);
    cJSON_AddStringToObject(doc, "commit", EPD_COMMIT);
    cJSON_AddNumberToObject(doc, "uptime_seconds", epd_procstats_uptime(&d->ps));
    cJSON_AddStringToObject(doc, "state", epd_state_name(d->state));
    cJSON_AddBoolToObject(doc, "ready", cJSON_IsTrue(cJSON_GetObjectItem(st, "ready")));
    cJSON_AddItemToObject(doc, "reasons", cJSON_DetachItemFromObject(st, "reasons"));
    cJSON_AddItemToObject(doc, "components", cJSON_DetachItemFromObject(st, "components"));
    cJSON_AddNumberToObject(doc, "http_connections", epd_http_server_connections(d->http));
    if (d->engine) cJSON_AddItemToObject(doc, "engine", epd_engine_status_cjson(d->engine));
    if (d->api) cJSON_AddItemToObject(doc, "tokenizer", epd_api_tokenizer_cjson(d->api));
    cJSON_AddItemToObject(doc, "config", cfg);
    respond_json(res, 200, doc);
    cJSON_Delete(doc);
    cJSON_Delete(st);
}

/* ---- systemd ---- */

static void notify_status(daemon_t *d, const char *extra)
{
    sd_notifyf(0, "%sSTATUS=%s; http %s:%d", extra ? extra : "", epd_state_name(d->state),
               d->cfg->http.host, epd_http_server_port(d->http));
}

static void on_watchdog(uv_timer_t *t)
{
    sd_notify(0, "WATCHDOG=1");
}

/* ---- stop ---- */

static void close_handle(uv_handle_t *h)
{
    if (h->loop && !uv_is_closing(h)) uv_close(h, NULL);
}

static void finish_stop(daemon_t *d)
{
    epd_state_set_phase(d->state, EPD_PHASE_STOPPING);
    epd_cluster_daemon_stop(d->cluster, 0, "stopping");
    /* the engine ends its requests (their responses finish) before the server goes */
    epd_api_detach_engine(d->api);
    epd_cluster_daemon_set_engine(d->cluster, NULL);
    if (d->engine) {
        epd_engine_destroy(d->engine);
        d->engine = NULL;
    }
    if (d->http) {
        epd_http_server_destroy(d->http); /* frees itself as its handles close */
        d->http = NULL;
    }
    /* the daemon's own handles; the HTTP server closes its own */
    close_handle((uv_handle_t *)&d->sig_term);
    close_handle((uv_handle_t *)&d->sig_int);
    close_handle((uv_handle_t *)&d->sig_hup);
    close_handle((uv_handle_t *)&d->watchdog);
    close_handle((uv_handle_t *)&d->shutdown_timer);
}

static void on_drained(void *arg)
{
    daemon_t *d = arg;
    EPD_INFO(SUB, "all HTTP connections finished; stopping");
    finish_stop(d);
}

static void on_shutdown_timeout(uv_timer_t *t)
{
    daemon_t *d = t->data;
    EPD_WARN(SUB,
             "timeouts.shutdown_ms (%d ms) elapsed with %d HTTP connection(s) open; "
             "failing them",
             d->cfg->shutdown_timeout_ms, epd_http_server_connections(d->http));
    /* every request still running gets its answer (503, or an SSE error and [DONE]) before
     * the connections close */
    char why[160];
    snprintf(why, sizeof why,
             "the node stopped before this request finished (timeouts.shutdown_ms %d ms "
             "elapsed); retry on another node",
             d->cfg->shutdown_timeout_ms);
    epd_api_fail_all(d->api, why);
    epd_http_server_abort(d->http);
    finish_stop(d);
}

static void begin_stop(daemon_t *d, const char *why)
{
    if (d->stopping) return;
    d->stopping = 1;
    EPD_INFO(SUB, "%s: stopping (in-flight requests get up to %d ms)", why,
             d->cfg->shutdown_timeout_ms);
    epd_state_set_phase(d->state, EPD_PHASE_DRAINING);
    /* Peers learn at once (BYE) instead of after the heartbeat timeout. */
    epd_cluster_daemon_stop(d->cluster, 1, why);
    sd_notify(0, "STOPPING=1\nSTATUS=draining");
    uv_timer_start(&d->shutdown_timer, on_shutdown_timeout, (uint64_t)d->cfg->shutdown_timeout_ms,
                   0);
    epd_http_server_drain(d->http, on_drained, d);
}

/* ---- reload ---- */

static void reload(daemon_t *d)
{
    epd_config_t *nc = malloc(sizeof(*nc));
    epd_config_errors_t errs = {0};
    if (!nc) {
        EPD_ERROR(SUB, "reload of %s: out of memory; keeping the running config", d->config_path);
        epd_metric_add(d->reload_failed, 1);
        return;
    }
    sd_notify(0, "RELOADING=1");
    if (epd_config_load(d->config_path, nc, &errs) != 0) {
        EPD_ERROR(SUB, "reload of %s failed with %d error(s); keeping the running config",
                  d->config_path, errs.count + errs.dropped);
        for (int i = 0; i < errs.count; i++)
            EPD_ERROR(SUB, "%s", errs.msgs[i]);
        epd_config_errors_free(&errs);
        free(nc);
        epd_metric_add(d->reload_failed, 1);
        notify_status(d, "READY=1\n");
        return;
    }
    epd_config_errors_free(&errs);
    /* Live: log.level. Everything else needs a restart: report the first difference. */
    if (nc->log_level != d->cfg->log_level) {
        EPD_INFO(SUB, "reload: log.level %s -> %s", epd_log_level_name(d->cfg->log_level),
                 epd_log_level_name(nc->log_level));
        epd_log_set_level(nc->log_level);
        d->cfg->log_level = nc->log_level;
    }
    char diff[512];
    int rc = epd_config_diff_all(d->cfg, nc, diff, sizeof(diff));
    if (rc == 1)
        EPD_WARN(SUB,
                 "reload: %s changed; this and any other changed setting except log.level "
                 "takes effect only after a restart",
                 diff);
    else if (rc == 0)
        EPD_INFO(SUB, "reload of %s: done", d->config_path);
    free(nc);
    epd_metric_add(d->reload_ok, 1);
    notify_status(d, "READY=1\n");
}

static void request_stop(void *ctx, const char *why)
{
    begin_stop(ctx, why);
}

static void on_signal(uv_signal_t *h, int signum)
{
    daemon_t *d = h->data;
    if (signum == SIGHUP) {
        if (!d->stopping) reload(d);
        return;
    }
    begin_stop(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* ---- serving ---- */

/* Records why start failed; returns rc so that a failure reads `return start_failed(...)`. */
__attribute__((format(printf, 3, 4))) static int start_failed(daemon_t *d, int rc, const char *fmt,
                                                              ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->start_err, sizeof(d->start_err), fmt, ap);
    va_end(ap);
    return rc;
}

static void on_model_loaded(void *arg, int status, const char *msg)
{
    daemon_t *d = arg;
    if (status != 0) {
        EPD_ERROR(SUB, "cannot load the model of model.path %s: %s", d->cfg->model_path, msg);
        sd_notifyf(0, "STATUS=model load failed: %s", msg);
        d->exit_code = 1;
        if (!d->stopping) {
            d->stopping = 1;
            epd_http_server_abort(d->http);
            finish_stop(d);
        }
        return;
    }
    if (d->stopping) return;
    notify_status(d, "READY=1\n");
}

static int start_serving(daemon_t *d)
{
    int rc;
    if (d->cfg->model_path[0]) {
        epd_err_t err = {0};
        epd_engine_opts_t eo = {.loop = &d->loop,
                                .cfg = d->cfg,
                                .metrics = d->metrics,
                                .state = d->state,
                                /* several nodes: ranks and bootstrap from the control plane */
                                .cluster = epd_cluster_daemon_engine_hooks(d->cluster),
                                .on_loaded = on_model_loaded,
                                .arg = d};
        if ((rc = epd_engine_create(&eo, &d->engine, &err)) != 0)
            return start_failed(d, rc, "cannot serve model.path %s: %s", d->cfg->model_path,
                                err.msg[0] ? err.msg : uv_strerror(rc));
        epd_cluster_daemon_set_engine(d->cluster, d->engine);
    }
    if ((rc = epd_api_create(d->http, d->engine, d->metrics, &d->api)) != 0)
        return start_failed(d, rc, "cannot create the HTTP API: %s", uv_strerror(rc));
    epd_api_set_state(d->api, d->state);
    epd_api_set_loop(d->api, &d->loop);
    /* text: the checkpoint's tokenizer; a missing or broken one only refuses text requests */
    if (d->cfg->model_path[0]) epd_api_load_tokenizer(d->api, d->cfg->model_path);
    return 0;
}

/* ---- start ---- */

static int start(daemon_t *d)
{
    int rc;
    if ((rc = uv_loop_init(&d->loop)) != 0)
        return start_failed(d, rc, "uv_loop_init: %s", uv_strerror(rc));
    d->loop_ok = 1;
    d->metrics = epd_metrics_create();
    d->state = epd_state_create();
    if (!d->metrics || !d->state)
        return start_failed(d, -ENOMEM, "out of memory for the metrics and the state");
    if ((rc = epd_procstats_init(&d->ps, d->metrics, EPD_VERSION, EPD_COMMIT,
                                 epd_backend_name(d->cfg->backend))) != 0)
        return start_failed(d, rc, "cannot register the process metrics: %s", uv_strerror(rc));
    d->reload_ok =
        epd_metrics_counter(d->metrics, "epd_config_reloads_total",
                            "Configuration reloads (SIGHUP), by result.", "result=\"ok\"");
    d->reload_failed =
        epd_metrics_counter(d->metrics, "epd_config_reloads_total",
                            "Configuration reloads (SIGHUP), by result.", "result=\"failed\"");
    d->cluster_id = epd_state_register(d->state, "cluster");
    if (d->cluster_id < 0)
        return start_failed(d, d->cluster_id, "cannot register the cluster state: %s",
                            uv_strerror(d->cluster_id));

    epd_http_limits_t lim = {
        .max_header_bytes = d->cfg->http_max_header_bytes,
        .max_body_bytes = d->cfg->http_max_body_bytes,
        .max_connections = d->cfg->http_max_connections,
        .max_connections_per_client = d->cfg->http_max_connections_per_client,
        .idle_timeout_ms = d->cfg->http_idle_timeout_ms,
        /* a head is never given longer than an idle connection would be */
        .header_timeout_ms = d->cfg->http_header_timeout_ms < d->cfg->http_idle_timeout_ms
                                 ? d->cfg->http_header_timeout_ms
                                 : d->cfg->http_idle_timeout_ms,
    };
    if ((rc = epd_http_server_create(&d->loop, &lim, d->metrics, &d->http)) != 0)
        return start_failed(d, rc, "cannot create the HTTP server: %s", uv_strerror(rc));
    if ((rc = epd_http_route(d->http, "GET", "/healthz", h_healthz, d)) ||
        (rc = epd_http_route(d->http, "GET", "/readyz", h_readyz, d)) ||
        (rc = epd_http_route(d->http, "GET", "/metrics", h_metrics, d)) ||
        (rc = epd_http_route(d->http, "GET", "/v1/status", h_status, d)))
        return start_failed(d, rc, "cannot add the HTTP routes: %s", uv_strerror(rc));
    if ((rc = epd_http_server_listen(d->http, d->cfg->http.host, d->cfg->http.port)) != 0)
        return start_failed(d, rc, "cannot listen on http.listen %s:%d: %s", d->cfg->http.host,
                            d->cfg->http.port, uv_strerror(rc));
    char http_addr[300];
    epd_err_t err = {0};
    epd_http_auth_opts_t ao = {.listen_host = d->cfg->http.host,
                               .listen_port = epd_http_server_port(d->http),
                               .admin_token_file = d->cfg->http_admin_token_file,
                               .api_key_file = d->cfg->http_api_key_file};
    if ((rc = epd_http_auth_create(&ao, &d->auth, &err)) != 0)
        return start_failed(d, rc, "%s", err.msg);
    epd_http_server_set_guard(d->http, epd_http_auth_guard, d->auth);
    if (!epd_http_auth_listen_is_loopback(d->cfg->http.host) && !d->cfg->http_api_key_file[0])
        EPD_WARN(SUB,
                 "http.listen %s is not loopback and no http.api_key_file is set: anyone who "
                 "reaches port %d can use the inference API",
                 d->cfg->http.host, epd_http_server_port(d->http));
    snprintf(http_addr, sizeof(http_addr), "%s:%d", d->cfg->http.host,
             epd_http_server_port(d->http));
    epd_cluster_daemon_opts_t co = {.loop = &d->loop,
                                    .cfg = d->cfg,
                                    .metrics = d->metrics,
                                    .state = d->state,
                                    .component = d->cluster_id,
                                    .http = d->http,
                                    .http_addr = http_addr,
                                    .request_stop = request_stop,
                                    .ctx = d};
    if ((rc = epd_cluster_daemon_start(&co, &d->cluster, &err)) != 0)
        return start_failed(d, rc, "%s", err.msg[0] ? err.msg : uv_strerror(rc));
    /* after the control plane: the engine takes its ranks from it (the loop is not running
     * yet, so routes added now are in place before the first request) */
    if ((rc = start_serving(d)) != 0) return rc;

    uv_signal_init(&d->loop, &d->sig_term);
    uv_signal_init(&d->loop, &d->sig_int);
    uv_signal_init(&d->loop, &d->sig_hup);
    d->sig_term.data = d->sig_int.data = d->sig_hup.data = d;
    uv_signal_start(&d->sig_term, on_signal, SIGTERM);
    uv_signal_start(&d->sig_int, on_signal, SIGINT);
    uv_signal_start(&d->sig_hup, on_signal, SIGHUP);
    signal(SIGPIPE, SIG_IGN);

    uv_timer_init(&d->loop, &d->shutdown_timer);
    d->shutdown_timer.data = d;
    uv_timer_init(&d->loop, &d->watchdog);
    uint64_t wd_usec = 0;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0) {
        uint64_t every_ms = wd_usec / 2000 ? wd_usec / 2000 : 1;
        uv_timer_start(&d->watchdog, on_watchdog, every_ms, every_ms);
        d->watchdog_on = 1;
        EPD_INFO(SUB, "systemd watchdog: pinging every %llu ms", (unsigned long long)every_ms);
    }

    epd_state_set_phase(d->state, EPD_PHASE_RUNNING);
    EPD_INFO(SUB, "epd %s (%s) node %d \"%s\" listening on http://%s:%d (%s)", EPD_VERSION,
             EPD_COMMIT, d->cfg->node_id, d->cfg->name, d->cfg->http.host,
             epd_http_server_port(d->http), epd_state_name(d->state));
    /* with a model, READY=1 waits for the load (on_model_loaded) */
    if (!d->engine) notify_status(d, "READY=1\n");
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"check", no_argument, NULL, 'k'},
                                         {"version", no_argument, NULL, 'V'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    /* CUDA loads kernels lazily by default, and a first launch may wait for the device to go
     * idle: with ranks sharing a GPU (or libep's receive kernels waiting for a peer) that can be
     * never. Load every module when CUDA starts instead (before any CUDA call; an operator's
     * own setting wins). */
    setenv("CUDA_MODULE_LOADING", "EAGER", 0);
    daemon_t d = {.config_path = EPD_DEFAULT_CONFIG};
    int check = 0, opt;
    epd_log_init(argv[0]);
    while ((opt = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            d.config_path = optarg;
            break;
        case 'k':
            check = 1;
            break;
        case 'V':
            printf("epd %s (%s)\n", EPD_VERSION, EPD_COMMIT);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "epd: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    d.cfg = malloc(sizeof(*d.cfg));
    if (!d.cfg) {
        fprintf(stderr, "epd: out of memory\n");
        return 1;
    }
    epd_config_errors_t errs = {0};
    if (epd_config_load(d.config_path, d.cfg, &errs) != 0) {
        epd_config_errors_print(&errs, stderr);
        fprintf(stderr, "epd: %s is invalid (%d error(s))\n", d.config_path,
                errs.count + errs.dropped);
        epd_config_errors_free(&errs);
        free(d.cfg);
        return 2;
    }
    epd_config_errors_free(&errs);
    if (check) {
        printf("%s: valid\n", d.config_path);
        free(d.cfg);
        return 0;
    }
    epd_log_set_level(d.cfg->log_level);

    int rc = start(&d);
    if (rc != 0) {
        /* the reason of the part that failed; errno text only where none was given */
        const char *why = d.start_err[0] ? d.start_err : uv_strerror(rc);
        EPD_ERROR(SUB, "start failed: %s", why);
        sd_notifyf(0, "STATUS=start failed: %s", why);
        d.exit_code = 1;
        if (d.loop_ok) finish_stop(&d);
    }
    if (d.loop_ok) {
        uv_run(&d.loop, UV_RUN_DEFAULT); /* returns once every handle is closed */
        rc = uv_loop_close(&d.loop);
        if (rc != 0) EPD_WARN(SUB, "uv_loop_close: %s", uv_strerror(rc));
    }
    epd_cluster_daemon_destroy(d.cluster);
    epd_api_destroy(d.api);
    epd_http_auth_destroy(d.auth);
    epd_state_destroy(d.state);
    epd_metrics_destroy(d.metrics);
    if (d.exit_code == 0) EPD_INFO(SUB, "stopped");
    free(d.cfg);
    return d.exit_code;
}
