/* The verbs wire's state, shared by wire_rdma.c (the wire ops, the producer side of the
 * command ring, bootstrap connection set-up), rdma_proxy.c (the proxy thread) and rdma_cm.c
 * (connection set-up through rdma_cm). Internal to the rdma transport.
 *
 * Threads: the wire's caller produces commands (put/signal), the proxy thread consumes them.
 * Ring indices are absolute counters (slot = counter % RING_SLOTS):
 *   tail <= seen <= head;  [tail, seen) taken by the proxy, not yet completed and retired;
 *   [seen, head) written by the producer, not yet taken. The staging memory is a byte ring with
 *   the same discipline: [stage_tail, stage_head) is in use; a command's stage_end frees it.
 */
#ifndef EP_RDMA_WIRE_H
#define EP_RDMA_WIRE_H

#include "rdma.h"

#include <pthread.h>
#include <rdma/rdma_cma.h>

#define RING_SLOTS 4096u /* power of two */
/* Largest put one command carries; larger puts are split (keeps staging turning over). */
#define PUT_CHUNK_MAX (1u << 20)

struct rdma_peer {
    struct ibv_qp *qp;
    struct rdma_cm_id *cm_id; /* cm: the connection's id (owns qp) */
    uint64_t raddr;           /* peer's symmetric buffer */
    _Atomic uint32_t rkey;
    uint32_t qpn, psn; /* remote QPN; the PSN this side starts sending with */
    _Atomic int failed;
    ep_status_t fail_st;
    int cm_state; /* rdma_cm.c's connection progress */

    /* proxy only */
    uint64_t q_first, q_last; /* commands waiting to be posted, linked through next[] */
    int outstanding;          /* posted, not completed */
    uint64_t progress_ns;     /* last completion (or first post after idle) */
};

struct wire_rdma {
    ep_wire_t base;
    struct rdma_opts opts;
    char opts_error[320]; /* a bad option string, reported by connect() */
    struct rdma_port_sel sel;
    int ack_timeout; /* IB local ACK timeout exponent, from timeout_ms */

    struct ibv_context *ctx; /* ours (bootstrap connect) or rdma_cm's (cm connect) */
    struct ibv_pd *pd;
    struct ibv_cq *cq;
    int cq_depth;
    struct ibv_mr *mr; /* the symmetric buffer */
    uint8_t *stage;    /* registered staging memory for put sources and SET values */
    struct ibv_mr *stage_mr;
    uint64_t *scratch; /* fetch-and-add results land here (discarded) */
    struct ibv_mr *scratch_mr;
    int max_rd_atomic;

    struct rdma_event_channel *cm_ch;
    struct rdma_cm_id *cm_listen;

    struct rdma_peer *peers;
    int connected;

    /* the ring; cmds and head written by the producer, tail and stage_tail by the proxy */
    struct rdma_cmd *cmds;
    uint64_t *next;  /* proxy: per-peer FIFO links */
    uint8_t *status; /* proxy: 0 pending, 1 done */
    pthread_mutex_t prod_lock;
    uint64_t stage_head; /* producer */
    _Alignas(64) _Atomic uint64_t head;
    _Alignas(64) _Atomic uint64_t tail;
    _Atomic uint64_t stage_tail;
    _Alignas(64) uint64_t seen; /* proxy */

    pthread_t proxy;
    int proxy_started;
    _Atomic int stop;
};

static inline struct wire_rdma *rdma_of(ep_wire_t *w)
{
    return (struct wire_rdma *)w;
}

/* Marks `peer` failed (first failure wins for the wire's error), moves its QP to the error
 * state so that posted work completes; returns st. */
ep_status_t rdma_peer_fail(struct wire_rdma *r, int peer, ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* QP attributes both set-up paths use. */
void rdma_qp_init_attr(struct wire_rdma *r, struct ibv_qp_init_attr *a);

/* rdma_cm.c: connects every pair through rdma_cm (listener + lower rank connects). The
 * bootstrap carries the listeners' addresses. */
ep_status_t rdma_cm_open(struct wire_rdma *r);
ep_status_t rdma_cm_connect(struct wire_rdma *r, const uint8_t *blobs, size_t blob_len);
/* Proxy: drains rdma_cm events (a peer's disconnect fails it). */
void rdma_cm_poll(struct wire_rdma *r);
void rdma_cm_close(struct wire_rdma *r);

/* rdma_proxy.c */
void *rdma_proxy_main(void *arg);

/* Endpoint blob (one per rank, allgathered); fixed-width fields, native byte order. */
#define RDMA_BLOB_MAGIC 0x57445045u /* "EPDW" */
#define RDMA_BLOB_VERSION 1
struct rdma_blob {
    uint32_t magic;
    uint16_t version;
    uint8_t roce, use_cm;
    uint32_t rank, nranks;
    uint64_t addr, bytes;
    uint32_t rkey;
    uint16_t lid;
    uint8_t mtu; /* enum ibv_mtu */
    uint8_t zero;
    uint8_t gid[16];
    uint32_t ipv4; /* cm: listener address (network order) */
    uint16_t cm_port;
    uint16_t zero2;
    /* followed by uint32_t qpn[nranks], psn[nranks]: the QP this rank made for each peer */
};

#endif /* EP_RDMA_WIRE_H */
