/* The tcp wire's state, shared by its files (internal to libep): wire_tcp.c (create and destroy,
 * the listener, the endpoint exchange through the bootstrap, the HELLO handshakes and building
 * the mesh) and wire_tcp_data.c (the data path: framing, send queues, the progress thread,
 * receive parsing, signals, peer failures). Byte formats are in wire_tcp.h. */
#ifndef EP_WIRE_TCP_INT_H
#define EP_WIRE_TCP_INT_H

#include "wire_tcp.h"
#include "epd_clock.h"

#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Receive staging buffer per peer; payload remainders of at least DIRECT_RECV_MIN bytes are
 * received straight into the symmetric buffer instead. */
#define RX_STAGE_BYTES (64u << 10)
#define DIRECT_RECV_MIN (16u << 10)

/* Incoming connections waiting for their HELLO; more at once are refused at accept. */
#define MAX_PENDING 16

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

static inline int ms_until(uint64_t deadline)
{
    uint64_t t = epd_now_ns();
    if (t >= deadline) return 0;
    uint64_t ms = (deadline - t + 999999) / 1000000;
    return ms > 1000000 ? 1000000 : (int)ms;
}

static inline void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint16_t get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline struct wire_tcp *tcp_of(ep_wire_t *w)
{
    return (struct wire_tcp *)w;
}

static inline void wake_progress(struct wire_tcp *t)
{
    char c = 1;
    ssize_t n = write(t->wake[1], &c, 1);
    (void)n; /* a full pipe already holds a wakeup */
}

/* wire_tcp.c: incoming connections and their HELLOs, served while the mesh is built and then by
 * the progress thread (which refuses every late one) */
void tcp_accept_pending(struct wire_tcp *t, unsigned hello_ms);
int tcp_serve_pending(struct wire_tcp *t, int i, int mesh_open);
void tcp_expire_pending(struct wire_tcp *t);

/* wire_tcp_data.c: the wire's data ops, the progress thread (started by connect) and the queue
 * drain that destroy uses for its orderly close */
ep_status_t tcp_put(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len);
ep_status_t tcp_signal(ep_wire_t *w, int peer, size_t remote_off, uint64_t value,
                       ep_signal_op_t op);
ep_status_t tcp_flush(ep_wire_t *w);
ep_status_t tcp_drain_queue_blocking(struct wire_tcp *t, int peer, unsigned timeout_ms);
void *tcp_progress_main(void *arg);

#endif /* EP_WIRE_TCP_INT_H */
