/* The tcp wire: one-sided put + signal between ranks of separate processes over a full mesh of
 * TCP connections, with one progress thread per wire that receives frames and drains send
 * queues. Byte formats are in wire_tcp.h.
 *
 * Sends: put() and signal() write straight to the socket (header + payload in one sendmsg, no
 * copy) under the peer's send lock; whatever the socket does not take is copied into a bounded
 * per-peer queue that the progress thread drains. A put whose unsent tail is larger than the
 * queue's free space blocks the caller until it fits, so memory stays bounded and large puts
 * stream without an extra copy. Receives: small frames come through a staging buffer, large
 * put payloads are received straight into the symmetric buffer.
 */
#define _GNU_SOURCE /* accept4, pipe2 */
#include "wire_tcp.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define TCP_DEFAULT_TIMEOUT_MS 10000u
/* Per-peer send queue: small frames return at once; bounded so that a slow peer cannot make
 * a rank buffer without limit. Allocated on first use. */
#define TX_QUEUE_BYTES (4u << 20)
/* Puts of at most COALESCE_MAX bytes are gathered in the queue and leave with the next signal
 * (or once COALESCE_FLUSH bytes are gathered, or at flush, or when the progress thread next
 * looks): a receiver only looks at data after a signal, and LL ops issue many small puts per
 * signal, so this turns one system call per put into one per signal. */
#define COALESCE_MAX 4096u
#define COALESCE_FLUSH (256u << 10)
/* Receive staging buffer per peer; payload remainders of at least DIRECT_RECV_MIN bytes are
 * received straight into the symmetric buffer instead. */
#define RX_STAGE_BYTES (64u << 10)
#define DIRECT_RECV_MIN (16u << 10)
/* Reads per peer per progress-loop turn, so that one busy peer cannot starve the others. */
#define RX_TURNS 32
#define CONNECT_RETRY_MS 20u
/* Incoming connections waiting for their HELLO; more at once are refused at accept. */
#define MAX_PENDING 16
/* How long a late connection (after the mesh is complete) may take to send its HELLO. */
#define LATE_HELLO_MS 2000u
/* destroy(): how long to wait for queued bytes to leave and for the peers' goodbyes. */
#define LINGER_MS 2000u
#define PROGRESS_POLL_MS 100

enum peer_state { PEER_DOWN = 0, PEER_UP, PEER_CLOSED, PEER_FAILED };

struct tcp_peer {
    int fd;
    _Atomic int state;
    struct sockaddr_storage addr; /* where its listener is (higher ranks only) */
    socklen_t addr_len;
    char where[EP_TCP_HOST_MAX + 8];

    /* send side, under tx_lock */
    pthread_mutex_t tx_lock;
    uint8_t *q; /* ring of bytes not yet taken by the socket */
    size_t q_cap, q_head, q_len;
    _Atomic int tx_pending;
    int bye_sent;

    /* receive side, progress thread only */
    uint8_t *stage;
    size_t st_pos, st_len;
    uint8_t hdr[EP_TCP_FRAME_BYTES];
    size_t hdr_got;
    uint8_t *dst;
    uint64_t pay_left;
    uint64_t rx_bytes;    /* stream bytes consumed from this peer */
    uint64_t frame_start; /* stream byte where the current frame began */
    uint32_t frame_type;
    _Atomic int bye_rx;
    _Atomic int rx_done; /* end of stream seen or receive side failed */
};

struct pending_conn {
    int fd;
    uint8_t buf[EP_TCP_HELLO_BYTES];
    size_t got;
    uint64_t deadline_ns;
    char addr[64];
};

struct wire_tcp {
    ep_wire_t base;
    int listen_fd;
    int port;
    char host[EP_TCP_HOST_MAX]; /* advertised to the peers */
    uint64_t my_nonce;
    uint64_t group_nonce;
    struct tcp_peer *peers;
    int wake[2];
    pthread_t thread;
    int thread_started;
    int connected;
    _Atomic int stop;
    _Atomic int closing;
    pthread_mutex_t refuse_lock;
    unsigned refused;
    char refuse_why[256];
    struct pending_conn pend[MAX_PENDING]; /* connect phase, then the progress thread */
    int npend;
};

/* ---- small helpers ------------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int ms_until(uint64_t deadline)
{
    uint64_t t = now_ns();
    if (t >= deadline) return 0;
    uint64_t ms = (deadline - t + 999999) / 1000000;
    return ms > 1000000 ? 1000000 : (int)ms;
}

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static struct wire_tcp *tcp_of(ep_wire_t *w)
{
    return (struct wire_tcp *)w;
}

static void wake_progress(struct wire_tcp *t)
{
    char c = 1;
    ssize_t n = write(t->wake[1], &c, 1);
    (void)n; /* a full pipe already holds a wakeup */
}

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

/* ---- send side ---------------------------------------------------------------------------- */

static void peer_failed(struct wire_tcp *t, int peer)
{
    struct tcp_peer *p = &t->peers[peer];
    atomic_store(&p->state, PEER_FAILED);
    /* The fd stays open until destroy so that a concurrent sender never writes to a reused
     * descriptor; shutdown wakes anyone blocked on it. */
    shutdown(p->fd, SHUT_RDWR);
}

/* Sends bytes [off, hlen + plen) of header ++ payload without blocking. Returns the count sent
 * (0 when the socket is full) or -errno. */
static ssize_t send_nb(int fd, const uint8_t *hdr, size_t hlen, const uint8_t *pay, size_t plen,
                       size_t off)
{
    struct iovec iov[2];
    int n = 0;
    if (off < hlen) {
        iov[n].iov_base = (void *)(hdr + off);
        iov[n++].iov_len = hlen - off;
        off = 0;
    } else {
        off -= hlen;
    }
    if (plen > off) {
        iov[n].iov_base = (void *)(pay + off);
        iov[n++].iov_len = plen - off;
    }
    if (n == 0) return 0;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    for (;;) {
        ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        return -errno;
    }
}

/* Sends what the socket takes from the queue. Caller holds tx_lock. Returns bytes sent or
 * -errno. */
static ssize_t queue_drain_nb(struct tcp_peer *p)
{
    if (p->q_len == 0) return 0;
    size_t first = p->q_cap - p->q_head;
    if (first > p->q_len) first = p->q_len;
    ssize_t r = send_nb(p->fd, p->q + p->q_head, first, p->q, p->q_len - first, 0);
    if (r > 0) {
        p->q_head = (p->q_head + (size_t)r) % p->q_cap;
        p->q_len -= (size_t)r;
        if (p->q_len == 0) p->q_head = 0;
    }
    return r;
}

static void queue_push(struct tcp_peer *p, const uint8_t *src, size_t n)
{
    if (n == 0) return;
    size_t tail = (p->q_head + p->q_len) % p->q_cap;
    size_t first = p->q_cap - tail;
    if (first > n) first = n;
    memcpy(p->q + tail, src, first);
    memcpy(p->q, src + first, n - first);
    p->q_len += n;
}

static ep_status_t send_error(struct wire_tcp *t, int peer, ssize_t err)
{
    ep_status_t st =
        ep_wire_fail(&t->base, peer, EP_ERR_PEER, "rank %d: sending to rank %d (%s) failed: %s",
                     t->base.rank, peer, t->peers[peer].where, strerror((int)-err));
    peer_failed(t, peer);
    return st;
}

static ep_status_t peer_unusable(struct wire_tcp *t, int peer)
{
    int s = atomic_load(&t->peers[peer].state);
    if (s == PEER_UP) return EP_OK;
    if (s == PEER_CLOSED || atomic_load(&t->peers[peer].bye_rx))
        return ep_wire_fail(&t->base, peer, EP_ERR_PEER,
                            "rank %d: rank %d has closed its wire; nothing more can be sent to it",
                            t->base.rank, peer);
    return EP_ERR_PEER; /* the failure was recorded when it happened */
}

/* Sends one frame (header + payload) to peer, in order with every earlier frame to it. */
static ep_status_t tx_frame(struct wire_tcp *t, int peer, const uint8_t *hdr, const uint8_t *pay,
                            size_t plen)
{
    struct tcp_peer *p = &t->peers[peer];
    const size_t hlen = EP_TCP_FRAME_BYTES;
    const size_t total = hlen + plen;
    ep_status_t st = EP_OK;
    size_t sent = 0;

    pthread_mutex_lock(&p->tx_lock);
    if ((st = peer_unusable(t, peer)) != EP_OK || p->bye_sent) {
        if (st == EP_OK) st = EP_ERR_STATE;
        goto out;
    }
    if (plen <= COALESCE_MAX) {
        if (!p->q) {
            p->q = malloc(TX_QUEUE_BYTES);
            p->q_cap = p->q ? TX_QUEUE_BYTES : 0;
        }
        if (p->q && total <= p->q_cap - p->q_len) {
            queue_push(p, hdr, hlen);
            queue_push(p, pay, plen);
            if (get_u32(hdr) == EP_TCP_FRAME_SIGNAL || p->q_len >= COALESCE_FLUSH) {
                ssize_t r = queue_drain_nb(p);
                if (r < 0) {
                    st = send_error(t, peer, r);
                    goto out;
                }
                /* Whatever the socket did not take, the progress thread sends. */
                if (p->q_len && !atomic_exchange(&p->tx_pending, 1)) wake_progress(t);
            } else {
                atomic_store(&p->tx_pending, 1); /* picked up at the next poll at the latest */
            }
            goto out;
        }
    }
    uint64_t deadline = now_ns() + (uint64_t)t->base.timeout_ms * 1000000ull;
    for (;;) {
        int progressed = 0;
        if (p->q_len) {
            ssize_t r = queue_drain_nb(p);
            if (r < 0) {
                st = send_error(t, peer, r);
                goto out;
            }
            progressed |= r > 0;
        }
        if (!p->q_len && sent < total) {
            ssize_t r = send_nb(p->fd, hdr, hlen, pay, plen, sent);
            if (r < 0) {
                st = send_error(t, peer, r);
                goto out;
            }
            sent += (size_t)r;
            progressed |= r > 0;
        }
        size_t left = total - sent;
        if (left == 0 || (p->q && left <= p->q_cap - p->q_len)) break;
        if (!p->q) {
            /* Allocated on first need; without memory the caller simply waits for the socket. */
            p->q = malloc(TX_QUEUE_BYTES);
            p->q_cap = p->q ? TX_QUEUE_BYTES : 0;
        }
        if (progressed) {
            deadline = now_ns() + (uint64_t)t->base.timeout_ms * 1000000ull;
            continue;
        }
        struct pollfd pfd = {.fd = p->fd, .events = POLLOUT};
        int ms = ms_until(deadline);
        if (ms == 0) {
            st = ep_wire_fail(&t->base, peer, EP_ERR_TIMEOUT,
                              "rank %d: rank %d (%s) took no data for %u ms (%zu bytes of a "
                              "%zu-byte frame still to send)",
                              t->base.rank, peer, p->where, t->base.timeout_ms, left, total);
            peer_failed(t, peer); /* a half-sent frame leaves the stream unusable */
            goto out;
        }
        if (poll(&pfd, 1, ms) < 0 && errno != EINTR) {
            st = send_error(t, peer, -errno);
            goto out;
        }
        if ((st = peer_unusable(t, peer)) != EP_OK) goto out;
    }
    if (sent < total) {
        if (sent < hlen) {
            queue_push(p, hdr + sent, hlen - sent);
            queue_push(p, pay, plen);
        } else {
            queue_push(p, pay + (sent - hlen), total - sent);
        }
        if (!atomic_exchange(&p->tx_pending, 1)) wake_progress(t);
    }
out:
    pthread_mutex_unlock(&p->tx_lock);
    return st;
}

static ep_status_t tcp_put(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len)
{
    struct wire_tcp *t = tcp_of(w);
    if (peer < 0 || peer >= w->nranks || remote_off > w->bytes || len > w->bytes - remote_off ||
        (len && !src))
        return EP_ERR_INVALID;
    if (!t->connected) return EP_ERR_STATE;
    if (peer == w->rank) {
        memmove(w->local + remote_off, src, len);
        return EP_OK;
    }
    if (len == 0) return EP_OK;
    uint8_t hdr[EP_TCP_FRAME_BYTES];
    put_u32(hdr, EP_TCP_FRAME_PUT);
    put_u32(hdr + 4, 0);
    put_u64(hdr + 8, remote_off);
    put_u64(hdr + 16, len);
    return tx_frame(t, peer, hdr, src, len);
}

static void apply_signal(uint8_t *word, uint64_t value, ep_signal_op_t op)
{
    _Atomic uint64_t *a = (_Atomic uint64_t *)word;
    if (op == EP_SIGNAL_ADD)
        atomic_fetch_add_explicit(a, value, memory_order_release);
    else
        atomic_store_explicit(a, value, memory_order_release);
}

static ep_status_t tcp_signal(ep_wire_t *w, int peer, size_t remote_off, uint64_t value,
                              ep_signal_op_t op)
{
    struct wire_tcp *t = tcp_of(w);
    if (peer < 0 || peer >= w->nranks || remote_off % 8 || w->bytes < 8 ||
        remote_off > w->bytes - 8 || (op != EP_SIGNAL_SET && op != EP_SIGNAL_ADD))
        return EP_ERR_INVALID;
    if (!t->connected) return EP_ERR_STATE;
    if (peer == w->rank) {
        apply_signal(w->local + remote_off, value, op);
        return EP_OK;
    }
    uint8_t hdr[EP_TCP_FRAME_BYTES];
    put_u32(hdr, EP_TCP_FRAME_SIGNAL);
    put_u32(hdr + 4, (uint32_t)op);
    put_u64(hdr + 8, remote_off);
    put_u64(hdr + 16, value);
    return tx_frame(t, peer, hdr, NULL, 0);
}

/* Waits until peer's queue is on the socket. Caller holds tx_lock. */
static ep_status_t drain_queue_blocking(struct wire_tcp *t, int peer, unsigned timeout_ms)
{
    struct tcp_peer *p = &t->peers[peer];
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (p->q_len) {
        ep_status_t st = peer_unusable(t, peer);
        if (st != EP_OK) return st;
        ssize_t r = queue_drain_nb(p);
        if (r < 0) return send_error(t, peer, r);
        if (r > 0) {
            deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
            continue;
        }
        int ms = ms_until(deadline);
        if (ms == 0)
            return ep_wire_fail(&t->base, peer, EP_ERR_TIMEOUT,
                                "rank %d: rank %d (%s) took none of %zu queued bytes for %u ms",
                                t->base.rank, peer, p->where, p->q_len, timeout_ms);
        struct pollfd pfd = {.fd = p->fd, .events = POLLOUT};
        if (poll(&pfd, 1, ms) < 0 && errno != EINTR) return send_error(t, peer, -errno);
    }
    atomic_store(&p->tx_pending, 0);
    return EP_OK;
}

static ep_status_t tcp_flush(ep_wire_t *w)
{
    struct wire_tcp *t = tcp_of(w);
    ep_status_t first = EP_OK;
    if (!t->connected) return EP_OK;
    for (int i = 0; i < w->nranks; i++) {
        if (i == w->rank) continue;
        struct tcp_peer *p = &t->peers[i];
        pthread_mutex_lock(&p->tx_lock);
        ep_status_t st = EP_OK;
        if (p->q_len)
            st = drain_queue_blocking(t, i, w->timeout_ms);
        else if (atomic_load(&p->state) == PEER_FAILED)
            st = EP_ERR_PEER;
        pthread_mutex_unlock(&p->tx_lock);
        if (st != EP_OK && first == EP_OK) first = st;
    }
    return first;
}

/* ---- receive side (progress thread) ------------------------------------------------------- */

static const char *frame_name(uint32_t type)
{
    switch (type) {
    case EP_TCP_FRAME_PUT:
        return "PUT";
    case EP_TCP_FRAME_SIGNAL:
        return "SIGNAL";
    case EP_TCP_FRAME_BYE:
        return "BYE";
    default:
        return "unknown";
    }
}

static int rx_fail(struct wire_tcp *t, int peer, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records a receive failure of peer (the message gets the rank prefix) and stops reading it. */
static int rx_fail(struct wire_tcp *t, int peer, const char *fmt, ...)
{
    char detail[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    ep_wire_fail(&t->base, peer, EP_ERR_PEER, "rank %d: from rank %d: %s", t->base.rank, peer,
                 detail);
    atomic_store(&t->peers[peer].rx_done, 1);
    peer_failed(t, peer);
    return -1;
}

/* Validates and applies the header in p->hdr. */
static int rx_header(struct wire_tcp *t, int peer)
{
    struct tcp_peer *p = &t->peers[peer];
    uint32_t type = get_u32(p->hdr);
    uint32_t op = get_u32(p->hdr + 4);
    uint64_t off = get_u64(p->hdr + 8);
    uint64_t arg = get_u64(p->hdr + 16);
    uint64_t at = p->frame_start;
    size_t bytes = t->base.bytes;

    p->frame_type = type;
    if (atomic_load(&p->bye_rx))
        return rx_fail(t, peer, "%s frame at stream byte %llu after its goodbye", frame_name(type),
                       (unsigned long long)at);
    switch (type) {
    case EP_TCP_FRAME_PUT:
        if (op != 0)
            return rx_fail(t, peer, "PUT frame at stream byte %llu has op %u (must be 0)",
                           (unsigned long long)at, op);
        if (off > bytes || arg > bytes - off)
            return rx_fail(t, peer,
                           "PUT frame at stream byte %llu writes %llu bytes at offset %llu, "
                           "outside the %zu-byte buffer",
                           (unsigned long long)at, (unsigned long long)arg, (unsigned long long)off,
                           bytes);
        p->dst = t->base.local + off;
        p->pay_left = arg;
        return 0;
    case EP_TCP_FRAME_SIGNAL:
        if (op != EP_SIGNAL_SET && op != EP_SIGNAL_ADD)
            return rx_fail(t, peer, "SIGNAL frame at stream byte %llu has unknown op %u",
                           (unsigned long long)at, op);
        if (off % 8)
            return rx_fail(t, peer,
                           "SIGNAL frame at stream byte %llu targets offset %llu, not 8-byte "
                           "aligned",
                           (unsigned long long)at, (unsigned long long)off);
        if (bytes < 8 || off > bytes - 8)
            return rx_fail(t, peer,
                           "SIGNAL frame at stream byte %llu targets offset %llu, outside the "
                           "%zu-byte buffer",
                           (unsigned long long)at, (unsigned long long)off, bytes);
        apply_signal(t->base.local + off, arg, (ep_signal_op_t)op);
        return 0;
    case EP_TCP_FRAME_BYE:
        if (op != 0 || off != 0 || arg != 0)
            return rx_fail(t, peer, "BYE frame at stream byte %llu has non-zero fields",
                           (unsigned long long)at);
        atomic_store(&p->bye_rx, 1);
        return 0;
    default:
        return rx_fail(t, peer, "unknown frame type %u at stream byte %llu", type,
                       (unsigned long long)at);
    }
}

/* Consumes the staged bytes. */
static int rx_parse(struct wire_tcp *t, int peer)
{
    struct tcp_peer *p = &t->peers[peer];
    while (p->st_pos < p->st_len) {
        size_t avail = p->st_len - p->st_pos;
        if (p->pay_left) {
            size_t k = avail < p->pay_left ? avail : (size_t)p->pay_left;
            memcpy(p->dst, p->stage + p->st_pos, k);
            p->dst += k;
            p->pay_left -= k;
            p->st_pos += k;
            p->rx_bytes += k;
            continue;
        }
        if (p->hdr_got == 0) p->frame_start = p->rx_bytes;
        size_t k = EP_TCP_FRAME_BYTES - p->hdr_got;
        if (k > avail) k = avail;
        memcpy(p->hdr + p->hdr_got, p->stage + p->st_pos, k);
        p->hdr_got += k;
        p->st_pos += k;
        p->rx_bytes += k;
        if (p->hdr_got < EP_TCP_FRAME_BYTES) break;
        p->hdr_got = 0;
        if (rx_header(t, peer) < 0) return -1;
    }
    return 0;
}

static int rx_end(struct wire_tcp *t, int peer, ssize_t r)
{
    struct tcp_peer *p = &t->peers[peer];
    if (r < 0)
        return rx_fail(t, peer, "receive failed at stream byte %llu: %s",
                       (unsigned long long)p->rx_bytes, strerror((int)-r));
    if (p->hdr_got || p->pay_left)
        return rx_fail(
            t, peer,
            "connection closed mid-frame at stream byte %llu (%s frame begun at byte "
            "%llu is short by %llu bytes)",
            (unsigned long long)p->rx_bytes, p->hdr_got ? "a" : frame_name(p->frame_type),
            (unsigned long long)p->frame_start,
            (unsigned long long)(p->hdr_got ? EP_TCP_FRAME_BYTES - p->hdr_got : p->pay_left));
    if (!atomic_load(&p->bye_rx) && !atomic_load(&t->closing))
        return rx_fail(t, peer, "connection closed without goodbye at stream byte %llu",
                       (unsigned long long)p->rx_bytes);
    atomic_store(&p->rx_done, 1);
    if (atomic_load(&p->bye_rx)) {
        int up = PEER_UP;
        atomic_compare_exchange_strong(&p->state, &up, PEER_CLOSED);
    }
    return -1;
}

static void rx_peer(struct wire_tcp *t, int peer)
{
    struct tcp_peer *p = &t->peers[peer];
    for (int turn = 0; turn < RX_TURNS; turn++) {
        ssize_t r;
        if (p->st_pos == p->st_len && p->pay_left >= DIRECT_RECV_MIN) {
            size_t want = p->pay_left > (1u << 30) ? (1u << 30) : (size_t)p->pay_left;
            r = recv(p->fd, p->dst, want, MSG_DONTWAIT);
            if (r > 0) {
                p->dst += r;
                p->pay_left -= (uint64_t)r;
                p->rx_bytes += (uint64_t)r;
                continue;
            }
        } else if (p->st_pos == p->st_len) {
            r = recv(p->fd, p->stage, RX_STAGE_BYTES, MSG_DONTWAIT);
            if (r > 0) {
                p->st_pos = 0;
                p->st_len = (size_t)r;
            }
        } else {
            r = 1;
        }
        if (r == 0) {
            rx_end(t, peer, 0);
            return;
        }
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            rx_end(t, peer, -errno);
            return;
        }
        if (rx_parse(t, peer) < 0) return;
    }
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

static void accept_pending(struct wire_tcp *t, unsigned hello_ms)
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
        pc->deadline_ns = now_ns() + (uint64_t)hello_ms * 1000000ull;
        snprintf(pc->addr, sizeof pc->addr, "%s", addr);
    }
}

static void drop_pending(struct wire_tcp *t, int i)
{
    t->pend[i] = t->pend[--t->npend];
}

/* Reads a pending connection's HELLO. Returns 1 when it joined the mesh, 0 while incomplete
 * or refused, a negative status when an incompatible rank of this group connected. */
static int serve_pending(struct wire_tcp *t, int i, int mesh_open)
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

static void expire_pending(struct wire_tcp *t)
{
    uint64_t now = now_ns();
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

/* ---- progress thread ---------------------------------------------------------------------- */

static void *progress_main(void *arg)
{
    struct wire_tcp *t = arg;
    int n = t->base.nranks;
    struct pollfd *pf = calloc((size_t)(n + 2 + MAX_PENDING), sizeof *pf);
    int *who = calloc((size_t)(n + 2 + MAX_PENDING), sizeof *who);
    if (!pf || !who) {
        ep_wire_fail(&t->base, -1, EP_ERR_NOMEM, "rank %d: tcp progress thread out of memory",
                     t->base.rank);
        free(pf);
        free(who);
        return NULL;
    }

    while (!atomic_load(&t->stop)) {
        int k = 0;
        pf[k] = (struct pollfd){.fd = t->wake[0], .events = POLLIN};
        who[k++] = -1;
        pf[k] = (struct pollfd){.fd = t->listen_fd, .events = POLLIN};
        who[k++] = -2;
        for (int i = 0; i < t->npend; i++) {
            pf[k] = (struct pollfd){.fd = t->pend[i].fd, .events = POLLIN};
            who[k++] = -3 - i;
        }
        for (int i = 0; i < n; i++) {
            struct tcp_peer *p = &t->peers[i];
            if (i == t->base.rank || p->fd < 0 || atomic_load(&p->state) == PEER_FAILED) continue;
            short ev = atomic_load(&p->rx_done) ? 0 : POLLIN;
            /* Only a peer that is up gets its queue drained here (else POLLOUT would spin). */
            if (atomic_load(&p->tx_pending) && atomic_load(&p->state) == PEER_UP) ev |= POLLOUT;
            if (!ev) continue;
            pf[k] = (struct pollfd){.fd = p->fd, .events = ev};
            who[k++] = i;
        }
        int r = poll(pf, (nfds_t)k, PROGRESS_POLL_MS);
        if (r < 0 && errno != EINTR) {
            ep_wire_fail(&t->base, -1, EP_ERR_IO, "rank %d: tcp progress poll failed: %s",
                         t->base.rank, strerror(errno));
            break;
        }
        int pend_before = t->npend;
        for (int j = 0; r > 0 && j < k; j++) {
            if (!pf[j].revents) continue;
            if (who[j] == -1) {
                char buf[64];
                while (read(t->wake[0], buf, sizeof buf) > 0) {
                }
            } else if (who[j] >= 0) {
                int i = who[j];
                struct tcp_peer *p = &t->peers[i];
                if (pf[j].revents & (POLLIN | POLLHUP | POLLERR)) rx_peer(t, i);
                if ((pf[j].revents & POLLOUT) && atomic_load(&p->state) == PEER_UP &&
                    pthread_mutex_trylock(&p->tx_lock) == 0) {
                    ssize_t s = queue_drain_nb(p);
                    if (s < 0)
                        send_error(t, i, s);
                    else if (p->q_len == 0)
                        atomic_store(&p->tx_pending, 0);
                    pthread_mutex_unlock(&p->tx_lock);
                }
            }
        }
        /* The listener and pending handshakes are served after the pass above, since
         * accepting and refusing reshuffle the pending list. Late connections: the mesh is
         * complete, so every one is refused; its HELLO is read first so that the refusal can say
         * who it claimed to be. */
        for (int i = pend_before - 1; i >= 0; i--)
            serve_pending(t, i, 0);
        accept_pending(t, LATE_HELLO_MS);
        expire_pending(t);
    }
    free(pf);
    free(who);
    return NULL;
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
    o->retry_at = now_ns() + CONNECT_RETRY_MS * 1000000ull;
    snprintf(o->last_error, sizeof o->last_error, "%s: %s", what, err ? strerror(err) : "closed");
}

/* Starts or advances the connection to higher rank i. Returns a negative status on a fatal
 * mismatch. */
static ep_status_t out_step(struct wire_tcp *t, int i, struct outgoing *o, short revents)
{
    struct tcp_peer *p = &t->peers[i];
    if (o->st == OUT_IDLE) {
        if (now_ns() < o->retry_at) return EP_OK;
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

    uint64_t deadline = now_ns() + (uint64_t)w->timeout_ms * 1000000ull;
    for (;;) {
        int missing = 0;
        for (int i = 0; i < n; i++)
            missing += i != me && atomic_load(&t->peers[i].state) != PEER_UP;
        if (!missing) break;
        if (now_ns() >= deadline) {
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
            int s = serve_pending(t, i, 1);
            if (s < 0) {
                st = (ep_status_t)s;
                goto fail;
            }
        }
        accept_pending(t, w->timeout_ms);
        expire_pending(t);
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
    if (pthread_create(&t->thread, NULL, progress_main, t) != 0) {
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
            if (drain_queue_blocking(t, i, linger) == EP_OK) {
                uint8_t bye[EP_TCP_FRAME_BYTES] = {0};
                put_u32(bye, EP_TCP_FRAME_BYE);
                send(p->fd, bye, sizeof bye, MSG_NOSIGNAL | MSG_DONTWAIT);
                p->bye_sent = 1;
            }
            shutdown(p->fd, SHUT_WR);
            pthread_mutex_unlock(&p->tx_lock);
        }
        uint64_t until = now_ns() + (uint64_t)linger * 1000000ull;
        for (;;) {
            int open = 0;
            for (int i = 0; i < n; i++)
                open += i != w->rank && t->peers[i].fd >= 0 &&
                        atomic_load(&t->peers[i].state) == PEER_UP &&
                        !atomic_load(&t->peers[i].rx_done);
            if (!open || now_ns() >= until) break;
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

static _Thread_local char create_error[256];

const char *ep_wire_tcp_create_error(void)
{
    return create_error;
}

static ep_status_t create_fail(ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static ep_status_t create_fail(ep_status_t st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(create_error, sizeof create_error, fmt, ap);
    va_end(ap);
    return st;
}

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
        t->my_nonce = now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)t;
    if ((st = open_listener(t, host, cfg->tcp_port)) != EP_OK) {
        create_fail(st, "%s", t->base.error);
        goto fail;
    }
    create_error[0] = 0;
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
