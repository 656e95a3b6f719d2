/* libep: expert-parallel dispatch and combine of MoE tokens between ranks (public C API).
 *
 * libep never depends on libuv or cJSON: ranks find each other through ep_bootstrap_t, which the
 * daemon implements with its control plane and tests implement in-process or over TCP.
 *
 * Conventions
 *  - Ranks: R ranks, E global experts, L = E / R local experts; expert e lives on rank e / L.
 *  - Tensors are plain pointers in the group's memory space: host memory for EP_BACKEND_CPU,
 *    device memory for EP_BACKEND_CUDA. bf16 values travel as uint16_t bit patterns, fp8 (e4m3)
 *    values as uint8_t. topk_idx is int32_t, -1 meaning "no expert".
 *  - `stream` is a cudaStream_t on the cuda backend and ignored on the cpu backend.
 *  - Every call returns an ep_status_t; on failure ep_group_last_error() says what and which
 *    peer. No call waits forever: every wait is bounded by ep_config_t.timeout_ms.
 */
#ifndef EP_H
#define EP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EP_MAX_TOPK 16
#define EP_MAX_RANKS 64
#define EP_FP8_BLOCK 128 /* channels per fp8 scale */

/* Every status: X(name, value, text); the enum and ep_strerror's texts are generated from this
 * one table (as libuv's UV_ERRNO_MAP). What each means for the caller:
 *   INVALID      a bad argument; the message names it
 *   NOMEM        host or device allocation failed
 *   TIMEOUT      a peer did not answer within timeout_ms
 *   PEER         a peer closed its connection or reported a failure
 *   UNSUPPORTED  not built in, or not supported by this backend
 *   BOOTSTRAP    exchanging endpoints failed
 *   CUDA         a CUDA runtime call failed
 *   IO           a socket or verbs call failed
 *   STATE        called out of order (e.g. a hook run twice)
 *   ABORTED      the group was aborted (ep_group_abort) */
#define EP_STATUS_MAP(X)                                                                           \
    X(OK, 0, "success")                                                                            \
    X(ERR_INVALID, -1, "invalid argument")                                                         \
    X(ERR_NOMEM, -2, "out of memory")                                                              \
    X(ERR_TIMEOUT, -3, "timed out waiting for a peer")                                             \
    X(ERR_PEER, -4, "a peer failed")                                                               \
    X(ERR_UNSUPPORTED, -5, "not supported")                                                        \
    X(ERR_BOOTSTRAP, -6, "bootstrap failed")                                                       \
    X(ERR_CUDA, -7, "CUDA error")                                                                  \
    X(ERR_IO, -8, "I/O error")                                                                     \
    X(ERR_STATE, -9, "called out of order")                                                        \
    X(ERR_ABORTED, -10, "group aborted")

typedef enum ep_status {
#define EP_STATUS_ENUM(name, value, text) EP_##name = (value),
    EP_STATUS_MAP(EP_STATUS_ENUM)
#undef EP_STATUS_ENUM
} ep_status_t;

const char *ep_strerror(ep_status_t st);

/* X(name, value, text) for the backends and the transports; ep_backend_name and
 * ep_transport_name return the text. */
#define EP_BACKEND_MAP(X)                                                                          \
    X(CPU, 0, "cpu")                                                                               \
    X(CUDA, 1, "cuda")

/* AUTO    shm for ranks of one process, tcp otherwise (cpu); nvlink (cuda)
 * SHM     ranks are threads of one process and share memory directly
 * TCP     one-sided put + signal over sockets (cuda: through the proxy)
 * NVLINK  CUDA peer access / IPC between GPUs of one node
 * RDMA    ibverbs RC queue pairs driven by CPU proxies (docs/rdma.md) */
#define EP_TRANSPORT_MAP(X)                                                                        \
    X(AUTO, 0, "auto")                                                                             \
    X(SHM, 1, "shm")                                                                               \
    X(TCP, 2, "tcp")                                                                               \
    X(NVLINK, 3, "nvlink")                                                                         \
    X(RDMA, 4, "rdma")

typedef enum ep_backend {
#define EP_BACKEND_ENUM(name, value, text) EP_BACKEND_##name = (value),
    EP_BACKEND_MAP(EP_BACKEND_ENUM)
#undef EP_BACKEND_ENUM
} ep_backend_t;

typedef enum ep_transport_kind {
#define EP_TRANSPORT_ENUM(name, value, text) EP_TRANSPORT_##name = (value),
    EP_TRANSPORT_MAP(EP_TRANSPORT_ENUM)
#undef EP_TRANSPORT_ENUM
} ep_transport_kind_t;

const char *ep_backend_name(ep_backend_t b);
const char *ep_transport_name(ep_transport_kind_t t);

/* ---- bootstrap ---------------------------------------------------------------------------- */

/* How ranks exchange endpoint blobs. Implemented by the embedder (the daemon's control plane)
 * or by one of the helpers below. Callbacks return 0 or a negative ep_status_t and must return
 * within timeout_ms. */
typedef struct ep_bootstrap {
    int rank;
    int nranks;
    void *ctx;
    /* Gather `len` bytes from every rank into out[nranks * len], in rank order. */
    int (*allgather)(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms);
    int (*barrier)(void *ctx, unsigned timeout_ms);
} ep_bootstrap_t;

/* Ranks that are threads of one process: one shared object, one ep_bootstrap_t per rank. */
typedef struct ep_inproc_world ep_inproc_world_t;
ep_status_t ep_inproc_world_create(int nranks, ep_inproc_world_t **out);
void ep_inproc_world_destroy(ep_inproc_world_t *w);
void ep_inproc_bootstrap(ep_inproc_world_t *w, int rank, ep_bootstrap_t *out);

/* Ranks in separate processes: rank 0 listens on host:port, the others connect to it.
 * The object is owned by the caller and must outlive every group created through it. */
typedef struct ep_tcp_bootstrap ep_tcp_bootstrap_t;
ep_status_t ep_tcp_bootstrap_create(const char *host, int port, int rank, int nranks,
                                    unsigned timeout_ms, ep_tcp_bootstrap_t **out);
void ep_tcp_bootstrap_destroy(ep_tcp_bootstrap_t *b);
void ep_tcp_bootstrap_get(ep_tcp_bootstrap_t *b, ep_bootstrap_t *out);
/* Why the calling thread's last failed tcp bootstrap call (create, or an allgather/barrier
 * through it) failed, naming the rank ("rank 0: rank(s) 2 did not join ..."); "" if none. */
const char *ep_tcp_bootstrap_last_error(void);

/* ---- group -------------------------------------------------------------------------------- */

typedef struct ep_config {
    ep_backend_t backend;
    ep_transport_kind_t transport;
    int num_experts;      /* E, a multiple of the number of ranks */
    int hidden;           /* H; a multiple of 128 when fp8 is used */
    int num_topk;         /* k, 1..EP_MAX_TOPK */
    int ll_max_tokens;    /* per-rank bound on T for LL ops (same on every rank); 0 disables LL */
    int ht_max_tokens;    /* per-rank bound on T for HT ops; 0 disables HT */
    int num_sms;          /* cuda: SMs the communication kernels may use (default 24) */
    unsigned timeout_ms;  /* bound on every wait (default 10000) */
    int device;           /* cuda: device ordinal for this rank (-1: rank % device count) */
    const char *tcp_host; /* tcp: address to listen on and advertise (default 127.0.0.1) */
    int tcp_port;         /* tcp: port to listen on (0: ephemeral) */
    /* rdma: "key=value,..." settings (device, port, gid_index, mtu, tc, cm, addr, near,
     * sq_depth, stage_kb; docs/rdma.md); NULL: the environment variable EP_RDMA_OPTIONS, else
     * automatic */
    const char *rdma_options;
} ep_config_t;

/* Fills *cfg with defaults (cpu backend, auto transport, timeout 10 s, 24 SMs). */
void ep_config_init(ep_config_t *cfg);

/* Bytes of symmetric buffer one rank needs for this configuration and number of ranks. */
size_t ep_buffer_size_hint(const ep_config_t *cfg, int nranks);

typedef struct ep_group ep_group_t;

/* Collective: every rank calls it with the same config (except device/tcp fields). */
ep_status_t ep_group_create(const ep_config_t *cfg, const ep_bootstrap_t *bs, ep_group_t **out);
/* Collective where possible; always frees local resources. */
void ep_group_destroy(ep_group_t *g);

int ep_group_rank(const ep_group_t *g);
int ep_group_size(const ep_group_t *g);
int ep_group_num_local_experts(const ep_group_t *g);
const ep_config_t *ep_group_config(const ep_group_t *g);
/* Detail of the last failure on this group ("rank 2: no signal within 5000 ms ..."). With
 * g == NULL: the last failed ep_group_create or ep_route_host of the calling thread. */
const char *ep_group_last_error(const ep_group_t *g);
/* Rank that caused the last failure, or -1 (g == NULL: as for ep_group_last_error). */
int ep_group_failed_peer(const ep_group_t *g);
/* Makes every current and future wait of this group return EP_ERR_ABORTED (thread-safe; the
 * daemon calls it when the control plane marks a peer down). */
void ep_group_abort(ep_group_t *g, int peer);
/* The failure, if any, that work already enqueued on this group has reported so far (a kernel
 * that timed out waiting for a peer, an abort), without enqueuing anything: for callers that
 * replay LL ops inside CUDA graphs, where no libep call runs on the host to notice it. EP_OK
 * otherwise; call it after synchronising the stream. */
ep_status_t ep_group_check(ep_group_t *g);

/* ---- control words ------------------------------------------------------------------------ */

#define EP_ALLGATHER_MAX 64 /* bytes one rank contributes to ep_group_allgather at most */

/* Collective: gathers `len` bytes (1..EP_ALLGATHER_MAX, the same on every rank) from every rank
 * into out[nranks * len], in rank order, over the group's data plane (the wire of the cpu
 * backend; on the cuda backend a host exchange between the threads of one process, or the proxy's
 * wire across processes) rather than the bootstrap: for a word per step that the ranks must agree
 * on. `in` and `out` are host memory on every backend; the call returns once out is complete.
 * Every rank calls it the same number of times (like LL ops; its order relative to the other ops
 * does not matter). Waits are bounded by timeout_ms; a timeout names the rank that did not answer
 * (ep_group_failed_peer) and leaves the group failed. EP_ERR_UNSUPPORTED, with nothing sent, on a
 * configuration without such a path (the cuda backend's ranks in several processes over nvlink):
 * every rank of the group gets it alike, and the caller keeps using its bootstrap. */
ep_status_t ep_group_allgather(ep_group_t *g, const void *in, void *out, size_t len);

/* ---- routing ------------------------------------------------------------------------------ */

typedef enum ep_route_kind {
    EP_ROUTE_SOFTMAX_TOPK = 0, /* softmax over all experts, then top-k (Qwen3-MoE, Mixtral) */
    EP_ROUTE_SIGMOID_GROUP,    /* sigmoid + bias, group-limited top-k (DeepSeek-V3) */
    EP_ROUTE_SOFTMAX_GROUP,    /* softmax, group-limited top-k, a group scored by its best expert
                                  (DeepSeek-V2's group_limited_greedy) */
} ep_route_kind_t;

typedef struct ep_route_params {
    ep_route_kind_t kind;
    int num_experts;
    int topk;
    int renormalize;             /* divide the top-k weights by their sum */
    float routed_scaling_factor; /* multiplies the final weights (1.0 if unused) */
    int num_groups;              /* *_GROUP: experts split into this many groups */
    int topk_groups;             /* *_GROUP: groups kept per token */
    const float *bias; /* SIGMOID_GROUP: [E] correction bias, selection only; may be NULL */
} ep_route_params_t;

/* logits: [T][E] fp32 -> topk_idx [T][k], topk_weights [T][k]; ties go to the lower expert id.
 * Host pointers. */
ep_status_t ep_route_host(const ep_route_params_t *p, const float *logits, int num_tokens,
                          int32_t *topk_idx, float *topk_weights);
/* Same, in the group's memory space (device memory on the cuda backend). */
ep_status_t ep_route(ep_group_t *g, const ep_route_params_t *p, const float *logits, int num_tokens,
                     int32_t *topk_idx, float *topk_weights, void *stream);

/* ---- receive hook ------------------------------------------------------------------------- */

/* With use_hook set, an LL op returns after its send half; ep_hook_run() runs the receive half
 * (on the cuda backend it enqueues it on the op's stream). A hook runs once and is owned by the
 * group; it is invalid after it ran. */
typedef struct ep_hook ep_hook_t;
ep_status_t ep_hook_run(ep_hook_t *hook);

/* ---- low-latency (decode) ----------------------------------------------------------------- */

/* LL ops alternate between two buffers: every ep_ll_dispatch and ep_ll_combine uses the buffer
 * after the one the previous LL op used, so the result of one op stays valid while the next runs
 * and is overwritten by the op after that. */

typedef struct ep_ll_handle ep_ll_handle_t; /* owned by the group, lives as long as its outputs */

typedef struct ep_ll_dispatch_args {
    const uint16_t *x;         /* [T][H] bf16 */
    int num_tokens;            /* T, 0..ll_max_tokens */
    const int32_t *topk_idx;   /* [T][k] */
    const float *topk_weights; /* [T][k]; may be NULL (then combine must be given them) */
    int use_fp8;               /* send e4m3 + one fp32 scale per 128 channels */
    int round_scale;           /* fp8: round scales up to powers of two */
    int use_hook;              /* return after the send half, *hook receives the rest */
    void *stream;
} ep_ll_dispatch_args_t;

/* Outputs live in the group's buffer (device memory on cuda). S = ll_max_tokens * R slots per
 * local expert. Rows of one expert are ordered by (source rank, source token index); rows past
 * recv_count are undefined. */
typedef struct ep_ll_dispatch_out {
    void *recv_x;           /* [L][S][H] fp8 e4m3 (uint8_t) or bf16 (uint16_t) */
    float *recv_scales;     /* [L][S][H/128] fp8 only; NULL for bf16 */
    int32_t *recv_count;    /* [L] rows received per local expert */
    int32_t *recv_src_info; /* [L][S] source token index (on its rank) of each row */
    int32_t *recv_range;    /* [L][R][2] (first row, row count) of the rows from each rank */
} ep_ll_dispatch_out_t;

ep_status_t ep_ll_dispatch(ep_group_t *g, const ep_ll_dispatch_args_t *a, ep_ll_dispatch_out_t *out,
                           ep_ll_handle_t **handle, ep_hook_t **hook);

typedef struct ep_ll_combine_args {
    const ep_ll_handle_t *handle; /* from the matching dispatch */
    const uint16_t *expert_y;     /* [L][S][H] bf16, the experts' outputs in recv_x's layout */
    const int32_t *topk_idx;      /* [T][k], the same as given to dispatch */
    const float *topk_weights;    /* [T][k] */
    uint16_t *out;                /* [T][H] bf16 = sum_j w[t][j] * y(expert topk_idx[t][j], t) */
    int use_hook;
    void *stream;
} ep_ll_combine_args_t;

ep_status_t ep_ll_combine(ep_group_t *g, const ep_ll_combine_args_t *a, ep_hook_t **hook);

/* ---- high-throughput (prefill) ------------------------------------------------------------ */

typedef struct ep_ht_layout {
    int32_t *num_tokens_per_rank;   /* [R] tokens that go to each rank (once per rank) */
    int32_t *num_tokens_per_expert; /* [E] */
    uint8_t *is_token_in_rank;      /* [T][R] */
} ep_ht_layout_t;

ep_status_t ep_get_dispatch_layout(ep_group_t *g, const int32_t *topk_idx, int num_tokens,
                                   ep_ht_layout_t *layout, void *stream);

typedef struct ep_ht_handle ep_ht_handle_t; /* owned by the caller: ep_ht_handle_destroy */

typedef struct ep_ht_dispatch_args {
    const void *x;         /* [T][H] bf16, or fp8 e4m3 when use_fp8 */
    const float *x_scales; /* [T][H/128] fp8 only */
    int use_fp8;
    int num_tokens;            /* T, 0..ht_max_tokens */
    const int32_t *topk_idx;   /* [T][k] */
    const float *topk_weights; /* [T][k]; may be NULL */
    int expert_alignment;      /* round num_recv_per_expert up to a multiple of this (0/1: none) */
    void *stream;
} ep_ht_dispatch_args_t;

/* Caller-allocated outputs with room for `capacity` rows (ep_ht_max_recv_tokens() is always
 * enough). Rows are ordered by (source rank, source token index), each token once per rank. */
typedef struct ep_ht_dispatch_out {
    int capacity;
    void *recv_x;                 /* [N][H] bf16 or fp8 */
    float *recv_scales;           /* [N][H/128] fp8 only */
    int32_t *recv_topk_idx;       /* [N][k] local expert ids, -1 for experts of other ranks */
    float *recv_topk_weights;     /* [N][k]; 0 where recv_topk_idx is -1 */
    int32_t *num_recv_per_expert; /* [L], aligned if expert_alignment > 1 */
    int num_recv_tokens;          /* N, set by the call */
} ep_ht_dispatch_out_t;

int ep_ht_max_recv_tokens(const ep_group_t *g);

ep_status_t ep_ht_dispatch(ep_group_t *g, const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out,
                           ep_ht_handle_t **handle);
/* Dispatch new data along the routes of an earlier dispatch (no layout exchange). Only x and
 * x_scales of `a` are read; recv_topk_* and counts are left untouched. */
ep_status_t ep_ht_dispatch_cached(ep_group_t *g, const ep_ht_handle_t *h,
                                  const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out);
/* x: [N][H] bf16 rows as received; out[t] = sum of the copies of token t, on its source rank. */
ep_status_t ep_ht_combine(ep_group_t *g, const ep_ht_handle_t *h, const uint16_t *x, uint16_t *out,
                          void *stream);
void ep_ht_handle_destroy(ep_ht_handle_t *h);

#ifdef __cplusplus
}
#endif
#endif /* EP_H */
