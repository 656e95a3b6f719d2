/* HT (prefill) layout, dispatch and combine for the ranks of one process (peer access).
 *
 * Counts first: epk_ht_prep (one block) computes, per destination d, the row pos[t][d] of each
 * token among the rows this rank sends to d (source order) and per-expert counts, publishes its
 * row {counts[R], expert counts[E]} to every peer, waits for every peer's row, then derives
 * base_at[d] (first row of this rank's block on d: rows are ordered by (source rank, token)),
 * N and num_recv_per_expert, and writes N to mapped host memory for the host.
 * Transfer: epk_ht_dispatch exchanges the output pointers (recv_x ...) through the buffer, then
 * `blocks` CTAs push every token once per destination rank straight into that rank's recv_x
 * (16-byte peer stores, one warp per token, loads shared by all destinations), and signal.
 * Combine pulls: the source rank reads each copy of its token from the ranks it visited
 * (their combine input, exchanged the same way), sums in fp32 and writes out[t] once; every
 * rank then waits until all peers finished reading its input.
 */
#include "ep_cuda_common.cuh"

namespace
{

constexpr int kPrepThreads = 1024;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;

__device__ __forceinline__ size_t row_stride(const epk_ctx_t &c)
{
    return ((size_t)(c.nranks + c.num_experts) * 4 + 15) / 16 * 16;
}

__device__ __forceinline__ uint64_t *ht_word(const epk_ctx_t &c, int rank, int idx)
{
    return epk_at(c, rank, c.lay.ht_cnt + (size_t)idx * 8);
}

__global__ void ht_layout_kernel(const epk_ctx_t c, const int32_t *topk_idx, int T,
                                 int32_t *per_rank, int32_t *per_expert, uint8_t *in_rank)
{
    const int R = c.nranks, L = c.local_experts, k = c.topk;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
        uint64_t m = 0;
        for (int j = 0; j < k; ++j) {
            const int e = topk_idx[(size_t)t * k + j];
            if (e < 0) continue;
            atomicAdd(&per_expert[e], 1);
            m |= 1ull << (e / L);
        }
        for (int d = 0; d < R; ++d) {
            const int in = (int)(m >> d & 1);
            in_rank[(size_t)t * R + d] = (uint8_t)in;
            if (in) atomicAdd(&per_rank[d], 1);
        }
    }
}

__global__ void __launch_bounds__(kPrepThreads)
    ht_prep_kernel(const epk_ctx_t c, const epk_ht_state_t st, const int32_t *topk_idx, int T,
                   int align, int32_t *num_recv_per_expert, epk_ht_info_t *info,
                   const epk_ht_ptrs_t mine, uint64_t seq)
{
    const int R = c.nranks, L = c.local_experts, k = c.topk, E = c.num_experts;
    const int parity = (int)(seq & 1);
    extern __shared__ int s_ecnt[]; /* [E] */
    __shared__ int s_scan[33];
    __shared__ int s_cnt[EP_MAX_RANKS];
    __shared__ int s_fail;

    for (int e = threadIdx.x; e < E; e += blockDim.x)
        s_ecnt[e] = 0;
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    for (int d = 0; d < R; ++d) {
        int run = 0;
        for (int t0 = 0; t0 < T; t0 += blockDim.x) {
            const int t = t0 + threadIdx.x;
            int sel = 0;
            if (t < T)
                for (int j = 0; j < k; ++j) {
                    const int e = topk_idx[(size_t)t * k + j];
                    sel |= e >= d * L && e < (d + 1) * L;
                }
            int tot;
            const int pre = epk_block_scan(sel, &tot, s_scan);
            if (t < T) st.pos[(size_t)t * R + d] = sel ? run + pre : -1;
            run += tot;
        }
        if (threadIdx.x == 0) s_cnt[d] = run;
    }
    /* runs of consecutive tokens per destination, for the copy-engine path */
    for (int d = 0; d < R; ++d) {
        int nstart = 0, nend = 0;
        for (int t0 = 0; t0 < T; t0 += blockDim.x) {
            const int t = t0 + threadIdx.x;
            const int here = t < T && st.pos[(size_t)t * R + d] >= 0;
            const int prev = t > 0 && t - 1 < T && here ? st.pos[(size_t)(t - 1) * R + d] >= 0 : 0;
            const int next = t + 1 < T && here ? st.pos[(size_t)(t + 1) * R + d] >= 0 : 0;
            const int is_start = here && !prev, is_end = here && !next;
            int ts, te;
            const int ps = epk_block_scan(is_start, &ts, s_scan);
            const int pe = epk_block_scan(is_end, &te, s_scan);
            if (is_start && nstart + ps < EPK_MAX_RUNS) info->runs[d][nstart + ps][0] = t;
            if (is_end && nend + pe < EPK_MAX_RUNS) info->runs[d][nend + pe][1] = t;
            nstart += ts;
            nend += te;
        }
        if (threadIdx.x == 0) info->nruns[d] = nstart <= EPK_MAX_RUNS ? nstart : -1;
    }
    for (int i = threadIdx.x; i < T * k; i += blockDim.x) {
        const int e = topk_idx[i];
        if (e >= 0) atomicAdd(&s_ecnt[e], 1);
    }
    __syncthreads();

    /* publish {counts[R], expert counts[E]} to every rank, then release its flag */
    for (int d = 0; d < R; ++d) {
        int32_t *row =
            (int32_t *)(c.base[d] + c.lay.ht_rows + ((size_t)parity * R + c.rank) * row_stride(c));
        for (int i = threadIdx.x; i < R + E; i += blockDim.x)
            row[i] = i < R ? s_cnt[i] : s_ecnt[i - R];
    }
    if ((int)threadIdx.x < R)
        ((epk_ht_ptrs_t *)(c.base[threadIdx.x] + c.lay.ht_ptrs))[(size_t)parity * R + c.rank] =
            mine;
    __syncthreads();
    if ((int)threadIdx.x < R) {
        __threadfence_system();
        epk_st_release_sys(ht_word(c, threadIdx.x, 2 * R + parity * R + c.rank), seq);
        epk_st_release_sys(ht_word(c, threadIdx.x, parity * R + c.rank), seq);
    }
    if ((int)threadIdx.x < R)
        if (!epk_wait_ge(c, ht_word(c, c.rank, parity * R + threadIdx.x), seq, threadIdx.x,
                         EPK_WAIT_HT_COUNTS))
            s_fail = 1;
    __syncthreads();
    if (s_fail) return;

    const uint8_t *rows = c.base[c.rank] + c.lay.ht_rows + (size_t)parity * R * row_stride(c);
    if (threadIdx.x == 0) {
        int n = 0;
        for (int s = 0; s < R; ++s) {
            const int32_t *row = (const int32_t *)(rows + (size_t)s * row_stride(c));
            st.recv_from[s] = row[c.rank];
            info->recv_from[s] = row[c.rank];
            n += row[c.rank];
        }
        for (int d = 0; d < R; ++d) {
            int b = 0;
            for (int s = 0; s < c.rank; ++s)
                b += ((const int32_t *)(rows + (size_t)s * row_stride(c)))[d];
            st.base_at[d] = b;
            info->base_at[d] = b;
            info->count_to[d] = s_cnt[d];
            const volatile epk_ht_ptrs_t *pp =
                (const volatile epk_ht_ptrs_t *)(c.base[c.rank] + c.lay.ht_ptrs) +
                (size_t)parity * R + d;
            info->recv_x[d] = pp->recv_x;
            info->capacity[d] = pp->capacity;
        }
        st.n_recv[0] = n;
        info->n_recv = n;
        __threadfence_system();
    }
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
        int n = 0;
        for (int s = 0; s < R; ++s)
            n += ((const int32_t *)(rows + (size_t)s * row_stride(c)))[R + c.rank * L + e];
        if (align > 1) n = (n + align - 1) / align * align;
        num_recv_per_expert[e] = n;
    }
}

/* Writes this rank's pointers into every peer's slot and waits for every peer's. */
__device__ bool exchange_ptrs(const epk_ctx_t &c, const epk_ht_ptrs_t &mine, uint64_t seq,
                              epk_ht_ptrs_t *s_ptrs, bool publish = true)
{
    const int R = c.nranks, parity = (int)(seq & 1);
    __shared__ int s_fail;
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    if (publish && blockIdx.x == 0 && (int)threadIdx.x < R) {
        epk_ht_ptrs_t *slot =
            (epk_ht_ptrs_t *)(c.base[threadIdx.x] + c.lay.ht_ptrs) + (size_t)parity * R + c.rank;
        *slot = mine;
        __threadfence_system();
        epk_st_release_sys(ht_word(c, threadIdx.x, 2 * R + parity * R + c.rank), seq);
    }
    if ((int)threadIdx.x < R) {
        if (!epk_wait_ge(c, ht_word(c, c.rank, 2 * R + parity * R + threadIdx.x), seq, threadIdx.x,
                         EPK_WAIT_HT_PTRS))
            s_fail = 1;
        else {
            const volatile uint64_t *w =
                (const volatile uint64_t *)((const epk_ht_ptrs_t *)(c.base[c.rank] +
                                                                    c.lay.ht_ptrs) +
                                            (size_t)parity * R + threadIdx.x);
            s_ptrs[threadIdx.x].recv_x = w[0];
            s_ptrs[threadIdx.x].recv_scales = w[1];
            s_ptrs[threadIdx.x].recv_topk_idx = w[2];
            s_ptrs[threadIdx.x].recv_topk_w = w[3];
            s_ptrs[threadIdx.x].combine_x = w[4];
            s_ptrs[threadIdx.x].capacity = w[5];
        }
    }
    __syncthreads();
    return !s_fail;
}

__device__ void signal_done_and_wait(const epk_ctx_t &c, uint64_t done_target)
{
    const int R = c.nranks;
    __syncthreads();
    if ((int)threadIdx.x < R) {
        __threadfence_system();
        epk_red_release_sys(ht_word(c, threadIdx.x, 4 * R + c.rank), 1);
    }
    if (blockIdx.x == 0 && (int)threadIdx.x < R)
        epk_wait_ge(c, ht_word(c, c.rank, 4 * R + threadIdx.x), done_target, threadIdx.x,
                    EPK_WAIT_HT_DONE);
}

__global__ void __launch_bounds__(kThreads)
    ht_dispatch_kernel(const epk_ctx_t c, const epk_ht_state_t st, const epk_ht_dispatch_params_t p)
{
    const int R = c.nranks, L = c.local_experts, k = c.topk, H = c.hidden;
    __shared__ epk_ht_ptrs_t s_ptrs[EP_MAX_RANKS];
    __shared__ int s_base[EP_MAX_RANKS];
    epk_ht_ptrs_t mine;
    mine.recv_x = (uint64_t)p.recv_x;
    mine.recv_scales = (uint64_t)p.recv_scales;
    mine.recv_topk_idx = (uint64_t)p.recv_topk_idx;
    mine.recv_topk_w = (uint64_t)p.recv_topk_w;
    mine.combine_x = 0;
    mine.capacity = (uint64_t)p.capacity;
    if ((int)threadIdx.x < R) s_base[threadIdx.x] = st.base_at[threadIdx.x];
    if (!exchange_ptrs(c, mine, p.seq, s_ptrs, !p.ptrs_ready)) return;

    const size_t row_bytes = p.use_fp8 ? (size_t)H : (size_t)H * 2;
    const int nvec = (int)(row_bytes / 16), ns = H / 128;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < p.num_tokens;
         t += gridDim.x * warps) {
        int rows[EP_MAX_RANKS > 8 ? 8 : EP_MAX_RANKS];
        uint64_t mask = 0;
        for (int d = 0; d < R; ++d) {
            const int r = st.pos[(size_t)t * R + d];
            if (r >= 0 && (uint64_t)(s_base[d] + r) < s_ptrs[d].capacity) {
                mask |= 1ull << d;
                if (d < 8) rows[d] = s_base[d] + r;
            }
        }
        const uint4 *src = (const uint4 *)((const uint8_t *)p.x + (size_t)t * row_bytes);
        const uint64_t data_mask = p.local_rows_only == 2 ? 0
                                   : p.local_rows_only    ? mask & (1ull << c.rank)
                                                          : mask;
        for (int v0 = 0; v0 < nvec && data_mask; v0 += 32 * kUnroll) {
            uint4 val[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int v = v0 + u * 32 + lane;
                if (v < nvec) val[u] = __ldg(src + v);
            }
            for (int d = 0; d < R; ++d) {
                if (!(data_mask >> d & 1)) continue;
                const int row = d < 8 ? rows[d] : s_base[d] + st.pos[(size_t)t * R + d];
                uint4 *dst = (uint4 *)((uint8_t *)s_ptrs[d].recv_x + (size_t)row * row_bytes);
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int v = v0 + u * 32 + lane;
                    if (v < nvec) dst[v] = val[u];
                }
            }
        }
        for (int d = 0; d < R; ++d) {
            if (!(mask >> d & 1)) continue;
            const int row = s_base[d] + st.pos[(size_t)t * R + d];
            if (p.use_fp8)
                for (int g = lane; g < ns; g += 32)
                    ((float *)s_ptrs[d].recv_scales)[(size_t)row * ns + g] =
                        p.x_scales[(size_t)t * ns + g];
            if (p.recv_topk_idx && lane < k) {
                const int e = p.topk_idx[(size_t)t * k + lane];
                const int li = e >= d * L && e < (d + 1) * L ? e - d * L : -1;
                ((int32_t *)s_ptrs[d].recv_topk_idx)[(size_t)row * k + lane] = li;
                ((float *)s_ptrs[d].recv_topk_w)[(size_t)row * k + lane] =
                    li >= 0 && p.topk_w ? p.topk_w[(size_t)t * k + lane] : 0.f;
            }
        }
    }
    if (!p.no_done) signal_done_and_wait(c, p.done_target);
}

__global__ void ht_done_kernel(const epk_ctx_t c, uint64_t add, uint64_t done_target, int wait)
{
    const int R = c.nranks;
    if ((int)threadIdx.x < R) {
        if (add) {
            __threadfence_system();
            epk_red_release_sys(ht_word(c, threadIdx.x, 4 * R + c.rank), add);
        }
        if (wait)
            epk_wait_ge(c, ht_word(c, c.rank, 4 * R + threadIdx.x), done_target, threadIdx.x,
                        EPK_WAIT_HT_DONE);
    }
}

__global__ void ht_stage_signal_kernel(const epk_ctx_t c, uint64_t value)
{
    const int R = c.nranks;
    if ((int)threadIdx.x < R && (int)threadIdx.x != c.rank) {
        __threadfence_system();
        epk_st_release_sys(ht_word(c, threadIdx.x, 5 * R + c.rank), value);
    }
}

/* chunk of row r among n rows split into nch chunks [c*n/nch, (c+1)*n/nch) */
__device__ __forceinline__ int row_chunk(int r, int n, int nch)
{
    int ch = 0;
    while (ch + 1 < nch && (long long)(ch + 1) * n / nch <= r)
        ++ch;
    return ch;
}

__global__ void __launch_bounds__(kThreads)
    ht_combine_staged_kernel(const epk_ctx_t c, const epk_ht_state_t st, const uint16_t *x,
                             uint16_t *out, int T, int nch, uint64_t stage_base)
{
    const int R = c.nranks, H = c.hidden, me = c.rank;
    __shared__ int s_base[EP_MAX_RANKS];
    __shared__ int s_cnt[EP_MAX_RANKS];
    __shared__ int s_fail;
    if ((int)threadIdx.x < R) {
        s_base[threadIdx.x] = st.base_at[threadIdx.x];
        s_cnt[threadIdx.x] = 0;
    }
    if (threadIdx.x == 0) s_fail = 0;
    __syncthreads();
    /* rows this rank sent to d = number of its tokens with pos >= 0 for d: the last one + 1 */
    for (int t = threadIdx.x; t < T; t += blockDim.x)
        for (int d = 0; d < R; ++d) {
            const int r = st.pos[(size_t)t * R + d];
            if (r >= 0) atomicMax(&s_cnt[d], r + 1);
        }
    __syncthreads();
    const uint8_t *stage = c.base[me] + c.lay.ht_stage;
    const int warps = blockDim.x >> 5;
    constexpr int U = 2 * kUnroll;
    for (int ch = 0; ch < nch; ++ch) {
        if ((int)threadIdx.x < R && (int)threadIdx.x != me)
            if (!epk_wait_ge(c, ht_word(c, me, 5 * R + threadIdx.x), stage_base + ch + 1,
                             threadIdx.x, EPK_WAIT_HT_DONE))
                s_fail = 1;
        __syncthreads();
        if (s_fail) return;
        for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
            int round = 0;
            for (int d = 0; d < R; ++d) {
                const int r = st.pos[(size_t)t * R + d];
                if (r >= 0 && d != me) {
                    const int rc = row_chunk(r, s_cnt[d], nch);
                    round = rc > round ? rc : round;
                }
            }
            if (round != ch) continue;
            epk_warp_sum_rows<U>((uint4 *)(out + (size_t)t * H), H, R, [&](int d) -> const uint4 * {
                const int r = st.pos[(size_t)t * R + d];
                if (r < 0) return nullptr;
                return d == me ? (const uint4 *)(x + (size_t)(s_base[me] + r) * H)
                               : (const uint4 *)(stage + ((size_t)d * c.ht_max_tokens + r) * H * 2);
            });
        }
    }
}

__global__ void __launch_bounds__(kThreads)
    ht_combine_kernel(const epk_ctx_t c, const epk_ht_state_t st, const uint16_t *x, uint16_t *out,
                      int T, uint64_t seq, uint64_t done_target)
{
    const int R = c.nranks, H = c.hidden;
    __shared__ epk_ht_ptrs_t s_ptrs[EP_MAX_RANKS];
    __shared__ int s_base[EP_MAX_RANKS];
    epk_ht_ptrs_t mine = {0, 0, 0, 0, (uint64_t)x, 0};
    if ((int)threadIdx.x < R) s_base[threadIdx.x] = st.base_at[threadIdx.x];
    if (!exchange_ptrs(c, mine, seq, s_ptrs)) return;

    const int warps = blockDim.x >> 5;
    constexpr int U = 2 * kUnroll;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
        epk_warp_sum_rows<U>((uint4 *)(out + (size_t)t * H), H, R, [&](int d) -> const uint4 * {
            const int r = st.pos[(size_t)t * R + d];
            if (r < 0) return nullptr;
            return (const uint4 *)((const uint16_t *)s_ptrs[d].combine_x +
                                   (size_t)(s_base[d] + r) * H);
        });
    }
    signal_done_and_wait(c, done_target);
}

} // namespace

extern "C" int epk_ht_layout(const epk_ctx_t *c, const int32_t *topk_idx, int T, int32_t *per_rank,
                             int32_t *per_expert, uint8_t *in_rank, void *stream)
{
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaMemsetAsync(per_rank, 0, (size_t)c->nranks * 4, s);
    if (e == cudaSuccess) e = cudaMemsetAsync(per_expert, 0, (size_t)c->num_experts * 4, s);
    if (e != cudaSuccess) return (int)e;
    if (T == 0) return 0;
    const int threads = 256, grid = (T + threads - 1) / threads;
    ht_layout_kernel<<<grid, threads, 0, s>>>(*c, topk_idx, T, per_rank, per_expert, in_rank);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_prep(const epk_ctx_t *c, const epk_ht_state_t *st, const int32_t *topk_idx,
                           int T, int expert_alignment, int32_t *num_recv_per_expert,
                           epk_ht_info_t *info, const epk_ht_ptrs_t *mine, uint64_t seq,
                           void *stream)
{
    const size_t smem = (size_t)c->num_experts * 4;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(
            ht_prep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    ht_prep_kernel<<<1, kPrepThreads, smem, (cudaStream_t)stream>>>(
        *c, *st, topk_idx, T, expert_alignment, num_recv_per_expert, info, *mine, seq);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_dispatch(const epk_ctx_t *c, const epk_ht_state_t *st,
                               const epk_ht_dispatch_params_t *p, void *stream)
{
    ht_dispatch_kernel<<<p->blocks, kThreads, 0, (cudaStream_t)stream>>>(*c, *st, *p);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_done(const epk_ctx_t *c, uint64_t add, uint64_t done_target, int wait,
                           void *stream)
{
    ht_done_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(*c, add, done_target, wait);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_stage_signal(const epk_ctx_t *c, uint64_t value, void *stream)
{
    ht_stage_signal_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(*c, value);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_combine_staged(const epk_ctx_t *c, const epk_ht_state_t *st,
                                     const uint16_t *x, uint16_t *out, int T, int blocks,
                                     int nchunks, uint64_t stage_base, void *stream)
{
    ht_combine_staged_kernel<<<blocks, kThreads, 0, (cudaStream_t)stream>>>(*c, *st, x, out, T,
                                                                            nchunks, stage_base);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_combine(const epk_ctx_t *c, const epk_ht_state_t *st, const uint16_t *x,
                              uint16_t *out, int T, int blocks, uint64_t seq, uint64_t done_target,
                              void *stream)
{
    ht_combine_kernel<<<blocks, kThreads, 0, (cudaStream_t)stream>>>(*c, *st, x, out, T, seq,
                                                                     done_target);
    return EPK_CHECK_LAUNCH();
}

/* Loads this file's kernels now (see epk_preload_kernels). */
extern "C" int epk_preload_ht(void)
{
    return epk_preload_kernels(ht_layout_kernel, ht_prep_kernel, ht_dispatch_kernel,
                               ht_combine_kernel, ht_done_kernel, ht_stage_signal_kernel,
                               ht_combine_staged_kernel);
}
