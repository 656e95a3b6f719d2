/* The tcp bootstrap: ranks of separate processes exchange small blobs through rank 0 (a star of
 * TCP connections). Rank 0 listens, the others connect; allgather and barrier gather at rank 0
 * and are broadcast back. Every message carries a versioned header; every wait has a deadline.
 *
 * Message header (BS_HDR_BYTES, little-endian):
 *   0 u32 magic BS_MAGIC   4 u16 version   6 u16 type   8 u32 sequence   12 u32 payload length
 * HELLO payload: u32 rank, u32 nranks. ABORT payload: i32 status, then a message (no NUL).
 * Sequence numbers count the collectives, so ranks that call different collectives (or the
 * same one a different number of times) are told so instead of exchanging the wrong data.
 */
#define _GNU_SOURCE /* accept4 */
#include "ep.h"
#include "epd_clock.h"
#include "last_error.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BS_MAGIC 0x42545045u /* "EPTB" */
#define BS_VERSION 1
#define BS_HDR_BYTES 16
/* Largest blob one rank may contribute: the bootstrap carries endpoint tables, not data. */
#define BS_MAX_LEN (16u << 20)
#define BS_RETRY_MS 20
/* Connections at rank 0 that have not sent their HELLO yet; more at once are refused. */
#define BS_MAX_PENDING 16

enum bs_type {
    BS_HELLO = 1,
    BS_WELCOME = 2, /* rank 0 -> all: every rank is connected */
    BS_CONTRIB = 3,
    BS_RESULT = 4,
    BS_BARRIER = 5,
    BS_RELEASE = 6,
    BS_ABORT = 7,
};

struct ep_tcp_bootstrap {
    int rank;
    int nranks;
    unsigned timeout_ms;
    int listen_fd;
    int *fds;     /* rank 0: fds[r] is rank r's connection; others: fds[0] is rank 0's */
    uint32_t seq; /* collectives started so far */
    int broken;   /* a failed collective leaves the star out of step: later ones fail fast */
};

const char *ep_tcp_bootstrap_last_error(void)
{
    return ep_last_error(EP_LAST_ERROR_BOOTSTRAP);
}

/* bs_fail(st, fmt, ...): records this thread's bootstrap error, returns st. */
#define bs_fail(...) ep_last_error_set(EP_LAST_ERROR_BOOTSTRAP, __VA_ARGS__)

static uint64_t deadline_after(unsigned ms)
{
    return epd_now_ns() + (uint64_t)ms * 1000000ull;
}

/* Rank 0 gives up a little before the others, so that its verdict (which rank is missing)
 * reaches them before their own deadline passes. */
static uint64_t root_deadline_after(unsigned ms)
{
    return deadline_after(ms - ms / 5);
}

static int ms_until(uint64_t deadline)
{
    uint64_t t = epd_now_ns();
    if (t >= deadline) return 0;
    uint64_t ms = (deadline - t + 999999) / 1000000;
    return ms > 1000000 ? 1000000 : (int)ms;
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void encode_hdr(uint8_t *h, int type, uint32_t seq, uint32_t len)
{
    put_u32(h, BS_MAGIC);
    h[4] = BS_VERSION & 0xff;
    h[5] = BS_VERSION >> 8;
    h[6] = (uint8_t)type;
    h[7] = (uint8_t)(type >> 8);
    put_u32(h + 8, seq);
    put_u32(h + 12, len);
}

/* 0, or -ETIMEDOUT, -EPIPE (peer closed), -errno. */
static int write_all(int fd, const void *buf, size_t len, uint64_t deadline)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t r = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            len -= (size_t)r;
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -errno;
        int ms = ms_until(deadline);
        if (ms == 0) return -ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        poll(&pfd, 1, ms);
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len, uint64_t deadline)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t r = recv(fd, p, len, MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            len -= (size_t)r;
            continue;
        }
        if (r == 0) return -EPIPE;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -errno;
        int ms = ms_until(deadline);
        if (ms == 0) return -ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        poll(&pfd, 1, ms);
    }
    return 0;
}

static ep_status_t io_status(int err)
{
    return err == -ETIMEDOUT ? EP_ERR_TIMEOUT : EP_ERR_PEER;
}

static const char *io_what(int err)
{
    return err == -ETIMEDOUT ? "timed out" : err == -EPIPE ? "connection closed" : strerror(-err);
}

static int send_msg(int fd, int type, uint32_t seq, const void *payload, uint32_t len,
                    uint64_t deadline)
{
    uint8_t h[BS_HDR_BYTES];
    encode_hdr(h, type, seq, len);
    int r = write_all(fd, h, sizeof h, deadline);
    if (r == 0 && len) r = write_all(fd, payload, len, deadline);
    return r;
}

/* Rank 0 tells everyone still connected why the bootstrap failed. Best effort. */
static void broadcast_abort(ep_tcp_bootstrap_t *b, ep_status_t st, int skip)
{
    uint8_t msg[4 + EP_LAST_ERROR_MAX];
    const char *why = ep_last_error(EP_LAST_ERROR_BOOTSTRAP);
    size_t n = strnlen(why, EP_LAST_ERROR_MAX);
    put_u32(msg, (uint32_t)st);
    memcpy(msg + 4, why, n);
    uint64_t deadline = deadline_after(100);
    for (int r = 1; r < b->nranks; r++)
        if (r != skip && b->fds[r] >= 0)
            send_msg(b->fds[r], BS_ABORT, b->seq, msg, (uint32_t)(4 + n), deadline);
}

/* A non-zero rank reads one header from rank 0; an ABORT turns into rank 0's message. */
static ep_status_t read_from_root(ep_tcp_bootstrap_t *b, uint8_t *h, uint64_t deadline, unsigned ms,
                                  const char *what)
{
    int fd = b->fds[0];
    int r = read_all(fd, h, BS_HDR_BYTES, deadline);
    if (r < 0)
        return r == -ETIMEDOUT
                   ? bs_fail(EP_ERR_TIMEOUT, "rank %d: %s: no answer from rank 0 within %u ms",
                             b->rank, what, ms)
                   : bs_fail(EP_ERR_PEER, "rank %d: %s: rank 0 left the bootstrap (%s)", b->rank,
                             what, io_what(r));
    if (get_u32(h) != BS_MAGIC || (h[4] | h[5] << 8) != BS_VERSION)
        return bs_fail(EP_ERR_BOOTSTRAP,
                       "rank %d: %s: rank 0 sent a message with bad magic or "
                       "version",
                       b->rank, what);
    if ((h[6] | h[7] << 8) == BS_ABORT) {
        uint32_t len = get_u32(h + 12);
        uint8_t msg[4 + EP_LAST_ERROR_MAX] = {0};
        if (len < 4 || len > sizeof msg - 1 || read_all(fd, msg, len, deadline) < 0)
            return bs_fail(EP_ERR_BOOTSTRAP, "rank %d: %s: rank 0 aborted", b->rank, what);
        int st = (int)get_u32(msg);
        ep_status_t s = st < 0 && st >= EP_ERR_ABORTED ? (ep_status_t)st : EP_ERR_BOOTSTRAP;
        return bs_fail(s, "rank %d: %s: rank 0 aborted: %.*s", b->rank, what, (int)(len - 4),
                       (const char *)msg + 4);
    }
    return EP_OK;
}

/* ---- create ------------------------------------------------------------------------------- */

static int set_nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static ep_status_t root_listen(ep_tcp_bootstrap_t *b, const char *host, int port)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res = NULL;
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0)
        return bs_fail(EP_ERR_IO, "rank 0: bootstrap host '%s': %s", host, gai_strerror(rc));
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
            b->listen_fd = fd;
            break;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (b->listen_fd < 0)
        return bs_fail(EP_ERR_IO, "rank 0: cannot listen on %s:%d for the bootstrap: %s", host,
                       port, strerror(err));
    return EP_OK;
}

struct bs_pending {
    int fd;
    uint8_t buf[BS_HDR_BYTES + 8];
    size_t got;
};

/* Rank 0: accepts connections until every rank sent a valid HELLO. Connections that are not
 * bootstrap peers of this world (garbage, wrong size, a rank twice) are closed. */
static ep_status_t root_gather(ep_tcp_bootstrap_t *b, uint64_t deadline)
{
    struct bs_pending pend[BS_MAX_PENDING];
    int npend = 0, joined = 0;
    ep_status_t st = EP_OK;

    while (joined < b->nranks - 1) {
        int ms = ms_until(deadline);
        if (ms == 0) {
            char list[160] = "";
            size_t len = 0;
            for (int r = 1; r < b->nranks && len < sizeof list - 8; r++)
                if (b->fds[r] < 0)
                    len +=
                        (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? ", " : "", r);
            st = bs_fail(EP_ERR_TIMEOUT,
                         "rank 0: rank(s) %s did not join the bootstrap within %u ms", list,
                         b->timeout_ms);
            broadcast_abort(b, st, -1);
            goto out;
        }
        struct pollfd pf[BS_MAX_PENDING + 1];
        pf[0] = (struct pollfd){.fd = b->listen_fd, .events = POLLIN};
        for (int i = 0; i < npend; i++)
            pf[i + 1] = (struct pollfd){.fd = pend[i].fd, .events = POLLIN};
        if (poll(pf, (nfds_t)(npend + 1), ms) < 0 && errno != EINTR) {
            st = bs_fail(EP_ERR_IO, "rank 0: bootstrap poll: %s", strerror(errno));
            goto out;
        }
        for (int i = npend - 1; i >= 0; i--) {
            if (!pf[i + 1].revents) continue;
            struct bs_pending *p = &pend[i];
            ssize_t r = recv(p->fd, p->buf + p->got, sizeof p->buf - p->got, MSG_DONTWAIT);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            int ok = r > 0;
            if (ok) {
                p->got += (size_t)r;
                if (p->got < sizeof p->buf) continue;
                uint32_t rank = get_u32(p->buf + BS_HDR_BYTES);
                uint32_t n = get_u32(p->buf + BS_HDR_BYTES + 4);
                ok = get_u32(p->buf) == BS_MAGIC && (p->buf[4] | p->buf[5] << 8) == BS_VERSION &&
                     (p->buf[6] | p->buf[7] << 8) == BS_HELLO && get_u32(p->buf + 12) == 8 &&
                     n == (uint32_t)b->nranks && rank >= 1 && rank < (uint32_t)b->nranks &&
                     b->fds[rank] < 0;
                if (ok) {
                    b->fds[rank] = p->fd;
                    joined++;
                }
            }
            if (!ok) close(p->fd); /* not a rank of this world: refused */
            pend[i] = pend[--npend];
        }
        if (pf[0].revents) {
            for (;;) {
                int fd = accept4(b->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                if (npend == BS_MAX_PENDING) {
                    close(fd);
                    continue;
                }
                set_nodelay(fd);
                pend[npend++] = (struct bs_pending){.fd = fd};
            }
        }
    }
    for (int r = 1; r < b->nranks; r++) {
        int e = send_msg(b->fds[r], BS_WELCOME, 0, NULL, 0, deadline_after(b->timeout_ms));
        if (e < 0) {
            st = bs_fail(EP_ERR_PEER, "rank 0: rank %d left the bootstrap while joining (%s)", r,
                         io_what(e));
            broadcast_abort(b, st, r);
            goto out;
        }
    }
out:
    for (int i = 0; i < npend; i++)
        close(pend[i].fd);
    return st;
}

static ep_status_t leaf_join(ep_tcp_bootstrap_t *b, const char *host, int port, uint64_t deadline)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0 || !res)
        return bs_fail(EP_ERR_IO, "rank %d: bootstrap host '%s': %s", b->rank, host,
                       gai_strerror(rc));
    int last_err = 0;
    int fd = -1;
    /* Rank 0 may not be listening yet: retry refused connections until the deadline. */
    while (fd < 0) {
        fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            last_err = errno;
            break;
        }
        int err = 0;
        if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
            err = errno;
            if (err == EINPROGRESS) {
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                err = ETIMEDOUT;
                if (poll(&pfd, 1, ms_until(deadline)) > 0) {
                    socklen_t el = sizeof err;
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
                }
            }
        }
        if (err == 0) break;
        last_err = err;
        close(fd);
        fd = -1;
        if (ms_until(deadline) == 0) break;
        struct timespec ts = {0, BS_RETRY_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    freeaddrinfo(res);
    if (fd < 0)
        return bs_fail(EP_ERR_TIMEOUT,
                       "rank %d: rank 0 did not accept the bootstrap connection at %s:%d within "
                       "%u ms (%s)",
                       b->rank, host, port, b->timeout_ms, strerror(last_err));
    set_nodelay(fd);
    b->fds[0] = fd;

    uint8_t hello[8];
    put_u32(hello, (uint32_t)b->rank);
    put_u32(hello + 4, (uint32_t)b->nranks);
    int e = send_msg(fd, BS_HELLO, 0, hello, sizeof hello, deadline);
    if (e < 0)
        return bs_fail(io_status(e), "rank %d: sending the bootstrap HELLO to rank 0: %s", b->rank,
                       io_what(e));
    uint8_t h[BS_HDR_BYTES];
    ep_status_t st = read_from_root(b, h, deadline, b->timeout_ms,
                                    "joining the bootstrap (rank 0 waits for every rank)");
    if (st != EP_OK) {
        return st;
    }
    if ((h[6] | h[7] << 8) != BS_WELCOME || get_u32(h + 12) != 0)
        return bs_fail(EP_ERR_BOOTSTRAP, "rank %d: rank 0 answered the HELLO with message type %d",
                       b->rank, h[6] | h[7] << 8);
    return EP_OK;
}

ep_status_t ep_tcp_bootstrap_create(const char *host, int port, int rank, int nranks,
                                    unsigned timeout_ms, ep_tcp_bootstrap_t **out)
{
    if (!out) return bs_fail(EP_ERR_INVALID, "ep_tcp_bootstrap_create: out is NULL");
    *out = NULL;
    if (nranks < 1 || nranks > EP_MAX_RANKS || rank < 0 || rank >= nranks)
        return bs_fail(EP_ERR_INVALID, "ep_tcp_bootstrap_create: rank %d of %d ranks is invalid",
                       rank, nranks);
    if (port <= 0 || port > 65535)
        return bs_fail(EP_ERR_INVALID, "ep_tcp_bootstrap_create: port %d is not 1..65535", port);
    if (!host) host = "127.0.0.1";
    if (!timeout_ms) timeout_ms = 10000;

    ep_status_t st = EP_ERR_NOMEM;
    ep_tcp_bootstrap_t *b = calloc(1, sizeof *b);
    if (!b) return bs_fail(st, "rank %d: out of memory", rank);
    b->rank = rank;
    b->nranks = nranks;
    b->timeout_ms = timeout_ms;
    b->listen_fd = -1;
    b->fds = malloc((size_t)nranks * sizeof *b->fds);
    if (!b->fds) {
        st = bs_fail(st, "rank %d: out of memory", rank);
        goto fail;
    }
    for (int r = 0; r < nranks; r++)
        b->fds[r] = -1;

    uint64_t deadline = rank == 0 ? root_deadline_after(timeout_ms) : deadline_after(timeout_ms);
    if (rank == 0) {
        if ((st = root_listen(b, host, port)) != EP_OK) goto fail;
        if ((st = root_gather(b, deadline)) != EP_OK) goto fail;
        /* Late or stray connections after this point are refused by the closed listener. */
        close(b->listen_fd);
        b->listen_fd = -1;
    } else if ((st = leaf_join(b, host, port, deadline)) != EP_OK) {
        goto fail;
    }
    ep_last_error_clear(EP_LAST_ERROR_BOOTSTRAP);
    *out = b;
    return EP_OK;
fail:
    ep_tcp_bootstrap_destroy(b);
    return st;
}

void ep_tcp_bootstrap_destroy(ep_tcp_bootstrap_t *b)
{
    if (!b) return;
    if (b->fds)
        for (int r = 0; r < b->nranks; r++) {
            if (b->fds[r] < 0) continue;
            /* Closing with unread input resets the connection, and a reset can destroy what
             * the peer has not read yet (an ABORT with the reason): read it away first. */
            char junk[4096];
            shutdown(b->fds[r], SHUT_WR);
            while (recv(b->fds[r], junk, sizeof junk, MSG_DONTWAIT) > 0) {
            }
            close(b->fds[r]);
        }
    if (b->listen_fd >= 0) close(b->listen_fd);
    free(b->fds);
    free(b);
}

/* ---- collectives -------------------------------------------------------------------------- */

static const char *coll_name(int type)
{
    return type == BS_CONTRIB ? "allgather" : "barrier";
}

/* Gathers len bytes from every rank at rank 0 and sends the whole table back. type is
 * BS_CONTRIB (answered by BS_RESULT) or BS_BARRIER (BS_RELEASE, len 0). */
static ep_status_t collective(ep_tcp_bootstrap_t *b, int type, const void *in, void *out,
                              size_t len, unsigned timeout_ms)
{
    const int reply = type == BS_CONTRIB ? BS_RESULT : BS_RELEASE;
    const char *name = coll_name(type);
    uint32_t seq = ++b->seq;
    if (!timeout_ms) timeout_ms = b->timeout_ms;
    uint64_t deadline = b->rank == 0 ? root_deadline_after(timeout_ms) : deadline_after(timeout_ms);
    size_t total = len * (size_t)b->nranks;
    ep_status_t st;

    if (b->broken)
        return bs_fail(EP_ERR_STATE, "rank %d: %s #%u: an earlier bootstrap call failed", b->rank,
                       name, seq);
    if (len > BS_MAX_LEN || (len && (!in || !out)))
        return bs_fail(EP_ERR_INVALID, "rank %d: %s #%u of %zu bytes per rank (at most %u)",
                       b->rank, name, seq, len, BS_MAX_LEN);
    if (len) memcpy((uint8_t *)out + (size_t)b->rank * len, in, len);
    if (b->nranks == 1) return EP_OK;

    if (b->rank != 0) {
        int e = send_msg(b->fds[0], type, seq, in, (uint32_t)len, deadline);
        if (e < 0) {
            st = bs_fail(io_status(e), "rank %d: %s #%u: sending to rank 0: %s", b->rank, name, seq,
                         io_what(e));
            /* Rank 0 may have given up on this collective already: its reason says more. */
            uint8_t h[BS_HDR_BYTES];
            char what[48];
            snprintf(what, sizeof what, "%s #%u", name, seq);
            if (e != -ETIMEDOUT) {
                ep_status_t why = read_from_root(b, h, deadline_after(100), timeout_ms, what);
                if (why == EP_OK)
                    bs_fail(st, "rank %d: %s #%u: sending to rank 0: %s", b->rank, name, seq,
                            io_what(e));
                else
                    st = why;
            }
            goto fail;
        }
        uint8_t h[BS_HDR_BYTES];
        char what[48];
        snprintf(what, sizeof what, "%s #%u", name, seq);
        if ((st = read_from_root(b, h, deadline, timeout_ms, what)) != EP_OK) goto fail;
        if ((h[6] | h[7] << 8) != reply || get_u32(h + 8) != seq || get_u32(h + 12) != total) {
            st = bs_fail(EP_ERR_BOOTSTRAP,
                         "rank %d: %s #%u: rank 0 answered with type %d, sequence %u, %u bytes",
                         b->rank, name, seq, h[6] | h[7] << 8, get_u32(h + 8), get_u32(h + 12));
            goto fail;
        }
        e = total ? read_all(b->fds[0], out, total, deadline) : 0;
        if (e < 0) {
            st = bs_fail(io_status(e), "rank %d: %s #%u: receiving the result from rank 0: %s",
                         b->rank, name, seq, io_what(e));
            goto fail;
        }
        return EP_OK;
    }

    for (int r = 1; r < b->nranks; r++) {
        uint8_t h[BS_HDR_BYTES];
        int e = read_all(b->fds[r], h, sizeof h, deadline);
        if (e < 0) {
            if (e == -ETIMEDOUT)
                st = bs_fail(EP_ERR_TIMEOUT,
                             "rank 0: %s #%u: rank %d did not take part within %u ms", name, seq, r,
                             timeout_ms);
            else
                st = bs_fail(EP_ERR_PEER, "rank 0: %s #%u: rank %d left the bootstrap (%s)", name,
                             seq, r, io_what(e));
            broadcast_abort(b, st, r);
            goto fail;
        }
        int got_type = h[6] | h[7] << 8;
        if (get_u32(h) != BS_MAGIC || (h[4] | h[5] << 8) != BS_VERSION || got_type != type ||
            get_u32(h + 8) != seq || get_u32(h + 12) != len) {
            st = bs_fail(EP_ERR_BOOTSTRAP,
                         "rank 0: %s #%u: rank %d sent %s #%u of %u bytes (expected %zu): ranks "
                         "called different bootstrap collectives",
                         name, seq, r,
                         got_type == BS_CONTRIB   ? "allgather"
                         : got_type == BS_BARRIER ? "barrier"
                                                  : "an unknown message",
                         get_u32(h + 8), get_u32(h + 12), len);
            broadcast_abort(b, st, -1);
            goto fail;
        }
        e = len ? read_all(b->fds[r], (uint8_t *)out + (size_t)r * len, len, deadline) : 0;
        if (e < 0) {
            st = bs_fail(io_status(e), "rank 0: %s #%u: receiving rank %d's %zu bytes: %s", name,
                         seq, r, len, io_what(e));
            broadcast_abort(b, st, r);
            goto fail;
        }
    }
    for (int r = 1; r < b->nranks; r++) {
        int e = send_msg(b->fds[r], reply, seq, out, (uint32_t)total, deadline);
        if (e < 0) {
            st = bs_fail(io_status(e), "rank 0: %s #%u: sending the result to rank %d: %s", name,
                         seq, r, io_what(e));
            broadcast_abort(b, st, r);
            goto fail;
        }
    }
    return EP_OK;
fail:
    b->broken = 1;
    return st;
}

static int bs_allgather(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms)
{
    return collective(ctx, BS_CONTRIB, in, out, len, timeout_ms);
}

static int bs_barrier(void *ctx, unsigned timeout_ms)
{
    return collective(ctx, BS_BARRIER, NULL, NULL, 0, timeout_ms);
}

void ep_tcp_bootstrap_get(ep_tcp_bootstrap_t *b, ep_bootstrap_t *out)
{
    out->rank = b->rank;
    out->nranks = b->nranks;
    out->ctx = b;
    out->allgather = bs_allgather;
    out->barrier = bs_barrier;
}
