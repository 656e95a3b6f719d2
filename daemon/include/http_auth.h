/* Who may call which HTTP route: the admin token (/v1/admin/...), the API key (the inference
 * API, as vLLM's --api-key), and the refusal of browser cross-origin requests to admin routes
 * (CSRF). Installed on the server as its guard (epd_http_server_set_guard). */
#ifndef EPD_HTTP_AUTH_H
#define EPD_HTTP_AUTH_H

#include <stddef.h>

#include "epd_err.h"
#include "http.h"

/* Tokens are printable ASCII without spaces (they travel in a header) and at least this long
 * (the same floor as the cluster secret: fewer bytes cannot carry enough entropy). */
#define EPD_HTTP_TOKEN_MIN 16
#define EPD_HTTP_TOKEN_MAX 1024

typedef struct epd_http_auth epd_http_auth_t;

typedef struct epd_http_auth_opts {
    const char *listen_host;      /* http.listen.host as configured */
    int listen_port;              /* the bound port */
    const char *admin_token_file; /* "" or NULL: none */
    const char *api_key_file;     /* "" or NULL: none */
} epd_http_auth_opts_t;

/* Loads the token files (refused unless a regular file, not a symlink, owned by the
 * effective user with no group/other bits, EPD_HTTP_TOKEN_MIN..MAX printable bytes after
 * trailing whitespace is stripped). 0, or a negative errno (-EINVAL not a regular file or not a
 * token; -EPERM wrong owner or mode; the call's errno when the file cannot be opened or read)
 * with a message in err naming the setting and the file (never the token). */
int epd_http_auth_create(const epd_http_auth_opts_t *o, epd_http_auth_t **out, epd_err_t *err);
void epd_http_auth_destroy(epd_http_auth_t *a);
/* Sets a token from memory (tests): which = "admin" or "api". -1 if out of bounds. */
int epd_http_auth_set_token(epd_http_auth_t *a, const char *which, const char *token);
/* 1 when http.listen is a loopback address (127.0.0.0/8, ::1, localhost). */
int epd_http_auth_listen_is_loopback(const char *host);

typedef enum epd_http_route_class {
    EPD_HTTP_ROUTE_OPEN,  /* /healthz, /readyz, /metrics: probes and scrapers, never gated */
    EPD_HTTP_ROUTE_ADMIN, /* /v1/admin/... */
    EPD_HTTP_ROUTE_API,   /* everything else */
} epd_http_route_class_t;
epd_http_route_class_t epd_http_auth_classify(const char *route_path);

/* The decision for one request to `route_path`: 0 to let it through, else the status (401 or
 * 403) with *why set to the message. */
int epd_http_auth_decide(const epd_http_auth_t *a, const epd_http_req_t *req,
                         const char *route_path, const char **why);
/* The guard for epd_http_server_set_guard (ctx = the epd_http_auth_t): answers refused
 * requests itself (JSON error; 401 with WWW-Authenticate) and returns 1 for them. */
int epd_http_auth_guard(const epd_http_req_t *req, epd_http_res_t *res, const char *route_path,
                        void *ctx);

#endif /* EPD_HTTP_AUTH_H */
