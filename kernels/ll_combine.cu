/* LL (decode) combine: each expert rank reduces the outputs of its local experts for a token
 * (weighted by the routing weights that travelled with the dispatch) and sends ONE bf16 partial
 * sum per (token, rank) back; the source rank adds the partials of the ranks its token visited.
 *
 * Send half (expert rank; block b handles tokens b, b + send_blocks, ... of every source s):
 *   partial[h] = sum_{j: topk_idx[s][t][j] local} w[s][t][j] * expert_y[e_j][inv[s][t][j]][h]
 *   -> comb at rank s: [src=rank][t][H] bf16 in this combine's buffer; then every block
 *   releases +1 onto ll_cnt[buf][1][rank] of every peer.
 *   When a source's dispatch carried no weights, that source sends its combine weights first
 *   (block 0, into the dispatch meta) and signals ll_cnt[buf][2]; expert ranks wait for them.
 *   Proxy path (tcp/rdma transport): each block takes a contiguous range of pairs; a partial
 *   sum for rank s is stored in this rank's send area [s][t], and one put command per block and
 *   rank copies the block's rows to [rank][t...] of s's comb; the last block to finish adds
 *   send_blocks to every peer's counter (a command, delivered after the puts).
 * Receive half (source rank; block handles tokens b, b + recv_blocks, ...):
 *   out[t][h] = bf16( sum over ranks d that token t visited, ascending, of partial_d[t][h] ).
 */
#include "ep_cuda_common.cuh"

namespace
{

constexpr int kThreads = 256;
constexpr int kRowsUnroll = 8; /* expert rows of one token loaded together */

__device__ void combine_send(const epk_ctx_t &c, const epk_ll_combine_params_t &p, int bid)
{
    const int H = c.hidden, k = c.topk, R = c.nranks, L = c.local_experts;
    const int Tmax = c.ll_max_tokens, S = Tmax * R;
    epk_ll_state *st = epk_ll_state_of(c);
    const size_t doff = c.lay.ll_win + (size_t)p.disp_buf * c.lay.ll_win_bytes;
    const size_t coff = c.lay.ll_win + (size_t)p.buf * c.lay.ll_win_bytes;
    const uint8_t *dwin = c.win + doff;
    const int32_t *inv = (const int32_t *)(c.base[c.rank] + c.lay.ll_loc +
                                           (size_t)p.disp_buf * c.lay.ll_loc_bytes + c.lay.ll_inv);
    const uint64_t seq = *(volatile uint64_t *)&st->seq[p.buf][1] + 1;
    __shared__ int s_fail;

    /* weights of this rank's tokens, for the expert ranks, when its dispatch had none */
    const size_t mw_off =
        doff + c.lay.ll_meta + (size_t)c.rank * c.lay.ll_meta_bytes + 16 + (size_t)Tmax * k * 4;
    if (bid == 0) {
        const int has_w =
            ((const int32_t *)(dwin + c.lay.ll_meta + (size_t)c.rank * c.lay.ll_meta_bytes))[1];
        for (int d = 0; d < (c.proxy ? 1 : R) && !has_w; ++d) {
            float *mw = (float *)(epk_dst(c, d) + mw_off);
            for (int i = threadIdx.x; i < p.num_tokens * k; i += blockDim.x)
                mw[i] = p.topk_w[i];
        }
        __syncthreads();
        const size_t wcnt_off = c.lay.ll_cnt + ((size_t)(p.buf * 3 + 2) * R + c.rank) * 8;
        if (!c.proxy && (int)threadIdx.x < R) {
            __threadfence_system();
            epk_red_release_sys(epk_at(c, threadIdx.x, wcnt_off), 1);
        } else if (c.proxy && threadIdx.x == 0) {
            __threadfence_system();
            for (int d = 0; d < R; ++d) {
                if (d == c.rank) continue;
                if (!has_w && p.num_tokens > 0)
                    epk_ring_push(c, EPK_CMD_PUT, d, mw_off, mw_off,
                                  (uint32_t)((size_t)p.num_tokens * k * 4));
                epk_ring_push(c, EPK_CMD_SIGNAL_ADD, d, 1, wcnt_off, 0);
            }
            epk_self_add(c, wcnt_off, 1);
        }
    }
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    if ((int)threadIdx.x < R) {
        const uint8_t *meta = dwin + c.lay.ll_meta + (size_t)threadIdx.x * c.lay.ll_meta_bytes;
        if (!((const volatile int32_t *)meta)[1]) {
            const uint64_t *cnt = (const uint64_t *)(c.win + c.lay.ll_cnt) +
                                  (size_t)(p.buf * 3 + 2) * R + threadIdx.x;
            if (!epk_wait_ge(c, cnt, seq, threadIdx.x, EPK_WAIT_LL_WEIGHTS)) s_fail = 1;
        }
    }
    __syncthreads();
    if (s_fail) return;

    __shared__ int s_e[EP_MAX_TOPK];
    __shared__ int s_r[EP_MAX_TOPK];
    __shared__ float s_w[EP_MAX_TOPK];
    __shared__ int s_n;
    /* (source, token) pairs q = s * Tmax + t spread over the blocks, one pair per block per
     * round (NVLink), or one contiguous range of pairs per block (proxy path: a block's rows for
     * a rank then leave as one put) */
    const int chunk = c.proxy ? (R * Tmax + p.send_blocks - 1) / p.send_blocks : 1;
    const int q_begin = c.proxy ? bid * chunk : bid;
    const int q_end = c.proxy ? min(R * Tmax, q_begin + chunk) : R * Tmax;
    /* the meta lives in the window (host memory on the proxy path): each value is read once, by
     * as many threads at a time as possible */
    __shared__ int s_T[EP_MAX_RANKS];
    __shared__ int s_mi[EP_MAX_TOPK], s_mr[EP_MAX_TOPK];
    __shared__ float s_mw[EP_MAX_TOPK];
    if ((int)threadIdx.x < R)
        s_T[threadIdx.x] = *(const volatile int32_t *)(dwin + c.lay.ll_meta +
                                                       (size_t)threadIdx.x * c.lay.ll_meta_bytes);
    __syncthreads();
    for (int q = q_begin; q < q_end; q += c.proxy ? 1 : p.send_blocks) {
        const int s = q / Tmax, t = q - s * Tmax;
        if (t >= s_T[s]) continue;
        const uint8_t *meta = dwin + c.lay.ll_meta + (size_t)s * c.lay.ll_meta_bytes;
        if ((int)threadIdx.x < k) {
            const int j = threadIdx.x;
            s_mi[j] = ((const int32_t *)(meta + 16))[(size_t)t * k + j];
            s_mw[j] = ((const float *)(meta + 16 + (size_t)Tmax * k * 4))[(size_t)t * k + j];
            s_mr[j] = inv[((size_t)s * Tmax + t) * k + j];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int n = 0;
            for (int j = 0; j < k; ++j) {
                const int e = s_mi[j];
                if (e >= c.rank * L && e < (c.rank + 1) * L) {
                    s_e[n] = e - c.rank * L;
                    s_r[n] = s_mr[j];
                    s_w[n] = s_mw[j];
                    ++n;
                }
            }
            s_n = n;
        }
        __syncthreads();
        const int n = s_n;
        /* where the row goes: rank s's comb [rank][t], or on the proxy path this rank's send
         * area [s][t] (own comb for s == rank) */
        const size_t comb_off = coff + c.lay.ll_comb + ((size_t)c.rank * Tmax + t) * H * 2;
        const size_t send_off = coff + c.lay.ll_send + ((size_t)s * Tmax + t) * H * 2;
        const bool via_ring = c.proxy && s != c.rank;
        if (n > 0) {
            uint4 *dst = (uint4 *)(via_ring ? c.win + send_off : epk_dst(c, s) + comb_off);
            const uint4 *rows[kRowsUnroll];
#pragma unroll
            for (int i = 0; i < kRowsUnroll; ++i)
                rows[i] = i < n ? (const uint4 *)(p.expert_y + ((size_t)s_e[i] * S + s_r[i]) * H)
                                : nullptr;
            for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
                /* all rows' loads first, then the weighted sum in slot order */
                uint4 y[kRowsUnroll];
#pragma unroll
                for (int i = 0; i < kRowsUnroll; ++i)
                    if (i < n) y[i] = __ldg(rows[i] + v);
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
                for (int i = 0; i < kRowsUnroll; ++i) {
                    if (i < n) {
                        float f[8];
                        epk_unpack8(y[i], f);
#pragma unroll
                        for (int qq = 0; qq < 8; ++qq)
                            acc[qq] = fmaf(s_w[i], f[qq], acc[qq]);
                    }
                }
                for (int i = kRowsUnroll; i < n; ++i) {
                    float f[8];
                    epk_unpack8(
                        __ldg((const uint4 *)(p.expert_y + ((size_t)s_e[i] * S + s_r[i]) * H) + v),
                        f);
#pragma unroll
                    for (int qq = 0; qq < 8; ++qq)
                        acc[qq] = fmaf(s_w[i], f[qq], acc[qq]);
                }
                dst[v] = epk_pack8(acc);
            }
        }
        __syncthreads();
    }
    __syncthreads();
    if (c.proxy && (int)threadIdx.x < R && (int)threadIdx.x != c.rank && q_begin < q_end) {
        /* thread s: this block's rows for rank s, tokens [lo, hi) below s's T, as one put (rows
         * of tokens that did not visit this rank travel too, and are never read) */
        const int s = threadIdx.x;
        const int lo = max(q_begin, s * Tmax) - s * Tmax;
        const int Ts =
            *(const volatile int32_t *)(dwin + c.lay.ll_meta + (size_t)s * c.lay.ll_meta_bytes);
        const int hi = min(min(q_end, (s + 1) * Tmax) - s * Tmax, Ts);
        if (lo < hi) {
            __threadfence_system();
            epk_ring_push(c, EPK_CMD_PUT, s, coff + c.lay.ll_send + ((size_t)s * Tmax + lo) * H * 2,
                          coff + c.lay.ll_comb + ((size_t)c.rank * Tmax + lo) * H * 2,
                          (uint32_t)((size_t)(hi - lo) * H * 2));
        }
    }
    __syncthreads(); /* every put of this block is in the ring before it counts as done */
    const size_t cnt_off = c.lay.ll_cnt + ((size_t)(p.buf * 3 + 1) * R + c.rank) * 8;
    if (!c.proxy) {
        if ((int)threadIdx.x < R) {
            __threadfence_system();
            epk_red_release_sys(epk_at(c, threadIdx.x, cnt_off), 1);
        }
        return;
    }
    if (threadIdx.x == 0 && epk_last_sender(&st->sfin[p.buf][1], (unsigned)p.send_blocks)) {
        for (int d = 0; d < R; ++d)
            if (d != c.rank)
                epk_ring_push(c, EPK_CMD_SIGNAL_ADD, d, (uint64_t)p.send_blocks, cnt_off, 0);
        epk_self_add(c, cnt_off, (uint64_t)p.send_blocks);
    }
}

__device__ void combine_recv(const epk_ctx_t &c, const epk_ll_combine_params_t &p, int bid)
{
    const int H = c.hidden, k = c.topk, R = c.nranks, L = c.local_experts, Tmax = c.ll_max_tokens;
    epk_ll_state *st = epk_ll_state_of(c);
    const uint8_t *cbuf = c.win + c.lay.ll_win + (size_t)p.buf * c.lay.ll_win_bytes;
    __shared__ int s_fail;
    __shared__ uint64_t s_mask;

    const uint64_t seq = *(volatile uint64_t *)&st->seq[p.buf][1] + 1;
    if (!epk_wait_all(c, (const uint64_t *)(c.win + c.lay.ll_cnt) + (size_t)(p.buf * 3 + 1) * R,
                      seq * (uint64_t)p.send_blocks, &st->gate[p.buf][1], seq, EPK_WAIT_LL_COMBINE,
                      &s_fail))
        return;

    for (int t = bid; t < p.num_tokens; t += p.recv_blocks) {
        if (threadIdx.x == 0) {
            uint64_t m = 0;
            for (int j = 0; j < k; ++j) {
                const int e = p.topk_idx[(size_t)t * k + j];
                if (e >= 0) m |= 1ull << (e / L);
            }
            s_mask = m;
        }
        __syncthreads();
        const uint64_t mask = s_mask;
        for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int d0 = 0; d0 < R; d0 += 8) {
                uint4 y[8];
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (d0 + i < R && (mask >> (d0 + i) & 1))
                        y[i] = *((const uint4 *)(cbuf + c.lay.ll_comb +
                                                 ((size_t)(d0 + i) * Tmax + t) * H * 2) +
                                 v);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (d0 + i < R && (mask >> (d0 + i) & 1)) {
                        float f[8];
                        epk_unpack8(y[i], f);
#pragma unroll
                        for (int q = 0; q < 8; ++q)
                            acc[q] += f[q];
                    }
                }
            }
            *((uint4 *)(p.out + (size_t)t * H) + v) = epk_pack8(acc);
        }
        __syncthreads();
    }

    epk_ll_recv_done(st, p.buf, 1, (unsigned)p.recv_blocks, seq);
}

__global__ void __launch_bounds__(kThreads, 2)
    ll_combine_kernel(const epk_ctx_t c, const epk_ll_combine_params_t p, int mode)
{
    const int bid = blockIdx.x;
    if (mode != 2 && bid < p.send_blocks) combine_send(c, p, bid);
    if (mode != 1 && bid < p.recv_blocks) combine_recv(c, p, bid);
}

} // namespace

extern "C" int epk_ll_combine(const epk_ctx_t *c, const epk_ll_combine_params_t *p, int mode,
                              void *stream)
{
    const int grid = epk_ll_grid(mode, p->send_blocks, p->recv_blocks);
    ll_combine_kernel<<<grid, kThreads, 0, (cudaStream_t)stream>>>(*c, *p, mode);
    return EPK_CHECK_LAUNCH();
}

/* Loads this file's kernels now (see epk_preload_kernels). */
extern "C" int epk_preload_ll_combine(void)
{
    return epk_preload_kernels(ll_combine_kernel);
}
