/* Next-token sampling on the GPU (cuda_ops.h, "sampling"): sample.h's algorithm, one block per
 * row, following epd_sample_ref (model/sample.c) step by step: argmax, p = expf((x - max) * 1/T),
 * the top-k and top-p thresholds by the same bisections over float bits, the draw with the same
 * (seed, counter) uniform. Sums are in double like the twin's; only their order differs. */
#include "cuda_ops.h"

#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

namespace
{

constexpr int kThreads = 1024; /* one block per row; a multiple of 32 */
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kBitsEnd = 0x3f800001u; /* bisection range [0, 1.0f] on float bits */

struct block_scratch {
    double d[kWarps + 1];
    float f[kWarps];
    int i[kWarps];
};

/* Reductions over the block, each ending with the result in every thread. The order of the
 * additions is fixed (per-warp shuffle tree, then the warps' partials in warp order), so a row
 * always gives the same result. */
__device__ __forceinline__ int block_sum_int(int v, block_scratch &sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sh.i[warp] = v;
    __syncthreads();
    int r = 0;
#pragma unroll 8
    for (int w = 0; w < kWarps; ++w)
        r += sh.i[w];
    __syncthreads();
    return r;
}

__device__ __forceinline__ double block_sum_double(double v, block_scratch &sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sh.d[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double x = sh.d[lane]; /* kWarps == 32 */
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            x += __shfl_xor_sync(0xffffffffu, x, o);
        if (lane == 0) sh.d[kWarps] = x;
    }
    __syncthreads();
    const double r = sh.d[kWarps];
    __syncthreads();
    return r;
}

/* Exclusive prefix sum in thread order. */
__device__ __forceinline__ double block_exclusive_scan_double(double v, block_scratch &sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh.d[warp] = x;
    __syncthreads();
    if (warp == 0) {
        const double tot = sh.d[lane];
        double s = tot;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        sh.d[lane] = s - tot; /* warps before this one */
    }
    __syncthreads();
    const double r = sh.d[warp] + (x - v);
    __syncthreads();
    return r;
}

__device__ __forceinline__ int block_min_int(int v, block_scratch &sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) sh.i[warp] = v;
    __syncthreads();
    int r = INT_MAX;
    for (int w = 0; w < kWarps; ++w)
        r = min(r, sh.i[w]);
    __syncthreads();
    return r;
}

__device__ __forceinline__ int block_max_int(int v, block_scratch &sh)
{
    return -block_min_int(-v, sh);
}

/* (value, id) with id -1 for "none": a larger value wins, the lower id on ties; none loses. */
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi)
{
    return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

__device__ __forceinline__ int block_argmax(float bv, int bi, block_scratch &sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sh.f[warp] = bv;
        sh.i[warp] = bi;
    }
    __syncthreads();
    float v = sh.f[0];
    int r = sh.i[0];
    for (int w = 1; w < kWarps; ++w)
        if (argmax_better(sh.f[w], sh.i[w], v, r)) {
            v = sh.f[w];
            r = sh.i[w];
        }
    __syncthreads();
    return r;
}

/* sample.c's mix64 and epd_sample_uniform. */
__device__ __forceinline__ uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ double sample_uniform(uint64_t seed, uint64_t counter)
{
    return (double)(mix64(mix64(seed) + counter) >> 11) * 0x1.0p-53;
}

/* One block per row m. logits: [M][V] fp32 (read only); params: [M]; next: [M];
 * p: workspace [M][V] fp32, the unfiltered p of the row. Filtering is kept as a cut (p below it
 * counts as 0) instead of zeroing p: top-k and then top-p only ever raise it (the top-p
 * threshold is >= the top-k one, as the sum at the top-k threshold is all of Z). Thread tid
 * owns ids tid, tid + kThreads, ... in every pass but the draw, so it reads back its own
 * writes of p without a barrier. */
__global__ void __launch_bounds__(kThreads)
    sample_kernel(int32_t *next, const float *logits, const epd_sample_params_t *params, int V,
                  const int32_t *n_dev, float *p_ws)
{
    __shared__ block_scratch sh;
    const int m = blockIdx.x, tid = threadIdx.x;
    if (n_dev && m >= *n_dev) return;
    const epd_sample_params_t sp = params[m];
    const float *x = logits + (size_t)m * V;
    float *p = p_ws + (size_t)m * V;

    /* 1. argmax: each thread sees its ids in increasing order, so '>' keeps the lowest. */
    float bv = 0.f;
    int bi = -1;
    for (int i = tid; i < V; i += kThreads) {
        const float v = x[i];
        if (v == v && (bi < 0 || v > bv)) {
            bv = v;
            bi = i;
        }
    }
    int am = block_argmax(bv, bi, sh);
    if (am < 0) am = 0;
    if (sp.temperature == 0) {
        if (tid == 0) next[m] = am;
        return;
    }
    const float mx = x[am];
    const float inv_t = __fdiv_rn(1.0f, sp.temperature);
    if (!(mx == mx) || isinf(mx) || isinf(inv_t)) {
        if (tid == 0) next[m] = am;
        return;
    }

    /* 2. p */
    for (int i = tid; i < V; i += kThreads) {
        const float v = x[i];
        p[i] = v == v ? expf(__fmul_rn(__fsub_rn(v, mx), inv_t)) : 0.0f;
    }

    /* 3. top-k: the largest t with count(p >= t) >= k. */
    float cut = 0.f;
    if (sp.top_k > 0 && sp.top_k < V) {
        uint32_t lo = 0, hi = kBitsEnd;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const float t = __uint_as_float(mid);
            int n = 0;
            for (int i = tid; i < V; i += kThreads)
                n += p[i] >= t;
            if (block_sum_int(n, sh) >= sp.top_k)
                lo = mid;
            else
                hi = mid;
        }
        cut = __uint_as_float(lo);
    }

    /* 4. top-p: the largest t with sum(kept p >= t) >= top_p * Z. */
    if (sp.top_p < 1) {
        double z = 0;
        for (int i = tid; i < V; i += kThreads) {
            const float v = p[i];
            if (v >= cut) z += v;
        }
        const double target = (double)sp.top_p * block_sum_double(z, sh);
        uint32_t lo = 0, hi = kBitsEnd;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const float t = fmaxf(__uint_as_float(mid), cut);
            double s = 0;
            for (int i = tid; i < V; i += kThreads) {
                const float v = p[i];
                if (v >= t) s += v;
            }
            if (block_sum_double(s, sh) >= target)
                lo = mid;
            else
                hi = mid;
        }
        cut = fmaxf(cut, __uint_as_float(lo));
    }

    /* 5. the draw. The kept p are those > 0 and >= cut. */
    double s = 0;
    for (int i = tid; i < V; i += kThreads) {
        const float v = p[i];
        if (v > 0 && v >= cut) s += v;
    }
    const double u = sample_uniform(sp.seed, sp.counter) * block_sum_double(s, sh);

    /* The running sum in id order: thread tid owns the contiguous ids [b, e); its chunk's sum,
     * a block-wide exclusive prefix of those, then a walk of the chunk from that prefix. The
     * first id whose running sum exceeds u is the lowest hit of all threads. */
    const int chunk = (V + kThreads - 1) / kThreads;
    const int b = min(V, tid * chunk), e = min(V, b + chunk);
    double cs = 0;
    for (int i = b; i < e; ++i) {
        const float v = p[i];
        if (v > 0 && v >= cut) cs += v;
    }
    __syncthreads(); /* p of other threads' ids: written in step 2 by their owners */
    double acc = block_exclusive_scan_double(cs, sh);
    int hit = INT_MAX, last = -1;
    for (int i = b; i < e; ++i) {
        const float v = p[i];
        if (!(v > 0 && v >= cut)) continue;
        acc += v;
        last = i;
        if (acc > u) {
            hit = i;
            break;
        }
    }
    hit = block_min_int(hit, sh);
    if (hit == INT_MAX) {
        last = block_max_int(last, sh);
        hit = last >= 0 ? last : am;
    }
    if (tid == 0) next[m] = hit;
}

} // namespace

extern "C" size_t epd_cu_sample_workspace(int M, int V)
{
    if (M <= 0 || V <= 0) return 0;
    return (size_t)M * (size_t)V * sizeof(float);
}

extern "C" int epd_cu_sample(int32_t *next, const float *logits, const epd_sample_params_t *params,
                             int M, int V, const int32_t *n_dev, void *workspace,
                             epd_stream_t stream)
{
    if (M < 0 || V <= 0) return (int)cudaErrorInvalidValue;
    if (M == 0) return 0;
    if (!workspace || !next || !logits || !params) return (int)cudaErrorInvalidValue;
    sample_kernel<<<M, kThreads, 0, (cudaStream_t)stream>>>(next, logits, params, V, n_dev,
                                                            (float *)workspace);
    return (int)cudaGetLastError();
}
