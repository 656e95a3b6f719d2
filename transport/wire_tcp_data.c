/* The tcp wire's data path: frames (PUT, SIGNAL, BYE), the per-peer send queues, the progress
 * thread, receive parsing, applying signals and peer failures. The wire's state is in
 * wire_tcp_int.h; connection set-up is in wire_tcp.c.
 *
 * Sends: put() and signal() write straight to the socket (header + payload in one sendmsg, no
 * copy) under the peer's send lock; whatever the socket does not take is copied into a bounded
 * per-peer queue that the progress thread drains. A put whose unsent tail is larger than the
 * queue's free space blocks the caller until it fits, so memory stays bounded and large puts
 * stream without an extra copy. Receives: small frames come through a staging buffer, large
 * put payloads are received straight into the symmetric buffer.
 */
#include "wire_tcp_int.h"
#include "epd_clock.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

/* Per-peer send queue: small frames return at once; bounded so that a slow peer cannot make
 * a rank buffer without limit. Allocated on first use. */
#define TX_QUEUE_BYTES (4u << 20)
/* Puts of at most COALESCE_MAX bytes are gathered in the queue and leave with the next signal
 * (or once COALESCE_FLUSH bytes are gathered, or at flush, or when the progress thread next
 * looks): a receiver only looks at data after a signal, and LL ops issue many small puts per
 * signal, so this turns one system call per put into one per signal. */
#define COALESCE_MAX 4096u
#define COALESCE_FLUSH (256u << 10)
/* Reads per peer per progress-loop turn, so that one busy peer cannot starve the others. */
#define RX_TURNS 32
/* How long a late connection (after the mesh is complete) may take to send its HELLO. */
#define LATE_HELLO_MS 2000u
#define PROGRESS_POLL_MS 100

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

/* The peer's send queue, allocated on first need; without memory the caller simply waits for
 * the socket instead. Caller holds tx_lock. */
static void queue_alloc(struct tcp_peer *p)
{
    if (p->q) return;
    p->q = malloc(TX_QUEUE_BYTES);
    p->q_cap = p->q ? TX_QUEUE_BYTES : 0;
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
        queue_alloc(p);
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
    uint64_t deadline = epd_now_ns() + (uint64_t)t->base.timeout_ms * 1000000ull;
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
        queue_alloc(p);
        if (progressed) {
            deadline = epd_now_ns() + (uint64_t)t->base.timeout_ms * 1000000ull;
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

ep_status_t tcp_put(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len)
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

ep_status_t tcp_signal(ep_wire_t *w, int peer, size_t remote_off, uint64_t value, ep_signal_op_t op)
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
ep_status_t tcp_drain_queue_blocking(struct wire_tcp *t, int peer, unsigned timeout_ms)
{
    struct tcp_peer *p = &t->peers[peer];
    uint64_t deadline = epd_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (p->q_len) {
        ep_status_t st = peer_unusable(t, peer);
        if (st != EP_OK) return st;
        ssize_t r = queue_drain_nb(p);
        if (r < 0) return send_error(t, peer, r);
        if (r > 0) {
            deadline = epd_now_ns() + (uint64_t)timeout_ms * 1000000ull;
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

ep_status_t tcp_flush(ep_wire_t *w)
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
            st = tcp_drain_queue_blocking(t, i, w->timeout_ms);
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
#define FRAME_NAME(name, value)                                                                    \
    case EP_TCP_FRAME_##name:                                                                      \
        return #name;
        EP_TCP_FRAME_MAP(FRAME_NAME)
#undef FRAME_NAME
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

/* ---- progress thread ---------------------------------------------------------------------- */

void *tcp_progress_main(void *arg)
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
            tcp_serve_pending(t, i, 0);
        tcp_accept_pending(t, LATE_HELLO_MS);
        tcp_expire_pending(t);
    }
    free(pf);
    free(who);
    return NULL;
}
