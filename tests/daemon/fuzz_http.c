/* libFuzzer target: arbitrary bytes through the HTTP request path (http-parser callbacks,
 * limits, routing, sync/async/streamed responses) over in-memory connections, no sockets.
 * The first input byte picks how the rest is split into reads, so fragmentation is fuzzed
 * too. Output is checked to start with a status line whenever there is any. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "log.h"
#include "metrics.h"

static uv_loop_t g_loop;
static epd_http_server_t *g_srv;
static epd_metrics_t *g_metrics;
static epd_http_res_t *g_pending;
static size_t g_out;
static char g_head[16];

static void on_write(void *ctx, const char *d, size_t n)
{
    if (g_out < sizeof(g_head)) {
        size_t k = n < sizeof(g_head) - g_out ? n : sizeof(g_head) - g_out;
        memcpy(g_head + g_out, d, k);
    }
    g_out += n;
}

static void h_sync(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    char b[128];
    int n = snprintf(b, sizeof(b), "%s %zu %d", req->query, req->body_len, req->nheaders);
    for (int i = 0; i < req->nheaders; i++) /* touch every header */
        n += (int)(strlen(req->headers[i].name) + strlen(req->headers[i].value)) * 0;
    epd_http_res_header(res, "X-Q", req->query); /* may be refused (CR/LF): fine */
    epd_http_respond(res, 200, "text/plain", b, (size_t)n);
}

static void h_async(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    if (g_pending) epd_http_respond(g_pending, 200, "text/plain", "a", 1);
    g_pending = res;
}

static void h_stream(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_http_stream_begin(res, 200, "text/event-stream");
    epd_http_stream_write(res, req->body, req->body_len);
    epd_http_stream_end(res);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    uv_loop_init(&g_loop);
    g_metrics = epd_metrics_create();
    epd_http_limits_t lim = {.max_header_bytes = 1024,
                             .max_body_bytes = 512,
                             .max_connections = 8,
                             .idle_timeout_ms = 1000,
                             .header_timeout_ms = 1000};
    epd_log_set_level(EPD_LOG_ERROR);
    if (epd_http_server_create(&g_loop, &lim, g_metrics, &g_srv) != 0) abort();
    epd_http_route(g_srv, "GET", "/s", h_sync, NULL);
    epd_http_route(g_srv, "POST", "/s", h_sync, NULL);
    epd_http_route(g_srv, "GET", "/a", h_async, NULL);
    epd_http_route(g_srv, "POST", "/st", h_stream, NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    size_t step = (size_t)data[0] % 64 + 1;
    data++;
    size--;
    g_out = 0;
    epd_http_conn_t *c = epd_http_conn_open_memory(g_srv, on_write, NULL);
    if (!c) return 0;
    for (size_t off = 0; off < size; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (!epd_http_conn_feed(c, data + off, n)) break;
        if (g_pending && (data[off] & 1)) { /* answer the async request mid-stream */
            epd_http_res_t *r = g_pending;
            g_pending = NULL;
            epd_http_respond(r, 202, "text/plain", "late", 4);
        }
    }
    if (g_out && memcmp(g_head, "HTTP/1.1 ", g_out < 9 ? g_out : 9) != 0) abort();
    epd_http_conn_close_memory(c);
    if (g_pending) { /* the client is gone; the handler still finishes its response */
        epd_http_res_t *r = g_pending;
        g_pending = NULL;
        epd_http_respond(r, 200, "text/plain", "x", 1);
    }
    return 0;
}
