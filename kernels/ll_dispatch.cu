/* LL (decode) dispatch: each token travels ONCE to every rank that hosts one of its experts
 * (with the fp8 cast fused into the send), and the receiver fans it out to its local experts.
 *
 * Send half (block b of send_blocks handles tokens b, b + send_blocks, ...):
 *   msg  at peer d: [src=rank][t] = fp8 x[H] + fp32 scales[H/128], or bf16 x[H]
 *   meta at peer d: [src=rank] = {T, has_w}, topk_idx [T][k], topk_w [T][k]  (block 0)
 *   then every block releases +1 onto counter ll_cnt[buf][0][rank] of every peer.
 *   Proxy path (tcp/rdma transport): each block takes a contiguous range of tokens; the message
 *   and meta rows go to this rank's own window (where they sit at the offsets they have in every
 *   peer's window); one put command per destination rank and run of consecutive tokens that go
 *   there; the last block to finish puts the meta and adds send_blocks to every peer's counter
 *   (a command, delivered after the puts).
 * Receive half (block handles local experts e, e + recv_blocks, ...): waits until every source
 *   counter reaches seq * send_blocks, then for expert e scans the sources in rank order and
 *   their tokens in index order, and copies each selected message into
 *   recv_x [L][S][H] / recv_scales [L][S][H/128]; writes recv_count [L], recv_src_info [L][S],
 *   recv_range [L][R][2] and the inverse map inv [R][Tmax][k] (row of (src, t, j)) that LL
 *   combine uses. The last block to finish advances seq[buf][0].
 */
#include "ep_cuda_common.cuh"

namespace
{

constexpr int kThreads = 256;

/* Bytes between two token messages: the message itself (fp8 x + scales, or bf16 x) rounded up
 * to 16, so that a source's consecutive tokens are one contiguous range (the proxy merges their
 * puts, which carry whole strides). */
__device__ __forceinline__ size_t msg_stride(const epk_ctx_t &c, const epk_ll_dispatch_params_t &p)
{
    const size_t n = p.use_fp8 ? (size_t)c.hidden + (size_t)c.hidden / 32 : (size_t)c.hidden * 2;
    return (n + 15) & ~(size_t)15;
}

__device__ void dispatch_send(const epk_ctx_t &c, const epk_ll_dispatch_params_t &p, int bid)
{
    const int H = c.hidden, k = c.topk, R = c.nranks, L = c.local_experts, T = p.num_tokens;
    const size_t boff = c.lay.ll_win + (size_t)p.buf * c.lay.ll_win_bytes;
    const size_t meta_off = boff + c.lay.ll_meta + (size_t)c.rank * c.lay.ll_meta_bytes;
    /* ranks written by stores: all of them, or only the own window on the proxy path */
    const int nd = c.proxy ? 1 : R;
    /* tokens of this block: every send_blocks-th (NVLink), or one contiguous range (proxy
     * path: its messages to a rank then leave as a few ranges instead of one put per token) */
    const int chunk = c.proxy ? (T + p.send_blocks - 1) / p.send_blocks : 1;
    const int t_begin = c.proxy ? bid * chunk : bid;
    const int t_end = c.proxy ? min(T, t_begin + chunk) : T, t_step = c.proxy ? 1 : p.send_blocks;
    __shared__ uint64_t s_mask;

    /* routing of every token to every rank (a receiver scans all of a source's tokens): each
     * block writes the rows of the tokens it sends, thread (d, j) one id and one weight */
    if (bid == 0 && (int)threadIdx.x < nd) {
        int32_t *hdr = (int32_t *)(epk_dst(c, threadIdx.x) + meta_off);
        hdr[0] = T;
        hdr[1] = p.topk_w != nullptr;
    }
    for (int t = t_begin; t < t_end; t += t_step)
        for (int i = threadIdx.x; i < nd * k; i += blockDim.x) {
            const int d = i / k, j = i - d * k;
            uint8_t *meta = epk_dst(c, d) + meta_off;
            ((int32_t *)(meta + 16))[(size_t)t * k + j] = p.topk_idx[(size_t)t * k + j];
            if (p.topk_w)
                ((float *)(meta + 16 + (size_t)c.ll_max_tokens * k * 4))[(size_t)t * k + j] =
                    p.topk_w[(size_t)t * k + j];
        }

    for (int t = t_begin; t < t_end; t += t_step) {
        if (threadIdx.x == 0) {
            uint64_t m = 0;
            for (int j = 0; j < k; ++j) {
                int e = p.topk_idx[(size_t)t * k + j];
                if (e >= 0) m |= 1ull << (e / L);
            }
            s_mask = m;
        }
        __syncthreads();
        const uint64_t mask = s_mask;
        /* destinations written by stores (the proxy's puts copy from the own window) */
        const uint64_t smask = c.proxy ? 1ull << c.rank : mask;
        const uint16_t *xt = p.x + (size_t)t * H;
        const size_t moff =
            boff + c.lay.ll_msg + ((size_t)c.rank * c.ll_max_tokens + t) * msg_stride(c, p);
        if (p.use_fp8) {
            /* 8 lanes per 128-channel group, 16 channels (32 bytes in, 16 bytes out) per lane */
            const int groups = H / 128;
            for (int g0 = 0; g0 < groups; g0 += blockDim.x / 8) {
                const int g = g0 + (int)(threadIdx.x >> 3), sub = threadIdx.x & 7;
                float f[16];
                float amax = 0.f;
                if (g < groups) {
                    const uint4 *src = (const uint4 *)(xt + g * 128 + sub * 16);
                    uint4 v0 = __ldg(src), v1 = __ldg(src + 1);
                    epk_unpack8(v0, f);
                    epk_unpack8(v1, f + 8);
#pragma unroll
                    for (int i = 0; i < 16; ++i)
                        amax = fmaxf(amax, fabsf(f[i]));
                }
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                if (g < groups) {
                    /* the reference's formula (kernels/fp8_quant_ref.h): scale = amax / 448,
                     * optionally rounded up to a power of two, q = e4m3(x / scale), with
                     * correctly rounded divisions */
                    if (!(amax >= 1e-4f)) amax = 1e-4f;
                    float sinv = __fdiv_rn(amax, 448.f);
                    if (p.round_scale) {
                        uint32_t u = __float_as_uint(sinv);
                        if (u & 0x7fffffu) u = (u & 0xff800000u) + 0x800000u;
                        sinv = __uint_as_float(u);
                    }
                    uint32_t w[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        w[i] = (uint32_t)epk_f2_to_e4m3x2(__fdiv_rn(f[4 * i], sinv),
                                                          __fdiv_rn(f[4 * i + 1], sinv)) |
                               ((uint32_t)epk_f2_to_e4m3x2(__fdiv_rn(f[4 * i + 2], sinv),
                                                           __fdiv_rn(f[4 * i + 3], sinv))
                                << 16);
                    const uint4 q = make_uint4(w[0], w[1], w[2], w[3]);
                    for (int d = 0; d < R; ++d) {
                        if (!(smask >> d & 1)) continue;
                        uint8_t *m = epk_dst(c, d) + moff;
                        *(uint4 *)(m + g * 128 + sub * 16) = q;
                        if (sub == 0) *(float *)(m + H + g * 4) = sinv;
                    }
                }
            }
        } else {
            for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
                const uint4 val = __ldg((const uint4 *)xt + v);
                for (int d = 0; d < R; ++d)
                    if (smask >> d & 1) *((uint4 *)(epk_dst(c, d) + moff) + v) = val;
            }
        }
        __syncthreads();
    }
    __syncthreads();
    if (c.proxy && (int)threadIdx.x < R && (int)threadIdx.x != c.rank && t_begin < t_end) {
        /* thread d: one put per run of consecutive tokens that go to rank d */
        const int d = threadIdx.x;
        const size_t stride = msg_stride(c, p);
        const size_t base = boff + c.lay.ll_msg + (size_t)c.rank * c.ll_max_tokens * stride;
        __threadfence_system();
        int run = -1;
        for (int t = t_begin; t <= t_end; ++t) {
            bool on = false;
            for (int j = 0; t < t_end && j < k && !on; ++j) {
                const int e = p.topk_idx[(size_t)t * k + j];
                on = e >= d * L && e < (d + 1) * L;
            }
            if (on && run < 0) run = t;
            if (!on && run >= 0) {
                epk_ring_push(c, EPK_CMD_PUT, d, base + run * stride, base + run * stride,
                              (uint32_t)((t - run) * stride));
                run = -1;
            }
        }
    }
    __syncthreads(); /* every put of this block is in the ring before it counts as done */
    const size_t cnt_off = c.lay.ll_cnt + ((size_t)(p.buf * 3 + 0) * R + c.rank) * 8;
    if (!c.proxy) {
        if ((int)threadIdx.x < R) {
            __threadfence_system();
            epk_red_release_sys(epk_at(c, threadIdx.x, cnt_off), 1);
        }
        return;
    }
    if (threadIdx.x == 0 &&
        epk_last_sender(&epk_ll_state_of(c)->sfin[p.buf][0], (unsigned)p.send_blocks)) {
        const size_t idx_bytes = 16 + (size_t)T * k * 4,
                     w_off = 16 + (size_t)c.ll_max_tokens * k * 4;
        for (int d = 0; d < R; ++d) {
            if (d == c.rank) continue;
            epk_ring_push(c, EPK_CMD_PUT, d, meta_off, meta_off, (uint32_t)idx_bytes);
            if (p.topk_w && T > 0)
                epk_ring_push(c, EPK_CMD_PUT, d, meta_off + w_off, meta_off + w_off,
                              (uint32_t)((size_t)T * k * 4));
            epk_ring_push(c, EPK_CMD_SIGNAL_ADD, d, (uint64_t)p.send_blocks, cnt_off, 0);
        }
        epk_self_add(c, cnt_off, (uint64_t)p.send_blocks);
    }
}

__device__ void dispatch_recv(const epk_ctx_t &c, const epk_ll_dispatch_params_t &p, int bid)
{
    const int H = c.hidden, k = c.topk, R = c.nranks, L = c.local_experts;
    const int Tmax = c.ll_max_tokens, S = Tmax * R;
    const uint8_t *wbuf = c.win + c.lay.ll_win + (size_t)p.buf * c.lay.ll_win_bytes;
    uint8_t *lbuf = c.base[c.rank] + c.lay.ll_loc + (size_t)p.buf * c.lay.ll_loc_bytes;
    epk_ll_state *st = epk_ll_state_of(c);
    __shared__ int s_fail;
    __shared__ int s_scan[33];
    __shared__ int s_tok[kThreads];
    __shared__ int s_row[kThreads];

    const uint64_t seq = *(volatile uint64_t *)&st->seq[p.buf][0] + 1;
    if (!epk_wait_all(c, (const uint64_t *)(c.win + c.lay.ll_cnt) + (size_t)(p.buf * 3 + 0) * R,
                      seq * (uint64_t)p.send_blocks, &st->gate[p.buf][0], seq, EPK_WAIT_LL_DISPATCH,
                      &s_fail))
        return;

    const size_t row_bytes = p.use_fp8 ? (size_t)H : (size_t)H * 2;
    const size_t stride = msg_stride(c, p);
    uint8_t *recv_x = lbuf + c.lay.ll_recv_x;
    float *recv_scales = (float *)(lbuf + c.lay.ll_recv_scales);
    int32_t *recv_count = (int32_t *)(lbuf + c.lay.ll_recv_count);
    int32_t *src_info = (int32_t *)(lbuf + c.lay.ll_src_info);
    int32_t *range = (int32_t *)(lbuf + c.lay.ll_range);
    int32_t *inv = (int32_t *)(lbuf + c.lay.ll_inv);

    __shared__ int s_ts[EP_MAX_RANKS];
    __shared__ int s_cnt[EP_MAX_RANKS];
    if ((int)threadIdx.x < R)
        s_ts[threadIdx.x] = *(const volatile int32_t *)(wbuf + c.lay.ll_meta +
                                                        (size_t)threadIdx.x * c.lay.ll_meta_bytes);
    __syncthreads();
    for (int e = bid; e < L; e += p.recv_blocks) {
        const int ge = c.rank * L + e;
        if ((int)threadIdx.x < R) s_cnt[threadIdx.x] = 0;
        int row = 0;
        /* one scan over all sources: index i = s * Tmax + t, so rows come out ordered by
         * (source rank, token) */
        for (int i0 = 0; i0 < R * Tmax; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x, s = i / Tmax, t = i - s * Tmax;
            int sel = 0;
            const int32_t *midx = nullptr;
            if (i < R * Tmax && t < s_ts[s]) {
                midx =
                    (const int32_t *)(wbuf + c.lay.ll_meta + (size_t)s * c.lay.ll_meta_bytes + 16) +
                    (size_t)t * k;
                for (int j = 0; j < k; ++j)
                    sel |= midx[j] == ge;
            }
            int tot;
            const int pre = epk_block_scan(sel, &tot, s_scan);
            if (sel) {
                const int r = row + pre;
                s_tok[pre] = i;
                s_row[pre] = r;
                src_info[(size_t)e * S + r] = t;
                atomicAdd(&s_cnt[s], 1);
                for (int j = 0; j < k; ++j)
                    if (midx[j] == ge) inv[((size_t)s * Tmax + t) * k + j] = r;
            }
            __syncthreads();
            /* copy the tot selected messages: all 16-byte vectors of all rows at once, eight
             * independent loads in flight per thread before their stores */
            const int nvec = (int)(row_bytes / 16), total = tot * nvec;
            for (int q0 = threadIdx.x; q0 < total; q0 += 8 * blockDim.x) {
                uint4 val[8];
                uint4 *dst[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    const int q = q0 + u * blockDim.x;
                    if (q < total) {
                        const int n = q / nvec, v = q - n * nvec;
                        const uint8_t *msg = wbuf + c.lay.ll_msg + (size_t)s_tok[n] * stride;
                        val[u] = *((const uint4 *)msg + v);
                        dst[u] = (uint4 *)(recv_x + ((size_t)e * S + s_row[n]) * row_bytes) + v;
                    }
                }
#pragma unroll
                for (int u = 0; u < 8; ++u)
                    if (q0 + u * (int)blockDim.x < total) *dst[u] = val[u];
            }
            if (p.use_fp8) {
                const int ns = H / 128;
                for (int q = threadIdx.x; q < tot * ns; q += blockDim.x) {
                    const int n = q / ns, g = q - n * ns;
                    const uint8_t *msg = wbuf + c.lay.ll_msg + (size_t)s_tok[n] * stride;
                    recv_scales[((size_t)e * S + s_row[n]) * ns + g] =
                        ((const float *)(msg + H))[g];
                }
            }
            row += tot;
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            int first = 0;
            for (int s = 0; s < R; ++s) {
                range[((size_t)e * R + s) * 2] = first;
                range[((size_t)e * R + s) * 2 + 1] = s_cnt[s];
                first += s_cnt[s];
            }
            recv_count[e] = row;
        }
        __syncthreads();
    }

    epk_ll_recv_done(st, p.buf, 0, (unsigned)p.recv_blocks, seq);
}

__global__ void __launch_bounds__(kThreads, 2)
    ll_dispatch_kernel(const epk_ctx_t c, const epk_ll_dispatch_params_t p, int mode)
{
    const int bid = blockIdx.x;
    if (mode != 2 && bid < p.send_blocks) dispatch_send(c, p, bid);
    if (mode != 1 && bid < p.recv_blocks) dispatch_recv(c, p, bid);
}

} // namespace

extern "C" int epk_ll_dispatch(const epk_ctx_t *c, const epk_ll_dispatch_params_t *p, int mode,
                               void *stream)
{
    const int grid = epk_ll_grid(mode, p->send_blocks, p->recv_blocks);
    ll_dispatch_kernel<<<grid, kThreads, 0, (cudaStream_t)stream>>>(*c, *p, mode);
    return EPK_CHECK_LAUNCH();
}

/* Loads this file's kernels now (see epk_preload_kernels). */
extern "C" int epk_preload_ll_dispatch(void)
{
    return epk_preload_kernels(ll_dispatch_kernel);
}
