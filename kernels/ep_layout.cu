/* The symmetric-buffer layout shared by the kernels and the cuda backend (host code). */
#include "ep_cuda.h"

static size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

extern "C" const char *epk_wait_name(int what)
{
    switch (what) {
    case EPK_WAIT_LL_DISPATCH:
        return "LL dispatch data";
    case EPK_WAIT_LL_COMBINE:
        return "LL combine data";
    case EPK_WAIT_LL_WEIGHTS:
        return "LL combine weights";
    case EPK_WAIT_HT_COUNTS:
        return "HT dispatch counts";
    case EPK_WAIT_HT_PTRS:
        return "HT buffer addresses";
    case EPK_WAIT_HT_DONE:
        return "HT transfer completion";
    case EPK_WAIT_RING:
        return "a free slot of the proxy command ring (the proxy thread is not draining it)";
    default:
        return "unknown wait";
    }
}

extern "C" void epk_layout(epk_layout_t *lay, const ep_config_t *cfg, int nranks, int proxy)
{
    const size_t R = (size_t)nranks, E = (size_t)cfg->num_experts, L = E / R;
    const size_t H = (size_t)cfg->hidden, k = (size_t)cfg->num_topk;
    const size_t T = cfg->ll_max_tokens > 0 ? (size_t)cfg->ll_max_tokens : 0;
    const size_t S = T * R;
    const size_t Tht = cfg->ht_max_tokens > 0 && !proxy ? (size_t)cfg->ht_max_tokens : 0;
    size_t off = 0;

    /* window: what peers write */
    lay->ll_cnt = off;
    off = align_up(off + 2 * 3 * R * 8, 256);
    lay->ht_cnt = off;
    off = align_up(off + 6 * R * 8, 256);
    lay->ht_rows = off;
    off = align_up(off + 2 * R * align_up((R + E) * 4, 16), 256);
    lay->ht_ptrs = off;
    off = align_up(off + (proxy ? 0 : 2 * R * sizeof(epk_ht_ptrs_t)), 256);
    lay->ht_stage = off;
    off = align_up(off + R * Tht * H * 2, 4096);
    const size_t Tpx = cfg->ht_max_tokens > 0 && proxy ? (size_t)cfg->ht_max_tokens : 0;
    lay->ht_seg_s = align_up(Tpx * H * 2, 256);
    lay->ht_seg_i = lay->ht_seg_s + align_up(Tpx * (H / 128) * 4, 256);
    lay->ht_seg_w = lay->ht_seg_i + align_up(Tpx * k * 4, 256);
    lay->ht_blk = Tpx > 0 ? align_up(lay->ht_seg_w + Tpx * k * 4, 4096) : 0;
    lay->ht_xfer = off;
    off += 2 * R * lay->ht_blk;
    lay->ht_send = off;
    off += R * lay->ht_blk;
    lay->ag = off;
    off = align_up(off + (proxy ? EPK_AG_BYTES(R) : 0), 256);

    /* window part of one LL buffer */
    size_t b = 0;
    lay->ll_meta_bytes = align_up(16 + T * k * 8, 256);
    lay->ll_meta = b;
    b += R * lay->ll_meta_bytes;
    lay->ll_msg_stride = align_up(2 * H > H + H / 32 ? 2 * H : H + H / 32, 16);
    lay->ll_msg = b;
    b = align_up(b + R * T * lay->ll_msg_stride, 256);
    lay->ll_comb = b;
    b = align_up(b + R * T * H * 2, 256);
    lay->ll_send = b;
    b = align_up(b + (proxy ? R * T * H * 2 : 0), 256);
    lay->ll_win_bytes = T > 0 ? b : 0;
    lay->ll_win = off;
    off = align_up(off + 2 * lay->ll_win_bytes, 4096);
    lay->win_total = off;

    /* local */
    lay->ll_state = off;
    off = align_up(off + 128, 256);
    b = 0;
    lay->ll_inv = b;
    b = align_up(b + R * T * k * 4, 256);
    lay->ll_recv_x = b;
    b = align_up(b + L * S * H * 2, 256);
    lay->ll_recv_scales = b;
    b = align_up(b + L * S * (H / 128) * 4, 256);
    lay->ll_recv_count = b;
    b = align_up(b + L * 4, 256);
    lay->ll_src_info = b;
    b = align_up(b + L * S * 4, 256);
    lay->ll_range = b;
    b = align_up(b + L * R * 8, 256);
    lay->ll_loc_bytes = T > 0 ? b : 0;
    lay->ll_loc = off;
    off += 2 * lay->ll_loc_bytes;
    lay->total = align_up(off, 4096);
}

extern "C" int epk_preload_ll_dispatch(void);
extern "C" int epk_preload_ll_combine(void);
extern "C" int epk_preload_ht(void);
extern "C" int epk_preload_route(void);
extern "C" int epk_preload_ht_proxy(void);

extern "C" int epk_preload(void)
{
    int rc;
    if ((rc = epk_preload_ll_dispatch()) || (rc = epk_preload_ll_combine()) ||
        (rc = epk_preload_ht()) || (rc = epk_preload_route()) || (rc = epk_preload_ht_proxy()))
        return rc;
    return 0;
}
