/* Routing top-k on the GPU (ep_route): one warp per token.
 *   SOFTMAX_TOPK:  p = softmax(logits[t]); top-k of p; optional renormalisation; x scaling.
 *   SIGMOID_GROUP: s = sigmoid(logits[t]); selection score s + bias[e]; a group's score is the
 *                  sum of its two best selection scores; keep topk_groups groups, then top-k of
 *                  the selection score among their experts; weights are s of the chosen experts,
 *                  optionally renormalised, times routed_scaling_factor.
 *   SOFTMAX_GROUP: p as SOFTMAX_TOPK; a group's score is its best p; keep topk_groups groups,
 *                  then top-k of p among their experts (DeepSeek-V2's group_limited_greedy).
 * Ties go to the lower expert (or group) id. logits [T][E] fp32 -> topk_idx [T][k] int32,
 * topk_w [T][k] fp32. Scores live in shared memory: [warps][E] floats.
 */
#include "ep_cuda_common.cuh"

#include <math.h>

namespace
{

constexpr int kWarps = 4;

/* Warp argmax over (value, index): larger value wins, ties to the lower index. */
__device__ __forceinline__ void warp_argmax(float &v, int &i)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void __launch_bounds__(kWarps * 32)
    route_kernel(const ep_route_params_t p, const float *logits, int T, int32_t *topk_idx,
                 float *topk_w)
{
    extern __shared__ float s_all[];
    const int E = p.num_experts, k = p.topk, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float *sel = s_all + (size_t)warp * 2 * E; /* selection score, -inf once taken/masked */
    float *val = sel + E;                      /* weight source (p or sigmoid) */
    const int t = blockIdx.x * kWarps + warp;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;

    const bool softmax = p.kind != EP_ROUTE_SIGMOID_GROUP;
    if (softmax) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32)
            m = fmaxf(m, l[e]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float sum = 0.f;
        for (int e = lane; e < E; e += 32) {
            const float x = expf(l[e] - m);
            val[e] = x;
            sum += x;
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) {
            val[e] = val[e] / sum;
            sel[e] = val[e];
        }
    } else {
        for (int e = lane; e < E; e += 32) {
            const float s = 1.f / (1.f + expf(-l[e]));
            val[e] = s;
            sel[e] = s + (p.bias ? p.bias[e] : 0.f);
        }
    }
    if (p.kind != EP_ROUTE_SOFTMAX_TOPK) {
        __syncwarp();
        const int G = p.num_groups > 0 ? p.num_groups : 1, gs = E / G;
        /* group scores: lane g (looping) computes the sum of the two best in group g */
        __shared__ float s_gscore[kWarps][64];
        for (int g = lane; g < G; g += 32) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * gs; e < (g + 1) * gs; ++e) {
                const float x = sel[e];
                if (x > b1) {
                    b2 = b1;
                    b1 = x;
                } else if (x > b2) {
                    b2 = x;
                }
            }
            s_gscore[warp][g] = gs >= 2 && !softmax ? b1 + b2 : b1;
        }
        __syncwarp();
        const int keep = p.topk_groups > 0 && p.topk_groups < G ? p.topk_groups : G;
        uint64_t kept = 0;
        for (int r = 0; r < keep; ++r) {
            float v = -INFINITY;
            int i = 0x7fffffff;
            for (int g = lane; g < G; g += 32)
                if (!(kept >> g & 1) &&
                    (s_gscore[warp][g] > v || (s_gscore[warp][g] == v && g < i))) {
                    v = s_gscore[warp][g];
                    i = g;
                }
            warp_argmax(v, i);
            kept |= 1ull << i;
        }
        for (int e = lane; e < E; e += 32)
            if (!(kept >> (e / gs) & 1)) sel[e] = -INFINITY;
    }
    __syncwarp();

    float wsum = 0.f, myw = 0.f;
    int myi = -1;
    for (int r = 0; r < k; ++r) {
        float v = -INFINITY;
        int i = 0x7fffffff;
        for (int e = lane; e < E; e += 32)
            if (sel[e] > v || (sel[e] == v && e < i)) {
                v = sel[e];
                i = e;
            }
        warp_argmax(v, i);
        const bool ok = v != -INFINITY && i < E;
        const float w = ok ? val[i] : 0.f;
        if (lane == r) {
            myi = ok ? i : -1;
            myw = w;
        }
        wsum += w;
        __syncwarp();
        if (ok && lane == (i & 31)) sel[i] = -INFINITY;
        __syncwarp();
    }
    if (lane < k) {
        float w = myw;
        if (p.renormalize) w = softmax ? w / wsum : w / (wsum + 1e-20f);
        topk_idx[(size_t)t * k + lane] = myi;
        topk_w[(size_t)t * k + lane] = w * p.routed_scaling_factor;
    }
}

} // namespace

extern "C" int epk_route(const ep_route_params_t *p, const float *logits, int T, int32_t *topk_idx,
                         float *topk_w, void *stream)
{
    if (T == 0) return 0;
    const size_t smem = (size_t)kWarps * 2 * p->num_experts * sizeof(float);
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(
            route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    route_kernel<<<(T + kWarps - 1) / kWarps, kWarps * 32, smem, (cudaStream_t)stream>>>(
        *p, logits, T, topk_idx, topk_w);
    return EPK_CHECK_LAUNCH();
}

/* Loads this file's kernels now (see epk_preload_kernels). */
extern "C" int epk_preload_route(void)
{
    return epk_preload_kernels(route_kernel);
}
