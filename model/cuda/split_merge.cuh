/* What the attention kernels share (attention.cu, mla.cu): bf16 conversions and the merge of a
 * context split into pieces. Header-only, internal to model/cuda. */
#ifndef EPD_MODEL_CUDA_SPLIT_MERGE_CUH
#define EPD_MODEL_CUDA_SPLIT_MERGE_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

__device__ __forceinline__ uint16_t epd_f2bf(float f)
{
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

__device__ __forceinline__ float epd_bf2f(uint16_t b)
{
    return __uint_as_float((uint32_t)b << 16);
}

/* One warp merges ns pieces of a row's attention over the context: piece s has its running max
 * ml[s].x (log2 domain), its sum of exp2 ml[s].y and its unnormalised output acc[s][dim]; dst
 * [dim] gets the softmax-weighted sum, in bf16 (0 when ns is 0). */
__device__ __forceinline__ void epd_merge_splits(const float2 *ml, const float *acc, int ns,
                                                 int dim, uint16_t *dst, int lane)
{
    float M = -INFINITY;
    for (int s = lane; s < ns; s += 32)
        M = fmaxf(M, ml[s].x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float Ls = 0.f;
    for (int s = lane; s < ns; s += 32)
        Ls += ml[s].y * exp2f(ml[s].x - M);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        Ls += __shfl_xor_sync(0xffffffffu, Ls, o);
    const float inv = ns > 0 ? 1.f / Ls : 0.f;
    for (int d = lane; d < dim; d += 32) {
        float a = 0.f;
        for (int s = 0; s < ns; ++s)
            a += acc[(size_t)s * dim + d] * exp2f(ml[s].x - M);
        dst[d] = epd_f2bf(a * inv);
    }
}

constexpr int kEpdMergeWarps = 4;

/* One warp per (token, head): the splits of ws_acc [T * nh][max_splits][dim] and ws_ml
 * [T * nh][max_splits] merged into out [T][nh][dim] bf16. A token's split count follows from
 * its length (pos + 1, at most max_len; 0 for a padding row, seq_idx < 0): its row gets zeros. */
static __global__ void __launch_bounds__(kEpdMergeWarps * 32)
    epd_merge_splits_kernel(uint16_t *out, const float *ws_acc, const float2 *ws_ml,
                            const int32_t *seq_idx, const int32_t *pos, int T, int nh, int dim,
                            int split_len, int max_splits, int max_len)
{
    const int wid = blockIdx.x * kEpdMergeWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (wid >= T * nh) return;
    const int t = wid / nh;
    const int len = seq_idx[t] < 0 ? 0 : min(pos[t] + 1, max_len);
    const int ns = len <= 0 ? 0 : (len + split_len - 1) / split_len;
    epd_merge_splits(ws_ml + (size_t)wid * max_splits, ws_acc + (size_t)wid * max_splits * dim, ns,
                     dim, out + (size_t)wid * dim, lane);
}

/* Enqueues the merge on st; returns the launch's cudaError_t as int. */
static inline int epd_launch_merge_splits(uint16_t *out, const float *ws_acc, const float2 *ws_ml,
                                          const int32_t *seq_idx, const int32_t *pos, int T, int nh,
                                          int dim, int split_len, int max_splits, int max_len,
                                          cudaStream_t st)
{
    const long long warps = (long long)T * nh;
    epd_merge_splits_kernel<<<(unsigned)((warps + kEpdMergeWarps - 1) / kEpdMergeWarps),
                              kEpdMergeWarps * 32, 0, st>>>(out, ws_acc, ws_ml, seq_idx, pos, T, nh,
                                                            dim, split_len, max_splits, max_len);
    return (int)cudaGetLastError();
}

#endif /* EPD_MODEL_CUDA_SPLIT_MERGE_CUH */
