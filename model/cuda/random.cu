// Uniform random fills on the GPU (benchmark weights of a real model's shape, no file needed):
// value i is a hash of (seed, i), so a fill is reproducible and needs no state.
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_bf16.h"
#include "cuda_fp8.h"

namespace
{

__device__ __forceinline__ uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform(uint64_t seed, size_t i, float lo, float hi)
{
    float u = (float)(mix64(seed ^ mix64(i)) >> 40) * (1.0f / 16777216.0f);
    return lo + (hi - lo) * u;
}

__global__ void fill_bf16(uint16_t *dst, size_t n, uint64_t seed, float lo, float hi)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(uniform(seed, i, lo, hi)));
}

__global__ void fill_f32(float *dst, size_t n, uint64_t seed, float lo, float hi)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = uniform(seed, i, lo, hi);
}

__global__ void fill_e4m3(uint8_t *dst, size_t n, uint64_t seed, float lo, float hi)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] =
            (uint8_t)__nv_cvt_float_to_fp8(uniform(seed, i, lo, hi), __NV_SATFINITE, __NV_E4M3);
}

unsigned blocks_for(size_t n)
{
    size_t b = (n + 255) / 256;
    return (unsigned)(b < 65536 ? (b ? b : 1) : 65536);
}

} // namespace

extern "C" int epd_cu_fill_uniform_bf16(uint16_t *dst, size_t n, uint64_t seed, float lo, float hi,
                                        cudaStream_t stream)
{
    fill_bf16<<<blocks_for(n), 256, 0, stream>>>(dst, n, seed, lo, hi);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_fill_uniform_f32(float *dst, size_t n, uint64_t seed, float lo, float hi,
                                       cudaStream_t stream)
{
    fill_f32<<<blocks_for(n), 256, 0, stream>>>(dst, n, seed, lo, hi);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_fill_uniform_e4m3(uint8_t *dst, size_t n, uint64_t seed, float lo, float hi,
                                        cudaStream_t stream)
{
    fill_e4m3<<<blocks_for(n), 256, 0, stream>>>(dst, n, seed, lo, hi);
    return (int)cudaGetLastError();
}
