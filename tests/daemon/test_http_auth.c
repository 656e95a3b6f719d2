/* Who may call which route (http_auth.c): admin routes refuse browser cross-origin requests
 * always, need the admin token when one is configured, and without one are served only on a
 * loopback listener; the API key gates every route but the probes and /metrics; token files
 * are refused unless owner-only. Requests are built here by hand. */
#include <setjmp.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "http_auth.h"

#define ADMIN "admin-token-0123456789abcdef"
#define KEY "api-key-0123456789abcdef0123"

static epd_http_req_t req_with(epd_http_header_t *h, int n)
{
    epd_http_req_t r = {.method = "POST", .path = "/", .query = "", .headers = h, .nheaders = n};
    return r;
}

static int decide(const epd_http_auth_t *a, const char *path, const char *n1, const char *v1,
                  const char *n2, const char *v2)
{
    epd_http_header_t h[2] = {{n1, v1}, {n2, v2}};
    int n = n2 ? 2 : n1 ? 1 : 0;
    epd_http_req_t r = req_with(h, n);
    const char *why = NULL;
    int st = epd_http_auth_decide(a, &r, path, &why);
    if (st) assert_non_null(why);
    return st;
}

static epd_http_auth_t *make(const char *host, const char *admin, const char *key)
{
    epd_http_auth_opts_t o = {.listen_host = host, .listen_port = 8080};
    epd_http_auth_t *a = NULL;
    epd_err_t err;
    assert_int_equal(epd_http_auth_create(&o, &a, &err), 0);
    if (admin) assert_int_equal(epd_http_auth_set_token(a, "admin", admin), 0);
    if (key) assert_int_equal(epd_http_auth_set_token(a, "api", key), 0);
    return a;
}

static void test_loopback_without_token(void **state)
{
    epd_http_auth_t *a = make("127.0.0.1", NULL, NULL);
    const char *down = "/v1/admin/down";
    assert_int_equal(decide(a, down, NULL, NULL, NULL, NULL), 0); /* curl, epctl */
    assert_int_equal(decide(a, down, "Origin", "http://127.0.0.1:8080", NULL, NULL), 0);
    assert_int_equal(decide(a, down, "Origin", "http://localhost:8080", NULL, NULL), 0);
    /* a page anywhere else: the CSRF case */
    assert_int_equal(decide(a, down, "Origin", "http://evil.example", NULL, NULL), 403);
    assert_int_equal(decide(a, down, "Origin", "null", NULL, NULL), 403);
    assert_int_equal(decide(a, down, "Origin", "http://127.0.0.1:9999", NULL, NULL), 403);
    assert_int_equal(decide(a, "/v1/admin/drain", "Sec-Fetch-Site", "cross-site", NULL, NULL), 403);
    /* the API and the probes are open without a key */
    assert_int_equal(decide(a, "/v1/completions", "Origin", "http://evil.example", NULL, NULL), 0);
    assert_int_equal(decide(a, "/healthz", NULL, NULL, NULL, NULL), 0);
    epd_http_auth_destroy(a);
}

static void test_not_loopback_without_token(void **state)
{
    epd_http_auth_t *a = make("0.0.0.0", NULL, NULL);
    assert_int_equal(decide(a, "/v1/admin/down", NULL, NULL, NULL, NULL), 403);
    epd_http_auth_t *b = make("10.1.2.3", NULL, NULL);
    assert_int_equal(decide(b, "/v1/admin/drain", NULL, NULL, NULL, NULL), 403);
    assert_int_equal(decide(b, "/v1/models", NULL, NULL, NULL, NULL), 0);
    assert_true(epd_http_auth_listen_is_loopback("::1"));
    assert_true(epd_http_auth_listen_is_loopback("127.0.0.53"));
    assert_false(epd_http_auth_listen_is_loopback("0.0.0.0"));
    assert_false(epd_http_auth_listen_is_loopback("::"));
    epd_http_auth_destroy(a);
    epd_http_auth_destroy(b);
}

static void test_admin_token(void **state)
{
    epd_http_auth_t *a = make("0.0.0.0", ADMIN, NULL);
    const char *down = "/v1/admin/down";
    assert_int_equal(decide(a, down, NULL, NULL, NULL, NULL), 401);
    assert_int_equal(decide(a, down, "Authorization", "Bearer " ADMIN, NULL, NULL), 0);
    assert_int_equal(decide(a, down, "authorization", "bearer " ADMIN, NULL, NULL), 0);
    assert_int_equal(decide(a, down, "Authorization", "Bearer " ADMIN "x", NULL, NULL), 401);
    assert_int_equal(decide(a, down, "Authorization", "Bearer admin-token", NULL, NULL), 401);
    assert_int_equal(decide(a, down, "Authorization", "Basic " ADMIN, NULL, NULL), 401);
    assert_int_equal(decide(a, down, "Authorization", "Bearer ", NULL, NULL), 401);
    /* even with the token: a browser cross-origin request is refused */
    assert_int_equal(
        decide(a, down, "Authorization", "Bearer " ADMIN, "Origin", "http://evil.example"), 403);
    epd_http_auth_destroy(a);
}

static void test_api_key(void **state)
{
    epd_http_auth_t *a = make("0.0.0.0", ADMIN, KEY);
    assert_int_equal(decide(a, "/v1/completions", NULL, NULL, NULL, NULL), 401);
    assert_int_equal(
        decide(a, "/v1/completions", "Authorization", "Bearer wrong-key-0123456789", NULL, NULL),
        401);
    assert_int_equal(decide(a, "/v1/completions", "Authorization", "Bearer " KEY, NULL, NULL), 0);
    assert_int_equal(decide(a, "/v1/status", "Authorization", "Bearer " ADMIN, NULL, NULL), 0);
    /* the API key does not open the admin routes */
    assert_int_equal(decide(a, "/v1/admin/down", "Authorization", "Bearer " KEY, NULL, NULL), 401);
    const char *open[] = {"/healthz", "/readyz", "/metrics"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(decide(a, open[i], NULL, NULL, NULL, NULL), 0);
    epd_http_auth_destroy(a);
}

static void test_token_files(void **state)
{
    char dir[] = "/tmp/epd-auth-XXXXXX", path[128];
    epd_err_t err;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/token", dir);
    FILE *f = fopen(path, "w");
    fputs(ADMIN "\n", f);
    fclose(f);
    epd_http_auth_opts_t o = {
        .listen_host = "127.0.0.1", .listen_port = 1, .admin_token_file = path};
    epd_http_auth_t *a = NULL;
    chmod(path, 0644);
    assert_int_equal(epd_http_auth_create(&o, &a, &err), -EPERM);
    assert_non_null(strstr(err.msg, "http.admin_token_file"));
    assert_non_null(strstr(err.msg, "chmod 0600"));
    chmod(path, 0600);
    assert_int_equal(epd_http_auth_create(&o, &a, &err), 0);
    assert_int_equal(decide(a, "/v1/admin/down", "Authorization", "Bearer " ADMIN, NULL, NULL), 0);
    assert_int_equal(decide(a, "/v1/admin/down", NULL, NULL, NULL, NULL), 401);
    epd_http_auth_destroy(a);
    f = fopen(path, "w");
    fputs("short\n", f);
    fclose(f);
    assert_int_equal(epd_http_auth_create(&o, &a, &err), -EINVAL);
    assert_null(strstr(err.msg, "short")); /* the message never shows the token */
    char link[160];
    snprintf(link, sizeof link, "%s/link", dir);
    assert_int_equal(symlink(path, link), 0);
    o.admin_token_file = link;
    assert_int_equal(epd_http_auth_create(&o, &a, &err), -ELOOP);
    unlink(link);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loopback_without_token),
        cmocka_unit_test(test_not_loopback_without_token),
        cmocka_unit_test(test_admin_token),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_token_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
