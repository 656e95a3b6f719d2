/* The cuda backend's private state (internal to transport/cuda/): the group's implementation
 * object, LL handles and hooks, HT handles, and the helpers its files share. */
#ifndef EP_CUDA_IMPL_H
#define EP_CUDA_IMPL_H

#include "group.h"

#include "ep_cuda.h"
#include "proxy.h"

#include <cuda_runtime.h>
#include <pthread.h>

struct cuda_ll_handle {
    struct ep_ll_handle base;
    int buf;
    int num_tokens;
};

/* A pending receive half. */
struct cuda_hook {
    struct ep_hook base;
    int kind; /* 1 dispatch, 2 combine */
    int pending;
    void *stream;
    epk_ll_dispatch_params_t dp;
    epk_ll_combine_params_t cp;
};

struct ht_scratch {
    struct ht_scratch *next;
    void *mem;
    epk_ht_state_t st;
};

struct cuda_ht_handle {
    struct ep_ht_handle base;
    struct ht_scratch *sc;
    int num_tokens;
    int num_recv;
    int32_t recv_from[EP_MAX_RANKS]; /* rows received from each rank (combine copies them back) */
    /* proxy path */
    int32_t count_to[EP_MAX_RANKS]; /* rows this rank sends to each rank */
    int32_t base_at[EP_MAX_RANKS];  /* first row of this rank's block on each rank */
};

/* Combine rows go back in this many copy-engine chunks, so summing overlaps the transfer. */
#define HT_COMBINE_CHUNKS 4

struct peer_info {
    int pid;
    int device;
    int num_sms;
    char host[64];
    char busid[32];
    uint64_t base;
    cudaIpcMemHandle_t ipc;
};

typedef struct cuda_impl {
    ep_bootstrap_t bs; /* kept for the barrier of destroy */
    int connected;     /* create completed: destroy may wait for the peers */
    int device;
    int inproc;
    epk_ctx_t ctx;
    uint8_t *buf;
    int *err_host, *err_dev;
    /* proxy path (tcp/rdma transport) */
    int proxy;
    ep_wire_t *wire;
    ep_cuda_proxy_t px;
    uint8_t *win_host;                   /* the window, pinned and mapped */
    epk_cmd_t *ring_host;                /* the command ring, pinned and mapped */
    uint64_t *head_host;                 /* the proxy's head word, pinned and mapped */
    unsigned long long *tail_dev;        /* commands handed out (device memory) */
    epk_ht_info_t *info_host, *info_dev; /* mapped: what the HT count exchange found */
    int ht_copy;                         /* HT moves bulk rows with the copy engines */
    cudaStream_t cs, ss;                 /* copy-engine stream, signal stream */
    cudaEvent_t ev_fork, ev_cs, ev_ss, ev_chunk[HT_COMBINE_CHUNKS];
    uint64_t ht_comb_n; /* copy-engine combines so far (same on every rank) */
    void *ipc_open[EP_MAX_RANKS];
    int ll_disp_send, ll_disp_recv, ll_comb_send, ll_comb_recv, ht_blocks;
    struct cuda_ll_handle handles[2];
    struct cuda_hook hooks[2];
    uint64_t ht_seq, ht_done;
    /* HT on the proxy path (ht_proxy.c) */
    uint8_t *ht_pack;      /* device: R blocks of lay.ht_blk (packed rows, combine stage) */
    int32_t *ht_idx_host;  /* pinned: [ht_max][k] routing of the current dispatch */
    int32_t *ht_pos_host;  /* pinned: [ht_max][R] row of token t among the rows to rank d */
    int32_t *ht_nrpe_host; /* pinned: [L] num_recv_per_expert */
    uint64_t ht_xfer_n;    /* HT data transfers so far (every HT op is one; same on all) */
    pthread_mutex_t sc_lock;
    struct ht_scratch *sc_free;
    /* ep_group_allgather: over c->wire at ctx.lay.ag on the proxy path; over ag_wire, an shm
     * wire on the host buffer ag_buf (EP_WIRE_AG_BYTES(R)), when the ranks are threads of one
     * process (nvlink); neither with ranks in several processes over nvlink (unsupported) */
    ep_wire_t *ag_wire;
    uint8_t *ag_buf;
    uint64_t ag_call;
} cuda_impl_t;

static inline cuda_impl_t *impl_of(ep_group_t *g)
{
    return (cuda_impl_t *)g->impl;
}

static inline ep_status_t cuda_fail(ep_group_t *g, cudaError_t e, const char *what)
{
    return ep_group_fail(g, -1, EP_ERR_CUDA, "rank %d: %s failed: %s", g->rank, what,
                         cudaGetErrorString(e));
}

/* backend_cuda.c */
/* Turns a kernel-reported stall or a proxy-reported failure (mapped error words) into a status. */
ep_status_t cuda_check_err(ep_group_t *g);
ep_status_t cuda_set_device(ep_group_t *g);
/* A launcher's return code as a status (what: the kernel, for the message). */
ep_status_t cuda_launched(ep_group_t *g, int rc, const char *what);
/* Per-dispatch device scratch (pos, base_at, ...), recycled through a free list. */
ep_status_t cuda_get_scratch(ep_group_t *g, struct ht_scratch **out);
void cuda_put_scratch(cuda_impl_t *c, struct ht_scratch *s);

/* ht_proxy.c: HT over the proxy path (tcp/rdma transport), driven from the host. */
ep_status_t cuda_ht_dispatch_proxy(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                                   ep_ht_dispatch_out_t *out, struct cuda_ht_handle *h, int cached);
ep_status_t cuda_ht_combine_proxy(ep_group_t *g, const struct cuda_ht_handle *h, const uint16_t *x,
                                  uint16_t *out, void *stream);

#endif /* EP_CUDA_IMPL_H */
