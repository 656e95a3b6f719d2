/* The tcp wire: one-sided put + signal between ranks of separate processes over a full mesh of
 * TCP connections, with one progress thread per wire that receives frames and drains send
 * queues. Byte formats are in wire_tcp.h.
 *
 * This file: create and destroy (with the orderly close), the listener, the endpoint exchange
 * through the bootstrap, the HELLO handshakes and building the mesh. The data path (frames, send
 * queues, the progress thread, receive parsing) is in wire_tcp_data.c; wire_tcp_int.h is the
 * state both share.
 */
#define _GNU_SOURCE /* accept4, pipe2 */
#include "wire_tcp_int.h"
#include "epd_clock.h"
#include "last_error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define TCP_DEFAULT_TIMEOUT_MS 10000u
#define CONNECT_RETRY_MS 20u
/* destroy(): how long to wait for queued bytes to leave and for the peers' goodbyes. */
#define LINGER_MS 2000u

/* ---- small helpers ------------------------------------------------------------------------ */

static void sock_tune(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
}

static void addr_str(const struct sockaddr *sa, char *out, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    }
    snprintf(out, len, "%s:%d", host, port);
}

static void record_refusal(struct wire_tcp *t, int fd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void record_refusal(struct wire_tcp *t, int fd, const char *fmt, ...)
{
    pthread_mutex_lock(&t->refuse_lock);
    t->refused++;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->refuse_why, sizeof t->refuse_why, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&t->refuse_lock);
    if (fd >= 0) close(fd);
}

/* ---- handshakes --------------------------------------------------------------------------- */

static void encode_hello(const struct wire_tcp *t, int kind, uint8_t *b)
{
    memset(b, 0, EP_TCP_HELLO_BYTES);
    put_u32(b, EP_TCP_MAGIC);
    put_u16(b + 4, EP_TCP_VERSION);
    put_u16(b + 6, (uint16_t)kind);
    put_u32(b + 8, (uint32_t)t->base.rank);
    put_u32(b + 12, (uint32_t)t->base.nranks);
    put_u64(b + 16, t->group_nonce);
    put_u64(b + 24, t->base.bytes);
}

/* Checks a HELLO against this group. Returns the claimed rank's validity: 0 fine; -1 refuse
 * (reason in why); -2 the peer is ours but incompatible (reason in why, fatal). */
static int check_hello(const struct wire_tcp *t, const uint8_t *b, int kind, int expect_rank,
                       int *rank_out, char *why, size_t why_len)
{
    uint32_t magic = get_u32(b);
    uint32_t rank = get_u32(b + 8), nranks = get_u32(b + 12);
    uint64_t nonce = get_u64(b + 16), bytes = get_u64(b + 24);
    *rank_out = (int)rank;
    if (magic != EP_TCP_MAGIC) {
        snprintf(why, why_len, "not an ep tcp wire HELLO (first bytes %02x %02x %02x %02x)", b[0],
                 b[1], b[2], b[3]);
        return -1;
    }
    if (get_u16(b + 4) != EP_TCP_VERSION) {
        snprintf(why, why_len, "protocol version %u, this rank speaks %u", get_u16(b + 4),
                 EP_TCP_VERSION);
        return -1;
    }
    if (get_u16(b + 6) != kind) {
        snprintf(why, why_len, "HELLO of kind %u where %d was expected", get_u16(b + 6), kind);
        return -1;
    }
    if (nonce != t->group_nonce) {
        snprintf(why, why_len, "HELLO claiming rank %u carries another group's nonce", rank);
        return -1;
    }
    if (nranks != (uint32_t)t->base.nranks) {
        snprintf(why, why_len, "HELLO claiming rank %u says %u ranks, this group has %d", rank,
                 nranks, t->base.nranks);
        return -1;
    }
    if (expect_rank >= 0 ? rank != (uint32_t)expect_rank : rank >= (uint32_t)t->base.rank) {
        snprintf(why, why_len, "HELLO names rank %u, expected %s %d", rank,
                 expect_rank >= 0 ? "rank" : "a rank below",
                 expect_rank >= 0 ? expect_rank : t->base.rank);
        return -1;
    }
    if (bytes != t->base.bytes) {
        snprintf(why, why_len, "rank %u has a symmetric buffer of %llu bytes, this rank %zu", rank,
                 (unsigned long long)bytes, t->base.bytes);
        return -2;
    }
    return 0;
}

void tcp_accept_pending(struct wire_tcp *t, unsigned hello_ms)
{
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(t->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or a transient accept error: the listener stays up */
        char addr[64];
        addr_str((struct sockaddr *)&ss, addr, sizeof addr);
        if (t->npend == MAX_PENDING) {
            record_refusal(t, fd, "refused connection from %s: %d handshakes already pending", addr,
                           MAX_PENDING);
            continue;
        }
        struct pending_conn *pc = &t->pend[t->npend++];
        memset(pc, 0, sizeof *pc);
        pc->fd = fd;
        pc->deadline_ns = epd_now_ns() + (uint64_t)hello_ms * 1000000ull;
        snprintf(pc->addr, sizeof pc->addr, "%s", addr);
    }
}

static void drop_pending(struct wire_tcp *t, int i)
{
    t->pend[i] = t->pend[--t->npend];
}

/* Reads a pending connection's HELLO. Returns 1 when it joined the mesh, 0 while incomplete
 * or refused, a negative status when an incompatible rank of this group connected. */
int tcp_serve_pending(struct wire_tcp *t, int i, int mesh_open)
{
    struct pending_conn *pc = &t->pend[i];
    ssize_t r = recv(pc->fd, pc->buf + pc->got, EP_TCP_HELLO_BYTES - pc->got, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    if (r <= 0) {
        record_refusal(t, pc->fd, "refused connection from %s: closed after %zu of %d HELLO bytes",
                       pc->addr, pc->got, EP_TCP_HELLO_BYTES);
        drop_pending(t, i);
        return 0;
    }
    pc->got += (size_t)r;
    if (pc->got < EP_TCP_HELLO_BYTES) return 0;

    char why[160];
    int rank;
    int c = check_hello(t, pc->buf, EP_TCP_HELLO_CONNECT, -1, &rank, why, sizeof why);
    if (c != -1 && (!mesh_open || t->peers[rank].fd >= 0)) {
        snprintf(why, sizeof why, "duplicate connection claiming rank %d", rank);
        c = -1;
    }
    if (c == -1) {
        record_refusal(t, pc->fd, "refused connection from %s: %s", pc->addr, why);
        drop_pending(t, i);
        return 0;
    }
    if (c == -2) {
        int st = ep_wire_fail(&t->base, rank, EP_ERR_INVALID, "rank %d: refused rank %d (%s): %s",
                              t->base.rank, rank, pc->addr, why);
        record_refusal(t, pc->fd, "refused connection from %s: %s", pc->addr, why);
        drop_pending(t, i);
        return st;
    }
    uint8_t ans[EP_TCP_HELLO_BYTES];
    encode_hello(t, EP_TCP_HELLO_ACCEPT, ans);
    if (send(pc->fd, ans, sizeof ans, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)sizeof ans) {
        record_refusal(t, pc->fd, "connection from %s (rank %d) failed while answering: %s",
                       pc->addr, rank, strerror(errno));
        drop_pending(t, i);
        return 0;
    }
    struct tcp_peer *p = &t->peers[rank];
    p->fd = pc->fd;
    sock_tune(p->fd);
    snprintf(p->where, sizeof p->where, "%s", pc->addr);
    atomic_store(&p->state, PEER_UP);
    drop_pending(t, i);
    return 1;
}

void tcp_expire_pending(struct wire_tcp *t)
{
    uint64_t now = epd_now_ns();
    for (int i = 0; i < t->npend;) {
        if (now >= t->pend[i].deadline_ns) {
            record_refusal(t, t->pend[i].fd,
                           "refused connection from %s: no complete HELLO in time (%zu of %d "
                           "bytes)",
                           t->pend[i].addr, t->pend[i].got, EP_TCP_HELLO_BYTES);
            drop_pending(t, i);
        } else {
            i++;
        }
    }
}

/* ---- connect ------------------------------------------------------------------------------ */

static void encode_blob(const struct wire_tcp *t, uint8_t *b)
{
    memset(b, 0, EP_TCP_BLOB_BYTES);
    put_u32(b, EP_TCP_MAGIC);
    put_u16(b + 4, EP_TCP_VERSION);
    put_u32(b + 8, (uint32_t)t->base.rank);
    put_u32(b + 12, (uint32_t)t->base.nranks);
    put_u64(b + 16, t->my_nonce);
    put_u64(b + 24, t->base.bytes);
    put_u32(b + 32, (uint32_t)t->port);
    memcpy(b + 40, t->host, strnlen(t->host, EP_TCP_HOST_MAX - 1));
}

static ep_status_t check_blob(struct wire_tcp *t, int i, const uint8_t *b)
{
    ep_wire_t *w = &t->base;
    if (get_u32(b) != EP_TCP_MAGIC || get_u16(b + 4) != EP_TCP_VERSION)
        return ep_wire_fail(w, i, EP_ERR_BOOTSTRAP,
                            "rank %d: endpoint of rank %d is not a tcp wire endpoint of version "
                            "%d (is every rank using the tcp transport?)",
                            w->rank, i, EP_TCP_VERSION);
    if (get_u32(b + 8) != (uint32_t)i || get_u32(b + 12) != (uint32_t)w->nranks)
        return ep_wire_fail(w, i, EP_ERR_BOOTSTRAP,
                            "rank %d: endpoint in slot %d claims rank %u of %u (this group: %d "
                            "ranks)",
                            w->rank, i, get_u32(b + 8), get_u32(b + 12), w->nranks);
    if (get_u64(b + 24) != w->bytes)
        return ep_wire_fail(w, i, EP_ERR_INVALID,
                            "rank %d: rank %d has a symmetric buffer of %llu bytes, this rank %zu "
                            "(ranks disagree on the configuration)",
                            w->rank, i, (unsigned long long)get_u64(b + 24), w->bytes);
    uint32_t port = get_u32(b + 32);
    if (port == 0 || port > 65535 || memchr(b + 40, 0, EP_TCP_HOST_MAX) == NULL || b[40] == 0)
        return ep_wire_fail(w, i, EP_ERR_BOOTSTRAP,
                            "rank %d: endpoint of rank %d has no valid host:port", w->rank, i);
    return EP_OK;
}

static ep_status_t resolve_peer(struct wire_tcp *t, int i, const uint8_t *b)
{
    struct tcp_peer *p = &t->peers[i];
    const char *host = (const char *)b + 40;
    char port[16];
    snprintf(port, sizeof port, "%u", get_u32(b + 32));
    snprintf(p->where, sizeof p->where, "%s:%s", host, port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0 || !res)
        return ep_wire_fail(&t->base, i, EP_ERR_IO, "rank %d: cannot resolve rank %d's %s: %s",
                            t->base.rank, i, p->where, gai_strerror(rc));
    memcpy(&p->addr, res->ai_addr, res->ai_addrlen);
    p->addr_len = res->ai_addrlen;
    freeaddrinfo(res);
    return EP_OK;
}

enum out_state { OUT_IDLE = 0, OUT_CONNECTING, OUT_HELLO, OUT_DONE };

struct outgoing {
    enum out_state st;
    int fd;
    uint64_t retry_at;
    uint8_t ans[EP_TCP_HELLO_BYTES];
    size_t got;
    char last_error[96];
};

static void out_retry(struct outgoing *o, const char *what, int err)
{
    if (o->fd >= 0) close(o->fd);
    o->fd = -1;
    o->st = OUT_IDLE;
    o->got = 0;
    o->retry_at = epd_now_ns() + CONNECT_RETRY_MS * 1000000ull;
    snprintf(o->last_error, sizeof o->last_error, "%s: %s", what, err ? strerror(err) : "closed");
}

/* Starts or advances the connection to higher rank i. Returns a negative status on a fatal
 * mismatch. */
static ep_status_t out_step(struct wire_tcp *t, int i, struct outgoing *o, short revents)
{
    struct tcp_peer *p = &t->peers[i];
    if (o->st == OUT_IDLE) {
        if (epd_now_ns() < o->retry_at) return EP_OK;
        o->fd = socket(p->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (o->fd < 0)
            return ep_wire_fail(&t->base, i, EP_ERR_IO, "rank %d: socket() for rank %d: %s",
                                t->base.rank, i, strerror(errno));
        sock_tune(o->fd);
        if (connect(o->fd, (struct sockaddr *)&p->addr, p->addr_len) == 0) {
            o->st = OUT_CONNECTING;
            revents = POLLOUT;
        } else if (errno == EINPROGRESS) {
            o->st = OUT_CONNECTING;
            return EP_OK;
        } else {
            out_retry(o, "connect", errno);
            return EP_OK;
        }
    }
    if (o->st == OUT_CONNECTING) {
        if (!(revents & (POLLOUT | POLLERR | POLLHUP))) return EP_OK;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(o->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            out_retry(o, "connect", err);
            return EP_OK;
        }
        uint8_t hello[EP_TCP_HELLO_BYTES];
        encode_hello(t, EP_TCP_HELLO_CONNECT, hello);
        if (send(o->fd, hello, sizeof hello, MSG_NOSIGNAL | MSG_DONTWAIT) !=
            (ssize_t)sizeof hello) {
            out_retry(o, "sending HELLO", errno);
            return EP_OK;
        }
        o->st = OUT_HELLO;
        return EP_OK;
    }
    if (o->st == OUT_HELLO && (revents & (POLLIN | POLLERR | POLLHUP))) {
        ssize_t r = recv(o->fd, o->ans + o->got, sizeof o->ans - o->got, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return EP_OK;
        if (r <= 0) {
            /* The peer refused us or is restarting its listener: try again until the deadline. */
            out_retry(o, "waiting for HELLO answer", r < 0 ? errno : 0);
            return EP_OK;
        }
        o->got += (size_t)r;
        if (o->got < sizeof o->ans) return EP_OK;
        char why[160];
        int rank;
        if (check_hello(t, o->ans, EP_TCP_HELLO_ACCEPT, i, &rank, why, sizeof why) != 0)
            return ep_wire_fail(&t->base, i, EP_ERR_PEER,
                                "rank %d: rank %d at %s answered with a bad HELLO: %s",
                                t->base.rank, i, p->where, why);
        p->fd = o->fd;
        o->fd = -1;
        o->st = OUT_DONE;
        atomic_store(&p->state, PEER_UP);
    }
    return EP_OK;
}

static ep_status_t build_mesh(struct wire_tcp *t)
{
    ep_wire_t *w = &t->base;
    int n = w->nranks, me = w->rank;
    ep_status_t st = EP_OK;
    struct outgoing *out = calloc((size_t)n, sizeof *out);
    struct pollfd *pf = calloc((size_t)(n + 1 + MAX_PENDING), sizeof *pf);
    int *who = calloc((size_t)(n + 1 + MAX_PENDING), sizeof *who);
    if (!out || !pf || !who) {
        st = ep_wire_fail(w, -1, EP_ERR_NOMEM, "rank %d: out of memory building the mesh", me);
        goto fail;
    }
    for (int i = 0; i < n; i++)
        out[i].fd = -1;

    uint64_t deadline = epd_now_ns() + (uint64_t)w->timeout_ms * 1000000ull;
    for (;;) {
        int missing = 0;
        for (int i = 0; i < n; i++)
            missing += i != me && atomic_load(&t->peers[i].state) != PEER_UP;
        if (!missing) break;
        if (epd_now_ns() >= deadline) {
            char list[160] = "";
            size_t len = 0;
            int first = -1;
            for (int i = 0; i < n && len < sizeof list - 8; i++) {
                if (i == me || atomic_load(&t->peers[i].state) == PEER_UP) continue;
                if (first < 0) first = i;
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? ", " : "", i);
            }
            char detail[400] = "";
            if (first > me)
                snprintf(detail, sizeof detail, "; toward rank %d at %s: %s", first,
                         t->peers[first].where, out[first].last_error);
            else
                snprintf(detail, sizeof detail, "; rank %d never connected to %s:%d%s%s", first,
                         t->host, t->port, t->refused ? ", last refusal: " : "",
                         t->refused ? t->refuse_why : "");
            st = ep_wire_fail(w, first, EP_ERR_TIMEOUT,
                              "rank %d: no connection with rank(s) %s within %u ms%s", me, list,
                              w->timeout_ms, detail);
            goto fail;
        }
        int k = 0;
        pf[k] = (struct pollfd){.fd = t->listen_fd, .events = POLLIN};
        who[k++] = -1;
        for (int i = 0; i < t->npend; i++) {
            pf[k] = (struct pollfd){.fd = t->pend[i].fd, .events = POLLIN};
            who[k++] = -2 - i;
        }
        int wait_ms = ms_until(deadline);
        for (int i = me + 1; i < n; i++) {
            struct outgoing *o = &out[i];
            if (o->st == OUT_IDLE) {
                if ((st = out_step(t, i, o, 0)) != EP_OK) goto fail;
                if (o->st == OUT_IDLE) {
                    int r = ms_until(o->retry_at);
                    wait_ms = r < wait_ms ? r : wait_ms;
                    continue;
                }
            }
            if (o->st == OUT_CONNECTING || o->st == OUT_HELLO) {
                pf[k] = (struct pollfd){.fd = o->fd,
                                        .events = o->st == OUT_CONNECTING ? POLLOUT : POLLIN};
                who[k++] = i;
            }
        }
        if (t->npend && wait_ms > 50) wait_ms = 50; /* pending handshakes expire */
        if (wait_ms == 0) wait_ms = 1;
        int r = poll(pf, (nfds_t)k, wait_ms);
        if (r < 0 && errno != EINTR) {
            st = ep_wire_fail(w, -1, EP_ERR_IO, "rank %d: poll while connecting: %s", me,
                              strerror(errno));
            goto fail;
        }
        int npend = t->npend;
        for (int j = 0; r > 0 && j < k; j++) {
            if (!pf[j].revents || who[j] < 0) continue;
            if ((st = out_step(t, who[j], &out[who[j]], pf[j].revents)) != EP_OK) goto fail;
        }
        for (int i = npend - 1; i >= 0; i--) {
            int s = tcp_serve_pending(t, i, 1);
            if (s < 0) {
                st = (ep_status_t)s;
                goto fail;
            }
        }
        tcp_accept_pending(t, w->timeout_ms);
        tcp_expire_pending(t);
    }
fail:
    if (out)
        for (int i = 0; i < n; i++)
            if (out[i].fd >= 0) close(out[i].fd);
    free(out);
    free(pf);
    free(who);
    return st;
}

static ep_status_t tcp_connect(ep_wire_t *w, const ep_bootstrap_t *bs, void *local, size_t bytes)
{
    struct wire_tcp *t = tcp_of(w);
    ep_status_t st;
    uint8_t *blobs = NULL;

    if (t->connected || !bs || !local || bs->rank != w->rank || bs->nranks != w->nranks)
        return ep_wire_fail(w, -1, t->connected ? EP_ERR_STATE : EP_ERR_INVALID,
                            "rank %d: tcp wire connect: %s", w->rank,
                            t->connected ? "already connected"
                                         : "bootstrap missing or for another rank/size");
    w->local = local;
    w->bytes = bytes;

    uint8_t mine[EP_TCP_BLOB_BYTES];
    encode_blob(t, mine);
    blobs = malloc((size_t)w->nranks * EP_TCP_BLOB_BYTES);
    if (!blobs) {
        st = ep_wire_fail(w, -1, EP_ERR_NOMEM, "rank %d: out of memory", w->rank);
        goto fail;
    }
    int rc = bs->allgather(bs->ctx, mine, blobs, EP_TCP_BLOB_BYTES, w->timeout_ms);
    if (rc != 0) {
        st = ep_wire_fail(w, -1, rc < 0 ? (ep_status_t)rc : EP_ERR_BOOTSTRAP,
                          "rank %d: allgather of tcp endpoints failed (status %d)", w->rank, rc);
        goto fail;
    }
    for (int i = 0; i < w->nranks; i++) {
        const uint8_t *b = blobs + (size_t)i * EP_TCP_BLOB_BYTES;
        if ((st = check_blob(t, i, b)) != EP_OK) goto fail;
        if (i > w->rank && (st = resolve_peer(t, i, b)) != EP_OK) goto fail;
    }
    t->group_nonce = get_u64(blobs + 16);
    if ((st = build_mesh(t)) != EP_OK) goto fail;

    for (int i = 0; i < w->nranks; i++) {
        struct tcp_peer *p = &t->peers[i];
        if (i == w->rank) continue;
        p->stage = malloc(RX_STAGE_BYTES);
        if (!p->stage) {
            st = ep_wire_fail(w, -1, EP_ERR_NOMEM, "rank %d: out of memory", w->rank);
            goto fail;
        }
    }
    t->connected = 1;
    if (pthread_create(&t->thread, NULL, tcp_progress_main, t) != 0) {
        t->connected = 0;
        st = ep_wire_fail(w, -1, EP_ERR_IO, "rank %d: cannot start the tcp progress thread",
                          w->rank);
        goto fail;
    }
    t->thread_started = 1;
    free(blobs);
    return EP_OK;
fail:
    free(blobs);
    return st;
}

/* ---- create / destroy --------------------------------------------------------------------- */

static int is_wildcard(const char *host)
{
    return !*host || !strcmp(host, "0.0.0.0") || !strcmp(host, "::") || !strcmp(host, "*");
}

static ep_status_t open_listener(struct wire_tcp *t, const char *host, int port)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res = NULL;
    int rc = getaddrinfo(is_wildcard(host) ? NULL : host, ps, &hints, &res);
    if (rc != 0)
        return ep_wire_fail(&t->base, -1, EP_ERR_IO, "rank %d: tcp_host '%s': %s", t->base.rank,
                            host, gai_strerror(rc));
    int err = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 128) == 0) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            getsockname(fd, (struct sockaddr *)&ss, &sl);
            t->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                     : ((struct sockaddr_in *)&ss)->sin_port);
            t->listen_fd = fd;
            break;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (t->listen_fd < 0)
        return ep_wire_fail(&t->base, -1, EP_ERR_IO, "rank %d: cannot listen on %s:%d: %s",
                            t->base.rank, host, port, strerror(err));
    /* Peers need an address they can reach: a wildcard listener advertises the host name. */
    if (is_wildcard(host)) {
        if (gethostname(t->host, sizeof t->host) != 0)
            snprintf(t->host, sizeof t->host, "localhost");
        t->host[sizeof t->host - 1] = 0;
    } else {
        snprintf(t->host, sizeof t->host, "%s", host);
    }
    return EP_OK;
}

/* Sends the BYE frame, waiting up to ms for room in the socket (its buffer may still be full
 * of the data just drained into it). */
static void send_bye(int fd, unsigned ms)
{
    uint8_t bye[EP_TCP_FRAME_BYTES] = {0};
    put_u32(bye, EP_TCP_FRAME_BYE);
    const uint64_t until = epd_now_ns() + (uint64_t)ms * 1000000ull;
    size_t sent = 0;
    while (sent < sizeof bye) {
        ssize_t r = send(fd, bye + sent, sizeof bye - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return;
        const int left = ms_until(until);
        if (left == 0) return;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        poll(&pfd, 1, left);
    }
}

static void tcp_destroy(ep_wire_t *w)
{
    struct wire_tcp *t = tcp_of(w);
    if (!t) return;
    int n = w->nranks;
    if (t->thread_started) {
        /* Orderly close: flush, say goodbye, and keep reading until every peer said goodbye
         * too, so that no unread byte turns our close into a reset that loses the peer's
         * last data. */
        atomic_store(&t->closing, 1);
        unsigned linger = w->timeout_ms < LINGER_MS ? w->timeout_ms : LINGER_MS;
        for (int i = 0; i < n; i++) {
            struct tcp_peer *p = &t->peers[i];
            /* A peer that already said goodbye gets ours too: it lingers until it does. */
            int s = atomic_load(&p->state);
            if (i == w->rank || (s != PEER_UP && s != PEER_CLOSED)) continue;
            pthread_mutex_lock(&p->tx_lock);
            if (tcp_drain_queue_blocking(t, i, linger) == EP_OK) send_bye(p->fd, linger);
            p->bye_sent = 1;
            shutdown(p->fd, SHUT_WR);
            pthread_mutex_unlock(&p->tx_lock);
        }
        uint64_t until = epd_now_ns() + (uint64_t)linger * 1000000ull;
        for (;;) {
            int open = 0;
            for (int i = 0; i < n; i++)
                open += i != w->rank && t->peers[i].fd >= 0 &&
                        atomic_load(&t->peers[i].state) == PEER_UP &&
                        !atomic_load(&t->peers[i].rx_done);
            if (!open || epd_now_ns() >= until) break;
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        atomic_store(&t->stop, 1);
        wake_progress(t);
        pthread_join(t->thread, NULL);
    }
    for (int i = 0; i < t->npend; i++)
        close(t->pend[i].fd);
    if (t->peers) {
        for (int i = 0; i < n; i++) {
            struct tcp_peer *p = &t->peers[i];
            if (p->fd >= 0) close(p->fd);
            pthread_mutex_destroy(&p->tx_lock);
            free(p->q);
            free(p->stage);
        }
        free(t->peers);
    }
    if (t->listen_fd >= 0) close(t->listen_fd);
    if (t->wake[0] >= 0) close(t->wake[0]);
    if (t->wake[1] >= 0) close(t->wake[1]);
    pthread_mutex_destroy(&t->refuse_lock);
    free(t);
}

static const struct ep_wire_ops tcp_ops = {
    .name = "tcp",
    .connect = tcp_connect,
    .put = tcp_put,
    .signal = tcp_signal,
    .flush = tcp_flush,
    .destroy = tcp_destroy,
};

const char *ep_wire_tcp_create_error(void)
{
    return ep_last_error(EP_LAST_ERROR_TCP_WIRE);
}

/* create_fail(st, fmt, ...): records this thread's tcp wire creation error, returns st. */
#define create_fail(...) ep_last_error_set(EP_LAST_ERROR_TCP_WIRE, __VA_ARGS__)

ep_status_t ep_wire_tcp_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out)
{
    if (!cfg || !out) return create_fail(EP_ERR_INVALID, "tcp wire: config or out is NULL");
    *out = NULL;
    if (nranks < 1 || nranks > EP_MAX_RANKS || rank < 0 || rank >= nranks)
        return create_fail(EP_ERR_INVALID, "tcp wire: rank %d of %d ranks (at most %d)", rank,
                           nranks, EP_MAX_RANKS);
    if (cfg->tcp_port < 0 || cfg->tcp_port > 65535)
        return create_fail(EP_ERR_INVALID, "rank %d: tcp_port %d is not 0..65535", rank,
                           cfg->tcp_port);
    const char *host = cfg->tcp_host ? cfg->tcp_host : "127.0.0.1";
    if (strlen(host) >= EP_TCP_HOST_MAX)
        return create_fail(EP_ERR_INVALID, "rank %d: tcp_host is longer than %d characters", rank,
                           EP_TCP_HOST_MAX - 1);

    ep_status_t st;
    struct wire_tcp *t = calloc(1, sizeof *t);
    if (!t) return create_fail(EP_ERR_NOMEM, "rank %d: tcp wire: out of memory", rank);
    t->base.ops = &tcp_ops;
    t->base.rank = rank;
    t->base.nranks = nranks;
    t->base.timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : TCP_DEFAULT_TIMEOUT_MS;
    atomic_init(&t->base.failed_peer, -1);
    atomic_init(&t->base.aborted, 0);
    t->listen_fd = -1;
    t->wake[0] = t->wake[1] = -1;
    pthread_mutex_init(&t->refuse_lock, NULL);

    t->peers = calloc((size_t)nranks, sizeof *t->peers);
    if (!t->peers) {
        st = create_fail(EP_ERR_NOMEM, "rank %d: tcp wire: out of memory", rank);
        goto fail;
    }
    for (int i = 0; i < nranks; i++) {
        t->peers[i].fd = -1;
        pthread_mutex_init(&t->peers[i].tx_lock, NULL);
        snprintf(t->peers[i].where, sizeof t->peers[i].where, "?");
    }
    if (pipe2(t->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        st = create_fail(EP_ERR_IO, "rank %d: tcp wire: pipe2: %s", rank, strerror(errno));
        goto fail;
    }
    if (getrandom(&t->my_nonce, sizeof t->my_nonce, 0) != (ssize_t)sizeof t->my_nonce)
        t->my_nonce = epd_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)t;
    if ((st = open_listener(t, host, cfg->tcp_port)) != EP_OK) {
        create_fail(st, "%s", t->base.error);
        goto fail;
    }
    ep_last_error_clear(EP_LAST_ERROR_TCP_WIRE);
    *out = &t->base;
    return EP_OK;
fail:
    tcp_destroy(&t->base);
    return st;
}

int ep_wire_tcp_port(const ep_wire_t *w)
{
    return ((const struct wire_tcp *)w)->port;
}

unsigned ep_wire_tcp_refused(ep_wire_t *w, char *why, size_t why_len)
{
    struct wire_tcp *t = tcp_of(w);
    pthread_mutex_lock(&t->refuse_lock);
    unsigned n = t->refused;
    if (why && why_len) snprintf(why, why_len, "%s", t->refuse_why);
    pthread_mutex_unlock(&t->refuse_lock);
    return n;
}
