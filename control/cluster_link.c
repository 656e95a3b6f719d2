/* Cluster links: authenticated libuv TCP connections to the configured peers. Sending (with a
 * bound on what a peer that does not read may queue), reading and decoding frames, rejection
 * (rate-limited log), authentication, the dispatch of frames to their handlers, outbound links
 * (the lower id connects: resolve, connect, backoff, connect+handshake deadline) and inbound
 * ones (accept, at most MAX_PENDING_CONNS unauthenticated). */
#include "cluster_int.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define SUB "cluster"
/* A peer that does not read its socket is dropped rather than buffered without bound. */
#define MAX_WRITE_QUEUE (16u << 20)
/* Unauthenticated connections at once (a port scan or a flood must not exhaust memory). */
#define MAX_PENDING_CONNS 64
/* At most this many rejection log lines per window; the rest are counted and summarised. */
#define REJECT_LOG_WINDOW_MS 10000
#define REJECT_LOG_BURST 10

typedef struct cl_write {
    uv_write_t req;
    uv_buf_t buf;
} cl_write_t;

typedef struct cl_resolve {
    uv_getaddrinfo_t req;
    epd_cluster_t *c;
    cl_peer_t *peer;
} cl_resolve_t;

static void retry_cb(uv_timer_t *t);

/* ---- sending ---- */

static void on_write(uv_write_t *req, int status)
{
    cl_write_t *w = (cl_write_t *)req;
    free(w->buf.base);
    free(w);
}

int cl_raw_write(cl_conn_t *cn, const uint8_t *p, size_t n)
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
        cl_conn_close(cn);
        return -1;
    }
    int r = cl_raw_write(cn, p, n);
    if (r < 0) {
        EPD_WARN(SUB, "link to %s: write failed: %s", cn->remote, uv_strerror(r));
        cl_conn_close(cn);
        return -1;
    }
    return 0;
}

int cl_conn_send_buf(cl_conn_t *cn, epd_ctl_buf_t *b)
{
    int r = b->len ? conn_send(cn, b->p, b->len) : 0;
    epd_ctl_buf_reset(b);
    return r;
}

int cl_send_node(epd_cluster_t *c, int node_id, epd_ctl_buf_t *frame)
{
    cl_peer_t *p = cl_peer_by_id(c, node_id);
    if (!p || !p->conn || !p->conn->authed || p->conn->closing) return -1;
    return conn_send(p->conn, frame->p, frame->len);
}

/* ---- rejection ---- */

static void count_reject(epd_cluster_t *c, epd_ctl_reject_t r, const char *remote,
                         const char *detail)
{
    if (r <= EPD_CTL_REJECT_NONE || r >= EPD_CTL_REJECT_COUNT) r = EPD_CTL_REJECT_MALFORMED;
    if (c->m_rejected[r]) epd_metric_add(c->m_rejected[r], 1);
    uint64_t now = cl_now_ms(c);
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

void cl_reject_conn(cl_conn_t *cn, epd_ctl_reject_t r, const char *detail)
{
    count_reject(cn->c, r, cn->remote, detail);
    cl_conn_close(cn);
}

/* ---- connections ---- */

void cl_conn_unlink(epd_cluster_t *c, cl_conn_t *cn)
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

void cl_on_conn_closed(uv_handle_t *h)
{
    cl_conn_t *cn = h->data;
    epd_cluster_t *c = cn->c;
    cl_conn_unlink(c, cn);
    epd_ctl_decoder_fini(&cn->dec);
    epd_ctl_auth_fini(&cn->auth);
    free(cn);
    cl_handle_closed(c);
}

void cl_conn_close(cl_conn_t *cn)
{
    if (cn->closing) return;
    epd_cluster_t *c = cn->c;
    cn->closing = 1;
    cl_conn_unlink(c, cn);
    cl_peer_t *p = cn->peer;
    if (p && p->conn == cn) {
        p->conn = NULL;
        if (p->state == EPD_PEER_UP && !c->stopping)
            cl_set_peer_state(c, p, EPD_PEER_SUSPECT, "link closed");
        if (cn->outbound && !c->stopping)
            cl_schedule_retry(p, c);
        else if (!cn->outbound && p->id > c->cfg.node_id && !c->stopping)
            cl_schedule_retry(p, c);
    }
    uv_close((uv_handle_t *)&cn->tcp, cl_on_conn_closed);
    if (!c->stopping) cl_evaluate(c);
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
    cn->started_ms = cl_now_ms(c);
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
            cl_reject_conn(cn, cn->dec.reason, cn->dec.detail);
            return;
        }
        if (nread != UV_EOF)
            EPD_DEBUG(SUB, "link to %s: read: %s", cn->remote, uv_strerror((int)nread));
        cl_conn_close(cn);
        return;
    }
    if (nread == 0) return;
    if (epd_ctl_decoder_feed(&cn->dec, buf->base, (size_t)nread) < 0) {
        cl_reject_conn(cn, cn->dec.reason, cn->dec.detail);
        return;
    }
    epd_ctl_msg_t m;
    int r;
    while (!cn->closing && (r = epd_ctl_decoder_next(&cn->dec, &m)) == 1)
        handle_frame(cn, &m);
    if (!cn->closing && r < 0) cl_reject_conn(cn, cn->dec.reason, cn->dec.detail);
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

static void on_authed(cl_conn_t *cn)
{
    cl_peer_t *p = cn->peer;
    cn->authed = 1;
    if (p->conn && p->conn != cn) {
        cl_conn_t *old = p->conn;
        EPD_INFO(SUB, "peer %d: new link from %s replaces the old one", p->id, cn->remote);
        old->peer = NULL;
        p->conn = NULL;
        cl_conn_close(old);
    }
    p->conn = cn;
    p->retry_ms = RETRY_INITIAL_MS;
    p->refused_us = 0;
    p->refused_why[0] = 0;
    uv_timer_stop(&p->retry);
    EPD_DEBUG(SUB, "link to node %d (%s) authenticated", p->id, cn->remote);
    cl_send_hello(cn);
}

static int accept_peer(void *ctx, uint32_t id, char *why, size_t wl)
{
    cl_conn_t *cn = ctx;
    epd_cluster_t *c = cn->c;
    if ((int)id == c->cfg.node_id) {
        snprintf(why, wl, "node id %u is this node's own id", id);
        return -1;
    }
    cl_peer_t *p = cl_peer_by_id(c, (int)id);
    if (!p) {
        snprintf(why, wl, "node %u is not in cluster.peers of node %d", id, c->cfg.node_id);
        return -1;
    }
    cn->peer = p;
    return 0;
}

void cl_on_shutdown(uv_shutdown_t *req, int status)
{
    cl_conn_t *cn = req->data;
    if (uv_is_closing((uv_handle_t *)&cn->tcp)) return;
    cl_conn_unlink(cn->c, cn);
    uv_close((uv_handle_t *)&cn->tcp, cl_on_conn_closed);
}

/* ---- frame dispatch ---- */

static void handle_frame(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    if (!cn->authed) {
        epd_ctl_buf_t out;
        epd_ctl_buf_init(&out);
        int r = epd_ctl_auth_on_frame(&cn->auth, m, &out, accept_peer, cn);
        if (out.len) cl_conn_send_buf(cn, &out);
        epd_ctl_buf_fini(&out);
        if (r < 0) {
            cl_reject_conn(cn, cn->auth.reason, cn->auth.detail);
            return;
        }
        if (r == 1 && !cn->closing) on_authed(cn);
        return;
    }
    if (m->type <= EPD_CTL_AUTH_OK) {
        char why[96];
        snprintf(why, sizeof why, "%s after authentication", epd_ctl_type_name(m->type));
        cl_reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, why);
        return;
    }
    if (!cn->hello_rx && m->type != EPD_CTL_HELLO && m->type != EPD_CTL_REFUSE &&
        m->type != EPD_CTL_BYE) {
        char why[96];
        snprintf(why, sizeof why, "%s before HELLO", epd_ctl_type_name(m->type));
        cl_reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, why);
        return;
    }
    cl_peer_t *p = cn->peer;
    if (p->conn != cn) return; /* a replaced link still draining */
    p->last_seen_ms = cl_now_ms(c);
    if (p->state == EPD_PEER_SUSPECT && p->hello_ok) cl_set_peer_state(c, p, EPD_PEER_UP, NULL);
    switch (m->type) {
    case EPD_CTL_HELLO:
        if (cn->hello_rx) {
            cl_reject_conn(cn, EPD_CTL_REJECT_OUT_OF_ORDER, "second HELLO on one link");
            return;
        }
        cl_on_hello(cn, m);
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
        cl_set_peer_state(c, p, EPD_PEER_REFUSED, reason);
        cl_conn_close(cn);
        break;
    }
    case EPD_CTL_RANK_TABLE:
        cl_on_rank_table(cn, m);
        break;
    case EPD_CTL_TABLE_ACK:
        cl_on_table_ack(cn, m);
        break;
    case EPD_CTL_COMMIT:
        cl_on_commit(cn, m);
        break;
    case EPD_CTL_HEARTBEAT:
        cl_on_heartbeat(cn, m);
        break;
    case EPD_CTL_HEARTBEAT_ACK:
        cl_on_heartbeat_ack(cn, m);
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
        cl_set_peer_state(c, p, EPD_PEER_DOWN, why);
        if (cn && !cn->closing) cl_conn_close(cn);
        cl_evaluate(c);
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
        cl_conn_close(cn);
        return;
    }
    remote_name(cn);
    int r = uv_read_start((uv_stream_t *)&cn->tcp, on_alloc, on_read);
    epd_ctl_buf_t out;
    epd_ctl_buf_init(&out);
    if (r == 0) r = epd_ctl_auth_start(&cn->auth, &out);
    if (r == 0) r = cl_conn_send_buf(cn, &out);
    epd_ctl_buf_fini(&out);
    if (r < 0 && !cn->closing) cl_conn_close(cn);
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
        cl_schedule_retry(p, c);
        return;
    }
    if (p->conn) {
        uv_freeaddrinfo(res);
        return;
    }
    cl_conn_t *cn = conn_new(c, 1);
    if (!cn) {
        uv_freeaddrinfo(res);
        cl_schedule_retry(p, c);
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
        cl_conn_close(cn);
        return;
    }
    /* The retry timer doubles as the connect+handshake deadline. */
    uv_timer_start(&p->retry, retry_cb, (uint64_t)c->cfg.connect_timeout_ms, 0);
}

/* Backoff expired (connect again) or a connect/handshake deadline passed (give up on it). */
static void retry_cb(uv_timer_t *t)
{
    cl_peer_t *p = t->data;
    epd_cluster_t *c = p->cl;
    if (c->stopping) return;
    if (p->conn) {
        if (!p->conn->authed &&
            cl_now_ms(c) - p->conn->started_ms >= (uint64_t)c->cfg.connect_timeout_ms) {
            EPD_DEBUG(SUB, "node %d (%s:%d): no connection and handshake within %d ms", p->id,
                      p->addr.host, p->addr.port, c->cfg.connect_timeout_ms);
            cl_conn_close(p->conn);
        }
        return;
    }
    cl_start_connect(c, p);
}

void cl_start_connect(epd_cluster_t *c, cl_peer_t *p)
{
    char port[16];
    cl_resolve_t *rs = calloc(1, sizeof *rs);
    if (!rs) {
        cl_schedule_retry(p, c);
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
        cl_schedule_retry(p, c);
        return;
    }
    c->handles++;
}

void cl_schedule_retry(cl_peer_t *p, epd_cluster_t *c)
{
    if (c->stopping || p->id < c->cfg.node_id) return; /* lower ids connect to us */
    uv_timer_start(&p->retry, retry_cb, (uint64_t)p->retry_ms, 0);
    p->retry_ms = p->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : p->retry_ms * 2;
}

/* ---- inbound links ---- */

void cl_on_connection(uv_stream_t *server, int status)
{
    epd_cluster_t *c = server->data;
    if (status < 0 || c->stopping) return;
    int pending = 0;
    for (cl_conn_t *cn = c->conns; cn; cn = cn->next)
        pending += !cn->authed;
    cl_conn_t *cn = conn_new(c, 0);
    if (!cn) return;
    if (uv_accept(server, (uv_stream_t *)&cn->tcp) < 0) {
        cl_conn_close(cn);
        return;
    }
    remote_name(cn);
    if (pending >= MAX_PENDING_CONNS) {
        EPD_WARN(SUB, "refusing control connection from %s: %d handshakes already pending",
                 cn->remote, pending);
        cl_conn_close(cn);
        return;
    }
    epd_ctl_auth_init(&cn->auth, EPD_CTL_AUTH_SERVER, &c->secret, (uint32_t)c->cfg.node_id, 0,
                      c->cfg.cluster_name);
    if (uv_read_start((uv_stream_t *)&cn->tcp, on_alloc, on_read) < 0) cl_conn_close(cn);
}
