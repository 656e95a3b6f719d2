/* The HTTP/1.1 server: per-connection state machine around http-parser (one request at a
 * time; pipelined bytes wait in a bounded buffer), the route table, limits and deadlines,
 * and the response object (immediate, async or chunked stream). */
#include "http.h"

#include <errno.h>
#include <cjson/cJSON.h>
#include <http_parser.h>
#include <limits.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

#define SUB "http"

typedef struct route {
    char *method;
    char *path;
    epd_http_handler_fn fn;
    void *ctx;
} route_t;

typedef enum {
    CS_IDLE,     /* between requests */
    CS_HEADERS,  /* reading request line and headers */
    CS_BODY,     /* reading the body */
    CS_HANDLING, /* a handler owns the current response */
} conn_state_t;

typedef enum { RS_PARSING, RS_HANDLER, RS_STREAMING, RS_DONE } res_state_t;

struct epd_http_conn {
    epd_http_server_t *srv;
    struct epd_http_conn *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    int memory; /* in-memory connection: no socket, no timers */
    void (*mem_write)(void *ctx, const char *data, size_t len);
    void *mem_ctx;
    int open_handles;
    int closing; /* close started; no more input or output */
    int ending;  /* last response queued; close when written */
    int shutdown_sent;
    int reading;
    int in_feed;
    http_parser parser;
    conn_state_t state;
    char *in; /* unparsed input [in_off, in_len) */
    size_t in_off, in_len, in_cap;
    size_t pending_write;
    epd_http_res_t *cur;
    int nrequests;                /* request heads completed on this connection */
    struct sockaddr_storage peer; /* the client's address (ss_family 0: unknown) */
    int reject_status;            /* set by a parser callback: respond with it and close */
    const char *reject_reason;
};

typedef struct strbuf {
    char *p;
    size_t len, cap;
} strbuf_t;

struct epd_http_res {
    epd_http_server_t *srv;
    struct epd_http_conn *conn; /* NULL once the connection is gone */
    res_state_t state;
    epd_http_req_t req;
    /* request storage */
    char method[24];
    strbuf_t url;
    strbuf_t hdr; /* "name\0value\0" pairs */
    int hdr_last_value;
    int nheaders;
    epd_http_header_t *headers;
    char *pathq; /* "path\0query\0" */
    strbuf_t body;
    size_t head_bytes;
    /* response */
    strbuf_t extra; /* extra header lines */
    int status;
    int head_only;
    int keep_alive;
    int chunked;
    int started; /* headers sent */
    const char *route_path;
    uint64_t start_ns;
    void (*on_close)(epd_http_res_t *, void *);
    void *on_close_arg;
};

struct epd_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    int listening;
    int listener_open;
    epd_http_limits_t lim;
    epd_metrics_t *metrics;
    route_t *routes;
    int nroutes, caproutes;
    struct epd_http_conn *conns;
    int nconns; /* socket connections not yet freed */
    int draining;
    int aborted; /* the server closed every connection: a response cut then is not a 499 */
    void (*drain_done)(void *);
    void *drain_arg;
    uv_idle_t drain_idle; /* runs drain_done from the loop */
    int drain_idle_open;
    int destroying;
    epd_http_guard_fn guard;
    void *guard_ctx;
    http_parser_settings settings;
};

static void conn_close(struct epd_http_conn *c);
static void conn_end(struct epd_http_conn *c);
static void conn_process(struct epd_http_conn *c);
static void res_finish(epd_http_res_t *res);
static void server_maybe_done(epd_http_server_t *s);
static void conn_arm_idle(struct epd_http_conn *c);
static void conn_start_reading(struct epd_http_conn *c);

/* ---- small helpers ---- */

static int sb_append(strbuf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->len + n + 1)
            nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) return -ENOMEM;
        b->p = np;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int sb_printf(strbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sb_printf(strbuf_t *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) return -EINVAL;
    return sb_append(b, tmp, (size_t)n);
}

static void sb_free(strbuf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* JSON string body escaping for the error documents that echo a request path. */
static void json_escape(strbuf_t *b, const char *s, size_t max)
{
    for (size_t i = 0; s[i] && i < max; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            char e[2] = {'\\', (char)ch};
            sb_append(b, e, 2);
        } else if (ch < 0x20 || ch >= 0x7f) {
            char e[8];
            snprintf(e, sizeof(e), "\\u%04x", ch);
            sb_append(b, e, 6);
        } else {
            sb_append(b, (const char *)&ch, 1);
        }
    }
}

static const char *reason_phrase(int status)
{
    const char *r = http_status_str((enum http_status)status);
    return (r && strcmp(r, "<unknown>") != 0) ? r : "Unknown";
}

const char *epd_http_req_header(const epd_http_req_t *req, const char *name)
{
    for (int i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0) return req->headers[i].value;
    return NULL;
}

/* ---- metrics ---- */

static void count_rejected(epd_http_server_t *s, const char *reason)
{
    if (!s->metrics) return;
    char lab[96];
    snprintf(lab, sizeof(lab), "reason=\"%s\"", reason);
    epd_metric_add(epd_metrics_counter(s->metrics, "epd_http_rejected_total",
                                       "HTTP requests or connections refused, by reason.", lab),
                   1);
}

static void count_request(epd_http_server_t *s, const char *route_path, int status,
                          uint64_t start_ns)
{
    if (!s->metrics) return;
    static const double bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1,    0.25,  0.5,    1,     2.5,  5,     10};
    char esc[256], lab[320];
    if (epd_metrics_escape_label(route_path ? route_path : "other", esc, sizeof(esc)) < 0)
        snprintf(esc, sizeof(esc), "other");
    snprintf(lab, sizeof(lab), "path=\"%s\",code=\"%d\"", esc, status);
    epd_metric_add(epd_metrics_counter(s->metrics, "epd_http_requests_total",
                                       "HTTP requests answered, by route and status code.", lab),
                   1);
    snprintf(lab, sizeof(lab), "path=\"%s\"", esc);
    double secs = (double)(uv_hrtime() - start_ns) / 1e9;
    epd_metric_observe(epd_metrics_histogram(s->metrics, "epd_http_request_duration_seconds",
                                             "Time from a request's end of headers to the end of "
                                             "its response.",
                                             lab, bounds,
                                             (int)(sizeof(bounds) / sizeof(bounds[0]))),
                       secs);
}

/* ---- output ---- */

typedef struct write_req {
    uv_write_t req;
    struct epd_http_conn *conn;
    size_t len;
    char data[];
} write_req_t;

static void on_shutdown(uv_shutdown_t *req, int status)
{
    conn_close(req->data);
}

static void maybe_finish_ending(struct epd_http_conn *c)
{
    if (!c->ending || c->closing || c->pending_write) return;
    if (c->memory) {
        c->closing = 1;
        return;
    }
    if (c->shutdown_sent) return;
    c->shutdown_sent = 1;
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) conn_close(c);
}

static void on_write(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    struct epd_http_conn *c = w->conn;
    c->pending_write -= w->len;
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED)
            EPD_DEBUG(SUB, "write failed: %s; closing connection", uv_strerror(status));
        conn_close(c);
        return;
    }
    maybe_finish_ending(c);
}

/* Queues a + b (copied). 0, or a negative error (the connection is then being closed). */
static int conn_write2(struct epd_http_conn *c, const char *a, size_t alen, const char *b,
                       size_t blen)
{
    if (c->closing) return -ECONNRESET;
    if (c->memory) {
        if (alen) c->mem_write(c->mem_ctx, a, alen);
        if (blen) c->mem_write(c->mem_ctx, b, blen);
        return 0;
    }
    write_req_t *w = malloc(sizeof(*w) + alen + blen);
    if (!w) {
        conn_close(c);
        return -ENOMEM;
    }
    memcpy(w->data, a, alen);
    if (blen) memcpy(w->data + alen, b, blen);
    w->conn = c;
    w->len = alen + blen;
    uv_buf_t buf = uv_buf_init(w->data, (unsigned)(alen + blen));
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc < 0) {
        free(w);
        conn_close(c);
        return -ECONNRESET;
    }
    c->pending_write += w->len;
    return 0;
}

/* A response generated by the server itself (errors), then close when `close` is set. */
static void conn_send_error(struct epd_http_conn *c, int status, const char *message,
                            const char *extra_headers, int close)
{
    strbuf_t body = {0}, head = {0};
    sb_printf(&body, "{\"error\":\"");
    json_escape(&body, message, 512);
    sb_append(&body, "\"}\n", 3);
    sb_printf(&head,
              "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
              "Connection: %s\r\n%s\r\n",
              status, reason_phrase(status), body.len, close ? "close" : "keep-alive",
              extra_headers ? extra_headers : "");
    if (head.p && body.p) conn_write2(c, head.p, head.len, body.p, body.len);
    sb_free(&head);
    sb_free(&body);
    if (close) conn_end(c);
}

/* ---- response object ---- */

static void res_free(epd_http_res_t *res)
{
    sb_free(&res->url);
    sb_free(&res->hdr);
    sb_free(&res->body);
    sb_free(&res->extra);
    free(res->headers);
    free(res->pathq);
    free(res);
}

int epd_http_res_is_open(const epd_http_res_t *res)
{
    return res->conn != NULL && !res->conn->closing;
}

void epd_http_res_on_close(epd_http_res_t *res, void (*cb)(epd_http_res_t *, void *), void *arg)
{
    res->on_close = cb;
    res->on_close_arg = arg;
}

static int valid_token(const char *s, int allow_space)
{
    if (!s) return 0;
    for (; *s; s++)
        if (*s == '\r' || *s == '\n' || (!allow_space && (*s == ' ' || *s == ':'))) return 0;
    return 1;
}

int epd_http_res_header(epd_http_res_t *res, const char *name, const char *value)
{
    if (res->started || res->state == RS_DONE) return -EINVAL;
    if (!valid_token(name, 0) || !*name || !valid_token(value, 1)) return -EINVAL;
    return sb_printf(&res->extra, "%s: %s\r\n", name, value);
}

/* Status line and headers; `length` < 0: no Content-Length (streaming). */
static int res_head(epd_http_res_t *res, strbuf_t *h, int status, const char *ctype,
                    long long length)
{
    struct epd_http_conn *c = res->conn;
    if (c && c->srv->draining) res->keep_alive = 0;
    int rc = sb_printf(h, "HTTP/1.1 %d %s\r\n", status, reason_phrase(status));
    if (!rc && ctype) rc = sb_printf(h, "Content-Type: %s\r\n", ctype);
    if (!rc && length >= 0) rc = sb_printf(h, "Content-Length: %lld\r\n", length);
    if (!rc && res->chunked) rc = sb_printf(h, "Transfer-Encoding: chunked\r\n");
    if (!rc) rc = sb_printf(h, "Connection: %s\r\n", res->keep_alive ? "keep-alive" : "close");
    if (!rc && res->extra.len) rc = sb_append(h, res->extra.p, res->extra.len);
    if (!rc) rc = sb_append(h, "\r\n", 2);
    return rc;
}

int epd_http_respond(epd_http_res_t *res, int status, const char *content_type, const char *body,
                     size_t len)
{
    if (res->state != RS_HANDLER || res->started) return -EINVAL;
    if (status < 100 || status > 999) status = 500;
    res->status = status;
    int rc = 0;
    if (res->conn && !res->conn->closing) {
        strbuf_t h = {0};
        rc = res_head(res, &h, status, content_type, (long long)len);
        if (rc == 0)
            rc = conn_write2(res->conn, h.p, h.len, res->head_only ? NULL : body,
                             res->head_only ? 0 : len);
        sb_free(&h);
    } else {
        rc = -ECONNRESET;
    }
    res->started = 1;
    res_finish(res);
    return rc;
}

int epd_http_respond_json(epd_http_res_t *res, int status, const cJSON *doc, int oom_status,
                          const char *oom_body)
{
    char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
    if (!text)
        return epd_http_respond(res, oom_status, "application/json", oom_body, strlen(oom_body));
    size_t n = strlen(text);
    char *body = malloc(n + 2);
    int rc;
    if (body) {
        memcpy(body, text, n);
        body[n] = '\n';
        rc = epd_http_respond(res, status, "application/json", body, n + 1);
        free(body);
    } else {
        rc = epd_http_respond(res, status, "application/json", text, n);
    }
    cJSON_free(text);
    return rc;
}

int epd_http_stream_begin(epd_http_res_t *res, int status, const char *content_type)
{
    if (res->state != RS_HANDLER || res->started) return -EINVAL;
    res->state = RS_STREAMING;
    res->started = 1;
    res->status = status;
    if (!res->conn || res->conn->closing) return -ECONNRESET;
    if (res->req.http_major == 1 && res->req.http_minor == 0)
        res->keep_alive = 0;
    else
        res->chunked = 1;
    strbuf_t h = {0};
    int rc = res_head(res, &h, status, content_type, -1);
    if (rc == 0) rc = conn_write2(res->conn, h.p, h.len, NULL, 0);
    sb_free(&h);
    return rc;
}

int epd_http_stream_write(epd_http_res_t *res, const void *data, size_t len)
{
    if (res->state != RS_STREAMING) return -EINVAL;
    if (!res->conn || res->conn->closing) return -ECONNRESET;
    if (len == 0 || res->head_only) return 0; /* an empty chunk would end the stream */
    if (res->conn->pending_write > EPD_HTTP_MAX_PENDING_WRITE) return -ENOBUFS;
    if (!res->chunked) return conn_write2(res->conn, data, len, NULL, 0);
    char size[32];
    int n = snprintf(size, sizeof(size), "%zx\r\n", len);
    strbuf_t chunk = {0};
    int rc = sb_append(&chunk, size, (size_t)n);
    if (!rc) rc = sb_append(&chunk, data, len);
    if (!rc) rc = sb_append(&chunk, "\r\n", 2);
    if (!rc) rc = conn_write2(res->conn, chunk.p, chunk.len, NULL, 0);
    sb_free(&chunk);
    return rc;
}

int epd_http_stream_end(epd_http_res_t *res)
{
    if (res->state != RS_STREAMING && res->state != RS_HANDLER) return -EINVAL;
    if (res->state == RS_HANDLER) /* never started: nothing sensible to send */
        return epd_http_respond(res, 500, "application/json", "{\"error\":\"no response\"}\n", 24);
    int rc = 0;
    if (!res->conn || res->conn->closing)
        rc = -ECONNRESET;
    else if (res->chunked && !res->head_only)
        rc = conn_write2(res->conn, "0\r\n\r\n", 5, NULL, 0);
    res_finish(res);
    return rc;
}

/* The response is complete: account it, release it, and move the connection on. */
static void res_finish(epd_http_res_t *res)
{
    struct epd_http_conn *c = res->conn;
    res->state = RS_DONE;
    /* a client that closed its side before the response was complete: 499, as nginx counts it */
    int gone = (!c || c->closing) && !res->srv->aborted;
    count_request(res->srv, res->route_path, gone ? 499 : res->status, res->start_ns);
    int keep = res->keep_alive;
    res_free(res);
    if (!c) return;
    c->cur = NULL;
    c->state = CS_IDLE;
    if (c->closing) return;
    if (!keep || c->srv->draining) {
        conn_end(c);
        return;
    }
    conn_arm_idle(c);
    conn_start_reading(c);
    conn_process(c);
}

/* ---- parser callbacks: they fill the current response's request storage ---- */

static struct epd_http_conn *conn_of(http_parser *p)
{
    return p->data;
}

static int reject(struct epd_http_conn *c, int status, const char *reason)
{
    c->reject_status = status;
    c->reject_reason = reason;
    return -1;
}

/* Request line and header bytes as stored (the parser's own raw-byte limit is set to the
 * same value and reports HPE_HEADER_OVERFLOW first in most cases). */
static int head_account(struct epd_http_conn *c, size_t n)
{
    epd_http_res_t *r = c->cur;
    r->head_bytes += n;
    if (r->head_bytes > c->srv->lim.max_header_bytes) return reject(c, 431, "header_too_large");
    return 0;
}

static void conn_arm_header_deadline(struct epd_http_conn *c);

static int on_message_begin(http_parser *p)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = calloc(1, sizeof(*r));
    if (!r) return reject(c, 503, "no_memory");
    r->srv = c->srv;
    r->conn = c;
    r->state = RS_PARSING;
    r->status = 0;
    r->start_ns = uv_hrtime();
    c->cur = r;
    c->state = CS_HEADERS;
    /* a new connection's first head runs on the deadline armed at accept */
    if (c->nrequests > 0) conn_arm_header_deadline(c);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    struct epd_http_conn *c = conn_of(p);
    if (head_account(c, len)) return -1;
    return sb_append(&c->cur->url, at, len) ? reject(c, 503, "no_memory") : 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = c->cur;
    int new_field = r->hdr_last_value || r->nheaders == 0;
    if (head_account(c, len + (new_field ? 4 : 0))) return -1; /* ": " and CRLF */
    if (new_field) {
        if (r->nheaders > 0 && sb_append(&r->hdr, "", 1)) return reject(c, 503, "no_memory");
        r->nheaders++;
        r->hdr_last_value = 0;
    }
    return sb_append(&r->hdr, at, len) ? reject(c, 503, "no_memory") : 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = c->cur;
    if (head_account(c, len)) return -1;
    if (!r->hdr_last_value) {
        if (sb_append(&r->hdr, "", 1)) return reject(c, 503, "no_memory");
        r->hdr_last_value = 1;
    }
    return sb_append(&r->hdr, at, len) ? reject(c, 503, "no_memory") : 0;
}

/* Builds the header array over "name\0value\0..." once the storage stops moving. */
static int build_headers(epd_http_res_t *r)
{
    if (r->nheaders == 0) return 0;
    if (!r->hdr_last_value && sb_append(&r->hdr, "", 1)) return -ENOMEM; /* name, no value */
    if (sb_append(&r->hdr, "", 1)) return -ENOMEM;
    r->headers = calloc((size_t)r->nheaders, sizeof(*r->headers));
    if (!r->headers) return -ENOMEM;
    const char *q = r->hdr.p, *end = r->hdr.p + r->hdr.len;
    for (int i = 0; i < r->nheaders && q < end; i++) {
        r->headers[i].name = q;
        q += strlen(q) + 1;
        r->headers[i].value = q < end ? q : "";
        q += strlen(q) + 1;
    }
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = c->cur;
    epd_http_server_t *s = c->srv;
    if (build_headers(r)) return reject(c, 503, "no_memory");
    snprintf(r->method, sizeof(r->method), "%s", http_method_str((enum http_method)p->method));
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (!r->url.p || http_parser_parse_url(r->url.p, r->url.len, p->method == HTTP_CONNECT, &u))
        return reject(c, 400, "malformed");
    const char *path = "";
    size_t plen = 0, qlen = 0;
    const char *query = "";
    if (u.field_set & (1 << UF_PATH)) {
        path = r->url.p + u.field_data[UF_PATH].off;
        plen = u.field_data[UF_PATH].len;
    }
    if (u.field_set & (1 << UF_QUERY)) {
        query = r->url.p + u.field_data[UF_QUERY].off;
        qlen = u.field_data[UF_QUERY].len;
    }
    r->pathq = malloc(plen + qlen + 2);
    if (!r->pathq) return reject(c, 503, "no_memory");
    memcpy(r->pathq, path, plen);
    r->pathq[plen] = '\0';
    memcpy(r->pathq + plen + 1, query, qlen);
    r->pathq[plen + 1 + qlen] = '\0';
    r->req.method = r->method;
    r->req.path = r->pathq;
    r->req.query = r->pathq + plen + 1;
    r->req.headers = r->headers;
    r->req.nheaders = r->nheaders;
    r->req.http_major = p->http_major;
    r->req.http_minor = p->http_minor;
    r->keep_alive = http_should_keep_alive(p) && !p->upgrade;
    if (p->content_length != ULLONG_MAX && p->content_length > s->lim.max_body_bytes)
        return reject(c, 413, "body_too_large");
    c->state = CS_BODY;
    c->nrequests++;
    conn_arm_idle(c); /* body: inactivity timeout instead of the header deadline */
    const char *expect = epd_http_req_header(&r->req, "Expect");
    if (expect && strcasecmp(expect, "100-continue") == 0 && p->http_minor >= 1)
        conn_write2(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, NULL, 0);
    r->start_ns = uv_hrtime();
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = c->cur;
    if (r->body.len + len > c->srv->lim.max_body_bytes) return reject(c, 413, "body_too_large");
    if (sb_append(&r->body, at, len)) return reject(c, 503, "no_memory");
    conn_arm_idle(c);
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct epd_http_conn *c = conn_of(p);
    epd_http_res_t *r = c->cur;
    r->req.body = r->body.p ? r->body.p : "";
    r->req.body_len = r->body.len;
    if (p->upgrade) r->keep_alive = 0; /* we speak nothing but HTTP/1.1 on this stream */
    c->state = CS_HANDLING;
    http_parser_pause(p, 1); /* one request at a time: the rest waits in c->in */
    return 0;
}

/* ---- dispatch ---- */

static void dispatch(struct epd_http_conn *c)
{
    epd_http_server_t *s = c->srv;
    epd_http_res_t *r = c->cur;
    if (!c->memory) uv_timer_stop(&c->timer);
    const route_t *match = NULL;
    int path_known = 0;
    int is_head = strcmp(r->method, "HEAD") == 0;
    for (int i = 0; i < s->nroutes; i++) {
        if (strcmp(s->routes[i].path, r->req.path) != 0) continue;
        path_known = 1;
        if (strcmp(s->routes[i].method, r->method) == 0) {
            match = &s->routes[i];
            break;
        }
        if (is_head && strcmp(s->routes[i].method, "GET") == 0 && !match) match = &s->routes[i];
    }
    r->state = RS_HANDLER;
    if (match) {
        r->route_path = match->path;
        r->head_only = is_head && strcmp(match->method, "HEAD") != 0;
        if (s->guard && s->guard(&r->req, r, match->path, s->guard_ctx)) return;
        match->fn(&r->req, r, match->ctx);
        return;
    }
    strbuf_t body = {0};
    if (path_known) {
        r->route_path = NULL;
        strbuf_t allow = {0};
        int has_get = 0;
        for (int i = 0; i < s->nroutes; i++) {
            if (strcmp(s->routes[i].path, r->req.path) != 0) continue;
            sb_printf(&allow, "%s%s", allow.len ? ", " : "", s->routes[i].method);
            has_get |= strcmp(s->routes[i].method, "GET") == 0;
        }
        if (has_get) sb_printf(&allow, ", HEAD");
        if (allow.p) epd_http_res_header(r, "Allow", allow.p);
        sb_free(&allow);
        sb_printf(&body, "{\"error\":\"method not allowed\",\"method\":\"");
        json_escape(&body, r->method, 32);
        sb_printf(&body, "\"}\n");
        epd_http_respond(r, 405, "application/json", body.p ? body.p : "", body.len);
    } else {
        sb_printf(&body, "{\"error\":\"not found\",\"path\":\"");
        json_escape(&body, r->req.path, 256);
        sb_printf(&body, "\"}\n");
        epd_http_respond(r, 404, "application/json", body.p ? body.p : "", body.len);
    }
    sb_free(&body);
}

/* Runs the parser over buffered input until it is consumed, a request is being handled, or
 * the connection ends. Re-entry (a handler responding synchronously) falls through to the
 * loop that is already running. */
static void conn_process(struct epd_http_conn *c)
{
    if (c->in_feed) return;
    c->in_feed = 1;
    while (!c->closing && !c->ending && c->state != CS_HANDLING && c->in_off < c->in_len) {
        size_t avail = c->in_len - c->in_off;
        size_t n = http_parser_execute(&c->parser, &c->srv->settings, c->in + c->in_off, avail);
        c->in_off += n;
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        if (c->reject_status) {
            int st = c->reject_status;
            count_rejected(c->srv, c->reject_reason);
            count_request(c->srv, NULL, st, c->cur ? c->cur->start_ns : uv_hrtime());
            conn_send_error(c, st,
                            st == 431   ? "request header fields too large"
                            : st == 413 ? "request body too large"
                            : st == 400 ? "malformed request"
                                        : "server out of memory",
                            NULL, 1);
            break;
        }
        if (e == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            dispatch(c);
            continue;
        }
        if (e != HPE_OK) {
            int st = e == HPE_HEADER_OVERFLOW ? 431 : 400;
            const char *why = e == HPE_HEADER_OVERFLOW ? "header_too_large" : "malformed";
            static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(5, 1000);
            epd_log_ratelimited(&rl, EPD_LOG_DEBUG, SUB, "rejecting request (%s) at byte %zu: %s",
                                http_errno_name(e), c->in_off, http_errno_description(e));
            count_rejected(c->srv, why);
            count_request(c->srv, NULL, st, c->cur ? c->cur->start_ns : uv_hrtime());
            conn_send_error(
                c, st, st == 431 ? "request header fields too large" : http_errno_description(e),
                NULL, 1);
            break;
        }
        if (n < avail && c->parser.upgrade) {
            /* An upgrade request ended the HTTP stream; what follows is not ours to parse. */
            c->in_off = c->in_len;
            break;
        }
        if (n == 0) break;
    }
    if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
    c->in_feed = 0;
    if (c->ending) maybe_finish_ending(c);
}

/* Appends input; compacts first so the buffer holds only unparsed bytes. */
static int conn_input(struct epd_http_conn *c, const char *data, size_t len)
{
    if (c->in_off) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    if (c->in_len + len > c->in_cap) {
        size_t nc = c->in_cap ? c->in_cap : 4096;
        while (nc < c->in_len + len)
            nc *= 2;
        char *np = realloc(c->in, nc);
        if (!np) return -ENOMEM;
        c->in = np;
        c->in_cap = nc;
    }
    memcpy(c->in + c->in_len, data, len);
    c->in_len += len;
    return 0;
}

/* ---- connection lifetime ---- */

static void conn_free(struct epd_http_conn *c)
{
    free(c->in);
    free(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    struct epd_http_conn *c = h->data;
    if (--c->open_handles > 0) return;
    epd_http_server_t *s = c->srv;
    epd_http_res_t *r = c->cur;
    c->cur = NULL;
    if (r) {
        r->conn = NULL;
        if (r->state == RS_PARSING) {
            res_free(r);
        } else if (r->on_close) {
            r->on_close(r, r->on_close_arg); /* the handler still finishes r */
        }
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    s->nconns--;
    conn_free(c);
    server_maybe_done(s);
}

static void conn_close(struct epd_http_conn *c)
{
    if (c->closing) return;
    c->closing = 1;
    if (c->memory) return;
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

/* Stop reading; close once the queued output is written (bounded by the idle timeout). */
static void conn_end(struct epd_http_conn *c)
{
    if (c->closing || c->ending) return;
    c->ending = 1;
    if (!c->memory) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
        conn_arm_idle(c);
    }
    if (!c->in_feed) maybe_finish_ending(c);
}

static void on_timer(uv_timer_t *t)
{
    struct epd_http_conn *c = t->data;
    if (c->closing) return;
    if (c->state == CS_HEADERS && !c->ending) {
        count_rejected(c->srv, "header_timeout");
        count_request(c->srv, NULL, 408, c->cur ? c->cur->start_ns : uv_hrtime());
        conn_send_error(c, 408, "request headers not received in time", NULL, 1);
        return;
    }
    if (c->state == CS_BODY && !c->ending) {
        count_rejected(c->srv, "body_timeout");
        count_request(c->srv, NULL, 408, c->cur ? c->cur->start_ns : uv_hrtime());
        conn_send_error(c, 408, "request body stalled", NULL, 1);
        return;
    }
    if (c->ending) {
        conn_close(c); /* the peer does not take our last bytes */
        return;
    }
    if (c->nrequests == 0) count_rejected(c->srv, "header_timeout"); /* connected, sent nothing */
    conn_close(c); /* idle keep-alive connection */
}

static void conn_arm_idle(struct epd_http_conn *c)
{
    if (c->memory || c->closing || c->srv->lim.idle_timeout_ms <= 0) return;
    uv_timer_start(&c->timer, on_timer, (uint64_t)c->srv->lim.idle_timeout_ms, 0);
}

static void conn_arm_header_deadline(struct epd_http_conn *c)
{
    const epd_http_limits_t *l = &c->srv->lim;
    int ms = l->header_timeout_ms > 0 ? l->header_timeout_ms : l->idle_timeout_ms;
    if (c->memory || c->closing || ms <= 0) return;
    uv_timer_start(&c->timer, on_timer, (uint64_t)ms, 0);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char slab[64 << 10]; /* the loop is single-threaded; read_cb consumes it at once */
    *buf = uv_buf_init(slab, sizeof(slab));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct epd_http_conn *c = st->data;
    if (nread == 0) return;
    if (nread < 0) {
        /* EOF or error: whatever is in flight has lost its client. */
        conn_close(c);
        return;
    }
    if (c->closing || c->ending) return;
    if (conn_input(c, buf->base, (size_t)nread)) {
        conn_close(c);
        return;
    }
    if (c->state == CS_HANDLING) {
        if (c->in_len - c->in_off > EPD_HTTP_MAX_PIPELINED_INPUT) {
            uv_read_stop(st);
            c->reading = 0;
        }
        return;
    }
    conn_process(c);
}

static void conn_start_reading(struct epd_http_conn *c)
{
    if (c->memory || c->reading || c->closing || c->ending) return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = 1;
    else
        conn_close(c);
}

static void conn_init_parser(struct epd_http_conn *c)
{
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->state = CS_IDLE;
}

static int same_client(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family || a->ss_family == 0) return 0;
    if (a->ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)a)->sin_addr,
                      &((const struct sockaddr_in *)b)->sin_addr, sizeof(struct in_addr)) == 0;
    if (a->ss_family == AF_INET6)
        return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                      &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr)) == 0;
    return 0;
}

/* A connection that costs the server nothing to drop: no request of it is being handled, none
 * has been fully received and no response is still being written (idle keep-alive, or still
 * sending its head). */
static int conn_evictable(const struct epd_http_conn *c)
{
    if (c->closing || c->ending || c->memory) return 0;
    return c->state == CS_HEADERS ||
           (c->state == CS_IDLE && c->in_off == c->in_len && c->pending_write == 0);
}

static void peer_name(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    if (ss->ss_family == AF_INET)
        uv_ip4_name((const struct sockaddr_in *)ss, buf, len);
    else if (ss->ss_family == AF_INET6)
        uv_ip6_name((const struct sockaddr_in6 *)ss, buf, len);
    else
        snprintf(buf, len, "?");
}

/* Admits `c` (already accepted and in the list) or closes it. Slots are not held by slow
 * clients: one address may hold at most max_connections_per_client, and when every slot is
 * taken the oldest evictable connection (the list's tail) makes room, so a probe such as
 * /healthz gets in while slow-header clients fill the server. */
static int conn_admit(epd_http_server_t *s, struct epd_http_conn *c)
{
    int live = 0, mine = 0;
    struct epd_http_conn *oldest = NULL;
    for (struct epd_http_conn *o = s->conns; o; o = o->next) {
        if (o->closing) continue;
        live++;
        if (o != c && same_client(&o->peer, &c->peer)) mine++;
        if (o != c && conn_evictable(o)) oldest = o; /* the list is newest first */
    }
    char who[64];
    if (s->lim.max_connections_per_client > 0 && mine >= s->lim.max_connections_per_client) {
        count_rejected(s, "max_connections_per_client");
        static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(1, 5000);
        peer_name(&c->peer, who, sizeof who);
        epd_log_ratelimited(&rl, EPD_LOG_WARN, SUB,
                            "refusing connection from %s: it has %d open, "
                            "http.max_connections_per_client is %d",
                            who, mine, s->lim.max_connections_per_client);
        return 0;
    }
    if (live <= s->lim.max_connections) return 1;
    if (oldest) {
        count_rejected(s, "evicted");
        static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(1, 5000);
        peer_name(&oldest->peer, who, sizeof who);
        epd_log_ratelimited(&rl, EPD_LOG_WARN, SUB,
                            "http.max_connections (%d) reached: closing the oldest idle or "
                            "header-reading connection (from %s) to admit a new one",
                            s->lim.max_connections, who);
        conn_close(oldest);
        return 1;
    }
    count_rejected(s, "max_connections");
    static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(1, 5000);
    epd_log_ratelimited(&rl, EPD_LOG_WARN, SUB,
                        "refusing connection: %d open and busy, http.max_connections is %d",
                        live - 1, s->lim.max_connections);
    return 0;
}

static void on_connection(uv_stream_t *ls, int status)
{
    epd_http_server_t *s = ls->data;
    if (status < 0) {
        EPD_WARN(SUB, "accept failed: %s", uv_strerror(status));
        return;
    }
    struct epd_http_conn *c = calloc(1, sizeof(*c));
    if (!c) return;
    c->srv = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    conn_init_parser(c);
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    if (s->draining || s->destroying) {
        count_rejected(s, "max_connections");
        conn_close(c);
        return;
    }
    int plen = sizeof(c->peer);
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->peer, &plen) != 0) c->peer.ss_family = 0;
    if (!conn_admit(s, c)) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    conn_arm_header_deadline(c); /* the first request head is due within header_timeout_ms */
    conn_start_reading(c);
}

/* ---- server ---- */

int epd_http_server_create(uv_loop_t *loop, const epd_http_limits_t *limits, epd_metrics_t *metrics,
                           epd_http_server_t **out)
{
    if (!loop || !limits || !out || limits->max_connections < 1) return -EINVAL;
    epd_http_server_t *s = calloc(1, sizeof(*s));
    if (!s) return -ENOMEM;
    s->loop = loop;
    s->lim = *limits;
    s->metrics = metrics;
    http_parser_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_url = on_url;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_value = on_header_value;
    s->settings.on_headers_complete = on_headers_complete;
    s->settings.on_body = on_body;
    s->settings.on_message_complete = on_message_complete;
    /* http-parser's own raw-byte bound on the head (process-wide; one server per process) */
    if (limits->max_header_bytes > 0 && limits->max_header_bytes < UINT32_MAX)
        http_parser_set_max_header_size((uint32_t)limits->max_header_bytes);
    *out = s;
    return 0;
}

int epd_http_server_listen(epd_http_server_t *s, const char *host, int port)
{
    struct sockaddr_storage ss;
    int rc;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
        /* a host name: resolved once, synchronously, at start-up */
        uv_getaddrinfo_t gai;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        char portstr[16];
        snprintf(portstr, sizeof(portstr), "%d", port);
        if ((rc = uv_getaddrinfo(s->loop, &gai, NULL, host, portstr, &hints)) != 0) return rc;
        memcpy(&ss, gai.addrinfo->ai_addr, gai.addrinfo->ai_addrlen);
        uv_freeaddrinfo(gai.addrinfo);
    }
    if ((rc = uv_tcp_init(s->loop, &s->listener)) != 0) return rc;
    s->listener.data = s;
    s->listener_open = 1;
    if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0)) != 0) goto fail;
    if ((rc = uv_listen((uv_stream_t *)&s->listener, 128, on_connection)) != 0) goto fail;
    s->listening = 1;
    return 0;
fail:
    /* the handle stays open until destroy closes it */
    return rc;
}

int epd_http_server_port(const epd_http_server_t *s)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    if (!s->listening || uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

int epd_http_route(epd_http_server_t *s, const char *method, const char *path,
                   epd_http_handler_fn handler, void *ctx)
{
    if (!method || !path || !handler || path[0] != '/') return -EINVAL;
    for (int i = 0; i < s->nroutes; i++)
        if (strcmp(s->routes[i].method, method) == 0 && strcmp(s->routes[i].path, path) == 0)
            return -EEXIST;
    if (s->nroutes == s->caproutes) {
        int nc = s->caproutes ? s->caproutes * 2 : 16;
        route_t *nr = realloc(s->routes, (size_t)nc * sizeof(*nr));
        if (!nr) return -ENOMEM;
        s->routes = nr;
        s->caproutes = nc;
    }
    route_t *r = &s->routes[s->nroutes];
    r->method = strdup(method);
    r->path = strdup(path);
    if (!r->method || !r->path) {
        free(r->method);
        free(r->path);
        return -ENOMEM;
    }
    r->fn = handler;
    r->ctx = ctx;
    s->nroutes++;
    return 0;
}

void epd_http_server_set_guard(epd_http_server_t *s, epd_http_guard_fn fn, void *ctx)
{
    s->guard = fn;
    s->guard_ctx = ctx;
}

int epd_http_server_connections(const epd_http_server_t *s)
{
    return s->nconns;
}

static void on_listener_closed(uv_handle_t *h)
{
    epd_http_server_t *s = h->data;
    s->listener_open = 0;
    server_maybe_done(s);
}

static void stop_listening(epd_http_server_t *s)
{
    if (s->listener_open && !uv_is_closing((uv_handle_t *)&s->listener)) {
        s->listening = 0;
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    }
}

static void on_drain_idle(uv_idle_t *h)
{
    epd_http_server_t *s = h->data;
    uv_idle_stop(h);
    if (s->drain_done) {
        void (*cb)(void *) = s->drain_done;
        s->drain_done = NULL;
        cb(s->drain_arg);
    }
}

static void on_drain_idle_closed(uv_handle_t *h)
{
    epd_http_server_t *s = h->data;
    s->drain_idle_open = 0;
    server_maybe_done(s);
}

static void server_free(epd_http_server_t *s)
{
    for (int i = 0; i < s->nroutes; i++) {
        free(s->routes[i].method);
        free(s->routes[i].path);
    }
    free(s->routes);
    free(s);
}

static void server_maybe_done(epd_http_server_t *s)
{
    if (s->nconns > 0) return;
    if (s->draining && s->drain_done && s->drain_idle_open)
        uv_idle_start(&s->drain_idle, on_drain_idle);
    if (s->destroying && !s->listener_open && !s->drain_idle_open) {
        server_free(s);
        return;
    }
    if (s->destroying && s->drain_idle_open && !uv_is_closing((uv_handle_t *)&s->drain_idle))
        uv_close((uv_handle_t *)&s->drain_idle, on_drain_idle_closed);
}

void epd_http_server_drain(epd_http_server_t *s, void (*done)(void *arg), void *arg)
{
    s->draining = 1;
    s->drain_done = done;
    s->drain_arg = arg;
    if (!s->drain_idle_open) {
        uv_idle_init(s->loop, &s->drain_idle);
        s->drain_idle.data = s;
        s->drain_idle_open = 1;
    }
    stop_listening(s);
    struct epd_http_conn *c = s->conns, *next;
    for (; c; c = next) {
        next = c->next;
        if (c->state == CS_IDLE && c->in_len == c->in_off) conn_end(c);
    }
    server_maybe_done(s);
}

void epd_http_server_abort(epd_http_server_t *s)
{
    struct epd_http_conn *c = s->conns, *next;
    s->aborted = 1;
    for (; c; c = next) {
        next = c->next;
        conn_close(c);
    }
}

void epd_http_server_destroy(epd_http_server_t *s)
{
    if (!s) return;
    s->destroying = 1;
    s->drain_done = NULL;
    stop_listening(s);
    epd_http_server_abort(s);
    server_maybe_done(s);
}

/* ---- in-memory connections ---- */

epd_http_conn_t *epd_http_conn_open_memory(epd_http_server_t *s,
                                           void (*write)(void *ctx, const char *data, size_t len),
                                           void *ctx)
{
    struct epd_http_conn *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->srv = s;
    c->memory = 1;
    c->mem_write = write;
    c->mem_ctx = ctx;
    conn_init_parser(c);
    return c;
}

int epd_http_conn_feed(epd_http_conn_t *c, const void *data, size_t len)
{
    if (c->closing || c->ending) return 0;
    if (conn_input(c, data, len)) {
        c->closing = 1;
        return 0;
    }
    if (c->state != CS_HANDLING) conn_process(c);
    return !(c->closing || c->ending);
}

void epd_http_conn_close_memory(epd_http_conn_t *c)
{
    if (!c) return;
    c->closing = 1;
    epd_http_res_t *r = c->cur;
    c->cur = NULL;
    if (r) {
        r->conn = NULL;
        if (r->state == RS_PARSING)
            res_free(r);
        else if (r->on_close)
            r->on_close(r, r->on_close_arg);
    }
    conn_free(c);
}
