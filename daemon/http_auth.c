/* HTTP access rules: the admin token and the API key (loaded from owner-only files, compared
 * in constant time), the browser cross-origin refusal for /v1/admin/..., and the guard that
 * answers refused requests. */
#include "http_auth.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct token {
    int set;
    unsigned char digest[SHA256_DIGEST_LENGTH]; /* SHA-256 of the token: compared, never the text */
} token_t;

struct epd_http_auth {
    int loopback;
    char origins[4][300]; /* the origins of the listener itself: the only ones admitted */
    int norigins;
    token_t admin, api;
};

int epd_http_auth_listen_is_loopback(const char *h)
{
    if (!h) return 0;
    if (strncmp(h, "127.", 4) == 0) return 1;
    return strcmp(h, "::1") == 0 || strcmp(h, "[::1]") == 0 || strcasecmp(h, "localhost") == 0;
}

static void token_from(token_t *t, const unsigned char *p, size_t n)
{
    SHA256(p, n, t->digest);
    t->set = 1;
}

static int token_ok(const unsigned char *p, size_t n)
{
    if (n < EPD_HTTP_TOKEN_MIN || n > EPD_HTTP_TOKEN_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < 0x21 || p[i] > 0x7e) return 0;
    return 1;
}

int epd_http_auth_set_token(epd_http_auth_t *a, const char *which, const char *token)
{
    size_t n = strlen(token);
    if (!token_ok((const unsigned char *)token, n)) return -1;
    token_from(strcmp(which, "admin") == 0 ? &a->admin : &a->api, (const unsigned char *)token, n);
    return 0;
}

static int load_token(const char *setting, const char *path, token_t *t, epd_err_t *err)
{
    unsigned char buf[EPD_HTTP_TOKEN_MAX + 2];
    struct stat st;
    size_t n = 0;
    int rc;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return epd_err_set(err, -errno, "%s %s: cannot open: %s", setting, path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        rc = epd_err_set(err, -errno, "%s %s: fstat: %s", setting, path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = epd_err_set(err, -EINVAL, "%s %s: not a regular file", setting, path);
        goto out;
    }
    if (st.st_uid != geteuid()) {
        rc = epd_err_set(err, -EPERM, "%s %s: owned by uid %u, not by the daemon's uid %u", setting,
                         path, (unsigned)st.st_uid, (unsigned)geteuid());
        goto out;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        rc = epd_err_set(err, -EPERM,
                         "%s %s: mode %04o gives access to group or others; chmod 0600 it", setting,
                         path, (unsigned)(st.st_mode & 07777));
        goto out;
    }
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc = epd_err_set(err, -errno, "%s %s: read: %s", setting, path, strerror(errno));
            goto out;
        }
        if (r == 0 || (n += (size_t)r) == sizeof buf) break;
    }
    while (n > 0 &&
           (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    if (!token_ok(buf, n)) {
        rc = epd_err_set(err, -EINVAL,
                         "%s %s: a token is %d..%d printable ASCII characters without spaces "
                         "(e.g. openssl rand -hex 32)",
                         setting, path, EPD_HTTP_TOKEN_MIN, EPD_HTTP_TOKEN_MAX);
        goto out;
    }
    token_from(t, buf, n);
    rc = 0;
out:
    OPENSSL_cleanse(buf, sizeof buf);
    close(fd);
    return rc;
}

int epd_http_auth_create(const epd_http_auth_opts_t *o, epd_http_auth_t **out, epd_err_t *err)
{
    int rc = 0;
    epd_http_auth_t *a = calloc(1, sizeof(*a));
    if (!a) return epd_err_set(err, -ENOMEM, "out of memory");
    const char *h = o->listen_host ? o->listen_host : "";
    a->loopback = epd_http_auth_listen_is_loopback(h);
    int v6 = strchr(h, ':') != NULL && h[0] != '[';
    snprintf(a->origins[a->norigins++], sizeof a->origins[0], "http://%s%s%s:%d", v6 ? "[" : "", h,
             v6 ? "]" : "", o->listen_port);
    if (a->loopback) {
        static const char *const alias[] = {"localhost", "127.0.0.1", "[::1]"};
        for (int i = 0; i < 3; i++)
            snprintf(a->origins[a->norigins++], sizeof a->origins[0], "http://%s:%d", alias[i],
                     o->listen_port);
    }
    if ((o->admin_token_file && o->admin_token_file[0] &&
         (rc = load_token("http.admin_token_file", o->admin_token_file, &a->admin, err))) ||
        (o->api_key_file && o->api_key_file[0] &&
         (rc = load_token("http.api_key_file", o->api_key_file, &a->api, err)))) {
        OPENSSL_cleanse(a, sizeof(*a));
        free(a);
        return rc;
    }
    *out = a;
    return 0;
}

void epd_http_auth_destroy(epd_http_auth_t *a)
{
    if (!a) return;
    OPENSSL_cleanse(a, sizeof(*a));
    free(a);
}

epd_http_route_class_t epd_http_auth_classify(const char *p)
{
    if (strcmp(p, "/healthz") == 0 || strcmp(p, "/readyz") == 0 || strcmp(p, "/metrics") == 0)
        return EPD_HTTP_ROUTE_OPEN;
    if (strncmp(p, "/v1/admin/", 10) == 0) return EPD_HTTP_ROUTE_ADMIN;
    return EPD_HTTP_ROUTE_API;
}

/* A browser says where a request comes from: Origin (any non-GET fetch or form POST) and
 * Sec-Fetch-Site. Tools such as curl and epctl send neither. */
static int cross_origin(const epd_http_auth_t *a, const epd_http_req_t *req)
{
    const char *site = epd_http_req_header(req, "Sec-Fetch-Site");
    if (site && strcasecmp(site, "cross-site") == 0) return 1;
    const char *origin = epd_http_req_header(req, "Origin");
    if (!origin) return 0;
    for (int i = 0; i < a->norigins; i++)
        if (strcasecmp(origin, a->origins[i]) == 0) return 0;
    return 1; /* another origin, or "null" (sandboxed frames, file: pages) */
}

/* Constant time in the token's contents: both sides are hashed and the digests compared with
 * CRYPTO_memcmp, so neither the length nor a matching prefix shows in the timing. */
static int bearer_matches(const epd_http_req_t *req, const token_t *t)
{
    if (!t->set) return 0;
    const char *h = epd_http_req_header(req, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    while (*h == ' ')
        h++;
    size_t n = strlen(h);
    while (n > 0 && h[n - 1] == ' ')
        n--;
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)h, n, d);
    return CRYPTO_memcmp(d, t->digest, sizeof d) == 0;
}

int epd_http_auth_decide(const epd_http_auth_t *a, const epd_http_req_t *req,
                         const char *route_path, const char **why)
{
    switch (epd_http_auth_classify(route_path)) {
    case EPD_HTTP_ROUTE_OPEN:
        return 0;
    case EPD_HTTP_ROUTE_ADMIN:
        if (cross_origin(a, req)) {
            *why = "cross-origin requests to /v1/admin/... are refused (a browser page may not "
                   "drive this node)";
            return 403;
        }
        if (a->admin.set) {
            if (bearer_matches(req, &a->admin)) return 0;
            *why = "this admin endpoint needs 'Authorization: Bearer <token>' with the token of "
                   "http.admin_token_file (epctl: --token-file FILE)";
            return 401;
        }
        if (a->loopback) return 0;
        *why = "admin endpoints are refused: http.listen is not loopback and no "
               "http.admin_token_file is configured (write a token, chmod 0600, set "
               "http.admin_token_file, restart)";
        return 403;
    case EPD_HTTP_ROUTE_API:
    default:
        /* the admin token opens the API as well: the operator's tools read /v1/status */
        if (!a->api.set || bearer_matches(req, &a->api) || bearer_matches(req, &a->admin)) return 0;
        *why = "this endpoint needs 'Authorization: Bearer <key>' with the key of "
               "http.api_key_file";
        return 401;
    }
}

int epd_http_auth_guard(const epd_http_req_t *req, epd_http_res_t *res, const char *route_path,
                        void *ctx)
{
    const char *why = NULL;
    int st = epd_http_auth_decide(ctx, req, route_path, &why);
    if (st == 0) return 0;
    if (st == 401)
        epd_http_res_header(res, "WWW-Authenticate",
                            epd_http_auth_classify(route_path) == EPD_HTTP_ROUTE_ADMIN
                                ? "Bearer realm=\"epd-admin\""
                                : "Bearer realm=\"epd\"");
    cJSON *doc = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(doc, "error");
    cJSON_AddStringToObject(e, "message", why);
    cJSON_AddStringToObject(e, "type", st == 401 ? "authentication_error" : "permission_error");
    cJSON_AddNumberToObject(e, "code", st);
    epd_http_respond_json(res, st, doc, 500, EPD_HTTP_OOM_JSON);
    cJSON_Delete(doc);
    return 1;
}
