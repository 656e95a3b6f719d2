/* The cuda backend's proxy (internal): the host thread of the internode path that drains the
 * command ring the kernels fill (kernels/ep_cuda.h, epk_ring_t) into a wire (tcp, or verbs on
 * an RDMA NIC), and reports a failed peer to the kernels through their error words. */
#ifndef EP_CUDA_PROXY_H
#define EP_CUDA_PROXY_H

#include "ep_cuda.h"
#include "wire.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct ep_cuda_proxy {
    ep_wire_t *wire;
    epk_cmd_t *slots;       /* host view of the ring */
    _Atomic uint64_t *head; /* host view of the head word the kernels read */
    uint32_t nslots;
    volatile int *err; /* host view of the kernels' error words */
    pthread_t thread;
    int running;
    _Atomic int stop;
    _Atomic uint64_t done; /* commands executed (written by the thread) */
    /* the first command the wire refused, e.g. "rank 0: proxy: put of 7232 bytes to rank 1
     * failed: ..." (written once, before err[] says EPK_CODE_PEER) */
    char error[512];
} ep_cuda_proxy_t;

/* Starts the thread; slots/head/nslots/wire/err must be set. */
ep_status_t ep_cuda_proxy_start(ep_cuda_proxy_t *p);
/* Waits until the proxy has executed `tail` commands (every command the kernels issued), then
 * until the wire has handed them to the network; EP_ERR_TIMEOUT after timeout_ms. After a
 * failure it still waits for the commands (those to live peers go out) and returns
 * EP_ERR_PEER. */
ep_status_t ep_cuda_proxy_drain(ep_cuda_proxy_t *p, uint64_t tail, unsigned timeout_ms);
void ep_cuda_proxy_stop(ep_cuda_proxy_t *p);

#endif /* EP_CUDA_PROXY_H */
