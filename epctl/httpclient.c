/* The blocking HTTP client (see httpclient.h): non-blocking socket + poll with one deadline. */
#include "httpclient.h"
#include "epd_clock.h"

#include <errno.h>
#include <fcntl.h>
#include <http_parser.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct client {
    epd_http_response_t *resp;
    size_t cap;
    int done;
    int too_big;
    int in_ctype; /* the header field being read is Content-Type */
    char field[32];
    size_t field_len;
} client_t;

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    client_t *c = p->data;
    if (c->in_ctype >= 0) { /* a value came before: a new field starts */
        c->field_len = 0;
        c->in_ctype = -1;
    }
    size_t n =
        len < sizeof(c->field) - 1 - c->field_len ? len : sizeof(c->field) - 1 - c->field_len;
    memcpy(c->field + c->field_len, at, n);
    c->field_len += n;
    c->field[c->field_len] = '\0';
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    client_t *c = p->data;
    if (c->in_ctype < 0) c->in_ctype = strcasecmp(c->field, "Content-Type") == 0;
    if (c->in_ctype) {
        size_t have = strlen(c->resp->content_type);
        size_t room = sizeof(c->resp->content_type) - 1 - have;
        size_t n = len < room ? len : room;
        memcpy(c->resp->content_type + have, at, n);
        c->resp->content_type[have + n] = '\0';
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    client_t *c = p->data;
    epd_http_response_t *r = c->resp;
    if (r->body_len + len > EPD_HTTPCLIENT_MAX_BODY) {
        c->too_big = 1;
        return -1;
    }
    if (r->body_len + len + 1 > c->cap) {
        size_t nc = c->cap ? c->cap * 2 : 4096;
        while (nc < r->body_len + len + 1)
            nc *= 2;
        char *nb = realloc(r->body, nc);
        if (!nb) return -1;
        r->body = nb;
        c->cap = nc;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    r->body[r->body_len] = '\0';
    return 0;
}

static int on_complete(http_parser *p)
{
    client_t *c = p->data;
    c->done = 1;
    c->resp->status = p->status_code;
    return 0;
}

int epd_http_parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon;
    const char *h = s;
    size_t hl;
    if (!s || !*s) return -EINVAL;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':') return -EINVAL;
        h = s + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon) return -EINVAL;
        hl = (size_t)(colon - s);
    }
    if (hl == 0 || hl >= hostlen) return -EINVAL;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || colon[1] == '\0' || p < 1 || p > 65535) return -EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (int)p;
    return 0;
}

static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - epd_now_ms();
        if (left <= 0) return -ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, (int)left);
        if (r > 0) return 0;
        if (r == 0) return -ETIMEDOUT;
        if (errno != EINTR) return -errno;
    }
}

int epd_http_request(const char *host, int port, const char *method, const char *path,
                     const char *body, size_t body_len, int timeout_ms, epd_http_response_t *resp,
                     char *err, size_t errlen)
{
    return epd_http_request_h(host, port, method, path, NULL, body, body_len, timeout_ms, resp, err,
                              errlen);
}

int epd_http_request_h(const char *host, int port, const char *method, const char *path,
                       const char *headers, const char *body, size_t body_len, int timeout_ms,
                       epd_http_response_t *resp, char *err, size_t errlen)
{
    long long deadline = epd_now_ms() + timeout_ms;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    char portstr[16], *req = NULL;
    int fd = -1, rc;
    memset(resp, 0, sizeof(*resp));
    snprintf(portstr, sizeof(portstr), "%d", port);
    if ((rc = getaddrinfo(host, portstr, &hints, &ai)) != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -EHOSTUNREACH;
    }
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        rc = -errno;
        snprintf(err, errlen, "socket: %s", strerror(errno));
        goto fail;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
            rc = -errno;
            snprintf(err, errlen, "connect to %s:%d: %s", host, port, strerror(errno));
            goto fail;
        }
        if ((rc = wait_fd(fd, POLLOUT, deadline)) != 0) {
            snprintf(err, errlen, "connect to %s:%d: %s", host, port, strerror(-rc));
            goto fail;
        }
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr) {
            rc = -soerr;
            snprintf(err, errlen, "connect to %s:%d: %s", host, port, strerror(soerr));
            goto fail;
        }
    }
    if (!headers) headers = "";
    size_t reqcap = strlen(method) + strlen(path) + strlen(host) + strlen(headers) + 160 + body_len;
    req = malloc(reqcap);
    if (!req) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    int hl = snprintf(req, reqcap,
                      "%s %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: epctl\r\nAccept: */*\r\n"
                      "Connection: close\r\nContent-Length: %zu\r\n%s\r\n",
                      method, path, host, port, body_len, headers);
    if (body_len) memcpy(req + hl, body, body_len);
    size_t total = (size_t)hl + body_len, off = 0;
    while (off < total) {
        ssize_t w = send(fd, req + off, total - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            rc = -errno;
            snprintf(err, errlen, "send to %s:%d: %s", host, port, strerror(errno));
            goto fail;
        }
        if ((rc = wait_fd(fd, POLLOUT, deadline)) != 0) {
            snprintf(err, errlen, "send to %s:%d: %s", host, port, strerror(-rc));
            goto fail;
        }
    }
    http_parser parser;
    http_parser_settings st;
    http_parser_settings_init(&st);
    st.on_header_field = on_header_field;
    st.on_header_value = on_header_value;
    st.on_body = on_body;
    st.on_message_complete = on_complete;
    client_t cl = {.resp = resp, .in_ctype = 0};
    http_parser_init(&parser, HTTP_RESPONSE);
    parser.data = &cl;
    char buf[16384];
    while (!cl.done) {
        if ((rc = wait_fd(fd, POLLIN, deadline)) != 0) {
            snprintf(err, errlen, "waiting for the response from %s:%d: %s", host, port,
                     strerror(-rc));
            goto fail;
        }
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            rc = -errno;
            snprintf(err, errlen, "receive from %s:%d: %s", host, port, strerror(errno));
            goto fail;
        }
        size_t p = http_parser_execute(&parser, &st, buf, (size_t)n); /* n == 0: EOF */
        if (HTTP_PARSER_ERRNO(&parser) != HPE_OK || (p != (size_t)n && !cl.done)) {
            rc = -EPROTO;
            snprintf(err, errlen, "bad response from %s:%d: %s", host, port,
                     cl.too_big ? "body too large"
                                : http_errno_description(HTTP_PARSER_ERRNO(&parser)));
            goto fail;
        }
        if (n == 0 && !cl.done) {
            rc = -EPROTO;
            snprintf(err, errlen, "%s:%d closed the connection before a complete response", host,
                     port);
            goto fail;
        }
    }
    if (!resp->body) {
        resp->body = calloc(1, 1);
        if (!resp->body) {
            rc = -ENOMEM;
            goto fail;
        }
    }
    free(req);
    close(fd);
    freeaddrinfo(ai);
    return 0;
fail:
    free(req);
    epd_http_response_free(resp);
    if (fd >= 0) close(fd);
    freeaddrinfo(ai);
    return rc < 0 ? rc : -EIO;
}

void epd_http_response_free(epd_http_response_t *resp)
{
    free(resp->body);
    resp->body = NULL;
    resp->body_len = 0;
}
