/* Device helpers shared by the attention kernels (attention.cu, mla.cu): bf16 conversions and
 * the merge of a context split into pieces. Header-only, internal to model/cuda. */
#ifndef EPD_MODEL_CUDA_SPLIT_MERGE_CUH
#define EPD_MODEL_CUDA_SPLIT_MERGE_CUH

#include <cuda_bf16.h>
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

#endif /* EPD_MODEL_CUDA_SPLIT_MERGE_CUH */
