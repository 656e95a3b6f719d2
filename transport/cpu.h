/* The cpu backend's internals (internal to libep): the symmetric buffer layout, channels and
 * the per-LL-buffer state shared by backend_cpu.c, cpu_ll.c and cpu_ht.c.
 *
 * Symmetric buffer of one rank (R ranks, M = ll_max_tokens, Mh = ht_max_tokens, k = top-k,
 * H = hidden; every region 64-byte aligned, regions of a disabled mode are empty):
 *   words       [CPU_CH_COUNT][2][R] uint64: per channel the signal words (one per source rank)
 *               then the ack words (one per destination rank)
 *   ll_disp[b]  [R src][ll_slot]: 64-byte header (uint32 row count) + [M][ll_row] rows
 *               ll_row = align16(4 + 4k) header {int32 src token, int32 topk_idx[k]} + data,
 *               data = bf16 [H], or fp8 [H] + fp32 scales [H/128]
 *   ll_comb[b]  [M][k][H] bf16: the expert output for (token, top-k slot); every slot has one
 *               owner rank, so the senders share the region
 *   ht_disp     [R src][ht_slot]: 64-byte header (uint32 row count) + [Mh][ht_row] rows
 *               ht_row = align16(4 + 8k) header {int32 src token, int32 topk_idx[k],
 *               float weights[k]} + data (as for LL)
 *   ht_comb     [R src][Mh][H] bf16: the copies of this rank's tokens, in send order per rank
 *   ag          EP_WIRE_AG_BYTES(R): ep_group_allgather's words and slots (wire.h)
 *
 * Channel protocol (one channel per region, every LL/HT op is collective): an op bumps the
 * channel's sequence number s on every rank; a sender first waits until each destination has
 * acknowledged use s-1 (so it never overwrites rows still being read), puts its rows, then
 * SETs its signal word at the destination to s. A receiver waits for s from every source,
 * reads, then SETs its ack word at each source to s.
 */
#ifndef EP_CPU_H
#define EP_CPU_H

#include "group.h"
#include "wire.h"

#include <stddef.h>
#include <stdint.h>

enum {
    CPU_CH_LL_DISP0,
    CPU_CH_LL_DISP1,
    CPU_CH_LL_COMB0,
    CPU_CH_LL_COMB1,
    CPU_CH_HT_DISP,
    CPU_CH_HT_COMB,
    CPU_CH_COUNT
};

#define CPU_SLOT_HEADER 64

struct cpu_layout {
    size_t words_off;
    size_t ll_hdr, ll_row, ll_slot;
    size_t ll_disp_off[2], ll_comb_off[2];
    size_t ht_hdr, ht_row, ht_slot;
    size_t ht_disp_off, ht_comb_off, ht_comb_slot;
    size_t ag_off;
    size_t total;
};

/* Returns 0, or -1 when the sizes overflow. */
int ep_cpu_layout(const ep_config_t *cfg, int nranks, struct cpu_layout *lo);

struct cpu_chan {
    size_t data_off;
    size_t sig_off; /* [R] words, indexed by source */
    size_t ack_off; /* [R] words, indexed by destination */
    uint64_t seq;
};

struct cpu_ll_handle {
    struct ep_ll_handle base;
    int buf;
    int valid; /* the dispatch's receive half completed and no dispatch overwrote it since */
};

enum { CPU_HOOK_DISPATCH = 1, CPU_HOOK_COMBINE = 2 };

struct cpu_hook {
    struct ep_hook base;
    int buf;
    int kind;
    int pending;
};

/* Private state of one LL buffer: the dispatch's outputs and what the receive halves need. */
struct cpu_ll_buf {
    struct cpu_ll_handle handle;
    struct cpu_hook hook;
    /* dispatch outputs: [L][S][H] (bytes per element: 1 fp8, 2 bf16), [L][S][H/128], [L],
     * [L][S], [L][R][2]; row_src/row_slot [L][S]: source rank and top-k slot of each row */
    void *recv_x;
    float *recv_scales;
    int32_t *recv_count, *recv_src_info, *recv_range, *row_src, *row_slot;
    int disp_fp8;
    int disp_tokens;    /* T of the dispatch on this buffer */
    int32_t *disp_topk; /* [M][k] its topk_idx */
    /* a combine on this buffer: its tokens, ids and weights ([M][k]) and the output */
    int comb_tokens;
    int32_t *comb_topk;
    float *comb_w;
    uint16_t *comb_out;
};

struct cpu_ht_handle {
    struct ep_ht_handle base;
    int num_tokens;
    int num_recv;
    int32_t *pos;       /* [T][R] row of token t in what was sent to rank r, -1 if not sent */
    int32_t *send_list; /* [R][T] tokens sent to rank r, in order */
    int32_t send_cnt[EP_MAX_RANKS];
    int32_t recv_cnt[EP_MAX_RANKS];
    int32_t recv_off[EP_MAX_RANKS];
};

struct cpu_impl {
    ep_bootstrap_t bs; /* kept for the barrier of destroy */
    ep_wire_t *wire;
    struct cpu_layout lo;
    uint8_t *buf; /* symmetric buffer, lo.total bytes */
    struct cpu_chan ch[CPU_CH_COUNT];
    struct cpu_ll_buf ll[2];
    uint8_t *stage;   /* one staged row */
    uint64_t ag_call; /* ep_group_allgather calls so far (the same on every rank) */
};

/* Channel steps (see the protocol above); failures are recorded on the group. */
void cpu_chan_begin(struct cpu_chan *ch);
ep_status_t cpu_chan_wait_free(ep_group_t *g, struct cpu_chan *ch);
ep_status_t cpu_chan_post(ep_group_t *g, struct cpu_chan *ch);
ep_status_t cpu_chan_wait_all(ep_group_t *g, struct cpu_chan *ch);
ep_status_t cpu_chan_release(ep_group_t *g, struct cpu_chan *ch);
ep_status_t cpu_put(ep_group_t *g, int peer, size_t off, const void *src, size_t len);
/* Records the wire's failure on the group and returns st. */
ep_status_t cpu_wire_error(ep_group_t *g, ep_status_t st);

/* Bit mask of the ranks that the ids of one token live on. */
uint64_t cpu_dest_mask(const ep_group_t *g, const int32_t *idx);

ep_status_t cpu_ll_dispatch(ep_group_t *g, int buf, const ep_ll_dispatch_args_t *a,
                            ep_ll_dispatch_out_t *out, ep_ll_handle_t **handle, ep_hook_t **hook);
ep_status_t cpu_ll_combine(ep_group_t *g, int buf, const ep_ll_combine_args_t *a, ep_hook_t **hook);
ep_status_t cpu_hook_run(ep_group_t *g, ep_hook_t *hook);

ep_status_t cpu_get_dispatch_layout(ep_group_t *g, const int32_t *topk_idx, int T,
                                    ep_ht_layout_t *layout, void *stream);
ep_status_t cpu_ht_dispatch(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                            ep_ht_dispatch_out_t *out, ep_ht_handle_t **handle);
ep_status_t cpu_ht_dispatch_cached(ep_group_t *g, const ep_ht_handle_t *h,
                                   const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out);
ep_status_t cpu_ht_combine(ep_group_t *g, const ep_ht_handle_t *h, const uint16_t *x, uint16_t *out,
                           void *stream);
void cpu_ht_handle_destroy(ep_ht_handle_t *h);

#endif /* EP_CPU_H */
