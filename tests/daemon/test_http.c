/* HTTP server through in-memory connections: routing, 404/405, HEAD, keep-alive and
 * pipelining, limits (431, 413, 400), async and streamed responses, client going away, and
 * the request metrics. Expected bytes are written out here by hand. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "http.h"
#include "metrics.h"

typedef struct out {
    char buf[1 << 16];
    size_t len;
} out_t;

static void capture(void *ctx, const char *d, size_t n)
{
    out_t *o = ctx;
    assert_true(o->len + n < sizeof(o->buf));
    memcpy(o->buf + o->len, d, n);
    o->len += n;
    o->buf[o->len] = '\0';
}

typedef struct fixture {
    uv_loop_t loop;
    epd_metrics_t *m;
    epd_http_server_t *s;
    out_t out;
    epd_http_conn_t *c;
    epd_http_res_t *pending;
    int closed_cb;
} fixture_t;

static void h_text(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_http_respond(res, 200, "text/plain", "hello", 5);
}

static void h_echo(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    char b[256];
    const char *x = epd_http_req_header(req, "x-tag");
    int n = snprintf(b, sizeof(b), "%s|%s|%s|%.*s", req->method, req->query, x ? x : "",
                     (int)req->body_len, req->body);
    epd_http_res_header(res, "X-Len", "1");
    epd_http_respond(res, 201, "text/plain", b, (size_t)n);
}

static void h_async(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    fixture_t *f = ctx;
    f->pending = res; /* answered later by the test */
}

static void on_res_close(epd_http_res_t *res, void *arg)
{
    ((fixture_t *)arg)->closed_cb++;
}

static void h_stream(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    fixture_t *f = ctx;
    epd_http_res_on_close(res, on_res_close, f);
    assert_int_equal(epd_http_stream_begin(res, 200, "text/event-stream"), 0);
    assert_int_equal(epd_http_stream_write(res, "data: 1\n\n", 9), 0);
    f->pending = res;
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    f->m = epd_metrics_create();
    epd_http_limits_t lim = {.max_header_bytes = 1024,
                             .max_body_bytes = 64,
                             .max_connections = 4,
                             .idle_timeout_ms = 1000,
                             .header_timeout_ms = 1000};
    assert_int_equal(epd_http_server_create(&f->loop, &lim, f->m, &f->s), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "/a", h_text, f), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "/a", h_text, f), -EEXIST);
    assert_int_equal(epd_http_route(f->s, "POST", "/echo", h_echo, f), 0);
    assert_int_equal(epd_http_route(f->s, "PUT", "/echo", h_echo, f), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "/async", h_async, f), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "/stream", h_stream, f), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "noslash", h_text, f), -EINVAL);
    f->c = epd_http_conn_open_memory(f->s, capture, &f->out);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (f->c) epd_http_conn_close_memory(f->c);
    epd_http_server_destroy(f->s);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    epd_metrics_destroy(f->m);
    free(f);
    return 0;
}

static int feed(fixture_t *f, const char *s)
{
    return epd_http_conn_feed(f->c, s, strlen(s));
}

static const char HELLO[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                            "Connection: keep-alive\r\n\r\nhello";

static void test_get_and_pipelining(void **state)
{
    fixture_t *f = *state;
    /* two requests in one write, the second split over two more writes */
    assert_int_equal(feed(f, "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /a?q=1 HT"), 1);
    assert_int_equal(feed(f, "TP/1.1\r\nHost: x\r\n"), 1);
    assert_int_equal(feed(f, "\r\n"), 1);
    char expect[512];
    snprintf(expect, sizeof(expect), "%s%s", HELLO, HELLO);
    assert_string_equal(f->out.buf, expect);
}

static void test_body_query_headers(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(feed(f, "POST /echo?k=v HTTP/1.1\r\nX-Tag: t1\r\nContent-Length: 4\r\n\r\nab"),
                     1);
    assert_int_equal(f->out.len, 0);
    assert_int_equal(feed(f, "cd"), 1);
    const char *expect =
        "HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n"
        "Connection: keep-alive\r\nX-Len: 1\r\n\r\nPOST|k=v|t1|abcd";
    assert_string_equal(f->out.buf, expect);
    /* chunked request body */
    f->out.len = 0;
    assert_int_equal(feed(f, "PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "3\r\nxyz\r\n0\r\n\r\n"),
                     1);
    assert_non_null(strstr(f->out.buf, "\r\n\r\nPUT|||xyz"));
}

static void test_404_405_head(void **state)
{
    fixture_t *f = *state;
    feed(f, "GET /nope\"x HTTP/1.1\r\n\r\n");
    assert_non_null(strstr(f->out.buf, "HTTP/1.1 404 Not Found\r\n"));
    assert_non_null(
        strstr(f->out.buf, "\r\n\r\n{\"error\":\"not found\",\"path\":\"/nope\\\"x\"}\n"));
    f->out.len = 0;
    feed(f, "DELETE /echo HTTP/1.1\r\n\r\n");
    assert_non_null(strstr(f->out.buf, "HTTP/1.1 405 Method Not Allowed\r\n"));
    assert_non_null(strstr(f->out.buf, "\r\nAllow: POST, PUT\r\n"));
    f->out.len = 0;
    feed(f, "POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_non_null(strstr(f->out.buf, "\r\nAllow: GET, HEAD\r\n"));
    f->out.len = 0;
    feed(f, "HEAD /a HTTP/1.1\r\n\r\n");
    const char *expect = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                         "Connection: keep-alive\r\n\r\n";
    assert_string_equal(f->out.buf, expect);
    /* the connection is still usable after all of these */
    f->out.len = 0;
    assert_int_equal(feed(f, "GET /a HTTP/1.1\r\n\r\n"), 1);
    assert_string_equal(f->out.buf, HELLO);
}

static void test_limits(void **state)
{
    fixture_t *f = *state;
    char big[2048];
    /* header over max_header_bytes (1024) */
    int n = snprintf(big, sizeof(big), "GET /a HTTP/1.1\r\nX-Big: ");
    memset(big + n, 'a', 1100);
    big[n + 1100] = '\0';
    assert_int_equal(feed(f, big), 0);
    assert_memory_equal(f->out.buf, "HTTP/1.1 431 ", 13);
    assert_non_null(strstr(f->out.buf, "Connection: close\r\n"));
    assert_int_equal(feed(f, "GET /a HTTP/1.1\r\n\r\n"), 0); /* closed: no more answers */

    /* Content-Length over max_body_bytes (64): refused before the body arrives */
    epd_http_conn_close_memory(f->c);
    f->out.len = 0;
    f->c = epd_http_conn_open_memory(f->s, capture, &f->out);
    assert_int_equal(feed(f, "POST /echo HTTP/1.1\r\nContent-Length: 65\r\n\r\n"), 0);
    assert_memory_equal(f->out.buf, "HTTP/1.1 413 ", 13);

    /* chunked body that grows past the limit */
    epd_http_conn_close_memory(f->c);
    f->out.len = 0;
    f->c = epd_http_conn_open_memory(f->s, capture, &f->out);
    assert_int_equal(feed(f, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n"
                             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"),
                     1);
    assert_int_equal(feed(f, "21\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"), 0);
    assert_memory_equal(f->out.buf, "HTTP/1.1 413 ", 13);

    /* garbage */
    epd_http_conn_close_memory(f->c);
    f->out.len = 0;
    f->c = epd_http_conn_open_memory(f->s, capture, &f->out);
    assert_int_equal(feed(f, "\x01\x02 NOT HTTP\r\n\r\n"), 0);
    assert_memory_equal(f->out.buf, "HTTP/1.1 400 ", 13);

    /* metrics: rejected reasons counted */
    char *text;
    size_t len;
    epd_metrics_render(f->m, &text, &len);
    assert_non_null(strstr(text, "epd_http_rejected_total{reason=\"header_too_large\"} 1\n"));
    assert_non_null(strstr(text, "epd_http_rejected_total{reason=\"body_too_large\"} 2\n"));
    assert_non_null(strstr(text, "epd_http_rejected_total{reason=\"malformed\"} 1\n"));
    free(text);
}

static void test_async_keeps_order(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(feed(f, "GET /async HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\n"), 1);
    assert_non_null(f->pending);
    assert_int_equal(f->out.len, 0); /* /a waits behind /async */
    assert_int_equal(epd_http_respond(f->pending, 202, "text/plain", "later", 5), 0);
    char expect[512];
    snprintf(expect, sizeof(expect),
             "HTTP/1.1 202 Accepted\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
             "Connection: keep-alive\r\n\r\nlater%s",
             HELLO);
    assert_string_equal(f->out.buf, expect);
}

static void test_stream_and_client_gone(void **state)
{
    fixture_t *f = *state;
    f->pending = NULL;
    assert_int_equal(feed(f, "GET /stream HTTP/1.1\r\n\r\n"), 1);
    assert_non_null(f->pending);
    assert_int_equal(epd_http_stream_write(f->pending, "data: 2\n\n", 9), 0);
    assert_int_equal(epd_http_stream_end(f->pending), 0);
    const char *expect = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         "Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
                         "9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n";
    assert_string_equal(f->out.buf, expect);

    /* HTTP/1.0: no chunking, the end of the body is the close */
    f->out.len = 0;
    assert_int_equal(feed(f, "GET /stream HTTP/1.0\r\n\r\n"), 1);
    assert_int_equal(epd_http_stream_end(f->pending), 0);
    assert_string_equal(f->out.buf, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                    "Connection: close\r\n\r\ndata: 1\n\n");
    assert_int_equal(feed(f, "GET /a HTTP/1.1\r\n\r\n"), 0);

    /* the client leaves mid-stream: close callback, then writes fail, end releases */
    epd_http_conn_close_memory(f->c);
    f->c = epd_http_conn_open_memory(f->s, capture, &f->out);
    f->closed_cb = 0;
    assert_int_equal(feed(f, "GET /stream HTTP/1.1\r\n\r\n"), 1);
    epd_http_res_t *r = f->pending;
    epd_http_conn_close_memory(f->c);
    f->c = NULL;
    assert_int_equal(f->closed_cb, 1);
    assert_int_equal(epd_http_res_is_open(r), 0);
    assert_int_equal(epd_http_stream_write(r, "x", 1), -ECONNRESET);
    assert_int_equal(epd_http_stream_end(r), -ECONNRESET);
}

static void test_expect_continue_and_metrics(void **state)
{
    fixture_t *f = *state;
    feed(f, "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    assert_string_equal(f->out.buf, "HTTP/1.1 100 Continue\r\n\r\n");
    feed(f, "hi");
    assert_non_null(strstr(f->out.buf, "POST|||hi"));
    feed(f, "GET /zzz HTTP/1.1\r\n\r\n");
    char *text;
    size_t len;
    epd_metrics_render(f->m, &text, &len);
    assert_non_null(strstr(text, "epd_http_requests_total{path=\"/echo\",code=\"201\"} 1\n"));
    assert_non_null(strstr(text, "epd_http_requests_total{path=\"other\",code=\"404\"} 1\n"));
    assert_non_null(strstr(text, "epd_http_request_duration_seconds_count{path=\"/echo\"} 1\n"));
    assert_null(strstr(text, "zzz")); /* unknown paths never become labels */
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_get_and_pipelining, setup, teardown),
        cmocka_unit_test_setup_teardown(test_body_query_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_404_405_head, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_async_keeps_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_and_client_gone, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expect_continue_and_metrics, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
