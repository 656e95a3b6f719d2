/* What the model's kernels share: bf16 conversions, the m16n8k16 bf16 tensor-core step, and the
 * merge of an attention context split into pieces (attention.cu, mla.cu). Header-only, internal
 * to model/cuda. */
#ifndef EPD_MODEL_CUDA_KERNEL_COMMON_CUH
#define EPD_MODEL_CUDA_KERNEL_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

/* float -> bf16 bits: round to nearest even, every NaN the canonical 0x7fff (as
 * ep_float_to_bf16 in kernels/numeric_ref.h). */
__device__ __forceinline__ uint16_t epd_f2bf(float f)
{
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

__device__ __forceinline__ float epd_bf2f(uint16_t b)
{
    return __uint_as_float((uint32_t)b << 16);
}

/* d += A (16x16 bf16, row) * B (16x8 bf16, col), fp32 accumulate. Fragments (g = lane / 4,
 * c = lane % 4): a0 (row g, k 2c..2c+1), a1 (row g+8, k 2c..), a2 (row g, k 2c+8..), a3 (row g+8,
 * k 2c+8..); b0 (k 2c..2c+1, col g), b1 (k 2c+8.., col g); d0,d1 (row g, col 2c, 2c+1), d2,d3
 * (row g+8, col 2c, 2c+1). The lower k of a pair sits in the lower 16 bits. */
__device__ __forceinline__ void epd_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
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

#endif /* EPD_MODEL_CUDA_KERNEL_COMMON_CUH */
