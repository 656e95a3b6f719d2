/* Cluster membership: authenticated links to configured peers (connect with backoff, accept),
 * HELLO checks, the coordinator's rank table and epochs, heartbeats and peer health, readiness,
 * and the /v1/cluster status document. Rules are documented in cluster.h. */
#include "cluster_int.h"

#include <inttypes.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "log.h"

#define SUB "cluster"
/* Reconnect backoff: starts small so a restarted peer is found quickly, doubles, and stays
 * well below the heartbeat timeout so a rejoin never waits for a long backoff. */
#define RETRY_INITIAL_MS 100
#define RETRY_MAX_MS 1000
/* A peer that does not read its socket is dropped rather than buffered without bound. */
#define MAX_WRITE_QUEUE (16u << 20)
/* Unauthenticated connections at once (a port scan or a flood must not exhaust memory). */
#define MAX_PENDING_CONNS 64
/* At most this many rejection log lines per window; the rest are counted and summarised. */
#define REJECT_LOG_WINDOW_MS 10000
#define REJECT_LOG_BURST 10

struct cl_conn {
    uv_tcp_t tcp;
    epd_cluster_t *c;
    cl_peer_t *peer;
    int outbound;
    int authed;
    int hello_rx;
    int closing;
    int linked; /* on c->conns */
    uint64_t started_ms;
    epd_ctl_decoder_t dec;
    epd_ctl_auth_t auth;
    uv_connect_t creq;
    uv_shutdown_t sreq;
    char remote[64];
    cl_conn_t *next;
    cl_conn_t *prev;
};

typedef struct cl_write {
    uv_write_t req;
    uv_buf_t buf;
} cl_write_t;

typedef struct cl_resolve {
    uv_getaddrinfo_t req;
    epd_cluster_t *c;
    cl_peer_t *peer;
} cl_resolve_t;

static void evaluate(epd_cluster_t *c);
static void conn_close(cl_conn_t *cn);
static void schedule_retry(cl_peer_t *p, epd_cluster_t *c);
static void retry_cb(uv_timer_t *t);
static void on_shutdown(uv_shutdown_t *req, int status);

const char *epd_peer_state_name(epd_peer_state_t s)
{
    switch (s) {
    case EPD_PEER_UNKNOWN:
        return "unknown";
    case EPD_PEER_UP:
        return "up";
    case EPD_PEER_SUSPECT:
        return "suspect";
    case EPD_PEER_DOWN:
        return "down";
    case EPD_PEER_REFUSED:
        return "refused";
    }
    return "invalid";
}

const char *epd_node_state_name(epd_node_state_t s)
{
    switch (s) {
    case EPD_NODE_STARTING:
        return "starting";
    case EPD_NODE_SERVING:
        return "serving";
    case EPD_NODE_DRAINING:
        return "draining";
    case EPD_NODE_STOPPING:
        return "stopping";
    }
    return "invalid";
}

static uint64_t now_ms(const epd_cluster_t *c)
{
    return uv_now(c->loop);
}

static cl_peer_t *peer_by_id(const epd_cluster_t *c, int id)
{
    for (int i = 0; i < c->npeers; i++)
        if (c->peers[i].id == id) return &c->peers[i];
    return NULL;
}

static void nodeinfo_free(cl_nodeinfo_t *n)
{
    free(n->endpoint);
    n->endpoint = NULL;
    n->endpoint_len = 0;
}

static void table_clear(cl_table_t *t)
{
    for (int i = 0; i < t->nnodes; i++)
        nodeinfo_free(&t->nodes[i]);
    free(t->nodes);
    free(t->acked);
    memset(t, 0, sizeof *t);
}

const cl_nodeinfo_t *cl_table_node(const epd_cluster_t *c, int node_id, int *index)
{
    if (!c->table.valid) return NULL;
    for (int i = 0; i < c->table.nnodes; i++) {
        if (c->table.nodes[i].id == node_id) {
            if (index) *index = i;
            return &c->table.nodes[i];
        }
    }
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

/* ---- sending ---- */

static void on_write(uv_write_t *req, int status)
{
    cl_write_t *w = (cl_write_t *)req;
    free(w->buf.base);
    free(w);
}

static int raw_write(cl_conn_t *cn, const uint8_t *p, size_t n)
{
    cl_write_t *w = malloc(sizeof *w);
    char *copy = malloc(n);
    if (!w || !copy) {
        free(w);
        free(copy);
        return UV_ENOMEM;
    }
    memcpy(copy, p, n);
    w->buf = uv_buf_init(copy, (unsigned)n);
    int r = uv_write(&w->req, (uv_stream_t *)&cn->tcp, &w->buf, 1, on_write);
    if (r < 0) {
        free(copy);
        free(w);
    }
    return r;
}

static int conn_send(cl_conn_t *cn, const uint8_t *p, size_t n)
{
    if (cn->closing || n == 0) return -1;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&cn->tcp) > MAX_WRITE_QUEUE) {
        EPD_WARN(SUB, "link to %s: peer is not reading (%zu bytes queued); closing", cn->remote,
                 uv_stream_get_write_queue_size((uv_stream_t *)&cn->tcp));
        conn_close(cn);
        return -1;
    }
    int r = raw_write(cn, p, n);
    if (r < 0) {
        EPD_WARN(SUB, "link to %s: write failed: %s", cn->remote, uv_strerror(r));
        conn_close(cn);
        return -1;
    }
    return 0;
}

static int conn_send_buf(cl_conn_t *cn, epd_ctl_buf_t *b)
{
    int r = b->len ? conn_send(cn, b->p, b->len) : 0;
    epd_ctl_buf_reset(b);
    return r;
}

int cl_send_node(epd_cluster_t *c, int node_id, epd_ctl_buf_t *frame)
{
    cl_peer_t *p = peer_by_id(c, node_id);
    if (!p || !p->conn || !p->conn->authed || p->conn->closing) return -1;
    return conn_send(p->conn, frame->p, frame->len);
}

/* ---- peer state ---- */

static void peer_metric(epd_cluster_t *c, cl_peer_t *p)
{
    if (p->m_state) epd_metric_set(p->m_state, (double)p->state);
}

static int in_table(const epd_cluster_t *c, int id)
{
    return cl_table_node(c, id, NULL) != NULL;
}

static void set_peer_state(epd_cluster_t *c, cl_peer_t *p, epd_peer_state_t s, const char *reason)
{
    if (p->state == s) return;
    epd_peer_state_t old = p->state;
    p->state = s;
    snprintf(p->reason, sizeof p->reason, "%s", reason ? reason : "");
    peer_metric(c, p);
    if (s == EPD_PEER_UP) {
        EPD_INFO(SUB, "peer %d (%s:%d) up", p->id, p->addr.host, p->addr.port);
        p->up_since_ms = now_ms(c);
        p->reason[0] = 0;
        return;
    }
    EPD_WARN(SUB, "peer %d (%s:%d) %s -> %s: %s", p->id, p->addr.host, p->addr.port,
             epd_peer_state_name(old), epd_peer_state_name(s), p->reason);
    if (s == EPD_PEER_DOWN) {
        p->hello_ok = 0;
        if (p->conn) conn_close(p->conn);
        if (in_table(c, p->id) && c->boot) {
            char why[320];
            snprintf(why, sizeof why, "peer %d down: %s", p->id, p->reason);
            cl_boot_abort(c->boot, why);
        }
        if (c->opts.on_peer_down) c->opts.on_peer_down(c->opts.cb_ctx, p->id, p->reason);
    }
}

/* ---- rejection ---- */

static void count_reject(epd_cluster_t *c, epd_ctl_reject_t r, const char *remote,
                         const char *detail)
{
    if (r <= EPD_CTL_REJECT_NONE || r >= EPD_CTL_REJECT_COUNT) r = EPD_CTL_REJECT_MALFORMED;
    if (c->m_rejected[r]) epd_metric_add(c->m_rejected[r], 1);
    uint64_t now = now_ms(c);
    if (now - c->rl_window_ms >= REJECT_LOG_WINDOW_MS) {
        if (c->rl_suppressed)
            EPD_WARN(SUB, "%d more rejected control frames in the last %d s were not logged",
                     c->rl_suppressed, REJECT_LOG_WINDOW_MS / 1000);
        c->rl_window_ms = now;
        c->rl_count = 0;
        c->rl_suppressed = 0;
    }
    if (c->rl_count++ < REJECT_LOG_BURST)
        EPD_WARN(SUB, "rejected control frame from %s (%s): %s; closing the link", remote,
                 epd_ctl_reject_name(r), detail);
    else
        c->rl_suppressed++;
}

static void reject_conn(cl_conn_t *cn, epd_ctl_reject_t r, const char *detail)
{
    count_reject(cn->c, r, cn->remote, detail);
    conn_close(cn);
}

/* ---- connections ---- */

static void conn_unlink(epd_cluster_t *c, cl_conn_t *cn)
{
    if (!cn->linked) return;
    cn->linked = 0;
    if (cn->prev)
        cn->prev->next = cn->next;
    else if (c->conns == cn)
        c->conns = cn->next;
    if (cn->next) cn->next->prev = cn->prev;
    cn->next = cn->prev = NULL;
    c->nconns--;
}

static void on_conn_closed(uv_handle_t *h)
{
    cl_conn_t *cn = h->data;
    epd_cluster_t *c = cn->c;
    conn_unlink(c, cn);
    epd_ctl_decoder_fini(&cn->dec);
    epd_ctl_auth_fini(&cn->auth);
    free(cn);
    cl_handle_closed(c);
}

static void conn_close(cl_conn_t *cn)
{
    if (cn->closing) return;
    epd_cluster_t *c = cn->c;
    cn->closing = 1;
    conn_unlink(c, cn);
    cl_peer_t *p = cn->peer;
    if (p && p->conn == cn) {
        p->conn = NULL;
        if (p->state == EPD_PEER_UP && !c->stopping)
            set_peer_state(c, p, EPD_PEER_SUSPECT, "link closed");
        if (cn->outbound && !c->stopping)
            schedule_retry(p, c);
        else if (!cn->outbound && p->id > c->cfg.node_id && !c->stopping)
            schedule_retry(p, c);
    }
    uv_close((uv_handle_t *)&cn->tcp, on_conn_closed);
    if (!c->stopping) evaluate(c);
}

static cl_conn_t *conn_new(epd_cluster_t *c, int outbound)
{
    cl_conn_t *cn = calloc(1, sizeof *cn);
    if (!cn) return NULL;
    if (uv_tcp_init(c->loop, &cn->tcp) < 0) {
        free(cn);
        return NULL;
    }
    c->handles++;
    cn->tcp.data = cn;
    cn->c = c;
    cn->outbound = outbound;
    cn->started_ms = now_ms(c);
    epd_ctl_decoder_init(&cn->dec, 0);
    cn->next = c->conns;
    if (c->conns) c->conns->prev = cn;
    c->conns = cn;
    cn->linked = 1;
    c->nconns++;
    uv_tcp_nodelay(&cn->tcp, 1);
    return cn;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static __thread char rbuf[65536];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(rbuf, sizeof rbuf);
}

static void handle_frame(cl_conn_t *cn, const epd_ctl_msg_t *m);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    cl_conn_t *cn = s->data;
    if (cn->closing) return;
    if (nread < 0) {
        if (epd_ctl_decoder_finish(&cn->dec) < 0) {
            reject_conn(cn, cn->dec.reason, cn->dec.detail);
            return;
        }
        if (nread != UV_EOF)
            EPD_DEBUG(SUB, "link to %s: read: %s", cn->remote, uv_strerror((int)nread));
        conn_close(cn);
        return;
    }
    if (nread == 0) return;
    if (epd_ctl_decoder_feed(&cn->dec, buf->base, (size_t)nread) < 0) {
        reject_conn(cn, cn->dec.reason, cn->dec.detail);
        return;
    }
    epd_ctl_msg_t m;
    int r;
    while (!cn->closing && (r = epd_ctl_decoder_next(&cn->dec, &m)) == 1)
        handle_frame(cn, &m);
    if (!cn->closing && r < 0) reject_conn(cn, cn->dec.reason, cn->dec.detail);
}

static void remote_name(cl_conn_t *cn)
{
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char host[48] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&cn->tcp, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET) {
            uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof host);
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof host);
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        }
    }
    snprintf(cn->remote, sizeof cn->remote, "%s:%d", host, port);
}

static void send_hello(cl_conn_t *cn)
{
    epd_cluster_t *c = cn->c;
    epd_ctl_buf_t b;
    char ctl[300];
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HELLO);
    epd_ctl_put_u32(&b, EPD_CTL_T_NODE_ID, (uint32_t)c->cfg.node_id);
    epd_ctl_put_str(&b, EPD_CTL_T_HOSTNAME, c->hostname);
    epd_ctl_put_str(&b, EPD_CTL_T_NAME, c->cfg.name);
    /* the epoch of the table we hold (a coordinator resyncs members that lag) */
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.valid ? c->table.epoch : 0);
    epd_ctl_put_u32(&b, EPD_CTL_T_RANKS, (uint32_t)c->opts.local_ranks);
    epd_ctl_put_u64(&b, EPD_CTL_T_INCARNATION, c->incarnation);
    epd_ctl_put_str(&b, EPD_CTL_T_BACKEND, c->backend);
    epd_ctl_put_u32(&b, EPD_CTL_T_CAPS, c->opts.transport_caps);
    epd_ctl_put_bytes(&b, EPD_CTL_T_FINGERPRINT, c->fingerprint, c->opts.fingerprint_len);
    if (c->opts.settings_len)
        epd_ctl_put_bytes(&b, EPD_CTL_T_SETTINGS, c->settings, c->opts.settings_len);
    if (c->opts.endpoint_len)
        epd_ctl_put_bytes(&b, EPD_CTL_T_ENDPOINT, c->endpoint, c->opts.endpoint_len);
    for (int i = 0; i < c->opts.num_gpus; i++) {
        size_t mk = epd_ctl_nest_begin(&b, EPD_CTL_T_GPU);
        epd_ctl_put_u32(&b, EPD_CTL_T_ORDINAL, (uint32_t)c->opts.gpus[i].ordinal);
        epd_ctl_put_str(&b, EPD_CTL_T_PCI, c->opts.gpus[i].pci_bus_id);
        epd_ctl_nest_end(&b, mk);
    }
    if (c->http_addr[0]) epd_ctl_put_str(&b, EPD_CTL_T_HTTP, c->http_addr);
    snprintf(ctl, sizeof ctl, "%s:%d", c->cfg.listen.host, c->port);
    epd_ctl_put_str(&b, EPD_CTL_T_CTL_ADDR, ctl);
    epd_ctl_put_u8(&b, EPD_CTL_T_STATE, (uint8_t)c->state);
    if (epd_ctl_frame_end(&b) == 0)
        conn_send_buf(cn, &b);
    else
        EPD_ERROR(SUB, "HELLO does not fit in a control frame (endpoint or settings too large)");
    epd_ctl_buf_fini(&b);
}

static void on_authed(cl_conn_t *cn)
{
    cl_peer_t *p = cn->peer;
    cn->authed = 1;
    if (p->conn && p->conn != cn) {
        cl_conn_t *old = p->conn;
        EPD_INFO(SUB, "peer %d: new link from %s replaces the old one", p->id, cn->remote);
        old->peer = NULL;
        p->conn = NULL;
        conn_close(old);
    }
    p->conn = cn;
    p->retry_ms = RETRY_INITIAL_MS;
    p->refused_us = 0;
    p->refused_why[0] = 0;
    uv_timer_stop(&p->retry);
    EPD_DEBUG(SUB, "link to node %d (%s) authenticated", p->id, cn->remote);
    send_hello(cn);
}

static int accept_peer(void *ctx, uint32_t id, char *why, size_t wl)
{
    cl_conn_t *cn = ctx;
    epd_cluster_t *c = cn->c;
    if ((int)id == c->cfg.node_id) {
        snprintf(why, wl, "node id %u is this node's own id", id);
        return -1;
    }
    cl_peer_t *p = peer_by_id(c, (int)id);
    if (!p) {
        snprintf(why, wl, "node %u is not in cluster.peers of node %d", id, c->cfg.node_id);
        return -1;
    }
    cn->peer = p;
    return 0;
}

/* ---- HELLO ---- */

static void parse_nodeinfo(const uint8_t *p, uint32_t len, cl_nodeinfo_t *n)
{
    uint32_t v;
    const uint8_t *blob;
    uint32_t bl;
    memset(n, 0, sizeof *n);
    if (epd_ctl_get_u32(p, len, EPD_CTL_T_NODE_ID, &v) == 0) n->id = (int)v;
    epd_ctl_get_str(p, len, EPD_CTL_T_HOSTNAME, n->hostname, sizeof n->hostname);
    epd_ctl_get_str(p, len, EPD_CTL_T_NAME, n->name, sizeof n->name);
    epd_ctl_get_str(p, len, EPD_CTL_T_BACKEND, n->backend, sizeof n->backend);
    epd_ctl_get_str(p, len, EPD_CTL_T_HTTP, n->http, sizeof n->http);
    epd_ctl_get_str(p, len, EPD_CTL_T_CTL_ADDR, n->ctl, sizeof n->ctl);
    epd_ctl_get_u32(p, len, EPD_CTL_T_RANKS, &n->ranks);
    epd_ctl_get_u32(p, len, EPD_CTL_T_CAPS, &n->caps);
    epd_ctl_get_u32(p, len, EPD_CTL_T_FIRST_RANK, &n->first_rank);
    if (epd_ctl_get_bytes(p, len, EPD_CTL_T_ENDPOINT, &blob, &bl) == 0 && bl > 0) {
        n->endpoint = malloc(bl);
        if (n->endpoint) {
            memcpy(n->endpoint, blob, bl);
            n->endpoint_len = bl;
        }
    }
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *val;
    uint32_t vl;
    epd_ctl_iter_init(&it, p, len);
    while (epd_ctl_iter_next(&it, &tag, &val, &vl)) {
        if (tag != EPD_CTL_T_GPU || n->ngpus >= EPD_CFG_MAX_GPUS) continue;
        epd_cluster_gpu_t *g = &n->gpus[n->ngpus++];
        if (epd_ctl_get_u32(val, vl, EPD_CTL_T_ORDINAL, &v) == 0) g->ordinal = (int)v;
        epd_ctl_get_str(val, vl, EPD_CTL_T_PCI, g->pci_bus_id, sizeof g->pci_bus_id);
    }
}

static void refuse_peer(cl_conn_t *cn, const char *reason, const char *setting)
{
    epd_cluster_t *c = cn->c;
    cl_peer_t *p = cn->peer;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_REFUSE);
    epd_ctl_put_str(&b, EPD_CTL_T_REASON, reason);
    if (setting && *setting) epd_ctl_put_str(&b, EPD_CTL_T_SETTING, setting);
    if (epd_ctl_frame_end(&b) == 0) conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
    /* A refused node keeps reconnecting: say it once per reason, not once per attempt. */
    if (p->state != EPD_PEER_REFUSED || strcmp(p->reason, reason) != 0)
        EPD_ERROR(SUB, "refusing node %d (%s): %s", p->id, cn->remote, reason);
    else
        EPD_DEBUG(SUB, "refusing node %d (%s) again: %s", p->id, cn->remote, reason);
    p->hello_ok = 0;
    set_peer_state(c, p, EPD_PEER_REFUSED, reason);
    /* uv_close would drop the queued REFUSE: shut the write side down first (it completes once
     * the frame is handed to the kernel) and close from its callback. */
    cn->closing = 1;
    conn_unlink(c, cn);
    if (p->conn == cn) p->conn = NULL;
    cn->sreq.data = cn;
    if (uv_shutdown(&cn->sreq, (uv_stream_t *)&cn->tcp, on_shutdown) < 0)
        uv_close((uv_handle_t *)&cn->tcp, on_conn_closed);
    if (cn->outbound) schedule_retry(p, c);
    evaluate(c);
}

static void on_hello(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    cl_peer_t *p = cn->peer;
    cl_nodeinfo_t n;
    char why[512], setting[256] = "";
    const uint8_t *fp, *settings = NULL;
    uint32_t fpl, sl = 0;
    uint64_t epoch = 0, incarnation = 0;
    uint8_t st = 0;

    parse_nodeinfo(m->payload, m->len, &n);
    if (n.id != p->id) {
        snprintf(why, sizeof why, "HELLO names node %d on the link authenticated as node %d", n.id,
                 p->id);
        nodeinfo_free(&n);
        reject_conn(cn, EPD_CTL_REJECT_AUTH_FAILED, why);
        return;
    }
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_FINGERPRINT, &fp, &fpl);
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_SETTINGS, &settings, &sl);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_STATE, &st);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_INCARNATION, &incarnation);
    cn->hello_rx = 1;

    if (fpl != c->opts.fingerprint_len || memcmp(fp, c->fingerprint, fpl) != 0) {
        char d[400] = "";
        int r = -1;
        if (c->opts.config_diff && settings)
            r = c->opts.config_diff(c->opts.cb_ctx, settings, sl, d, sizeof d);
        if (r == 1) {
            snprintf(setting, sizeof setting, "%.255s", d);
            snprintf(why, sizeof why, "config of node %d differs from node %d: %s", p->id,
                     c->cfg.node_id, d);
        } else if (r == -1 && d[0]) {
            snprintf(why, sizeof why, "config fingerprint of node %d differs; its settings: %s",
                     p->id, d);
        } else {
            snprintf(why, sizeof why, "config fingerprint of node %d differs from node %d's", p->id,
                     c->cfg.node_id);
        }
        nodeinfo_free(&n);
        refuse_peer(cn, why, setting);
        return;
    }
    if ((int)n.ranks != c->opts.local_ranks) {
        snprintf(why, sizeof why, "node %d runs %u ranks, node %d runs %d: ranks per node differ",
                 p->id, n.ranks, c->cfg.node_id, c->opts.local_ranks);
        nodeinfo_free(&n);
        refuse_peer(cn, why, "compute.ranks_per_node");
        return;
    }
    /* A new process behind a known node id (restarted before we marked it down) lost its EP
     * state: the engine aborts what it had in flight with it, and the cluster re-forms. A
     * member that merely reconnected but holds another epoch missed a table: resync it. */
    if (p->incarnation && incarnation != p->incarnation && p->hello_ok) {
        EPD_WARN(SUB, "peer %d restarted (new incarnation)", p->id);
        if (in_table(c, p->id) && c->boot) cl_boot_abort(c->boot, "peer restarted");
        if (c->opts.on_peer_down) c->opts.on_peer_down(c->opts.cb_ctx, p->id, "restarted");
    }
    if (in_table(c, p->id) &&
        ((p->incarnation && incarnation != p->incarnation) || epoch != c->table.epoch))
        c->retable = 1;
    p->incarnation = incarnation;
    nodeinfo_free(&p->info);
    p->info = n;
    p->epoch_seen = epoch;
    p->node_state = st;
    if (epoch > c->max_epoch) c->max_epoch = epoch;
    p->hello_ok = 1;
    p->last_seen_ms = now_ms(c);
    set_peer_state(c, p, EPD_PEER_UP, NULL);
    evaluate(c);
}

/* ---- rank table ---- */

static void adopt_table(epd_cluster_t *c, cl_table_t *t)
{
    table_clear(&c->table);
    c->table = *t;
    memset(t, 0, sizeof *t);
    c->formed = 0;
    if (c->table.epoch > c->max_epoch) c->max_epoch = c->table.epoch;
    if (c->m_epoch) epd_metric_set(c->m_epoch, (double)c->table.epoch);
    int idx;
    const cl_nodeinfo_t *me = cl_table_node(c, c->cfg.node_id, &idx);
    char why[96];
    snprintf(why, sizeof why, "epoch changed to %" PRIu64, c->table.epoch);
    if (c->boot)
        cl_boot_set_epoch(c->boot, c->table.epoch, 0, me ? (int)me->first_rank : -1,
                          c->table.nranks, why);
    EPD_INFO(SUB, "rank table epoch %" PRIu64 " from coordinator %d: %d nodes, %d ranks%s",
             c->table.epoch, c->table.coord, c->table.nnodes, c->table.nranks,
             c->table.complete ? "" : " (incomplete)");
}

static void set_formed(epd_cluster_t *c)
{
    if (c->formed) return;
    c->formed = 1;
    int idx;
    const cl_nodeinfo_t *me = cl_table_node(c, c->cfg.node_id, &idx);
    if (c->boot)
        cl_boot_set_epoch(c->boot, c->table.epoch, 1, me ? (int)me->first_rank : -1,
                          c->table.nranks, "");
    EPD_INFO(SUB,
             "cluster formed at epoch %" PRIu64 ": %d nodes, %d ranks (this node: first "
             "rank %d)",
             c->table.epoch, c->table.nnodes, c->table.nranks, me ? (int)me->first_rank : -1);
    if (c->opts.on_formed) c->opts.on_formed(c->opts.cb_ctx, c->table.epoch);
}

static void put_node(epd_ctl_buf_t *b, const cl_nodeinfo_t *n)
{
    size_t mk = epd_ctl_nest_begin(b, EPD_CTL_T_NODE);
    epd_ctl_put_u32(b, EPD_CTL_T_NODE_ID, (uint32_t)n->id);
    epd_ctl_put_str(b, EPD_CTL_T_HOSTNAME, n->hostname);
    epd_ctl_put_str(b, EPD_CTL_T_NAME, n->name);
    epd_ctl_put_u32(b, EPD_CTL_T_FIRST_RANK, n->first_rank);
    epd_ctl_put_u32(b, EPD_CTL_T_RANKS, n->ranks);
    epd_ctl_put_str(b, EPD_CTL_T_BACKEND, n->backend);
    epd_ctl_put_u32(b, EPD_CTL_T_CAPS, n->caps);
    for (int g = 0; g < n->ngpus; g++) {
        size_t gm = epd_ctl_nest_begin(b, EPD_CTL_T_GPU);
        epd_ctl_put_u32(b, EPD_CTL_T_ORDINAL, (uint32_t)n->gpus[g].ordinal);
        epd_ctl_put_str(b, EPD_CTL_T_PCI, n->gpus[g].pci_bus_id);
        epd_ctl_nest_end(b, gm);
    }
    if (n->endpoint_len) epd_ctl_put_bytes(b, EPD_CTL_T_ENDPOINT, n->endpoint, n->endpoint_len);
    if (n->http[0]) epd_ctl_put_str(b, EPD_CTL_T_HTTP, n->http);
    if (n->ctl[0]) epd_ctl_put_str(b, EPD_CTL_T_CTL_ADDR, n->ctl);
    epd_ctl_nest_end(b, mk);
}

static void self_info(const epd_cluster_t *c, cl_nodeinfo_t *n)
{
    memset(n, 0, sizeof *n);
    n->id = c->cfg.node_id;
    snprintf(n->hostname, sizeof n->hostname, "%s", c->hostname);
    snprintf(n->name, sizeof n->name, "%s", c->cfg.name);
    snprintf(n->backend, sizeof n->backend, "%s", c->backend);
    snprintf(n->http, sizeof n->http, "%s", c->http_addr);
    snprintf(n->ctl, sizeof n->ctl, "%.200s:%d", c->cfg.listen.host, c->port);
    n->ranks = (uint32_t)c->opts.local_ranks;
    n->caps = c->opts.transport_caps;
    n->ngpus = c->opts.num_gpus;
    memcpy(n->gpus, c->opts.gpus, sizeof n->gpus);
    if (c->opts.endpoint_len && (n->endpoint = malloc(c->opts.endpoint_len))) {
        memcpy(n->endpoint, c->endpoint, c->opts.endpoint_len);
        n->endpoint_len = c->opts.endpoint_len;
    }
}

static int alive_member(const cl_peer_t *p)
{
    return p->hello_ok && (p->state == EPD_PEER_UP || p->state == EPD_PEER_SUSPECT);
}

static void broadcast_table(epd_cluster_t *c, int complete)
{
    cl_table_t t;
    memset(&t, 0, sizeof t);
    int n = 1;
    for (int i = 0; i < c->npeers; i++)
        n += alive_member(&c->peers[i]);
    t.nodes = calloc((size_t)n, sizeof *t.nodes);
    t.acked = calloc((size_t)n, 1);
    if (!t.nodes || !t.acked) {
        free(t.nodes);
        free(t.acked);
        EPD_ERROR(SUB, "out of memory building a rank table");
        return;
    }
    /* Members ordered by node id; rank = node_index * ranks_per_node + local. */
    int k = 0, last = -1;
    for (;;) {
        int best = -1;
        if (c->cfg.node_id > last) best = c->cfg.node_id;
        for (int i = 0; i < c->npeers; i++) {
            cl_peer_t *p = &c->peers[i];
            if (alive_member(p) && p->id > last && (best < 0 || p->id < best)) best = p->id;
        }
        if (best < 0) break;
        cl_nodeinfo_t *ni = &t.nodes[k];
        if (best == c->cfg.node_id) {
            self_info(c, ni);
        } else {
            cl_peer_t *p = peer_by_id(c, best);
            *ni = p->info;
            ni->endpoint = NULL;
            if (p->info.endpoint_len && (ni->endpoint = malloc(p->info.endpoint_len)))
                memcpy(ni->endpoint, p->info.endpoint, p->info.endpoint_len);
            else
                ni->endpoint_len = 0;
        }
        ni->first_rank = (uint32_t)t.nranks;
        t.nranks += (int)ni->ranks;
        k++;
        last = best;
    }
    t.nnodes = k;
    t.valid = 1;
    t.coord = c->cfg.node_id;
    t.complete = complete;
    uint64_t e = c->max_epoch > c->table.epoch ? c->max_epoch : c->table.epoch;
    t.epoch = e + 1;

    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_RANK_TABLE);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, t.epoch);
    epd_ctl_put_u32(&b, EPD_CTL_T_COORD, (uint32_t)t.coord);
    epd_ctl_put_u8(&b, EPD_CTL_T_COMPLETE, (uint8_t)complete);
    epd_ctl_put_u32(&b, EPD_CTL_T_NRANKS, (uint32_t)t.nranks);
    for (int i = 0; i < t.nnodes; i++)
        put_node(&b, &t.nodes[i]);
    if (epd_ctl_frame_end(&b) < 0) {
        EPD_ERROR(SUB, "rank table of %d nodes does not fit in a control frame", t.nnodes);
        epd_ctl_buf_fini(&b);
        table_clear(&t);
        return;
    }
    adopt_table(c, &t);
    for (int i = 0; i < c->table.nnodes; i++) {
        if (c->table.nodes[i].id == c->cfg.node_id)
            c->table.acked[i] = 1;
        else
            cl_send_node(c, c->table.nodes[i].id, &b);
    }
    epd_ctl_buf_fini(&b);
}

static void maybe_commit(epd_cluster_t *c)
{
    if (!c->table.valid || c->table.coord != c->cfg.node_id || !c->table.complete || c->formed)
        return;
    for (int i = 0; i < c->table.nnodes; i++)
        if (!c->table.acked[i]) return;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_COMMIT);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.epoch);
    if (epd_ctl_frame_end(&b) == 0)
        for (int i = 0; i < c->table.nnodes; i++)
            if (c->table.nodes[i].id != c->cfg.node_id) cl_send_node(c, c->table.nodes[i].id, &b);
    epd_ctl_buf_fini(&b);
    set_formed(c);
}

static void coordinate(epd_cluster_t *c)
{
    int alive = 1, members_same = 1, member_gone = 0;
    for (int i = 0; i < c->npeers; i++) {
        cl_peer_t *p = &c->peers[i];
        int a = alive_member(p);
        alive += a;
        int t = in_table(c, p->id);
        if (a != t) members_same = 0;
        if (t && !a) member_gone = 1;
    }
    int complete = alive == c->npeers + 1;
    if (c->table.valid && !in_table(c, c->cfg.node_id)) members_same = 0;
    int mine = c->table.valid && c->table.coord == c->cfg.node_id;
    if (!c->table.valid || !mine) c->retable = 0; /* a fresh table is coming anyway */
    if (mine && members_same && !c->retable) {
        maybe_commit(c);
        return;
    }
    /* A complete membership always gets a table; an incomplete one only replaces a table whose
     * member died (so its ranks stop being used), never waits on a table of its own. */
    if (complete || (c->table.valid && (member_gone || c->retable))) {
        c->retable = 0;
        broadcast_table(c, complete);
    }
    maybe_commit(c);
}

static void on_rank_table(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    cl_table_t t;
    uint64_t epoch;
    uint32_t coord, nranks;
    uint8_t complete;
    memset(&t, 0, sizeof t);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_COORD, &coord);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_COMPLETE, &complete);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_NRANKS, &nranks);
    if ((int)coord != cn->peer->id) {
        char why[128];
        snprintf(why, sizeof why, "RANK_TABLE from node %d names coordinator %u", cn->peer->id,
                 coord);
        reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    if (epoch < c->table.epoch ||
        (epoch == c->table.epoch && c->table.valid && (int)coord >= c->table.coord)) {
        EPD_DEBUG(SUB, "ignoring stale rank table epoch %" PRIu64 " from node %u", epoch, coord);
        return;
    }
    int n = 0;
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *v;
    uint32_t vl;
    epd_ctl_iter_init(&it, m->payload, m->len);
    while (epd_ctl_iter_next(&it, &tag, &v, &vl))
        n += tag == EPD_CTL_T_NODE;
    if (n == 0 || n > c->npeers + 1) {
        char why[128];
        snprintf(why, sizeof why, "RANK_TABLE epoch %" PRIu64 " lists %d nodes (cluster has %d)",
                 epoch, n, c->npeers + 1);
        reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    t.nodes = calloc((size_t)n, sizeof *t.nodes);
    t.acked = calloc((size_t)n, 1);
    if (!t.nodes || !t.acked) {
        free(t.nodes);
        free(t.acked);
        return;
    }
    epd_ctl_iter_init(&it, m->payload, m->len);
    uint32_t expect_rank = 0;
    const char *bad = NULL;
    int last_id = -1;
    while (epd_ctl_iter_next(&it, &tag, &v, &vl)) {
        if (tag != EPD_CTL_T_NODE) continue;
        cl_nodeinfo_t *ni = &t.nodes[t.nnodes++];
        parse_nodeinfo(v, vl, ni);
        if (ni->id <= last_id)
            bad = "nodes not ordered by id";
        else if (ni->id != c->cfg.node_id && !peer_by_id(c, ni->id))
            bad = "unknown node id";
        else if (ni->first_rank != expect_rank)
            bad = "ranks not contiguous";
        last_id = ni->id;
        expect_rank += ni->ranks;
    }
    if (!bad && expect_rank != nranks) bad = "rank count does not match its nodes";
    if (bad) {
        char why[160];
        snprintf(why, sizeof why, "RANK_TABLE epoch %" PRIu64 " from node %u: %s", epoch, coord,
                 bad);
        table_clear(&t);
        reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    t.valid = 1;
    t.epoch = epoch;
    t.coord = (int)coord;
    t.complete = complete != 0;
    t.nranks = (int)nranks;
    adopt_table(c, &t);
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_TABLE_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, epoch);
    if (epd_ctl_frame_end(&b) == 0) conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
    evaluate(c);
}

static void on_table_ack(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    uint64_t epoch;
    int idx;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    if (!c->table.valid || c->table.coord != c->cfg.node_id || epoch != c->table.epoch) return;
    if (!cl_table_node(c, cn->peer->id, &idx)) return;
    c->table.acked[idx] = 1;
    maybe_commit(c);
    evaluate(c);
}

static void on_commit(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    uint64_t epoch;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    if (!c->table.valid || epoch != c->table.epoch || c->table.coord != cn->peer->id ||
        !c->table.complete)
        return;
    set_formed(c);
    evaluate(c);
}

/* ---- heartbeats ---- */

static void send_heartbeat(cl_conn_t *cn)
{
    epd_cluster_t *c = cn->c;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HEARTBEAT);
    epd_ctl_put_u64(&b, EPD_CTL_T_SEQ, ++cn->peer->hb_seq);
    epd_ctl_put_u64(&b, EPD_CTL_T_TIME, uv_hrtime());
    epd_ctl_put_u8(&b, EPD_CTL_T_STATE, (uint8_t)c->state);
    epd_ctl_put_u32(&b, EPD_CTL_T_LOAD, c->load);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.epoch);
    if (epd_ctl_frame_end(&b) == 0) conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
}

static void on_heartbeat(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    cl_peer_t *p = cn->peer;
    uint64_t seq, t, epoch;
    uint8_t st;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_SEQ, &seq);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_TIME, &t);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_STATE, &st);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_LOAD, &p->load);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    p->node_state = st;
    p->epoch_seen = epoch;
    p->last_hb_ms = now_ms(cn->c);
    if (epoch > cn->c->max_epoch) cn->c->max_epoch = epoch;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HEARTBEAT_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_SEQ, seq);
    epd_ctl_put_u64(&b, EPD_CTL_T_TIME, t);
    if (epd_ctl_frame_end(&b) == 0) conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
}

static void on_heartbeat_ack(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    cl_peer_t *p = cn->peer;
    uint64_t t, now = uv_hrtime();
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_TIME, &t);
    if (t > now) return; /* not our clock: ignore rather than record a negative RTT */
    p->rtt_s = (double)(now - t) / 1e9;
    if (p->m_rtt) epd_metric_observe(p->m_rtt, p->rtt_s);
}

/* ---- frame dispatch ---- */

static void handle_frame(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    if (!cn->authed) {
        epd_ctl_buf_t out;
        epd_ctl_buf_init(&out);
        int r = epd_ctl_auth_on_frame(&cn->auth, m, &out, accept_peer, cn);
        if (out.len) conn_send_buf(cn, &out);
        epd_ctl_buf_fini(&out);
        if (r < 0) {
            reject_conn(cn, cn->auth.reason, cn->auth.detail);
            return;
        }
        if (r == 1 && !cn->closing) on_authed(cn);
        return;
    }
    if (m->type <= EPD_CTL_AUTH_OK) {
        char why[96];
        snprintf(why, sizeof why, "%s after authentication", epd_ctl_type_name(m->type));
        reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, why);
        return;
    }
    if (!cn->hello_rx && m->type != EPD_CTL_HELLO && m->type != EPD_CTL_REFUSE &&
        m->type != EPD_CTL_BYE) {
        char why[96];
        snprintf(why, sizeof why, "%s before HELLO", epd_ctl_type_name(m->type));
        reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, why);
        return;
    }
    cl_peer_t *p = cn->peer;
    if (p->conn != cn) return; /* a replaced link still draining */
    p->last_seen_ms = now_ms(c);
    if (p->state == EPD_PEER_SUSPECT && p->hello_ok) set_peer_state(c, p, EPD_PEER_UP, NULL);
    switch (m->type) {
    case EPD_CTL_HELLO:
        if (cn->hello_rx) {
            reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, "second HELLO on one link");
            return;
        }
        on_hello(cn, m);
        break;
    case EPD_CTL_REFUSE: {
        char reason[1024] = "", setting[256] = "";
        epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_REASON, reason, sizeof reason);
        epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_SETTING, setting, sizeof setting);
        snprintf(p->refused_why, sizeof p->refused_why, "%.250s", reason);
        p->refused_us = 1;
        if (p->state != EPD_PEER_REFUSED || strcmp(p->reason, reason) != 0)
            EPD_ERROR(SUB, "node %d refused this node: %s", p->id, reason);
        p->hello_ok = 0;
        set_peer_state(c, p, EPD_PEER_REFUSED, reason);
        conn_close(cn);
        break;
    }
    case EPD_CTL_RANK_TABLE:
        on_rank_table(cn, m);
        break;
    case EPD_CTL_TABLE_ACK:
        on_table_ack(cn, m);
        break;
    case EPD_CTL_COMMIT:
        on_commit(cn, m);
        break;
    case EPD_CTL_HEARTBEAT:
        on_heartbeat(cn, m);
        break;
    case EPD_CTL_HEARTBEAT_ACK:
        on_heartbeat_ack(cn, m);
        break;
    case EPD_CTL_BOOT_CONTRIB:
        if (c->boot) cl_boot_on_contrib(c->boot, p->id, m);
        break;
    case EPD_CTL_BOOT_RESULT:
        if (c->boot) cl_boot_on_result(c->boot, m);
        break;
    case EPD_CTL_WAKE:
        if (c->opts.on_wake) c->opts.on_wake(c->opts.cb_ctx, p->id);
        break;
    case EPD_CTL_BYE: {
        char reason[1024] = "";
        char why[1100];
        epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_REASON, reason, sizeof reason);
        snprintf(why, sizeof why, "left the cluster: %s", reason);
        set_peer_state(c, p, EPD_PEER_DOWN, why);
        if (cn && !cn->closing) conn_close(cn);
        evaluate(c);
        break;
    }
    default:
        break;
    }
}

/* ---- outbound links ---- */

static void on_connect(uv_connect_t *req, int status)
{
    cl_conn_t *cn = req->data;
    epd_cluster_t *c = cn->c;
    if (cn->closing) return;
    if (status < 0) {
        EPD_DEBUG(SUB, "connect to node %d (%s:%d): %s", cn->peer->id, cn->peer->addr.host,
                  cn->peer->addr.port, uv_strerror(status));
        conn_close(cn);
        return;
    }
    remote_name(cn);
    int r = uv_read_start((uv_stream_t *)&cn->tcp, on_alloc, on_read);
    epd_ctl_buf_t out;
    epd_ctl_buf_init(&out);
    if (r == 0) r = epd_ctl_auth_start(&cn->auth, &out);
    if (r == 0) r = conn_send_buf(cn, &out);
    epd_ctl_buf_fini(&out);
    if (r < 0 && !cn->closing) conn_close(cn);
    (void)c;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    cl_resolve_t *rs = (cl_resolve_t *)req;
    epd_cluster_t *c = rs->c;
    cl_peer_t *p = rs->peer;
    free(rs);
    if (c->stopping) {
        if (res) uv_freeaddrinfo(res);
        cl_handle_closed(c);
        return;
    }
    c->handles--;
    if (status < 0 || !res) {
        EPD_WARN(SUB, "resolve node %d address %s: %s", p->id, p->addr.host, uv_strerror(status));
        schedule_retry(p, c);
        return;
    }
    if (p->conn) {
        uv_freeaddrinfo(res);
        return;
    }
    cl_conn_t *cn = conn_new(c, 1);
    if (!cn) {
        uv_freeaddrinfo(res);
        schedule_retry(p, c);
        return;
    }
    cn->peer = p;
    p->conn = cn;
    snprintf(cn->remote, sizeof cn->remote, "%.50s:%d", p->addr.host, p->addr.port);
    epd_ctl_auth_init(&cn->auth, EPD_CTL_AUTH_CLIENT, &c->secret, (uint32_t)c->cfg.node_id,
                      (uint32_t)p->id, c->cfg.cluster_name);
    cn->creq.data = cn;
    int r = uv_tcp_connect(&cn->creq, &cn->tcp, res->ai_addr, on_connect);
    uv_freeaddrinfo(res);
    if (r < 0) {
        EPD_DEBUG(SUB, "connect to node %d: %s", p->id, uv_strerror(r));
        conn_close(cn);
        return;
    }
    /* The retry timer doubles as the connect+handshake deadline. */
    uv_timer_start(&p->retry, retry_cb, (uint64_t)c->cfg.connect_timeout_ms, 0);
}

static void start_connect(epd_cluster_t *c, cl_peer_t *p);

/* Backoff expired (connect again) or a connect/handshake deadline passed (give up on it). */
static void retry_cb(uv_timer_t *t)
{
    cl_peer_t *p = t->data;
    epd_cluster_t *c = p->cl;
    if (c->stopping) return;
    if (p->conn) {
        if (!p->conn->authed &&
            now_ms(c) - p->conn->started_ms >= (uint64_t)c->cfg.connect_timeout_ms) {
            EPD_DEBUG(SUB, "node %d (%s:%d): no connection and handshake within %d ms", p->id,
                      p->addr.host, p->addr.port, c->cfg.connect_timeout_ms);
            conn_close(p->conn);
        }
        return;
    }
    start_connect(c, p);
}

static void start_connect(epd_cluster_t *c, cl_peer_t *p)
{
    char port[16];
    cl_resolve_t *rs = calloc(1, sizeof *rs);
    if (!rs) {
        schedule_retry(p, c);
        return;
    }
    rs->c = c;
    rs->peer = p;
    snprintf(port, sizeof port, "%d", p->addr.port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int r = uv_getaddrinfo(c->loop, &rs->req, on_resolved, p->addr.host, port, &hints);
    if (r < 0) {
        free(rs);
        EPD_WARN(SUB, "resolve node %d address %s: %s", p->id, p->addr.host, uv_strerror(r));
        schedule_retry(p, c);
        return;
    }
    c->handles++;
}

static void schedule_retry(cl_peer_t *p, epd_cluster_t *c)
{
    if (c->stopping || p->id < c->cfg.node_id) return; /* lower ids connect to us */
    uv_timer_start(&p->retry, retry_cb, (uint64_t)p->retry_ms, 0);
    p->retry_ms = p->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : p->retry_ms * 2;
}

/* ---- tick: heartbeats, health, handshake deadlines ---- */

static void on_tick(uv_timer_t *t)
{
    epd_cluster_t *c = t->data;
    uint64_t now = now_ms(c);
    uint64_t to = (uint64_t)c->cfg.heartbeat_timeout_ms;
    for (int i = 0; i < c->npeers; i++) {
        cl_peer_t *p = &c->peers[i];
        if (p->conn && p->conn->authed && p->conn->hello_rx && !p->conn->closing)
            send_heartbeat(p->conn);
        if (p->state != EPD_PEER_UP && p->state != EPD_PEER_SUSPECT) continue;
        uint64_t silence = now - p->last_seen_ms;
        char why[128];
        if (silence >= 2 * to) {
            snprintf(why, sizeof why,
                     "no frame for %" PRIu64
                     " ms (down after 2 x timeouts.heartbeat_timeout_ms = %d ms)",
                     silence, 2 * c->cfg.heartbeat_timeout_ms);
            set_peer_state(c, p, EPD_PEER_DOWN, why);
        } else if (silence >= to && p->state == EPD_PEER_UP) {
            snprintf(why, sizeof why,
                     "no frame for %" PRIu64 " ms (timeouts.heartbeat_timeout_ms %d)", silence,
                     c->cfg.heartbeat_timeout_ms);
            set_peer_state(c, p, EPD_PEER_SUSPECT, why);
        }
    }
    int pending = 0;
    for (cl_conn_t *cn = c->conns, *next; cn; cn = next) {
        next = cn->next;
        if (cn->authed) continue;
        pending++;
        if (now - cn->started_ms >= (uint64_t)c->cfg.connect_timeout_ms) {
            EPD_DEBUG(SUB, "link %s: no handshake within %d ms; closing", cn->remote,
                      c->cfg.connect_timeout_ms);
            conn_close(cn);
        }
    }
    evaluate(c);
}

/* ---- inbound links ---- */

static void on_connection(uv_stream_t *server, int status)
{
    epd_cluster_t *c = server->data;
    if (status < 0 || c->stopping) return;
    int pending = 0;
    for (cl_conn_t *cn = c->conns; cn; cn = cn->next)
        pending += !cn->authed;
    cl_conn_t *cn = conn_new(c, 0);
    if (!cn) return;
    if (uv_accept(server, (uv_stream_t *)&cn->tcp) < 0) {
        conn_close(cn);
        return;
    }
    remote_name(cn);
    if (pending >= MAX_PENDING_CONNS) {
        EPD_WARN(SUB, "refusing control connection from %s: %d handshakes already pending",
                 cn->remote, pending);
        conn_close(cn);
        return;
    }
    epd_ctl_auth_init(&cn->auth, EPD_CTL_AUTH_SERVER, &c->secret, (uint32_t)c->cfg.node_id, 0,
                      c->cfg.cluster_name);
    if (uv_read_start((uv_stream_t *)&cn->tcp, on_alloc, on_read) < 0) conn_close(cn);
}

/* ---- readiness ---- */

static void update_readiness(epd_cluster_t *c)
{
    char why[512] = "";
    size_t n = 0;
    int ready = 0;
    if (c->stopping) {
        snprintf(why, sizeof why, "node is stopping");
    } else {
        for (int i = 0; i < c->npeers && !why[0]; i++) {
            cl_peer_t *p = &c->peers[i];
            if (p->refused_us)
                snprintf(why, sizeof why, "refused by node %d: %.400s", p->id, p->refused_why);
        }
        if (!why[0]) {
            /* "waiting for peers" while none has failed yet (bring-up), else "peers not up" */
            int failed = 0;
            for (int i = 0; i < c->npeers; i++)
                failed |= c->peers[i].state != EPD_PEER_UP && c->peers[i].state != EPD_PEER_UNKNOWN;
            for (int i = 0; i < c->npeers; i++) {
                cl_peer_t *p = &c->peers[i];
                if (p->state == EPD_PEER_UP) continue;
                if (n == 0)
                    n += (size_t)snprintf(why, sizeof why, "%s",
                                          failed ? "peers not up:" : "waiting for peers:");
                if (p->state == EPD_PEER_UNKNOWN && n < sizeof why) {
                    n += (size_t)snprintf(why + n, sizeof why - n,
                                          " node %d (%.60s:%d) not reached yet;", p->id,
                                          p->addr.host, p->addr.port);
                    continue;
                }
                if (n < sizeof why)
                    n += (size_t)snprintf(why + n, sizeof why - n, " node %d %s%s%.100s%s;", p->id,
                                          epd_peer_state_name(p->state), p->reason[0] ? " (" : "",
                                          p->reason, p->reason[0] ? ")" : "");
            }
        }
        if (!why[0]) {
            if (!c->table.valid)
                snprintf(why, sizeof why, "waiting for the rank table from coordinator %d",
                         c->coordinator);
            else if (!in_table(c, c->cfg.node_id))
                snprintf(why, sizeof why, "not in rank table epoch %" PRIu64, c->table.epoch);
            else if (!c->table.complete)
                snprintf(why, sizeof why, "rank table epoch %" PRIu64 " is incomplete",
                         c->table.epoch);
            else if (!c->formed)
                snprintf(why, sizeof why,
                         "rank table epoch %" PRIu64 " not yet acknowledged by every node",
                         c->table.epoch);
            else
                ready = 1;
        }
    }
    if (n > 0 && why[strlen(why) - 1] == ';') why[strlen(why) - 1] = 0;
    if (ready == c->ready && strcmp(why, c->ready_reason) == 0) return;
    c->ready = ready;
    snprintf(c->ready_reason, sizeof c->ready_reason, "%s", why);
    if (ready)
        EPD_INFO(SUB, "cluster ready at epoch %" PRIu64, c->table.epoch);
    else
        EPD_INFO(SUB, "cluster not ready: %s", why);
    if (c->opts.on_ready) c->opts.on_ready(c->opts.cb_ctx, ready, why);
}

static void evaluate_once(epd_cluster_t *c)
{
    int coord = c->cfg.node_id;
    for (int i = 0; i < c->npeers; i++)
        if (alive_member(&c->peers[i]) && c->peers[i].id < coord) coord = c->peers[i].id;
    c->coordinator = coord;
    if (coord == c->cfg.node_id) coordinate(c);
    update_readiness(c);
}

/* Runs after every membership event. Sending may close a link, which re-enters here; such
 * nested calls only ask the outer one to run again. */
static void evaluate(epd_cluster_t *c)
{
    if (c->stopping || !c->started) {
        if (c->stopping) update_readiness(c);
        return;
    }
    if (c->evaluating) {
        c->reevaluate = 1;
        return;
    }
    c->evaluating = 1;
    int rounds = 0;
    do {
        c->reevaluate = 0;
        evaluate_once(c);
    } while (c->reevaluate && ++rounds < 8);
    c->evaluating = 0;
}

/* ---- lifecycle ---- */

int epd_cluster_create(const epd_cluster_opts_t *o, epd_cluster_t **out, char *err, size_t errlen)
{
    epd_cluster_t *c = NULL;
    const epd_config_t *cfg = o->cfg;
    *out = NULL;
    if (!o->loop || !cfg) {
        snprintf(err, errlen, "cluster: loop and config are required");
        return -1;
    }
    if (o->local_ranks < 1) {
        snprintf(err, errlen, "cluster: a node runs at least one rank (got %d)", o->local_ranks);
        return -1;
    }
    if (cfg->heartbeat_interval_ms <= 0 ||
        cfg->heartbeat_timeout_ms <= cfg->heartbeat_interval_ms || cfg->connect_timeout_ms <= 0) {
        snprintf(err, errlen,
                 "cluster: timeouts.heartbeat_timeout_ms (%d) must exceed "
                 "timeouts.heartbeat_interval_ms (%d) > 0, and timeouts.connect_ms (%d) > 0",
                 cfg->heartbeat_timeout_ms, cfg->heartbeat_interval_ms, cfg->connect_timeout_ms);
        return -1;
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
        snprintf(err, errlen, "cluster: config fingerprint longer than 64 bytes");
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
        if (epd_ctl_secret_load(cfg->secret_file, &c->secret, err, errlen) < 0) goto fail;
    } else if (cfg->num_peers > 0) {
        snprintf(err, errlen,
                 "cluster: cluster.secret_file is required when cluster.peers lists other nodes");
        goto fail;
    }

    c->peers = calloc((size_t)(cfg->num_peers > 0 ? cfg->num_peers : 1), sizeof *c->peers);
    if (!c->peers) goto nomem;
    for (int i = 0; i < cfg->num_peers; i++) {
        const epd_peer_t *cp = &cfg->peers[i];
        if (cp->node_id == cfg->node_id) continue; /* one peer list may serve every node */
        if (peer_by_id(c, cp->node_id)) {
            snprintf(err, errlen, "cluster: cluster.peers[%d]: node id %d listed twice", i,
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
            peer_metric(c, &c->peers[i]);
        }
        if (c->m_epoch) epd_metric_set(c->m_epoch, 0);
    }
    if (cl_boot_create(c, o->local_ranks, &c->boot) < 0) goto nomem;
    snprintf(c->ready_reason, sizeof c->ready_reason, "cluster not started");
    *out = c;
    return 0;
nomem:
    snprintf(err, errlen, "cluster: out of memory");
fail:
    if (c) {
        epd_ctl_secret_wipe(&c->secret);
        free(c->fingerprint);
        free(c->settings);
        free(c->endpoint);
        free(c->peers);
        free(c);
    }
    return -1;
}

static int bind_listener(epd_cluster_t *c, char *err, size_t errlen)
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
        snprintf(err, errlen, "cluster.listen %s:%d: %s", c->cfg.listen.host, c->cfg.listen.port,
                 gai_strerror(r));
        return -1;
    }
    if ((r = uv_tcp_init(c->loop, &c->listener)) < 0) {
        freeaddrinfo(res);
        snprintf(err, errlen, "cluster.listen: uv_tcp_init: %s", uv_strerror(r));
        return -1;
    }
    c->handles++;
    c->listening = 1;
    c->listener.data = c;
    r = uv_tcp_bind(&c->listener, res->ai_addr, 0);
    freeaddrinfo(res);
    if (r == 0) r = uv_listen((uv_stream_t *)&c->listener, 128, on_connection);
    if (r < 0) {
        snprintf(err, errlen, "cluster.listen %s:%d: %s", c->cfg.listen.host, c->cfg.listen.port,
                 uv_strerror(r));
        return -1;
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getsockname(&c->listener, (struct sockaddr *)&ss, &len) == 0)
        c->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

int epd_cluster_start(epd_cluster_t *c, char *err, size_t errlen)
{
    if (c->started) {
        snprintf(err, errlen, "cluster: already started");
        return -1;
    }
    if (uv_timer_init(c->loop, &c->tick) < 0 || uv_timer_init(c->loop, &c->stop_timer) < 0) {
        snprintf(err, errlen, "cluster: uv_timer_init failed");
        return -1;
    }
    c->handles += 2;
    if (cl_boot_start(c->boot) < 0) {
        snprintf(err, errlen, "cluster: uv_async_init failed");
        uv_close((uv_handle_t *)&c->tick, NULL);
        uv_close((uv_handle_t *)&c->stop_timer, NULL);
        c->handles -= 2;
        return -1;
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
    if (bind_listener(c, err, errlen) < 0) return -1;
    EPD_INFO(SUB, "node %d listening for peers on %s:%d (%d peers, heartbeat %d ms, timeout %d ms)",
             c->cfg.node_id, c->cfg.listen.host, c->port, c->npeers, c->cfg.heartbeat_interval_ms,
             c->cfg.heartbeat_timeout_ms);
    uv_timer_start(&c->tick, on_tick, (uint64_t)c->cfg.heartbeat_interval_ms,
                   (uint64_t)c->cfg.heartbeat_interval_ms);
    for (int i = 0; i < c->npeers; i++)
        if (c->peers[i].id > c->cfg.node_id) start_connect(c, &c->peers[i]);
    evaluate(c);
    return 0;
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    cl_conn_t *cn = req->data;
    if (uv_is_closing((uv_handle_t *)&cn->tcp)) return;
    conn_unlink(cn->c, cn);
    uv_close((uv_handle_t *)&cn->tcp, on_conn_closed);
}

static void on_stop_timer(uv_timer_t *t)
{
    epd_cluster_t *c = t->data;
    /* Links still flushing their BYE after the budget are closed hard; uv_close cancels the
     * shutdown request, whose callback then does nothing more. */
    while (c->conns) {
        cl_conn_t *cn = c->conns;
        conn_unlink(c, cn);
        if (!uv_is_closing((uv_handle_t *)&cn->tcp))
            uv_close((uv_handle_t *)&cn->tcp, on_conn_closed);
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
        update_readiness(c);
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
            raw_write(cn, bye.p, bye.len) == 0) {
            cn->sreq.data = cn;
            if (uv_shutdown(&cn->sreq, (uv_stream_t *)&cn->tcp, on_shutdown) == 0) continue;
        }
        conn_unlink(c, cn);
        uv_close((uv_handle_t *)&cn->tcp, on_conn_closed);
    }
    epd_ctl_buf_fini(&bye);
    c->stop_armed = 1;
    uv_timer_start(&c->stop_timer, on_stop_timer,
                   (uint64_t)(c->cfg.shutdown_timeout_ms > 0 && c->cfg.shutdown_timeout_ms < 2000
                                  ? c->cfg.shutdown_timeout_ms
                                  : 2000),
                   0);
    update_readiness(c);
}

void epd_cluster_destroy(epd_cluster_t *c)
{
    if (!c) return;
    if (c->handles > 0)
        EPD_ERROR(SUB, "epd_cluster_destroy with %d libuv handles still open", c->handles);
    if (c->boot) cl_boot_destroy(c->boot);
    for (int i = 0; i < c->npeers; i++)
        nodeinfo_free(&c->peers[i].info);
    table_clear(&c->table);
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
    const cl_peer_t *p = peer_by_id(c, node_id);
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
    char err[160];
    return cl_boot_get(c->boot, local_rank, 0, 0, out, err, sizeof err);
}

int epd_cluster_bootstrap_wait(epd_cluster_t *c, int local_rank, unsigned generation,
                               unsigned timeout_ms, ep_bootstrap_t *out, char *err, size_t errlen)
{
    return cl_boot_get(c->boot, local_rank, generation, timeout_ms, out, err, errlen);
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
    uint64_t now = now_ms(c);
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
