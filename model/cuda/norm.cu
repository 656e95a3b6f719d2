/* The CUDA model's elementwise and per-row kernels (cuda_ops.h, "embedding, norms, activations"
 * and "conversions"): embedding lookup, fused residual + RMSNorm, SwiGLU activation, row gather
 * and fp32 -> bf16. Reference twins: norm_ref.c (and epd_f32_to_bf16 of model/ops.h). */
#include "cuda_ops.h"
#include "kernel_common.cuh"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace
{

constexpr int kRowThreads = 256; /* one block per row: embed, add_rmsnorm, gather_rows */
constexpr int kEltThreads = 256; /* grid-stride elementwise kernels */
constexpr int kMaxEltBlocks = 132 * 16;

bool host_aligned(const void *p, unsigned a)
{
    return p == nullptr || ((uintptr_t)p & (a - 1)) == 0;
}

int blocks_for(size_t n)
{
    size_t b = (n + kEltThreads - 1) / kEltThreads;
    return (int)(b < kMaxEltBlocks ? b : kMaxEltBlocks);
}

/* h: [T][H] fp32; emb: [V][H] bf16; tokens: [T]. VEC: H % 8 == 0 and emb 16-byte aligned,
 * h 16-byte aligned (8 bf16 in, two float4 out). */
template <bool VEC>
__global__ void __launch_bounds__(kRowThreads)
    embed_kernel(float *h, const uint16_t *emb, const int32_t *tokens, int H)
{
    const int t = blockIdx.x;
    const uint16_t *src = emb + (size_t)tokens[t] * H;
    float *dst = h + (size_t)t * H;
    if (VEC) {
        const uint4 *s = reinterpret_cast<const uint4 *>(src);
        float4 *d = reinterpret_cast<float4 *>(dst);
        for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
            const uint4 x = s[v];
            d[2 * v] = make_float4(__uint_as_float(x.x << 16), __uint_as_float(x.x & 0xffff0000u),
                                   __uint_as_float(x.y << 16), __uint_as_float(x.y & 0xffff0000u));
            d[2 * v + 1] =
                make_float4(__uint_as_float(x.z << 16), __uint_as_float(x.z & 0xffff0000u),
                            __uint_as_float(x.w << 16), __uint_as_float(x.w & 0xffff0000u));
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            dst[i] = epd_bf2f(src[i]);
    }
}

/* Block sum of one float per thread, in a fixed order (shuffle tree per warp, then the warps'
 * sums by warp 0's tree), returned to every thread. sh: [32]. */
__device__ __forceinline__ float block_sum(float v, float *sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sh[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

/* One row per block. h: [T][H] fp32 (updated in place when delta != NULL); delta: [T][H] bf16;
 * w: [H] fp32; out_f32 / out_bf16: [T][H] (either NULL). Pass 1 adds the residual and sums the
 * squares; pass 2 re-reads the thread's own elements of h (just written by the same thread,
 * so no barrier is needed for them) and scales. VEC: H % 4 == 0 and every pointer aligned for
 * float4 / 4 x bf16. */
template <bool VEC>
__global__ void __launch_bounds__(kRowThreads)
    add_rmsnorm_kernel(float *h, const uint16_t *delta, const float *w, float eps, int H,
                       float *out_f32, uint16_t *out_bf16)
{
    __shared__ float sh[32];
    const size_t off = (size_t)blockIdx.x * H;
    float *hr = h + off;
    float ss = 0.f;
    if (VEC) {
        float4 *h4 = reinterpret_cast<float4 *>(hr);
        const uint2 *d4 = delta ? reinterpret_cast<const uint2 *>(delta + off) : nullptr;
        for (int v = threadIdx.x; v < H / 4; v += blockDim.x) {
            float4 x = h4[v];
            if (d4) {
                const uint2 d = d4[v];
                x.x = __fadd_rn(x.x, __uint_as_float(d.x << 16));
                x.y = __fadd_rn(x.y, __uint_as_float(d.x & 0xffff0000u));
                x.z = __fadd_rn(x.z, __uint_as_float(d.y << 16));
                x.w = __fadd_rn(x.w, __uint_as_float(d.y & 0xffff0000u));
                h4[v] = x;
            }
            ss += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            float x = hr[i];
            if (delta) {
                x = __fadd_rn(x, epd_bf2f(delta[off + i]));
                hr[i] = x;
            }
            ss += x * x;
        }
    }
    ss = block_sum(ss, sh);
    /* epd_rmsnorm: inv = 1 / sqrt(mean + eps), y = w * (x * inv); IEEE div and sqrt. */
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)H), eps)));
    if (VEC) {
        const float4 *h4 = reinterpret_cast<const float4 *>(hr);
        const float4 *w4 = reinterpret_cast<const float4 *>(w);
        for (int v = threadIdx.x; v < H / 4; v += blockDim.x) {
            const float4 x = h4[v], g = w4[v];
            const float4 y = make_float4(
                __fmul_rn(g.x, __fmul_rn(x.x, inv)), __fmul_rn(g.y, __fmul_rn(x.y, inv)),
                __fmul_rn(g.z, __fmul_rn(x.z, inv)), __fmul_rn(g.w, __fmul_rn(x.w, inv)));
            if (out_f32) reinterpret_cast<float4 *>(out_f32 + off)[v] = y;
            if (out_bf16)
                reinterpret_cast<uint2 *>(out_bf16 + off)[v] =
                    make_uint2((uint32_t)epd_f2bf(y.x) | (uint32_t)epd_f2bf(y.y) << 16,
                               (uint32_t)epd_f2bf(y.z) | (uint32_t)epd_f2bf(y.w) << 16);
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            const float y = __fmul_rn(w[i], __fmul_rn(hr[i], inv));
            if (out_f32) out_f32[off + i] = y;
            if (out_bf16) out_bf16[off + i] = epd_f2bf(y);
        }
    }
}

/* silu(g) * u as swiglu.c writes it: g / (1 + expf(-g)) * u, IEEE division, no fusion. */
__device__ __forceinline__ float silu_mul1(float g, float u)
{
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

/* act: [T][I] bf16; gu: [T][2I] fp32 (gate I values, then up I values). Grid-stride over groups
 * of 4 elements of a row when I % 4 == 0 and the pointers allow (VEC), else single elements. */
template <bool VEC>
__global__ void __launch_bounds__(kEltThreads)
    silu_mul_kernel(uint16_t *act, const float *gu, int T, int I)
{
    const int G = VEC ? 4 : 1, per_row = I / G;
    const size_t n = (size_t)T * per_row;
    for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (size_t)gridDim.x * blockDim.x) {
        const size_t t = j / per_row, i = (j % per_row) * G;
        const float *g = gu + t * 2 * I + i, *u = g + I;
        uint16_t *a = act + t * I + i;
        if (VEC) {
            const float4 gv = *reinterpret_cast<const float4 *>(g);
            const float4 uv = *reinterpret_cast<const float4 *>(u);
            *reinterpret_cast<uint2 *>(a) =
                make_uint2((uint32_t)epd_f2bf(silu_mul1(gv.x, uv.x)) |
                               (uint32_t)epd_f2bf(silu_mul1(gv.y, uv.y)) << 16,
                           (uint32_t)epd_f2bf(silu_mul1(gv.z, uv.z)) |
                               (uint32_t)epd_f2bf(silu_mul1(gv.w, uv.w)) << 16);
        } else {
            *a = epd_f2bf(silu_mul1(*g, *u));
        }
    }
}

/* dst: [n][cols]; src: [*][cols]; rows: [n]. VEC: cols % 4 == 0, both 16-byte aligned. */
template <bool VEC>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(float *dst, const float *src, const int32_t *rows, int cols)
{
    const float *s = src + (size_t)rows[blockIdx.x] * cols;
    float *d = dst + (size_t)blockIdx.x * cols;
    if (VEC) {
        for (int v = threadIdx.x; v < cols / 4; v += blockDim.x)
            reinterpret_cast<float4 *>(d)[v] = reinterpret_cast<const float4 *>(s)[v];
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x)
            d[i] = s[i];
    }
}

/* dst: [n] bf16; src: [n] fp32. Groups of 4 where both are aligned for it (the host checks the
 * bases; n % 4 leftovers are done one by one by the first threads). */
template <bool VEC>
__global__ void __launch_bounds__(kEltThreads)
    f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (VEC) {
        const size_t n4 = n / 4;
        for (size_t j = first; j < n4; j += stride) {
            const float4 x = reinterpret_cast<const float4 *>(src)[j];
            reinterpret_cast<uint2 *>(dst)[j] =
                make_uint2((uint32_t)epd_f2bf(x.x) | (uint32_t)epd_f2bf(x.y) << 16,
                           (uint32_t)epd_f2bf(x.z) | (uint32_t)epd_f2bf(x.w) << 16);
        }
        for (size_t j = n4 * 4 + first; j < n; j += stride)
            dst[j] = epd_f2bf(src[j]);
    } else {
        for (size_t j = first; j < n; j += stride)
            dst[j] = epd_f2bf(src[j]);
    }
}

} // namespace

extern "C" int epd_cu_embed(float *h, const uint16_t *emb, const int32_t *tokens, int T, int H,
                            epd_stream_t stream)
{
    if (T < 0 || H < 0) return (int)cudaErrorInvalidValue;
    if (T == 0 || H == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (H % 8 == 0 && host_aligned(emb, 16) && host_aligned(h, 16))
        embed_kernel<true><<<T, kRowThreads, 0, s>>>(h, emb, tokens, H);
    else
        embed_kernel<false><<<T, kRowThreads, 0, s>>>(h, emb, tokens, H);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_add_rmsnorm(float *h, const uint16_t *delta, const float *w, float eps, int T,
                                  int H, float *out_f32, uint16_t *out_bf16, epd_stream_t stream)
{
    if (T < 0 || H <= 0) return (int)cudaErrorInvalidValue;
    if (T == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    const bool vec = H % 4 == 0 && host_aligned(h, 16) && host_aligned(w, 16) &&
                     host_aligned(out_f32, 16) && host_aligned(delta, 8) &&
                     host_aligned(out_bf16, 8);
    if (vec)
        add_rmsnorm_kernel<true><<<T, kRowThreads, 0, s>>>(h, delta, w, eps, H, out_f32, out_bf16);
    else
        add_rmsnorm_kernel<false><<<T, kRowThreads, 0, s>>>(h, delta, w, eps, H, out_f32, out_bf16);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_silu_mul(uint16_t *act, const float *gu, int T, int I, epd_stream_t stream)
{
    if (T < 0 || I < 0) return (int)cudaErrorInvalidValue;
    if (T == 0 || I == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (I % 4 == 0 && host_aligned(gu, 16) && host_aligned(act, 8))
        silu_mul_kernel<true><<<blocks_for((size_t)T * I / 4), kEltThreads, 0, s>>>(act, gu, T, I);
    else
        silu_mul_kernel<false><<<blocks_for((size_t)T * I), kEltThreads, 0, s>>>(act, gu, T, I);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n,
                                  int cols, epd_stream_t stream)
{
    if (n < 0 || cols < 0) return (int)cudaErrorInvalidValue;
    if (n == 0 || cols == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (cols % 4 == 0 && host_aligned(dst, 16) && host_aligned(src, 16))
        gather_rows_kernel<true><<<n, kRowThreads, 0, s>>>(dst, src, rows, cols);
    else
        gather_rows_kernel<false><<<n, kRowThreads, 0, s>>>(dst, src, rows, cols);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_f32_to_bf16(uint16_t *dst, const float *src, size_t n, epd_stream_t stream)
{
    if (n == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (host_aligned(src, 16) && host_aligned(dst, 8))
        f32_to_bf16_kernel<true><<<blocks_for(n / 4 + 1), kEltThreads, 0, s>>>(dst, src, n);
    else
        f32_to_bf16_kernel<false><<<blocks_for(n), kEltThreads, 0, s>>>(dst, src, n);
    return (int)cudaGetLastError();
}
