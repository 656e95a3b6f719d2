/* The HTTP/1.1 server of epd: connections on the libuv loop, requests parsed by http-parser,
 * a route table, limits (header and body size, connections, idle and header-read deadlines),
 * and responses that complete immediately, later (async), or as a chunked stream. */
#ifndef EPD_HTTP_H
#define EPD_HTTP_H

#include <stddef.h>
#include <uv.h>

#include "metrics.h"

typedef struct epd_http_server epd_http_server_t;
typedef struct epd_http_res epd_http_res_t;

typedef struct epd_http_header {
    const char *name; /* as sent (compare case-insensitively) */
    const char *value;
} epd_http_header_t;

/* A parsed request. Valid until its response is finished (see epd_http_respond). */
typedef struct epd_http_req {
    const char *method; /* "GET", "POST", ... */
    const char *path;   /* "/v1/status": the URL path, not decoded, without the query */
    const char *query;  /* the text after '?', "" if none */
    const epd_http_header_t *headers;
    int nheaders;
    const char *body; /* NUL-terminated for convenience; body_len excludes the NUL */
    size_t body_len;
    int http_major, http_minor;
} epd_http_req_t;

/* Case-insensitive header lookup; NULL if absent. */
const char *epd_http_req_header(const epd_http_req_t *req, const char *name);

/* A handler runs on the loop thread. It must eventually finish `res` exactly once, now or
 * later from the loop: epd_http_respond, or epd_http_stream_begin ... epd_http_stream_end.
 * Finishing releases `res` and `req`. */
typedef void (*epd_http_handler_fn)(const epd_http_req_t *req, epd_http_res_t *res, void *ctx);

typedef struct epd_http_limits {
    size_t max_header_bytes; /* request line + headers; over -> 431 */
    size_t max_body_bytes;   /* Content-Length or received body; over -> 413 */
    int max_connections;     /* when full, the oldest idle or header-reading connection is closed
                                to admit a new one; with none such, the new one is closed at once */
    int max_connections_per_client; /* per peer address; further ones closed at once; 0: any */
    int idle_timeout_ms;            /* keep-alive idle, and body inactivity */
    int header_timeout_ms;          /* from accept to the first request's end of headers, and from a
                                       later request's first byte to its end of headers -> 408 */
} epd_http_limits_t;

/* Queued output beyond which epd_http_stream_write refuses (-ENOBUFS): a client that does
 * not read cannot grow our memory. */
#define EPD_HTTP_MAX_PENDING_WRITE (8u << 20)
/* Pipelined input buffered while a request is being handled; reading pauses beyond it. */
#define EPD_HTTP_MAX_PIPELINED_INPUT (64u << 10)

/* metrics may be NULL. The server updates epd_http_requests_total{path,code},
 * epd_http_request_duration_seconds{path} and epd_http_rejected_total{reason}; `path` is a
 * registered route or "other". */
int epd_http_server_create(uv_loop_t *loop, const epd_http_limits_t *limits, epd_metrics_t *metrics,
                           epd_http_server_t **out);
/* Binds and listens; port 0 picks a free port (see epd_http_server_port). host is an IPv4
 * or IPv6 literal. Returns 0 or a negative libuv error. */
int epd_http_server_listen(epd_http_server_t *s, const char *host, int port);
int epd_http_server_port(const epd_http_server_t *s);
/* Registers an exact-path route. HEAD is served by the GET handler with the body dropped.
 * Returns 0, -EEXIST (same method and path twice), -EINVAL or -ENOMEM. */
int epd_http_route(epd_http_server_t *s, const char *method, const char *path,
                   epd_http_handler_fn handler, void *ctx);
/* A guard runs before every matched route's handler (route_path: the route as registered).
 * It returns 0 to let the request through, or answers `res` itself and returns 1. */
typedef int (*epd_http_guard_fn)(const epd_http_req_t *req, epd_http_res_t *res,
                                 const char *route_path, void *ctx);
void epd_http_server_set_guard(epd_http_server_t *s, epd_http_guard_fn fn, void *ctx);
/* Graceful stop: stops accepting, closes idle connections, lets every connection finish its
 * current request and then closes it; `done` runs (once, from the loop) when none is left. */
void epd_http_server_drain(epd_http_server_t *s, void (*done)(void *arg), void *arg);
/* Closes every connection now; unfinished responses see their close callback. */
void epd_http_server_abort(epd_http_server_t *s);
int epd_http_server_connections(const epd_http_server_t *s);
/* Closes everything; memory is released as libuv finishes closing (keep running the loop). */
void epd_http_server_destroy(epd_http_server_t *s);

/* ---- responses ---- */
/* Adds a response header (before the response starts). -EINVAL for CR/LF in name or value. */
int epd_http_res_header(epd_http_res_t *res, const char *name, const char *value);
/* Sends a complete response and finishes `res`. Returns 0, or -ECONNRESET if the client went
 * away (res is finished all the same), -EINVAL if the response had already started. */
int epd_http_respond(epd_http_res_t *res, int status, const char *content_type, const char *body,
                     size_t len);
/* Sends `doc` as application/json (one line, then a newline) and finishes `res`. If doc is
 * NULL or cannot be printed (out of memory), sends `oom_status` with `oom_body` instead.
 * Returns as epd_http_respond. */
struct cJSON;
#define EPD_HTTP_OOM_JSON "{\"error\":\"out of memory\"}\n"
int epd_http_respond_json(epd_http_res_t *res, int status, const struct cJSON *doc, int oom_status,
                          const char *oom_body);
/* Streaming: headers now (chunked transfer-encoding for HTTP/1.1; HTTP/1.0 gets the raw body
 * and a close), then chunks, then the end, which finishes `res`. stream_write returns
 * -ENOBUFS while more than EPD_HTTP_MAX_PENDING_WRITE bytes wait to be sent, -ECONNRESET once
 * the client is gone (call epd_http_stream_end anyway to release res). */
int epd_http_stream_begin(epd_http_res_t *res, int status, const char *content_type);
int epd_http_stream_write(epd_http_res_t *res, const void *data, size_t len);
int epd_http_stream_end(epd_http_res_t *res);
/* Called once, from the loop, if the connection closes before `res` is finished (client went
 * away, server aborted). `res` stays valid until the handler finishes it. */
void epd_http_res_on_close(epd_http_res_t *res, void (*cb)(epd_http_res_t *res, void *arg),
                           void *arg);
int epd_http_res_is_open(const epd_http_res_t *res);

/* ---- in-memory connections (tests and fuzzing): the full request path without sockets.
 * Output is handed to `write` synchronously; timers are not armed. ---- */
typedef struct epd_http_conn epd_http_conn_t;
epd_http_conn_t *epd_http_conn_open_memory(epd_http_server_t *s,
                                           void (*write)(void *ctx, const char *data, size_t len),
                                           void *ctx);
/* Feeds bytes; returns 1 while the connection is open, 0 once the server closed it. */
int epd_http_conn_feed(epd_http_conn_t *c, const void *data, size_t len);
/* Ends the connection as the client going away, firing close callbacks, and frees it. */
void epd_http_conn_close_memory(epd_http_conn_t *c);

#endif /* EPD_HTTP_H */
