/* Slow clients over real loopback sockets cannot take the server: one address holds at most
 * max_connections_per_client connections, a full server evicts the oldest header-reading
 * connection so /healthz still answers, and a head that does not arrive within
 * header_timeout_ms gets 408 and a close (sooner than the idle timeout). The clients bind
 * 127.0.0.1 and 127.0.0.2.. (all of 127/8 is local on Linux) to be different addresses. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "http.h"
#include "metrics.h"

#define MAX_CONN 16
#define PER_CLIENT 4
#define HEADER_MS 400
#define IDLE_MS 10000

typedef struct fixture {
    uv_loop_t loop;
    epd_metrics_t *m;
    epd_http_server_t *s;
    int port;
} fixture_t;

static void h_healthz(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_http_respond(res, 200, "application/json", "{\"status\":\"ok\"}\n", 16);
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    f->m = epd_metrics_create();
    epd_http_limits_t lim = {.max_header_bytes = 4096,
                             .max_body_bytes = 4096,
                             .max_connections = MAX_CONN,
                             .max_connections_per_client = PER_CLIENT,
                             .idle_timeout_ms = IDLE_MS,
                             .header_timeout_ms = HEADER_MS};
    assert_int_equal(epd_http_server_create(&f->loop, &lim, f->m, &f->s), 0);
    assert_int_equal(epd_http_route(f->s, "GET", "/healthz", h_healthz, f), 0);
    assert_int_equal(epd_http_server_listen(f->s, "127.0.0.1", 0), 0);
    f->port = epd_http_server_port(f->s);
    assert_true(f->port > 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    epd_http_server_destroy(f->s);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    epd_metrics_destroy(f->m);
    free(f);
    return 0;
}

/* Runs the server's loop for about `ms` milliseconds. */
static void pump(fixture_t *f, int ms)
{
    for (int i = 0; i < ms; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    uv_run(&f->loop, UV_RUN_NOWAIT);
}

/* A connection from 127.0.0.<host> (non-blocking once connected). */
static int client(fixture_t *f, int host)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
    char ip[32];
    snprintf(ip, sizeof ip, "127.0.0.%d", host);
    inet_pton(AF_INET, ip, &src.sin_addr);
    assert_int_equal(bind(fd, (struct sockaddr *)&src, sizeof src), 0);
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    dst.sin_port = htons((uint16_t)f->port);
    assert_int_equal(connect(fd, (struct sockaddr *)&dst, sizeof dst), 0); /* the backlog */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void say(int fd, const char *s)
{
    assert_int_equal(send(fd, s, strlen(s), MSG_NOSIGNAL), (ssize_t)strlen(s));
}

/* What the server sent so far; *closed set when it closed the connection. */
static size_t hear(int fd, char *buf, size_t cap, int *closed)
{
    size_t n = 0;
    *closed = 0;
    for (;;) {
        ssize_t r = recv(fd, buf + n, cap - 1 - n, 0);
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) *closed = 1;
        break;
    }
    buf[n] = 0;
    return n;
}

static double rejected(fixture_t *f, const char *reason)
{
    char *text = NULL;
    size_t len = 0;
    if (epd_metrics_render(f->m, &text, &len) != 0) return -1;
    char key[128];
    snprintf(key, sizeof key, "epd_http_rejected_total{reason=\"%s\"} ", reason);
    const char *p = text ? strstr(text, key) : NULL;
    double v = p ? atof(p + strlen(key)) : 0;
    free(text);
    return v;
}

static void test_per_client_bound(void **state)
{
    fixture_t *f = *state;
    int fds[PER_CLIENT + 1], closed;
    char buf[4096];
    for (int i = 0; i <= PER_CLIENT; i++) {
        fds[i] = client(f, 1);
        say(fds[i], "GET /healthz HTTP/1.1\r\nHost: x\r\n"); /* and never the blank line */
        pump(f, 5);
    }
    pump(f, 20);
    for (int i = 0; i < PER_CLIENT; i++) {
        hear(fds[i], buf, sizeof buf, &closed);
        assert_false(closed);
    }
    assert_int_equal(hear(fds[PER_CLIENT], buf, sizeof buf, &closed), 0);
    assert_true(closed); /* over the bound: closed at once, without a response */
    assert_true(rejected(f, "max_connections_per_client") >= 1);
    /* another address is not affected */
    int other = client(f, 2);
    say(other, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    pump(f, 30);
    hear(other, buf, sizeof buf, &closed);
    assert_non_null(strstr(buf, "HTTP/1.1 200 OK"));
    for (int i = 0; i <= PER_CLIENT; i++)
        close(fds[i]);
    close(other);
}

static void test_full_server_still_answers_healthz(void **state)
{
    fixture_t *f = *state;
    int slow[MAX_CONN + 8], n = 0, closed;
    char buf[4096];
    /* 6 addresses x 4 slow-header connections: more than every slot */
    for (int host = 2; host < 8; host++)
        for (int i = 0; i < PER_CLIENT; i++) {
            slow[n] = client(f, host);
            say(slow[n], "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            n++;
            pump(f, 2);
        }
    pump(f, 20);
    assert_true(epd_http_server_connections(f->s) <= MAX_CONN);
    assert_true(rejected(f, "evicted") >= n - MAX_CONN);
    for (int probe = 0; probe < 3; probe++) {
        int h = client(f, 20 + probe);
        say(h, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        pump(f, 30);
        hear(h, buf, sizeof buf, &closed);
        assert_non_null(strstr(buf, "HTTP/1.1 200 OK"));
        assert_non_null(strstr(buf, "{\"status\":\"ok\"}"));
        close(h);
    }
    /* the slow ones still open are answered 408 and closed once header_timeout_ms passes,
     * long before the idle timeout */
    pump(f, HEADER_MS + 200);
    int timed_out = 0;
    for (int i = 0; i < n; i++) {
        hear(slow[i], buf, sizeof buf, &closed);
        assert_true(closed);
        if (strstr(buf, "HTTP/1.1 408 ")) timed_out++;
        close(slow[i]);
    }
    /* each probe evicted one more slow connection; the rest waited for their deadline */
    assert_true(timed_out >= MAX_CONN - 3);
    assert_true(rejected(f, "header_timeout") >= timed_out);
}

static void test_silent_connection_closed_after_header_timeout(void **state)
{
    fixture_t *f = *state;
    int closed;
    char buf[256];
    int fd = client(f, 1); /* connects and sends nothing */
    pump(f, HEADER_MS / 2);
    hear(fd, buf, sizeof buf, &closed);
    assert_false(closed);
    pump(f, HEADER_MS);
    hear(fd, buf, sizeof buf, &closed);
    assert_true(closed);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_per_client_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_server_still_answers_healthz, setup, teardown),
        cmocka_unit_test_setup_teardown(test_silent_connection_closed_after_header_timeout, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
