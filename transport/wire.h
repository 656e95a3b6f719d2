/* The wire: how the cpu backend reaches other ranks' symmetric buffers (internal to libep).
 *
 * Every rank owns one symmetric buffer of the same size and layout. A wire gives one-sided
 * access to the peers' buffers: put bytes at an offset, then signal a 64-bit word at an offset.
 * A signal is delivered after every put issued before it to the same peer (the receiver that
 * sees the signal sees the data). The receiver waits by polling its own buffer with
 * ep_wire_wait(). Implementations: wire_shm.c (threads of one process, plain memory),
 * wire_tcp.c and wire_tcp_data.c (sockets and a progress thread); the rdma transport adds a
 * verbs one.
 */
#ifndef EP_WIRE_H
#define EP_WIRE_H

#include "ep.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ep_wire ep_wire_t;

typedef enum ep_signal_op { EP_SIGNAL_SET = 0, EP_SIGNAL_ADD = 1 } ep_signal_op_t;

struct ep_wire_ops {
    const char *name;
    /* Exchange endpoints through the bootstrap and connect to every peer. `local` is this
     * rank's symmetric buffer of `bytes` bytes (64-byte aligned). */
    ep_status_t (*connect)(ep_wire_t *w, const ep_bootstrap_t *bs, void *local, size_t bytes);
    /* Copy len bytes from src into peer's buffer at remote_off. May return before the data
     * left; src may be reused on return. peer == own rank copies locally. */
    ep_status_t (*put)(ep_wire_t *w, int peer, size_t remote_off, const void *src, size_t len);
    /* Optional. Copy len bytes of this rank's own buffer at local_off into peer's buffer at
     * remote_off without a staging copy: the range must stay unchanged until a signal issued
     * after it has been seen by the peer (or flush returned). NULL: ep_wire_put_local() puts
     * from the buffer with put(). */
    ep_status_t (*put_local)(ep_wire_t *w, int peer, size_t remote_off, size_t local_off,
                             size_t len);
    /* Atomically SET or ADD `value` to the 64-bit word at remote_off in peer's buffer, after
     * all earlier puts to that peer. */
    ep_status_t (*signal)(ep_wire_t *w, int peer, size_t remote_off, uint64_t value,
                          ep_signal_op_t op);
    /* Returns once every put and signal issued so far has been handed to the network (or
     * failed: the status and ep_wire_error() say which peer). */
    ep_status_t (*flush)(ep_wire_t *w);
    void (*destroy)(ep_wire_t *w);
    /* Optional. Called instead of freeing this rank's (malloc'd) symmetric buffer when the
     * owner is done with it, before destroy: the wire frees it once no rank can write into it
     * any more (the shm wire waits until every rank has let go, so a stalled peer thread can
     * never write into freed memory). NULL: the owner frees the buffer after destroy. */
    void (*release_buffer)(ep_wire_t *w, void *local);
};

struct ep_wire {
    const struct ep_wire_ops *ops;
    int rank;
    int nranks;
    unsigned timeout_ms;
    uint8_t *local; /* this rank's symmetric buffer */
    size_t bytes;
    /* Set by the implementation when a peer fails (closed, timed out, error completion);
     * waits on this wire then fail fast naming it. -1 while healthy; -2 for the instant
     * ep_wire_fail takes to write `error` (readers that see a rank >= 0 see its message). */
    _Atomic int failed_peer;
    _Atomic int aborted; /* ep_group_abort */
    char error[256];     /* detail of the first failure */
};

ep_status_t ep_wire_shm_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out);
ep_status_t ep_wire_tcp_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out);
/* transport/rdma/wire_rdma.c (built with EPD_RDMA, which needs libibverbs and librdmacm:
 * EP_HAVE_RDMA). */
ep_status_t ep_wire_rdma_create(const ep_config_t *cfg, int rank, int nranks, ep_wire_t **out);
/* Before connect: unless the options name a device or a near= device, prefer the NICs nearest
 * the PCI device pci_bus_id ("0000:1b:00.0", the rank's GPU) in the PCIe tree. */
void ep_wire_rdma_prefer_near(ep_wire_t *w, const char *pci_bus_id);

/* put_local when the wire has it, else put from this rank's buffer. */
ep_status_t ep_wire_put_local(ep_wire_t *w, int peer, size_t remote_off, size_t local_off,
                              size_t len);

/* Waits until the 64-bit word at local_off of this rank's buffer is >= target (acquire), or
 * the wire's timeout passes, a peer fails or the group is aborted. `peer` is the rank expected
 * to write the word; it is named in the error. */
ep_status_t ep_wire_wait(ep_wire_t *w, size_t local_off, uint64_t target, int peer);

/* ep_group_allgather over a wire (the cpu backend, and the cuda backend's proxy path and
 * in-process path). Region at `off` of every rank's buffer, EP_WIRE_AG_BYTES(R) bytes:
 *   sig   [R src] uint64: the number of the last call whose slot src has put here
 *   slot  [2 parity][R src] EP_WIRE_AG_SLOT bytes: {uint64 call, uint32 len, pad} + data
 * Call n (1, 2, ... the same on every rank) puts this rank's slot into parity n & 1 of every
 * peer's region, SETs its sig word there to n, then waits for every peer's word to reach n and
 * reads that peer's slot. No acknowledgements are needed: a rank puts call n + 2's slot only
 * after its call n + 1 saw every peer's word reach n + 1, which a peer SETs only after its call
 * n read every slot of parity n & 1. A peer's mismatched len or call number fails the wire. */
#define EP_WIRE_AG_SLOT (64 + EP_ALLGATHER_MAX)
#define EP_WIRE_AG_BYTES(R) ((size_t)(R) * (8 + 2 * EP_WIRE_AG_SLOT))
ep_status_t ep_wire_allgather(ep_wire_t *w, size_t off, uint64_t call, const void *in, void *out,
                              size_t len);

/* Records the first failure of the wire (thread-safe); returns st. */
ep_status_t ep_wire_fail(ep_wire_t *w, int peer, ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif /* EP_WIRE_H */
