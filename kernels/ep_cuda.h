/* The C interface of libep's CUDA kernels: the symmetric-buffer layout the kernels and the cuda
 * backend agree on, and the extern "C" launchers (kernels/ the .cu files) that transport/cuda
 * calls.
 *
 * Every launcher enqueues work on `stream` and returns a cudaError_t as int (0 = success); none
 * synchronises with the host, so LL launches can be captured into a CUDA graph.
 *
 * Signalling. Every rank owns one symmetric buffer (same layout on every rank; a peer's copy is
 * reached at base[peer] + offset through peer access). A sender writes data into the receiver's
 * buffer with plain stores, then each sending block releases at system scope (fence + red.add)
 * onto a 64-bit counter in the receiver's control area. Counters only grow, so a receiver waits
 * for counter >= seq * blocks, where seq counts the ops on that buffer; seq lives in device
 * memory and is advanced by the kernels themselves, which keeps graph replays correct.
 *
 * Errors. Every wait is bounded by timeout_ns of %globaltimer. A wait that times out writes
 * err[EPK_ERR_PEER] (the rank it waited for), err[EPK_ERR_WHAT] (which wait) and then
 * err[EPK_ERR_CODE] = EPK_CODE_TIMEOUT into mapped host memory and the kernel returns. Any
 * nonzero code (also EPK_CODE_ABORT written by the host, or EPK_CODE_PEER written by the proxy
 * when the wire lost a peer) makes every other wait give up too.
 *
 * Proxy path (tcp/rdma transport): see epk_ring_t below; counters then live in the host window
 * and the signal of a block is a command instead of a remote red.add.
 */
#ifndef EP_CUDA_H
#define EP_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "ep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* err[] words (mapped host memory, int32). */
enum { EPK_ERR_CODE = 0, EPK_ERR_PEER = 1, EPK_ERR_WHAT = 2, EPK_ERR_WORDS = 4 };
enum { EPK_CODE_OK = 0, EPK_CODE_TIMEOUT = 1, EPK_CODE_ABORT = 2, EPK_CODE_PEER = 3 };
/* Which wait timed out (err[EPK_ERR_WHAT]). */
enum {
    EPK_WAIT_LL_DISPATCH = 1,
    EPK_WAIT_LL_COMBINE = 2,
    EPK_WAIT_LL_WEIGHTS = 3,
    EPK_WAIT_HT_COUNTS = 4,
    EPK_WAIT_HT_PTRS = 5,
    EPK_WAIT_HT_DONE = 6,
    EPK_WAIT_RING = 7, /* a free slot of the proxy's command ring */
};
const char *epk_wait_name(int what);

/* Byte offsets of everything inside one rank's symmetric buffer. Filled by epk_layout().
 *
 * The buffer has two parts. The WINDOW [0, win_total) holds everything peers write (counters,
 * LL token messages and combine rows, HT exchange areas); the LOCAL part [win_total, total) holds
 * what only this rank's kernels touch (LL sequence state, the LL outputs). Kernels reach their
 * own window at ctx.win and the local part at ctx.base[rank], both with these offsets. Over
 * NVLink both are the one device buffer (win == base[rank]); on the proxy path (tcp/rdma
 * transport) the window is pinned host memory that the wire reads and writes. */
/* Bytes of the proxy path's allgather region for R ranks (= EP_WIRE_AG_BYTES(R)). */
#define EPK_AG_BYTES(R) ((size_t)(R) * (8 + 2 * (64 + EP_ALLGATHER_MAX)))

typedef struct epk_layout {
    /* window: uint64 counters written by peers */
    size_t ll_cnt;   /* [2 buf][3 phase][R src]: dispatch data, combine data, combine weights */
    size_t ht_cnt;   /* uint64 words: [2 parity][R src] count flags, [2][R] pointer flags,
                      * [R] done counters, [R] combine staging progress (copy-engine path) */
    size_t ht_rows;  /* [2 parity][R src] epk_ht_row_t (counts + expert counts) */
    size_t ht_ptrs;  /* [2 parity][R src] epk_ht_ptrs_t */
    size_t ht_stage; /* [R src][ht_max_tokens][H] bf16: combine rows copied back by peers */
    /* proxy path: HT rows travel as packed blocks of ht_blk bytes, one per peer: x rows (bf16
     * or fp8) at 0, fp32 scales at ht_seg_s, local topk ids at ht_seg_i, weights at ht_seg_w;
     * combine rows (bf16) at 0. */
    size_t ht_xfer; /* [2 parity of the transfer][R src] blocks received */
    size_t ht_send; /* [R dst] blocks waiting for the wire */
    size_t ht_blk, ht_seg_s, ht_seg_i, ht_seg_w;
    /* proxy path: ep_group_allgather's words and slots, EPK_AG_BYTES(R) (transport/wire.h's
     * ep_wire_allgather; the host alone reads and writes them) */
    size_t ag;
    /* window part of LL buffer b: ll_win + b * ll_win_bytes */
    size_t ll_win;
    size_t ll_win_bytes;
    size_t ll_meta;       /* [R src] epk_ll_meta: {T, has_w}, idx [Tmax][k], w [Tmax][k] */
    size_t ll_meta_bytes; /* per source */
    size_t ll_msg;        /* [R src][Tmax][msg_stride] token messages (fp8 x + scales, or bf16) */
    size_t ll_msg_stride; /* room per message; an op packs its messages at its own stride */
    size_t ll_comb;       /* [R src][Tmax][H] bf16 partial sums sent back by expert ranks */
    size_t ll_send;       /* proxy path: [R dst][Tmax][H] bf16 combine rows waiting for the wire */
    size_t win_total;
    /* local */
    size_t ll_state; /* struct epk_ll_state (kernels/ep_cuda_common.cuh), 128 bytes */
    /* local part of LL buffer b: ll_loc + b * ll_loc_bytes */
    size_t ll_loc;
    size_t ll_loc_bytes;
    size_t ll_inv;         /* [R src][Tmax][k] int32: row of (token, j) in its local expert */
    size_t ll_recv_x;      /* [L][S][H] fp8 or bf16 (sized for bf16) */
    size_t ll_recv_scales; /* [L][S][H/128] fp32 */
    size_t ll_recv_count;  /* [L] int32 */
    size_t ll_src_info;    /* [L][S] int32 */
    size_t ll_range;       /* [L][R][2] int32 */
    size_t total;
} epk_layout_t;

/* ---- the proxy path's command ring -------------------------------------------------------- *
 * With the tcp or rdma transport, peers are not reachable by stores. A kernel writes what a peer
 * should receive into its own window (at the offset it has in the peer's window, or in a send
 * area) and appends a command to a ring in mapped host memory; a host proxy thread
 * (transport/cuda/proxy.c) executes the commands in ring order through the wire, which
 * delivers a signal to a peer after every earlier put to that peer.
 *
 * Producers (any GPU thread): slot = atomicAdd(tail, 1); wait while slot - *head >= slots;
 * write the command; fence (system); then write seq = slot + 1 (low 32 bits). The proxy reads
 * slot `head % slots` once its seq says so, runs it, and publishes head + 1. */
enum { EPK_CMD_PUT = 1, EPK_CMD_SIGNAL_ADD = 2 };
typedef struct epk_cmd {
    uint64_t a;   /* PUT: offset in this rank's window; SIGNAL: the value */
    uint64_t b;   /* offset in the peer's window */
    uint32_t len; /* PUT: bytes */
    uint16_t peer;
    uint8_t op;
    uint8_t pad;
    uint32_t seq; /* slot number + 1 (low 32 bits), written last */
    uint32_t pad2;
} epk_cmd_t;

typedef struct epk_ring {
    epk_cmd_t *slots;         /* device alias of mapped host memory */
    unsigned long long *tail; /* device memory: slots handed out so far */
    const uint64_t *head;     /* device alias of the mapped word the proxy advances */
    uint32_t nslots;          /* a power of two */
} epk_ring_t;

typedef struct epk_ht_ptrs {
    uint64_t recv_x, recv_scales, recv_topk_idx, recv_topk_w, combine_x;
    uint64_t capacity; /* rows recv_x holds; a pusher never writes past it */
} epk_ht_ptrs_t;

/* Everything a kernel needs to know about the group. Passed by value. */
typedef struct epk_ctx {
    int rank, nranks;
    int num_experts, local_experts, hidden, topk;
    int ll_max_tokens, ht_max_tokens;
    unsigned long long timeout_ns;
    int *err;                    /* mapped host memory, EPK_ERR_WORDS int32 */
    uint8_t *base[EP_MAX_RANKS]; /* every rank's buffer as seen from this device (NVLink); on
                                  * the proxy path only base[rank] (local part) is set */
    uint8_t *win;                /* this rank's window (see epk_layout_t) */
    int proxy;                   /* peers are reached through the command ring */
    epk_ring_t ring;
    epk_layout_t lay;
} epk_ctx_t;

/* proxy: lay out for the proxy path (adds the LL send area and the HT transfer blocks instead of
 * the NVLink HT areas). */
void epk_layout(epk_layout_t *lay, const ep_config_t *cfg, int nranks, int proxy);
/* Loads every kernel on the current device (call once per device before the first launch). */
int epk_preload(void);

/* ---- LL ----------------------------------------------------------------------------------- */
/* mode: 0 = send and receive in one launch, 1 = send half only, 2 = receive half only. */
typedef struct epk_ll_dispatch_params {
    int buf;
    const uint16_t *x; /* [T][H] bf16 */
    int num_tokens;
    const int32_t *topk_idx; /* [T][k] */
    const float *topk_w;     /* [T][k] or NULL */
    int use_fp8, round_scale;
    int send_blocks, recv_blocks;
} epk_ll_dispatch_params_t;
int epk_ll_dispatch(const epk_ctx_t *c, const epk_ll_dispatch_params_t *p, int mode, void *stream);

typedef struct epk_ll_combine_params {
    int buf;                  /* this combine's buffer */
    int disp_buf;             /* the buffer of the dispatch whose handle it uses */
    const uint16_t *expert_y; /* [L][S][H] bf16 */
    const int32_t *topk_idx;  /* [T][k] this rank's routing (receive half) */
    const float *topk_w;      /* [T][k] (used only when the dispatch had no weights) */
    int num_tokens;           /* T of this rank's dispatch */
    uint16_t *out;            /* [T][H] bf16 */
    int send_blocks, recv_blocks;
} epk_ll_combine_params_t;
int epk_ll_combine(const epk_ctx_t *c, const epk_ll_combine_params_t *p, int mode, void *stream);

/* ---- HT ----------------------------------------------------------------------------------- */
int epk_ht_layout(const epk_ctx_t *c, const int32_t *topk_idx, int T, int32_t *per_rank,
                  int32_t *per_expert, uint8_t *in_rank, void *stream);

/* What the HT count exchange tells the host (mapped host memory), for the copy-engine path. */
#define EPK_MAX_RUNS 64
typedef struct epk_ht_info {
    int32_t n_recv;
    int32_t base_at[EP_MAX_RANKS];               /* first row of this rank's block on each rank */
    int32_t count_to[EP_MAX_RANKS];              /* rows this rank sends to each rank */
    int32_t recv_from[EP_MAX_RANKS];             /* rows this rank receives from each rank */
    int32_t nruns[EP_MAX_RANKS];                 /* runs of consecutive tokens sent to each rank */
    int32_t runs[EP_MAX_RANKS][EPK_MAX_RUNS][2]; /* (first token, last token) */
    uint64_t recv_x[EP_MAX_RANKS];               /* each rank's recv_x (peer address) */
    uint64_t capacity[EP_MAX_RANKS];             /* each rank's recv_x rows */
} epk_ht_info_t;

/* Per-call device scratch of one HT dispatch (the handle's device part). */
typedef struct epk_ht_state {
    int32_t *pos;       /* [Tmax][R] row of token t among the rows this rank sends to d, -1 */
    int32_t *base_at;   /* [R] first row of this rank's block on rank d */
    int32_t *recv_from; /* [R] rows this rank receives from each source */
    int32_t *n_recv;    /* [1] device copy of N */
} epk_ht_state_t;

/* Counts first: positions, counts and the output addresses of every rank (info: device alias
 * of mapped host memory; `mine` is this rank's epk_ht_ptrs_t). */
int epk_ht_prep(const epk_ctx_t *c, const epk_ht_state_t *st, const int32_t *topk_idx, int T,
                int expert_alignment, int32_t *num_recv_per_expert, epk_ht_info_t *info,
                const epk_ht_ptrs_t *mine, uint64_t seq, void *stream);
typedef struct epk_ht_dispatch_params {
    const void *x;         /* [T][H] bf16, or fp8 */
    const float *x_scales; /* [T][H/128] fp8 only */
    int use_fp8, num_tokens;
    const int32_t *topk_idx;
    const float *topk_w; /* may be NULL */
    void *recv_x;
    int capacity; /* rows of recv_x */
    float *recv_scales;
    int32_t *recv_topk_idx; /* NULL: leave topk outputs untouched (cached dispatch) */
    float *recv_topk_w;
    int blocks;
    int local_rows_only;  /* copy-engine path: 1 move only this rank's own rows, 2 no rows at all
                           * (metadata for every rank in both cases) */
    int ptrs_ready;       /* the count exchange already published the output addresses */
    int no_done;          /* leave the completion signal to epk_ht_done */
    uint64_t seq;         /* HT op number (same on every rank), selects the parity slots */
    uint64_t done_target; /* cumulative HT blocks every peer has signalled after this op */
} epk_ht_dispatch_params_t;
int epk_ht_dispatch(const epk_ctx_t *c, const epk_ht_state_t *st, const epk_ht_dispatch_params_t *p,
                    void *stream);
/* One block: optionally adds `add` to every rank's done counter for this rank, optionally
 * waits until every rank's counter here reaches done_target. */
int epk_ht_done(const epk_ctx_t *c, uint64_t add, uint64_t done_target, int wait, void *stream);
/* Copy-engine combine: release value into word [5R + rank] of every peer (chunk progress). */
int epk_ht_stage_signal(const epk_ctx_t *c, uint64_t value, void *stream);
/* Copy-engine combine: sums this rank's tokens from its own rows (x) and the rows peers staged
 * into its buffer, chunk by chunk as they arrive (stage words >= stage_base + c + 1). */
int epk_ht_combine_staged(const epk_ctx_t *c, const epk_ht_state_t *st, const uint16_t *x,
                          uint16_t *out, int T, int blocks, int nchunks, uint64_t stage_base,
                          void *stream);
int epk_ht_combine(const epk_ctx_t *c, const epk_ht_state_t *st, const uint16_t *x, uint16_t *out,
                   int T, int blocks, uint64_t seq, uint64_t done_target, void *stream);

/* HT on the proxy path (kernels/ht_proxy.cu): the host exchanges counts and blocks through the
 * wire; these kernels pack this rank's rows per destination and sum the returned copies. */
typedef struct epk_ht_pack_params {
    const void *x;         /* [T][H] bf16 or fp8 */
    const float *x_scales; /* fp8 */
    int use_fp8, num_tokens;
    const int32_t *topk_idx; /* NULL: pack no routing (cached dispatch) */
    const float *topk_w;     /* may be NULL (weights 0) */
    const int32_t *pos;      /* [T][R] row of token t among the rows to rank d, or -1 */
    uint8_t *pack;           /* block d at pack + d * lay.ht_blk (d != rank) */
    /* this rank's own rows go straight to its outputs, at row0 + pos (below capacity) */
    void *recv_x;
    float *recv_scales;
    int32_t *recv_topk_idx;
    float *recv_topk_w;
    int row0, capacity;
    int blocks;
} epk_ht_pack_params_t;
int epk_ht_pack(const epk_ctx_t *c, const epk_ht_pack_params_t *p, void *stream);
/* out[t] = bf16(sum over ranks d ascending with pos[t][d] >= 0 of the row: x[row0 + pos] for
 * d == rank, else row pos of block d of `stage` (bf16 rows of H at the block's start)). */
int epk_ht_sum(const epk_ctx_t *c, const int32_t *pos, int T, const uint16_t *x, int row0,
               const uint8_t *stage, uint16_t *out, int blocks, void *stream);

/* ---- routing ------------------------------------------------------------------------------ */
int epk_route(const ep_route_params_t *p, const float *logits, int T, int32_t *topk_idx,
              float *topk_w, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* EP_CUDA_H */
