/* The cuda backend's symmetric-buffer layout (kernels/ep_layout.cu, epk_layout) for NVLink and
 * for the proxy path, over a grid of configurations: every region the kernels and the host
 * address is listed with the size they use (recomputed here from the config, independently of
 * the layout code), and no two overlap; window regions lie below win_total (the part peers and
 * the wire write), local ones above it; every region starts 16-byte aligned (the kernels move
 * uint4), counters 8-byte aligned; everything fits in total. A pure host function: no GPU needed.
 */
#include "check.h"
#include "ep_cuda.h"

#include <stdio.h>
#include <stdlib.h>

struct region {
    const char *name;
    size_t off, len;
    int window;
};

static int failures;

#define EXPECT(cond, ...) TEST_CHECK(-1, -1, failures++, cond, __VA_ARGS__)

static void check(int R, int E, int H, int k, int T, int Tht, int proxy)
{
    ep_config_t cfg = {0};
    cfg.num_experts = E;
    cfg.hidden = H;
    cfg.num_topk = k;
    cfg.ll_max_tokens = T;
    cfg.ht_max_tokens = Tht;
    epk_layout_t l;
    epk_layout(&l, &cfg, R, proxy);
    const size_t L = (size_t)(E / R), S = (size_t)T * R, ns = (size_t)H / 128;
    const size_t row_stride = ((size_t)(R + E) * 4 + 15) / 16 * 16;
    const size_t msg =
        (2 * (size_t)H > (size_t)H + (size_t)H / 32 ? 2 * (size_t)H : (size_t)H + (size_t)H / 32);
    const size_t Tp = proxy ? (size_t)Tht : 0, Tn = proxy ? 0 : (size_t)Tht;
    struct region r[64];
    int n = 0;
#define REG(nm, o, ln, w) r[n++] = (struct region){nm, (o), (ln), (w)}
    REG("ll_cnt", l.ll_cnt, 2 * 3 * (size_t)R * 8, 1);
    REG("ht_cnt", l.ht_cnt, 6 * (size_t)R * 8, 1);
    REG("ht_rows", l.ht_rows, 2 * (size_t)R * row_stride, 1);
    if (!proxy) REG("ht_ptrs", l.ht_ptrs, 2 * (size_t)R * sizeof(epk_ht_ptrs_t), 1);
    REG("ht_stage", l.ht_stage, (size_t)R * Tn * H * 2, 1);
    if (proxy && Tht > 0) {
        /* one HT block: x rows (bf16 at most), scales, local ids, weights */
        EXPECT(l.ht_seg_s >= Tp * H * 2 && l.ht_seg_i >= l.ht_seg_s + Tp * ns * 4 &&
                   l.ht_seg_w >= l.ht_seg_i + Tp * k * 4 && l.ht_blk >= l.ht_seg_w + Tp * k * 4,
               "R%d H%d k%d Tht%d: HT block segments overlap", R, H, k, Tht);
        REG("ht_xfer", l.ht_xfer, 2 * (size_t)R * l.ht_blk, 1);
        REG("ht_send", l.ht_send, (size_t)R * l.ht_blk, 1);
    }
    for (int b = 0; b < 2 && T > 0; ++b) {
        const size_t w = l.ll_win + (size_t)b * l.ll_win_bytes;
        const size_t lo = l.ll_loc + (size_t)b * l.ll_loc_bytes;
        EXPECT(l.ll_meta_bytes >= 16 + (size_t)T * k * 8, "meta rows do not fit");
        EXPECT(l.ll_msg_stride >= msg, "message stride %zu < %zu", l.ll_msg_stride, msg);
        REG(b ? "ll_meta[1]" : "ll_meta[0]", w + l.ll_meta, (size_t)R * l.ll_meta_bytes, 1);
        REG(b ? "ll_msg[1]" : "ll_msg[0]", w + l.ll_msg, (size_t)R * T * l.ll_msg_stride, 1);
        REG(b ? "ll_comb[1]" : "ll_comb[0]", w + l.ll_comb, (size_t)R * T * H * 2, 1);
        if (proxy) REG(b ? "ll_send[1]" : "ll_send[0]", w + l.ll_send, (size_t)R * T * H * 2, 1);
        REG(b ? "ll_inv[1]" : "ll_inv[0]", lo + l.ll_inv, (size_t)R * T * k * 4, 0);
        REG(b ? "recv_x[1]" : "recv_x[0]", lo + l.ll_recv_x, L * S * H * 2, 0);
        REG(b ? "scales[1]" : "scales[0]", lo + l.ll_recv_scales, L * S * ns * 4, 0);
        REG(b ? "count[1]" : "count[0]", lo + l.ll_recv_count, L * 4, 0);
        REG(b ? "src_info[1]" : "src_info[0]", lo + l.ll_src_info, L * S * 4, 0);
        REG(b ? "range[1]" : "range[0]", lo + l.ll_range, L * R * 8, 0);
    }
    REG("ll_state", l.ll_state, 128, 0);
#undef REG
    for (int i = 0; i < n; ++i) {
        const struct region *a = &r[i];
        EXPECT(a->off % 16 == 0, "R%d proxy%d: %s at %zu is not 16-byte aligned", R, proxy, a->name,
               a->off);
        EXPECT(a->off + a->len <= l.total, "R%d proxy%d: %s ends at %zu past total %zu", R, proxy,
               a->name, a->off + a->len, l.total);
        if (a->window)
            EXPECT(a->off + a->len <= l.win_total,
                   "R%d proxy%d: window region %s ends at %zu > %zu", R, proxy, a->name,
                   a->off + a->len, l.win_total);
        else
            EXPECT(a->off >= l.win_total, "R%d proxy%d: local region %s at %zu inside the window",
                   R, proxy, a->name, a->off);
        for (int j = i + 1; j < n; ++j) {
            const struct region *c = &r[j];
            if (!a->len || !c->len) continue;
            EXPECT(a->off + a->len <= c->off || c->off + c->len <= a->off,
                   "R%d E%d H%d k%d T%d Tht%d proxy%d: %s [%zu, +%zu) overlaps %s [%zu, +%zu)", R,
                   E, H, k, T, Tht, proxy, a->name, a->off, a->len, c->name, c->off, c->len);
        }
    }
}

int main(void)
{
    const int ranks[] = {1, 2, 3, 8, 64};
    const int hidden[] = {128, 256, 2048, 7168};
    const int tokens[] = {0, 1, 24, 128};
    for (int proxy = 0; proxy < 2; ++proxy)
        for (int ri = 0; ri < 5; ++ri)
            for (int hi = 0; hi < 4; ++hi)
                for (int ti = 0; ti < 4; ++ti) {
                    const int R = ranks[ri];
                    check(R, 4 * R, hidden[hi],
                          R == 1      ? 2
                          : 8 < 4 * R ? 8
                                      : 4 * R,
                          tokens[ti], tokens[ti] * 4, proxy);
                }
    printf("%s: epk_layout checked over %d configurations\n", failures ? "FAILED" : "PASSED",
           2 * 5 * 4 * 4);
    return failures ? 1 : 0;
}
