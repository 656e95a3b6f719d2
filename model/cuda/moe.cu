/* The MoE block's kernels (cuda_ops.h, "MoE"): the routing fix-ups, the one-rank local
 * dispatch and combine, and the experts' SwiGLU on the packed per-expert layout as
 * weight-streaming tensor-core GEMVs (each expert's weights read once per tile of 8 * NT rows).
 * Twins: moe_ref.c. */
#include "cuda_ops.h"
#include "kernel_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace
{

constexpr int kChunk = 32;     /* k per warp step: 4 lanes x 8 bf16, two m16n8k16 mmas */
constexpr int kUnroll = 8;     /* chunks whose weights are in flight before the mmas use them */
constexpr int kPad = 32;       /* bf16 of padding per staged row (64 B): conflict-free LDS.128 */
constexpr int kFp8Block = 128; /* channels per fp8 scale (EP_FP8_BLOCK) */
constexpr int kMaxExperts = 1024;

/* e4m3 bits -> bf16 bits, exact (every e4m3 value, subnormals and NaN included, is a bf16). */
__device__ __forceinline__ uint32_t e4m3_to_bf16(uint32_t q)
{
    __half_raw hr = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q, __NV_E4M3);
    return __float_as_uint(__half2float(__half(hr))) >> 16;
}

/* Weights are read once: keep them out of L1 and first in line for eviction from L2 (policy
 * from l2_evict_first), so that the activations, read by every column tile, stay there. */
__device__ __forceinline__ uint64_t l2_evict_first()
{
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    return pol;
}

__device__ __forceinline__ uint4 ld_weights(const uint16_t *p, uint64_t pol)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(pol));
    return v;
}

__device__ __forceinline__ uint2 ld_weights8(const uint8_t *p, uint64_t pol)
{
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0,%1}, [%2], %3;\n"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p), "l"(pol));
    return v;
}

/* Two e4m3 codes (the low 16 bits of q, first code lowest) -> two bf16 (first in the low half),
 * exact: the hardware's e4m3x2 -> f16x2 conversion (every e4m3 value is a normal f16 or zero),
 * then f16 -> bf16 in integer ops: mantissa and exponent shift down by 3 bits, the exponent bias
 * grows by 112 where the value is not zero. NaN codes are not carried (weights hold none). */
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t q)
{
    const __half2_raw h2 =
        __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(q & 0xffffu), __NV_E4M3);
    const uint32_t h = (uint32_t)h2.x | (uint32_t)h2.y << 16;
    const uint32_t t = (h >> 3) & 0x0fff0fffu;                   /* |value| as bf16, bias 15 */
    const uint32_t nz = ((t + 0x7fff7fffu) >> 15) & 0x00010001u; /* 1 per non-zero half */
    return (t + nz * 0x3800u) | (h & 0x80008000u);
}

/* Eight e4m3 weights (8 bytes) -> eight bf16 in the layout of ld_weights. */
__device__ __forceinline__ uint4 e4m3x8_to_bf16x8(uint2 q)
{
    return make_uint4(e4m3x2_to_bf16x2(q.x), e4m3x2_to_bf16x2(q.x >> 16), e4m3x2_to_bf16x2(q.y),
                      e4m3x2_to_bf16x2(q.y >> 16));
}

/* ---- experts ----------------------------------------------------------------------------------
 * One block: WG warps side by side over the output columns, KS warps splitting the reduction
 * (k) dimension, for one local expert (blockIdx.y). Each warp owns 16 weight rows (the M of the
 * mma): gate_up: gate rows c0..c0+7 and up rows I+c0..I+c0+7, so that silu(g) * u pairs up in
 * one thread; down: output columns c0..c0+15. The expert's rows are the mma's N, 8 * NT at a
 * time, staged in shared memory as bf16 [8 NT][K rounded up to 32, + kPad]; fp8 rows are staged
 * as their e4m3 values (exact in bf16) and their per-128-channel scales applied to the partial
 * sums of each 128-channel block.
 *
 * Instead of the mma's k order, thread (g = lane / 4, c = lane % 4) feeds it physical channels
 * kb + 8c .. kb + 8c + 7 of its weight rows and of its staged row, as two k16 steps: a sum over
 * k does not depend on the order, and both operands come from one 16-byte load each.
 *
 * kW8: the weights are e4m3 (an FP8 checkpoint's experts as stored: 8 bytes per lane and chunk,
 * half the bytes) with fp32 scales per block of bn rows by bk channels (w_scales, layouts in
 * cuda_ops.h); each chunk's codes become bf16 in registers (exact), the partial sums of each
 * block of channels are scaled by the weight rows' block scales (and the staged rows' when kFp8)
 * as the activation scales are. Partial sums run over `fl` chunks: the channels on which every
 * scale involved is constant. */
template <bool kGateUp, bool kFp8, bool kW8, int NT, int WG, int KS>
__global__ void __launch_bounds__(32 * WG * KS)
    expert_mm(uint16_t *__restrict__ out, const void *__restrict__ xin,
              const float *__restrict__ x_scales, const int32_t *__restrict__ counts,
              const int32_t *__restrict__ offsets, int stride, const void *__restrict__ w,
              const float *__restrict__ w_scales, int bn, int bk, int K, int M, int max_rows)
{
    /* gate_up: K = H, M = I (outputs per row), w [L][2I][H]; down: K = I, M = H, w [L][H][I]. */
    constexpr int RT = 8 * NT;
    constexpr int kCols = kGateUp ? 8 : 16; /* output columns per warp */
    const int l = blockIdx.y;
    int cnt = counts[l];
    cnt = cnt < 0 ? 0 : (cnt > max_rows ? max_rows : cnt);
    if (cnt == 0) return;
    const size_t base = offsets ? (size_t)offsets[l] : (size_t)l * (size_t)stride;

    extern __shared__ __align__(16) unsigned char smem[];
    const int nch = (K + kChunk - 1) / kChunk;
    const int ld = nch * kChunk + kPad;
    const int nb = K / kFp8Block;
    uint16_t *xs = reinterpret_cast<uint16_t *>(smem);           /* [RT][ld] bf16 */
    float *sc = reinterpret_cast<float *>(xs + (size_t)RT * ld); /* [RT][nb], fp8 only */
    float *red = sc + (kFp8 ? RT * nb : 0);                      /* [KS-1][WG][NT*4][32] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wg = warp % WG, kh = warp / WG;
    const int g = lane >> 2, c = lane & 3;
    const int c0 = (blockIdx.x * WG + wg) * kCols;
    const bool active = c0 < M;
    const uint64_t pol = l2_evict_first();

    const size_t wrows = kGateUp ? 2 * (size_t)M : (size_t)M;
    const int ra = c0 + g, rb = kGateUp ? M + c0 + g : c0 + g + 8; /* this thread's weight rows */
    const uint16_t *wa = static_cast<const uint16_t *>(w) + ((size_t)l * wrows + ra) * K;
    const uint16_t *wb = static_cast<const uint16_t *>(w) + ((size_t)l * wrows + rb) * K;
    const uint8_t *wa8 = static_cast<const uint8_t *>(w) + ((size_t)l * wrows + ra) * K;
    const uint8_t *wb8 = static_cast<const uint8_t *>(w) + ((size_t)l * wrows + rb) * K;
    /* the weight rows' block scales: gate_up [L][2][nbr][nbk] (the up half's own blocks), down
     * [L][nbr][nbk] */
    const int nbk = kW8 ? (K + bk - 1) / bk : 1;
    const int nbr = kW8 ? (M + bn - 1) / bn : 1;
    const float *swa = nullptr, *swb = nullptr;
    if (kW8) {
        const float *swl = w_scales + (size_t)l * (kGateUp ? 2 : 1) * nbr * nbk;
        swa = swl + (size_t)(ra / bn) * nbk;
        swb = swl + (size_t)(kGateUp ? nbr + (c0 + g) / bn : rb / bn) * nbk;
    }

    /* chunks per partial sum: an fp8 activation block (4 chunks), a weight block (bk / 32), or
     * the channels common to both */
    const int fl = kW8 ? (kFp8 ? (bk / kChunk) % 4 == 0   ? 4
                                 : (bk / kChunk) % 2 == 0 ? 2
                                                          : 1
                               : bk / kChunk)
                       : 4;
    /* k split: whole chunks, whole partial sums */
    int per = (nch + KS - 1) / KS;
    if (kFp8 || kW8) per = (per + fl - 1) / fl * fl;
    const int ch_lo = kh * per;
    const int ch_hi = min(nch, ch_lo + per);

    for (int p0 = 0; p0 < cnt; p0 += RT) {
        const int rows = min(RT, cnt - p0);
        __syncthreads(); /* the previous tile's readers are done */
        const int units = nch * (kChunk / 8);
        for (int i = threadIdx.x; i < RT * units; i += blockDim.x) {
            const int r = i / units, k = (i - r * units) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < rows && k < K) {
                const size_t row = base + p0 + r;
                if (kFp8) {
                    const uint2 q = *reinterpret_cast<const uint2 *>(
                        static_cast<const uint8_t *>(xin) + row * K + k);
                    v.x = e4m3_to_bf16(q.x & 0xff) | e4m3_to_bf16((q.x >> 8) & 0xff) << 16;
                    v.y = e4m3_to_bf16((q.x >> 16) & 0xff) | e4m3_to_bf16(q.x >> 24) << 16;
                    v.z = e4m3_to_bf16(q.y & 0xff) | e4m3_to_bf16((q.y >> 8) & 0xff) << 16;
                    v.w = e4m3_to_bf16((q.y >> 16) & 0xff) | e4m3_to_bf16(q.y >> 24) << 16;
                } else {
                    v = *reinterpret_cast<const uint4 *>(static_cast<const uint16_t *>(xin) +
                                                         row * K + k);
                }
            }
            *reinterpret_cast<uint4 *>(xs + (size_t)r * ld + k) = v;
        }
        if (kFp8)
            for (int i = threadIdx.x; i < RT * nb; i += blockDim.x) {
                const int r = i / nb;
                sc[i] = r < rows ? x_scales[(base + p0 + r) * nb + (i - r * nb)] : 0.0f;
            }
        __syncthreads();

        float acc[NT][4], tmp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[n][e] = tmp[n][e] = 0.0f;

        if (active) {
            for (int ch0 = ch_lo; ch0 < ch_hi; ch0 += kUnroll) {
                uint4 va[kUnroll], vb[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int k = (ch0 + u) * kChunk + 8 * c;
                    if (ch0 + u < ch_hi && k < K) {
                        if (kW8) {
                            va[u] = e4m3x8_to_bf16x8(ld_weights8(wa8 + k, pol));
                            vb[u] = e4m3x8_to_bf16x8(ld_weights8(wb8 + k, pol));
                        } else {
                            va[u] = ld_weights(wa + k, pol);
                            vb[u] = ld_weights(wb + k, pol);
                        }
                    } else {
                        va[u] = vb[u] = make_uint4(0, 0, 0, 0);
                    }
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int ch = ch0 + u;
                    if (ch >= ch_hi) break;
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        const uint4 xv = *reinterpret_cast<const uint4 *>(
                            xs + (size_t)(n * 8 + g) * ld + ch * kChunk + 8 * c);
                        float(&d)[4] = kFp8 || kW8 ? tmp[n] : acc[n];
                        epd_mma_bf16(d, va[u].x, vb[u].x, va[u].y, vb[u].y, xv.x, xv.y);
                        epd_mma_bf16(d, va[u].z, vb[u].z, va[u].w, vb[u].w, xv.z, xv.w);
                    }
                    if ((kFp8 || kW8) && ((ch + 1) % fl == 0 || ch + 1 == ch_hi)) {
                        const int b = ch >> 2;
                        /* d0, d1 belong to weight row ra, d2, d3 to rb */
                        const float sa = kW8 ? swa[ch * kChunk / bk] : 1.0f;
                        const float sb = kW8 ? swb[ch * kChunk / bk] : 1.0f;
#pragma unroll
                        for (int n = 0; n < NT; ++n) {
                            /* accumulator columns are rows n*8 + 2c and n*8 + 2c + 1 */
                            const float s0 = kFp8 ? sc[(n * 8 + 2 * c) * nb + b] : 1.0f;
                            const float s1 = kFp8 ? sc[(n * 8 + 2 * c + 1) * nb + b] : 1.0f;
                            acc[n][0] += s0 * sa * tmp[n][0];
                            acc[n][1] += s1 * sa * tmp[n][1];
                            acc[n][2] += s0 * sb * tmp[n][2];
                            acc[n][3] += s1 * sb * tmp[n][3];
                            tmp[n][0] = tmp[n][1] = tmp[n][2] = tmp[n][3] = 0.0f;
                        }
                    }
                }
            }
        }

        if (KS > 1) {
            if (kh > 0)
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        red[(((kh - 1) * WG + wg) * NT * 4 + n * 4 + e) * 32 + lane] = acc[n][e];
            __syncthreads();
            if (kh == 0)
                for (int s = 0; s < KS - 1; ++s)
#pragma unroll
                    for (int n = 0; n < NT; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            acc[n][e] += red[((s * WG + wg) * NT * 4 + n * 4 + e) * 32 + lane];
        }
        if (kh != 0 || !active) continue;

            /* d0, d1: weight row g, staged rows 2c, 2c + 1; d2, d3: weight row g + 8, same rows */
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = n * 8 + 2 * c + h;
                if (r >= rows) continue;
                uint16_t *o = out + (base + p0 + r) * (size_t)M + c0 + g;
                if (kGateUp) {
                    const float gt = acc[n][h], up = acc[n][2 + h];
                    o[0] = epd_f2bf(gt / (1.0f + expf(-gt)) * up);
                } else {
                    o[0] = epd_f2bf(acc[n][h]);
                    o[8] = epd_f2bf(acc[n][2 + h]);
                }
            }
    }
}

/* The weights of one launch: bf16 (scales NULL), or e4m3 with block scales. */
struct WeightsArg {
    const void *w;
    const float *scales;
    int bn, bk;
};

template <bool kGateUp, bool kFp8, bool kW8, int NT, int WG, int KS>
int launch_expert(uint16_t *out, const void *x, const float *xs, const int32_t *counts,
                  const int32_t *offsets, int stride, WeightsArg w, int L, int K, int M,
                  int max_rows, cudaStream_t st)
{
    constexpr int kCols = kGateUp ? 8 : 16;
    const int nch = (K + kChunk - 1) / kChunk;
    const size_t smem = (size_t)8 * NT * (nch * kChunk + kPad) * 2 +
                        (kFp8 ? (size_t)8 * NT * (K / kFp8Block) * 4 : 0) +
                        (size_t)(KS - 1) * WG * NT * 4 * 32 * 4;
    auto kern = expert_mm<kGateUp, kFp8, kW8, NT, WG, KS>;
    if (smem > 48 * 1024) {
        cudaError_t e =
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    dim3 grid((M + kCols * WG - 1) / (kCols * WG), L);
    kern<<<grid, 32 * WG * KS, smem, st>>>(out, x, xs, counts, offsets, stride, w.w, w.scales, w.bn,
                                           w.bk, K, M, max_rows);
    return (int)cudaGetLastError();
}

/* Rows staged per pass: 16 when an expert may have more than 8 (decode batches of 16+ tokens);
 * an expert with more rows than that re-reads its weight tile per 16 rows (from L2 when the
 * tile is still there). */
template <bool kGateUp, bool kFp8, bool kW8, int WG, int KS>
int launch_expert_nt(uint16_t *out, const void *x, const float *xs, const int32_t *counts,
                     const int32_t *offsets, int stride, WeightsArg w, int L, int K, int M,
                     int max_rows, cudaStream_t st)
{
    if (max_rows <= 8)
        return launch_expert<kGateUp, kFp8, kW8, 1, WG, KS>(out, x, xs, counts, offsets, stride, w,
                                                            L, K, M, max_rows, st);
    return launch_expert<kGateUp, kFp8, kW8, 2, WG, KS>(out, x, xs, counts, offsets, stride, w, L,
                                                        K, M, max_rows, st);
}

/* gate_up with bf16 or fp8 inputs and bf16 or fp8 weights */
template <int WG, int KS>
int launch_gate_up(uint16_t *act, const void *x, const float *xs, const int32_t *counts,
                   const int32_t *offsets, int stride, WeightsArg w, int L, int H, int I,
                   int max_rows, cudaStream_t st)
{
    if (xs && w.scales)
        return launch_expert_nt<true, true, true, WG, KS>(act, x, xs, counts, offsets, stride, w, L,
                                                          H, I, max_rows, st);
    if (xs)
        return launch_expert_nt<true, true, false, WG, KS>(act, x, xs, counts, offsets, stride, w,
                                                           L, H, I, max_rows, st);
    if (w.scales)
        return launch_expert_nt<true, false, true, WG, KS>(act, x, nullptr, counts, offsets, stride,
                                                           w, L, H, I, max_rows, st);
    return launch_expert_nt<true, false, false, WG, KS>(act, x, nullptr, counts, offsets, stride, w,
                                                        L, H, I, max_rows, st);
}

/* ---- routing, local dispatch and combine ------------------------------------------------------
 */

__global__ void route_fixup_kernel(int32_t *idx, float *wt, int n, int k, int E,
                                   const int32_t *n_valid, const int32_t *slot_of,
                                   unsigned long long *expert_tokens)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = idx[i];
    if ((n_valid && i / k >= *n_valid) || e < 0 || e >= E) {
        idx[i] = -1;
        wt[i] = 0.0f;
        return;
    }
    if (expert_tokens) atomicAdd(&expert_tokens[e], 1ull);
    if (slot_of) idx[i] = slot_of[e];
}

/* row_of[i] = the selection's place among its expert's rows (atomic order), or -1. */
__global__ void local_count_kernel(int32_t *counts, int32_t *row_of, const int32_t *idx, int n,
                                   int E)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = idx[i];
    row_of[i] = (e >= 0 && e < E) ? atomicAdd(&counts[e], 1) : -1;
}

constexpr int kScatterThreads = 256;

/* Every block scans counts[E] into shared memory (block 0 also writes offsets); then each warp
 * places one selection: row_of[i] += offsets[e], packed[row] = x[t] in 16-byte copies. */
__global__ void __launch_bounds__(kScatterThreads)
    local_scatter_kernel(uint16_t *packed, int32_t *offsets, int32_t *row_of, const int32_t *counts,
                         const uint16_t *x, const int32_t *idx, int n, int k, int E, int H)
{
    __shared__ int off[kMaxExperts];
    __shared__ int wsum[kScatterThreads / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per = (E + kScatterThreads - 1) / kScatterThreads;
    const int e0 = threadIdx.x * per;
    int s = 0;
    for (int e = e0; e < e0 + per && e < E; ++e)
        s += counts[e];
    int incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    int run = 0;
    for (int w = 0; w < warp; ++w)
        run += wsum[w];
    run += incl - s;
    for (int e = e0; e < e0 + per && e < E; ++e) {
        off[e] = run;
        if (blockIdx.x == 0) offsets[e] = run;
        run += counts[e];
    }
    __syncthreads();

    const int i = blockIdx.x * (kScatterThreads / 32) + warp;
    if (i >= n) return;
    const int pos = row_of[i];
    if (pos < 0) return;
    const int row = off[idx[i]] + pos;
    __syncwarp();
    if (lane == 0) row_of[i] = row;
    const uint4 *src = reinterpret_cast<const uint4 *>(x + (size_t)(i / k) * H);
    uint4 *dst = reinterpret_cast<uint4 *>(packed + (size_t)row * H);
    for (int v = lane; v < H / 8; v += 32)
        dst[v] = src[v];
}

/* One block per token; each thread owns 8 channels at a time. Multiply and add are kept apart
 * (no fused multiply-add) so that the sum is the twin's to the bit. */
__global__ void local_combine_kernel(float *h, const uint16_t *y, const int32_t *row_of,
                                     const float *wt, int k, int H)
{
    const int t = blockIdx.x;
    const int32_t *ro = row_of + (size_t)t * k;
    const float *wr = wt + (size_t)t * k;
    for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < k; ++j) {
            const int r = ro[j];
            if (r < 0) continue;
            const float wj = wr[j];
            const uint4 q = reinterpret_cast<const uint4 *>(y + (size_t)r * H)[v];
            const uint32_t p[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[2 * e] = __fadd_rn(acc[2 * e], __fmul_rn(wj, epd_bf2f(p[e] & 0xffff)));
                acc[2 * e + 1] = __fadd_rn(acc[2 * e + 1], __fmul_rn(wj, epd_bf2f(p[e] >> 16)));
            }
        }
        float4 *hp = reinterpret_cast<float4 *>(h + (size_t)t * H + (size_t)v * 8);
        float4 a = hp[0], b = hp[1];
        a.x = __fadd_rn(a.x, acc[0]);
        a.y = __fadd_rn(a.y, acc[1]);
        a.z = __fadd_rn(a.z, acc[2]);
        a.w = __fadd_rn(a.w, acc[3]);
        b.x = __fadd_rn(b.x, acc[4]);
        b.y = __fadd_rn(b.y, acc[5]);
        b.z = __fadd_rn(b.z, acc[6]);
        b.w = __fadd_rn(b.w, acc[7]);
        hp[0] = a;
        hp[1] = b;
    }
}

} /* namespace */

/* Block shapes of the expert kernels: 2 warps of columns x 2 warps of k. gate_up: 16 output
 * columns (32 weight rows) per block, 48 tiles per Qwen3-30B-A3B expert; down: 32 output
 * columns per block, 64 tiles. Enough blocks to fill 132 SMs from 8 active experts (batch 1),
 * each warp with 8 x 1 KB of weights in flight. */
constexpr int kGuWG = 2, kGuKS = 2, kDnWG = 2, kDnKS = 2;

extern "C" int epd_cu_route_fixup(int32_t *topk_idx, float *topk_w, int T, int k, int E,
                                  const int32_t *n_valid, const int32_t *slot_of,
                                  unsigned long long *expert_tokens, epd_stream_t stream)
{
    if (T < 0 || k <= 0 || E <= 0) return (int)cudaErrorInvalidValue;
    const int n = T * k;
    if (n == 0) return 0;
    route_fixup_kernel<<<(n + 255) / 256, 256, 0, (cudaStream_t)stream>>>(
        topk_idx, topk_w, n, k, E, n_valid, slot_of, expert_tokens);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_moe_local_dispatch(uint16_t *packed, int32_t *counts, int32_t *offsets,
                                         int32_t *row_of, const uint16_t *x,
                                         const int32_t *topk_idx, int T, int k, int E, int H,
                                         epd_stream_t stream)
{
    if (T < 0 || k <= 0 || E <= 0 || E > kMaxExperts || H <= 0 || H % 8)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t e = cudaMemsetAsync(counts, 0, (size_t)E * sizeof(int32_t), st);
    if (e != cudaSuccess) return (int)e;
    const int n = T * k;
    if (n > 0) local_count_kernel<<<(n + 255) / 256, 256, 0, st>>>(counts, row_of, topk_idx, n, E);
    const int wpb = kScatterThreads / 32;
    const int blocks = n > 0 ? (n + wpb - 1) / wpb : 1; /* block 0 writes offsets even for T = 0 */
    local_scatter_kernel<<<blocks, kScatterThreads, 0, st>>>(packed, offsets, row_of, counts, x,
                                                             topk_idx, n, k, E, H);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_moe_local_combine(float *h, const uint16_t *y, const int32_t *row_of,
                                        const float *topk_w, int T, int k, int H,
                                        epd_stream_t stream)
{
    if (T < 0 || k <= 0 || H <= 0 || H % 8) return (int)cudaErrorInvalidValue;
    if (T == 0) return 0;
    const int threads = H / 8 >= 256 ? 256 : ((H / 8 + 31) / 32) * 32;
    local_combine_kernel<<<T, threads, 0, (cudaStream_t)stream>>>(h, y, row_of, topk_w, k, H);
    return (int)cudaGetLastError();
}

static bool expert_shape_ok(int L, int H, int I, int max_rows, const int32_t *offsets, int stride)
{
    return L >= 0 && H > 0 && I > 0 && H % 16 == 0 && I % 16 == 0 && max_rows >= 0 && L <= 65535 &&
           (offsets || stride >= max_rows);
}

extern "C" int epd_cu_expert_gate_up(uint16_t *act, const void *x, const float *x_scales,
                                     const int32_t *counts, const int32_t *offsets, int stride,
                                     const uint16_t *w_gate_up, int L, int H, int I, int max_rows,
                                     epd_stream_t stream)
{
    if (!expert_shape_ok(L, H, I, max_rows, offsets, stride) || (x_scales && H % kFp8Block))
        return (int)cudaErrorInvalidValue;
    if (L == 0 || max_rows == 0) return 0;
    return launch_gate_up<kGuWG, kGuKS>(act, x, x_scales, counts, offsets, stride,
                                        WeightsArg{w_gate_up, nullptr, 1, kChunk}, L, H, I,
                                        max_rows, (cudaStream_t)stream);
}

extern "C" int epd_cu_expert_down(uint16_t *y, const uint16_t *act, const int32_t *counts,
                                  const int32_t *offsets, int stride, const uint16_t *w_down, int L,
                                  int H, int I, int max_rows, epd_stream_t stream)
{
    if (!expert_shape_ok(L, H, I, max_rows, offsets, stride)) return (int)cudaErrorInvalidValue;
    if (L == 0 || max_rows == 0) return 0;
    return launch_expert_nt<false, false, false, kDnWG, kDnKS>(
        y, act, nullptr, counts, offsets, stride, WeightsArg{w_down, nullptr, 1, kChunk}, L, I, H,
        max_rows, (cudaStream_t)stream);
}

extern "C" int epd_cu_expert_gate_up_w8(uint16_t *act, const void *x, const float *x_scales,
                                        const int32_t *counts, const int32_t *offsets, int stride,
                                        const uint8_t *w8_gate_up, const float *w_scales, int bn,
                                        int bk, int L, int H, int I, int max_rows,
                                        epd_stream_t stream)
{
    if (!expert_shape_ok(L, H, I, max_rows, offsets, stride) || (x_scales && H % kFp8Block) ||
        !w_scales || bn < 1 || bk < kChunk || bk % kChunk)
        return (int)cudaErrorInvalidValue;
    if (L == 0 || max_rows == 0) return 0;
    return launch_gate_up<kGuWG, kGuKS>(act, x, x_scales, counts, offsets, stride,
                                        WeightsArg{w8_gate_up, w_scales, bn, bk}, L, H, I, max_rows,
                                        (cudaStream_t)stream);
}

extern "C" int epd_cu_expert_down_w8(uint16_t *y, const uint16_t *act, const int32_t *counts,
                                     const int32_t *offsets, int stride, const uint8_t *w8_down,
                                     const float *w_scales, int bn, int bk, int L, int H, int I,
                                     int max_rows, epd_stream_t stream)
{
    if (!expert_shape_ok(L, H, I, max_rows, offsets, stride) || !w_scales || bn < 1 ||
        bk < kChunk || bk % kChunk)
        return (int)cudaErrorInvalidValue;
    if (L == 0 || max_rows == 0) return 0;
    return launch_expert_nt<false, false, true, kDnWG, kDnKS>(
        y, act, nullptr, counts, offsets, stride, WeightsArg{w8_down, w_scales, bn, bk}, L, I, H,
        max_rows, (cudaStream_t)stream);
}
