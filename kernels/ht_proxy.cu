/* HT (prefill) on the proxy path (tcp/rdma transport): the host (transport/cuda/ht_proxy.c)
 * exchanges counts and moves whole blocks of rows through the wire; these two kernels do the
 * per-row work on the GPU.
 *
 * epk_ht_pack: one warp per token; for every rank d the token goes to (pos[t][d] >= 0) its row
 *   is written once: this rank's own rows straight into the outputs (recv_x, scales, local topk
 *   ids and weights at row0 + pos), a peer's into block d of the pack area at row pos, as
 *   separate segments (x, scales, ids, weights; kernels/ep_cuda.h) so that each lands in the
 *   receiver's outputs with one contiguous copy.
 * epk_ht_sum: one warp per token; sums its copies in rank order in fp32 (the order of the
 *   NVLink combine kernels) and writes out[t] once.
 */
#include "ep_cuda_common.cuh"

namespace
{

constexpr int kThreads = 512;

__global__ void __launch_bounds__(kThreads)
    ht_pack_kernel(const epk_ctx_t c, const epk_ht_pack_params_t p)
{
    const int R = c.nranks, L = c.local_experts, k = c.topk, H = c.hidden, me = c.rank;
    const size_t row_bytes = p.use_fp8 ? (size_t)H : (size_t)H * 2;
    const int nvec = (int)(row_bytes / 16), ns = H / 128;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < p.num_tokens;
         t += gridDim.x * warps) {
        const uint4 *src = (const uint4 *)((const uint8_t *)p.x + (size_t)t * row_bytes);
        for (int d = 0; d < R; ++d) {
            const int r = p.pos[(size_t)t * R + d];
            if (r < 0) continue;
            uint8_t *x_dst, *s_dst, *i_dst, *w_dst;
            size_t row;
            if (d == me) {
                if (p.row0 + r >= p.capacity) continue; /* the host reports the overflow */
                row = (size_t)(p.row0 + r);
                x_dst = (uint8_t *)p.recv_x;
                s_dst = (uint8_t *)p.recv_scales;
                i_dst = (uint8_t *)p.recv_topk_idx;
                w_dst = (uint8_t *)p.recv_topk_w;
            } else {
                uint8_t *blk = p.pack + (size_t)d * c.lay.ht_blk;
                row = (size_t)r;
                x_dst = blk;
                s_dst = blk + c.lay.ht_seg_s;
                i_dst = blk + c.lay.ht_seg_i;
                w_dst = blk + c.lay.ht_seg_w;
            }
            uint4 *xd = (uint4 *)(x_dst + row * row_bytes);
            for (int v = lane; v < nvec; v += 32)
                xd[v] = __ldg(src + v);
            if (p.use_fp8 && s_dst)
                for (int g = lane; g < ns; g += 32)
                    ((float *)s_dst)[row * ns + g] = p.x_scales[(size_t)t * ns + g];
            if (p.topk_idx && i_dst && lane < k) {
                const int e = p.topk_idx[(size_t)t * k + lane];
                const int li = e >= d * L && e < (d + 1) * L ? e - d * L : -1;
                ((int32_t *)i_dst)[row * k + lane] = li;
                if (w_dst)
                    ((float *)w_dst)[row * k + lane] =
                        li >= 0 && p.topk_w ? p.topk_w[(size_t)t * k + lane] : 0.f;
            }
        }
    }
}

__global__ void __launch_bounds__(kThreads)
    ht_sum_kernel(const epk_ctx_t c, const int32_t *pos, int T, const uint16_t *x, int row0,
                  const uint8_t *stage, uint16_t *out)
{
    const int R = c.nranks, H = c.hidden, me = c.rank;
    const int warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
        epk_warp_sum_rows<8>((uint4 *)(out + (size_t)t * H), H, R, [&](int d) -> const uint4 * {
            const int r = pos[(size_t)t * R + d];
            if (r < 0) return nullptr;
            return d == me ? (const uint4 *)(x + (size_t)(row0 + r) * H)
                           : (const uint4 *)(stage + (size_t)d * c.lay.ht_blk + (size_t)r * H * 2);
        });
    }
}

} // namespace

extern "C" int epk_ht_pack(const epk_ctx_t *c, const epk_ht_pack_params_t *p, void *stream)
{
    if (p->num_tokens <= 0) return 0;
    ht_pack_kernel<<<p->blocks, kThreads, 0, (cudaStream_t)stream>>>(*c, *p);
    return EPK_CHECK_LAUNCH();
}

extern "C" int epk_ht_sum(const epk_ctx_t *c, const int32_t *pos, int T, const uint16_t *x,
                          int row0, const uint8_t *stage, uint16_t *out, int blocks, void *stream)
{
    if (T <= 0) return 0;
    ht_sum_kernel<<<blocks, kThreads, 0, (cudaStream_t)stream>>>(*c, pos, T, x, row0, stage, out);
    return EPK_CHECK_LAUNCH();
}

/* Loads this file's kernels now (see epk_preload_kernels). */
extern "C" int epk_preload_ht_proxy(void)
{
    return epk_preload_kernels(ht_pack_kernel, ht_sum_kernel);
}
