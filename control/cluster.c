/* Cluster module: lifecycle (create, start, stop, destroy), libuv handle accounting, the
 * public accessors and the /v1/cluster status document. Links are in cluster_link.c, peers
 * (HELLO, state, heartbeats, health) in cluster_peer.c, the coordinator's rank table and
 * readiness in cluster_coord.c, libep's bootstrap in cluster_boot.c. Rules are documented in
 * cluster.h. */
#include "cluster_int.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "log.h"

#define SUB "cluster"

const char *epd_peer_state_name(epd_peer_state_t s)
{
#define PEER_CASE(name, value, text)                                                               \
    case EPD_PEER_##name:                                                                          \
        return text;
    switch (s) {
        EPD_PEER_STATE_MAP(PEER_CASE)
    }
#undef PEER_CASE
    return "invalid";
}

const char *epd_node_state_name(epd_node_state_t s)
{
#define NODE_CASE(name, value, text)                                                               \
    case EPD_NODE_##name:                                                                          \
        return text;
    switch (s) {
        EPD_NODE_STATE_MAP(NODE_CASE)
    }
#undef NODE_CASE
    return "invalid";
}

cl_peer_t *cl_peer_by_id(const epd_cluster_t *c, int id)
{
    for (int i = 0; i < c->npeers; i++)
        if (c->peers[i].id == id) return &c->peers[i];
    return NULL;
}

static void on_handle_closed(uv_handle_t *h)
{
    cl_handle_closed(h->data);
}

void cl_handle_closed(epd_cluster_t *c)
{
    c->handles--;
    /* Every link flushed its BYE: the stop timer is the last handle, no need to wait for it. */
    if (c->stopping && c->stop_armed && c->handles == 1 && !c->conns) {
        c->stop_armed = 0;
        uv_close((uv_handle_t *)&c->stop_timer, on_handle_closed);
        return;
    }
    if (c->stopping && c->handles == 0 && !c->stopped_notified) {
        c->stopped_notified = 1;
        if (c->opts.on_stopped) c->opts.on_stopped(c->opts.cb_ctx);
    }
}

static void on_retry_closed(uv_handle_t *h)
{
    cl_peer_t *p = h->data;
    cl_handle_closed(p->cl);
}

/* ---- lifecycle ---- */

int epd_cluster_create(const epd_cluster_opts_t *o, epd_cluster_t **out, epd_err_t *err)
{
    epd_cluster_t *c = NULL;
    int rc;
    const epd_config_t *cfg = o->cfg;
    *out = NULL;
    if (!o->loop || !cfg) {
        return epd_err_set(err, -EINVAL, "cluster: loop and config are required");
    }
    if (o->local_ranks < 1) {
        return epd_err_set(err, -EINVAL, "cluster: a node runs at least one rank (got %d)",
                           o->local_ranks);
    }
    if (cfg->heartbeat_interval_ms <= 0 ||
        cfg->heartbeat_timeout_ms <= cfg->heartbeat_interval_ms || cfg->connect_timeout_ms <= 0) {
        return epd_err_set(
            err, -EINVAL,
            "cluster: timeouts.heartbeat_timeout_ms (%d) must exceed "
            "timeouts.heartbeat_interval_ms (%d) > 0, and timeouts.connect_ms (%d) > 0",
            cfg->heartbeat_timeout_ms, cfg->heartbeat_interval_ms, cfg->connect_timeout_ms);
    }
    c = calloc(1, sizeof *c);
    if (!c) goto nomem;
    c->loop = o->loop;
    c->cfg = *cfg;
    c->opts = *o;
    c->metrics = o->metrics;
    c->port = -1;
    c->state = EPD_NODE_STARTING;
    c->coordinator = cfg->node_id;
    if (RAND_bytes((unsigned char *)&c->incarnation, sizeof c->incarnation) != 1 ||
        c->incarnation == 0)
        c->incarnation = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ 1;
    if (gethostname(c->hostname, sizeof c->hostname - 1) < 0) snprintf(c->hostname, 2, "?");
    snprintf(c->backend, sizeof c->backend, "%s", o->backend ? o->backend : "cpu");
    snprintf(c->http_addr, sizeof c->http_addr, "%s", o->http_addr ? o->http_addr : "");
    if (o->fingerprint_len > 64) {
        rc = epd_err_set(err, -EINVAL, "cluster: config fingerprint longer than 64 bytes");
        goto fail;
    }
    c->fingerprint = malloc(o->fingerprint_len + 1);
    c->settings = malloc(o->settings_len + 1);
    c->endpoint = malloc(o->endpoint_len + 1);
    if (!c->fingerprint || !c->settings || !c->endpoint) goto nomem;
    if (o->fingerprint_len) memcpy(c->fingerprint, o->fingerprint, o->fingerprint_len);
    if (o->settings_len) memcpy(c->settings, o->settings, o->settings_len);
    if (o->endpoint_len) memcpy(c->endpoint, o->endpoint, o->endpoint_len);
    c->opts.fingerprint = c->opts.settings = c->opts.endpoint = NULL;
    c->opts.cfg = &c->cfg;

    if (o->secret) {
        c->secret = *o->secret;
    } else if (cfg->secret_file[0]) {
        if ((rc = epd_ctl_secret_load(cfg->secret_file, &c->secret, err)) < 0) goto fail;
    } else if (cfg->num_peers > 0) {
        rc = epd_err_set(err, -EINVAL,
                         "cluster: cluster.secret_file is required when cluster.peers lists "
                         "other nodes");
        goto fail;
    }

    c->peers = calloc((size_t)(cfg->num_peers > 0 ? cfg->num_peers : 1), sizeof *c->peers);
    if (!c->peers) goto nomem;
    for (int i = 0; i < cfg->num_peers; i++) {
        const epd_peer_t *cp = &cfg->peers[i];
        if (cp->node_id == cfg->node_id) continue; /* one peer list may serve every node */
        if (cl_peer_by_id(c, cp->node_id)) {
            rc = epd_err_set(err, -EINVAL, "cluster: cluster.peers[%d]: node id %d listed twice", i,
                             cp->node_id);
            goto fail;
        }
        cl_peer_t *p = &c->peers[c->npeers++];
        p->id = cp->node_id;
        p->addr = cp->addr;
        p->rtt_s = -1;
        p->retry_ms = RETRY_INITIAL_MS;
    }
    if (c->metrics) {
        c->m_epoch = epd_metrics_gauge(c->metrics, "epd_cluster_epoch",
                                       "Epoch of the rank table this node holds", NULL);
        for (int r = 1; r < EPD_CTL_REJECT_COUNT; r++) {
            char l[64];
            snprintf(l, sizeof l, "reason=\"%s\"", epd_ctl_reject_name(r));
            c->m_rejected[r] = epd_metrics_counter(
                c->metrics, "epd_ctl_rejected_frames_total",
                "Control-plane frames rejected (the link was closed), by reason", l);
        }
        static const double rtt_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                            0.01,   0.025,   0.05,   0.1,   0.25,   1.0};
        for (int i = 0; i < c->npeers; i++) {
            char l[32];
            snprintf(l, sizeof l, "peer=\"%d\"", c->peers[i].id);
            c->peers[i].m_state =
                epd_metrics_gauge(c->metrics, "epd_cluster_peer_state",
                                  "Peer state: 0 unknown, 1 up, 2 suspect, 3 down, 4 refused", l);
            c->peers[i].m_rtt =
                epd_metrics_histogram(c->metrics, "epd_cluster_heartbeat_rtt_seconds",
                                      "Heartbeat round-trip time to each peer", l, rtt_bounds,
                                      (int)(sizeof rtt_bounds / sizeof rtt_bounds[0]));
            cl_peer_metric(c, &c->peers[i]);
        }
        if (c->m_epoch) epd_metric_set(c->m_epoch, 0);
    }
    if (cl_boot_create(c, o->local_ranks, &c->boot) < 0) goto nomem;
    snprintf(c->ready_reason, sizeof c->ready_reason, "cluster not started");
    *out = c;
    return 0;
nomem:
    rc = epd_err_set(err, -ENOMEM, "cluster: out of memory");
fail:
    if (c) {
        epd_ctl_secret_wipe(&c->secret);
        free(c->fingerprint);
        free(c->settings);
        free(c->endpoint);
        free(c->peers);
        free(c);
    }
    return rc;
}

static int bind_listener(epd_cluster_t *c, epd_err_t *err)
{
    char port[16];
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(port, sizeof port, "%d", c->cfg.listen.port);
    int r = getaddrinfo(c->cfg.listen.host[0] ? c->cfg.listen.host : NULL, port, &hints, &res);
    if (r != 0 || !res) {
        return epd_err_set(err, -EADDRNOTAVAIL, "cluster.listen %s:%d: %s", c->cfg.listen.host,
                           c->cfg.listen.port, gai_strerror(r));
    }
    if ((r = uv_tcp_init(c->loop, &c->listener)) < 0) {
        freeaddrinfo(res);
        return epd_err_set(err, r, "cluster.listen: uv_tcp_init: %s", uv_strerror(r));
    }
    c->handles++;
    c->listening = 1;
    c->listener.data = c;
    r = uv_tcp_bind(&c->listener, res->ai_addr, 0);
    freeaddrinfo(res);
    if (r == 0) r = uv_listen((uv_stream_t *)&c->listener, 128, cl_on_connection);
    if (r < 0) {
        return epd_err_set(err, r, "cluster.listen %s:%d: %s", c->cfg.listen.host,
                           c->cfg.listen.port, uv_strerror(r));
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getsockname(&c->listener, (struct sockaddr *)&ss, &len) == 0)
        c->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

int epd_cluster_start(epd_cluster_t *c, epd_err_t *err)
{
    int rc;
    if (c->started) {
        return epd_err_set(err, -EALREADY, "cluster: already started");
    }
    if ((rc = uv_timer_init(c->loop, &c->tick)) < 0 ||
        (rc = uv_timer_init(c->loop, &c->stop_timer)) < 0)
        return epd_err_set(err, rc, "cluster: uv_timer_init: %s", uv_strerror(rc));
    c->handles += 2;
    if ((rc = cl_boot_start(c->boot)) < 0) {
        epd_err_set(err, rc, "cluster: uv_async_init: %s", uv_strerror(rc));
        uv_close((uv_handle_t *)&c->tick, NULL);
        uv_close((uv_handle_t *)&c->stop_timer, NULL);
        c->handles -= 2;
        return rc;
    }
    c->tick.data = c;
    c->stop_timer.data = c;
    for (int i = 0; i < c->npeers; i++) {
        cl_peer_t *p = &c->peers[i];
        p->cl = c;
        uv_timer_init(c->loop, &p->retry);
        p->retry.data = p;
        c->handles++;
    }
    c->started = 1;
    if ((rc = bind_listener(c, err)) < 0) return rc;
    EPD_INFO(SUB, "node %d listening for peers on %s:%d (%d peers, heartbeat %d ms, timeout %d ms)",
             c->cfg.node_id, c->cfg.listen.host, c->port, c->npeers, c->cfg.heartbeat_interval_ms,
             c->cfg.heartbeat_timeout_ms);
    uv_timer_start(&c->tick, cl_on_tick, (uint64_t)c->cfg.heartbeat_interval_ms,
                   (uint64_t)c->cfg.heartbeat_interval_ms);
    for (int i = 0; i < c->npeers; i++)
        if (c->peers[i].id > c->cfg.node_id) cl_start_connect(c, &c->peers[i]);
    cl_evaluate(c);
    return 0;
}

static void on_stop_timer(uv_timer_t *t)
{
    epd_cluster_t *c = t->data;
    /* Links still flushing their BYE after the budget are closed hard; uv_close cancels the
     * shutdown request, whose callback then does nothing more. */
    while (c->conns) {
        cl_conn_t *cn = c->conns;
        cl_conn_unlink(c, cn);
        if (!uv_is_closing((uv_handle_t *)&cn->tcp))
            uv_close((uv_handle_t *)&cn->tcp, cl_on_conn_closed);
    }
    c->stop_armed = 0;
    uv_close((uv_handle_t *)&c->stop_timer, on_handle_closed);
}

void epd_cluster_stop(epd_cluster_t *c, int graceful, const char *reason)
{
    if (c->stopping) return;
    c->stopping = 1;
    c->state = EPD_NODE_STOPPING;
    EPD_INFO(SUB, "node %d leaving the cluster%s: %s", c->cfg.node_id,
             graceful ? " (graceful)" : "", reason ? reason : "stop");
    if (c->boot) {
        cl_boot_abort(c->boot, "node is stopping");
        cl_boot_close(c->boot);
    }
    if (!c->started) {
        cl_update_readiness(c);
        if (c->handles == 0 && !c->stopped_notified) {
            c->stopped_notified = 1;
            if (c->opts.on_stopped) c->opts.on_stopped(c->opts.cb_ctx);
        }
        return;
    }
    uv_close((uv_handle_t *)&c->tick, on_handle_closed);
    if (c->listening) uv_close((uv_handle_t *)&c->listener, on_handle_closed);
    for (int i = 0; i < c->npeers; i++)
        uv_close((uv_handle_t *)&c->peers[i].retry, on_retry_closed);
    epd_ctl_buf_t bye;
    epd_ctl_buf_init(&bye);
    epd_ctl_frame_begin(&bye, EPD_CTL_BYE);
    epd_ctl_put_str(&bye, EPD_CTL_T_REASON, reason ? reason : "stop");
    int have_bye = epd_ctl_frame_end(&bye) == 0;
    cl_conn_t *list = c->conns;
    while (list) {
        cl_conn_t *cn = list;
        list = cn->next;
        if (cn->peer && cn->peer->conn == cn) cn->peer->conn = NULL;
        if (cn->closing) continue;
        cn->closing = 1;
        /* Authenticated links get a BYE, flushed by uv_shutdown; they stay on the list so the
         * stop timer can close them hard if the peer does not read. */
        if (graceful && have_bye && cn->authed && cn->hello_rx &&
            cl_raw_write(cn, bye.p, bye.len) == 0) {
            cn->sreq.data = cn;
            if (uv_shutdown(&cn->sreq, (uv_stream_t *)&cn->tcp, cl_on_shutdown) == 0) continue;
        }
        cl_conn_unlink(c, cn);
        uv_close((uv_handle_t *)&cn->tcp, cl_on_conn_closed);
    }
    epd_ctl_buf_fini(&bye);
    c->stop_armed = 1;
    uv_timer_start(&c->stop_timer, on_stop_timer,
                   (uint64_t)(c->cfg.shutdown_timeout_ms > 0 && c->cfg.shutdown_timeout_ms < 2000
                                  ? c->cfg.shutdown_timeout_ms
                                  : 2000),
                   0);
    cl_update_readiness(c);
}

void epd_cluster_destroy(epd_cluster_t *c)
{
    if (!c) return;
    if (c->handles > 0)
        EPD_ERROR(SUB, "epd_cluster_destroy with %d libuv handles still open", c->handles);
    if (c->boot) cl_boot_destroy(c->boot);
    for (int i = 0; i < c->npeers; i++)
        cl_nodeinfo_free(&c->peers[i].info);
    cl_table_clear(&c->table);
    epd_ctl_secret_wipe(&c->secret);
    free(c->fingerprint);
    free(c->settings);
    free(c->endpoint);
    free(c->peers);
    free(c);
}

int epd_cluster_listen_port(const epd_cluster_t *c)
{
    return c->port;
}

uint64_t epd_cluster_epoch(const epd_cluster_t *c)
{
    return c->table.epoch;
}

int epd_cluster_is_formed(const epd_cluster_t *c)
{
    return c->formed;
}

int epd_cluster_is_ready(const epd_cluster_t *c, char *reason, size_t len)
{
    if (reason && len) snprintf(reason, len, "%s", c->ready_reason);
    return c->ready;
}

int epd_cluster_first_rank(const epd_cluster_t *c)
{
    const cl_nodeinfo_t *me = cl_table_node(c, c->cfg.node_id, NULL);
    return me ? (int)me->first_rank : -1;
}

int epd_cluster_nranks(const epd_cluster_t *c)
{
    return c->table.valid ? c->table.nranks : -1;
}

epd_peer_state_t epd_cluster_peer_state(const epd_cluster_t *c, int node_id)
{
    const cl_peer_t *p = cl_peer_by_id(c, node_id);
    return p ? p->state : EPD_PEER_UNKNOWN;
}

void epd_cluster_set_state(epd_cluster_t *c, epd_node_state_t s)
{
    if (!c->stopping) c->state = s;
}

epd_node_state_t epd_cluster_get_state(const epd_cluster_t *c)
{
    return c->state;
}

void epd_cluster_set_load(epd_cluster_t *c, uint32_t load)
{
    c->load = load;
}

int epd_cluster_bootstrap(epd_cluster_t *c, int local_rank, ep_bootstrap_t *out)
{
    /* libep's boundary: its status, not errno */
    int rc = cl_boot_get(c->boot, local_rank, 0, 0, out, NULL);
    return rc == 0 ? EP_OK : rc == -EINVAL ? EP_ERR_INVALID : EP_ERR_STATE;
}

int epd_cluster_bootstrap_wait(epd_cluster_t *c, int local_rank, unsigned generation,
                               unsigned timeout_ms, ep_bootstrap_t *out, epd_err_t *err)
{
    return cl_boot_get(c->boot, local_rank, generation, timeout_ms, out, err);
}

void epd_cluster_wake_peers(epd_cluster_t *c)
{
    if (c->stopping) return;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_WAKE);
    if (epd_ctl_frame_end(&b) == 0)
        for (int i = 0; i < c->npeers; i++)
            if (c->peers[i].conn && c->peers[i].conn->hello_rx) cl_send_node(c, c->peers[i].id, &b);
    epd_ctl_buf_fini(&b);
}

static cJSON *node_json(const cl_nodeinfo_t *n)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "node_id", n->id);
    cJSON_AddStringToObject(o, "hostname", n->hostname);
    cJSON_AddStringToObject(o, "name", n->name);
    cJSON_AddNumberToObject(o, "first_rank", n->first_rank);
    cJSON_AddNumberToObject(o, "ranks", n->ranks);
    cJSON_AddStringToObject(o, "backend", n->backend);
    cJSON_AddNumberToObject(o, "transport_caps", n->caps);
    cJSON_AddStringToObject(o, "http", n->http);
    cJSON_AddStringToObject(o, "control", n->ctl);
    cJSON_AddNumberToObject(o, "endpoint_bytes", (double)n->endpoint_len);
    cJSON *g = cJSON_AddArrayToObject(o, "gpus");
    for (int i = 0; i < n->ngpus; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "ordinal", n->gpus[i].ordinal);
        cJSON_AddStringToObject(e, "pci_bus_id", n->gpus[i].pci_bus_id);
        cJSON_AddItemToArray(g, e);
    }
    return o;
}

cJSON *epd_cluster_status_json(const epd_cluster_t *c)
{
    uint64_t now = cl_now_ms(c);
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "node_id", c->cfg.node_id);
    cJSON_AddStringToObject(o, "name", c->cfg.name);
    cJSON_AddStringToObject(o, "cluster", c->cfg.cluster_name);
    cJSON_AddStringToObject(o, "state", epd_node_state_name(c->state));
    cJSON_AddNumberToObject(o, "epoch", (double)c->table.epoch);
    cJSON_AddBoolToObject(o, "formed", c->formed);
    cJSON_AddBoolToObject(o, "ready", c->ready);
    cJSON_AddStringToObject(o, "reason", c->ready_reason);
    cJSON_AddNumberToObject(o, "coordinator", c->coordinator);
    cJSON_AddNumberToObject(o, "first_rank", epd_cluster_first_rank(c));
    cJSON_AddNumberToObject(o, "local_ranks", c->opts.local_ranks);
    cJSON_AddNumberToObject(o, "bootstrap_collectives", (double)cl_boot_collectives(c->boot));
    if (c->table.valid) {
        cJSON *t = cJSON_AddObjectToObject(o, "rank_table");
        cJSON_AddNumberToObject(t, "epoch", (double)c->table.epoch);
        cJSON_AddNumberToObject(t, "coordinator", c->table.coord);
        cJSON_AddBoolToObject(t, "complete", c->table.complete);
        cJSON_AddNumberToObject(t, "nranks", c->table.nranks);
        cJSON *nodes = cJSON_AddArrayToObject(t, "nodes");
        for (int i = 0; i < c->table.nnodes; i++)
            cJSON_AddItemToArray(nodes, node_json(&c->table.nodes[i]));
    } else {
        cJSON_AddNullToObject(o, "rank_table");
    }
    cJSON *peers = cJSON_AddArrayToObject(o, "peers");
    for (int i = 0; i < c->npeers; i++) {
        const cl_peer_t *p = &c->peers[i];
        cJSON *e = cJSON_CreateObject();
        char addr[300];
        snprintf(addr, sizeof addr, "%s:%d", p->addr.host, p->addr.port);
        cJSON_AddNumberToObject(e, "node_id", p->id);
        cJSON_AddStringToObject(e, "address", addr);
        cJSON_AddStringToObject(e, "state", epd_peer_state_name(p->state));
        cJSON_AddStringToObject(e, "reason", p->reason);
        if (p->state == EPD_PEER_UP || p->state == EPD_PEER_SUSPECT)
            cJSON_AddStringToObject(e, "node_state", epd_node_state_name(p->node_state));
        if (p->last_hb_ms)
            cJSON_AddNumberToObject(e, "last_heartbeat_ms_ago", (double)(now - p->last_hb_ms));
        else
            cJSON_AddNullToObject(e, "last_heartbeat_ms_ago");
        if (p->rtt_s >= 0)
            cJSON_AddNumberToObject(e, "rtt_ms", p->rtt_s * 1e3);
        else
            cJSON_AddNullToObject(e, "rtt_ms");
        cJSON_AddNumberToObject(e, "load", p->load);
        cJSON_AddNumberToObject(e, "epoch", (double)p->epoch_seen);
        if (p->hello_ok) cJSON_AddStringToObject(e, "hostname", p->info.hostname);
        if (p->hello_ok && p->info.http[0]) cJSON_AddStringToObject(e, "http", p->info.http);
        if (p->refused_us) cJSON_AddStringToObject(e, "refused_us", p->refused_why);
        cJSON_AddItemToArray(peers, e);
    }
    return o;
}
