/* DeepSeek's multi-head latent attention on the GPU: the latent cache store (kv_a_layernorm on
 * the latent, RoPE on the shared key part and on q's rope part), the absorbed form's attention
 * over the paged latent cache (decode: a split kernel and a merge kernel, flash-decoding as
 * attention.cu), and the pieces of the expanded form (prefill: the context's latents gathered,
 * keys and values per head laid out for epd_cu_attention). The absorption itself (q_nope through
 * kv_b's key part, the output through its value part) and the decompression are cuBLAS GEMMs in
 * cuda_forward.c. Twins: mla_ref.c.
 *
 * Latent split kernel: one block of kMlaThreads per (token t, split s, group of up to kMlaHeads
 * query heads). Its positions come in tiles of kMlaTile: the tile's cache rows (kvl + rope bf16
 * each) go to shared memory once for all the group's heads (every head reads the same latent:
 * multi-query); warp w computes the scores (h, p) = w, w + 8, ... as lane-strided dot products
 * over kvl + rope, reduced by a butterfly; thread h < heads updates head h's online softmax (log2
 * domain); then thread i accumulates latent dims i and i + kMlaThreads of every head. Workspace:
 * acc fp32 [T][nh][max_splits][kvl] (unnormalised sum of 2^(s2 - m) lat), then ml float2
 * [T][nh][max_splits] (m, l) of the splits a token reaches; the merge reads only those. */
#include "cuda_ops.h"
#include "kernel_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace
{

constexpr float kLog2e = 1.4426950408889634f;

/* ---- latent store + rope ----------------------------------------------------------------------
 */

constexpr int kStoreThreads = 256;
constexpr int kMaxRope = 256;

/* One block per token, the C twin's arithmetic (epd_rmsnorm, epd_rope_rotate): the latent's sum
 * of squares in fp64 (block reduction: another order than the C loop), inv = (float)(1 / sqrt(ss
 * / kvl + eps)), y = w * (x * inv); cos and sin of the fp32 angle in fp64, rounded to fp32, then
 * times the attention factor; every product and sum rounded separately. */
__global__ void __launch_bounds__(kStoreThreads)
    mla_rope_store_kernel(float *q, const float *kv, const float *kv_norm, const float *inv_freq,
                          float rope_scale, int interleave, const int32_t *pos, const int32_t *slot,
                          int nh, int nope, int rope, int kvl, float eps, uint16_t *cache)
{
    __shared__ float s_cos[kMaxRope / 2], s_sin[kMaxRope / 2];
    __shared__ double s_ss[kStoreThreads / 32];
    const int t = blockIdx.x, half = rope / 2, qk = nope + rope, row = kvl + rope;
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float ang = __fmul_rn(p, inv_freq[i]);
        double s, c;
        sincos((double)ang, &s, &c);
        s_cos[i] = __fmul_rn((float)c, rope_scale);
        s_sin[i] = __fmul_rn((float)s, rope_scale);
    }
    __syncthreads();
    /* q's rope part of every head, in place */
    float *qt = q + (size_t)t * nh * qk + nope;
    for (int i = threadIdx.x; i < nh * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        const int ia = interleave ? 2 * j : j, ib = interleave ? 2 * j + 1 : j + half;
        float *x = qt + (size_t)h * qk;
        const float a = x[ia], b = x[ib], c = s_cos[j], s = s_sin[j];
        x[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        x[ib] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
    const int sl = slot[t];
    if (sl < 0) return; /* uniform over the block */
    const float *x = kv + (size_t)t * row;
    double ss = 0;
    for (int i = threadIdx.x; i < kvl; i += blockDim.x)
        ss += (double)x[i] * (double)x[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) s_ss[threadIdx.x >> 5] = ss;
    __syncthreads();
    ss = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w)
        ss += s_ss[w];
    const float inv = (float)(1.0 / sqrt(ss / kvl + (double)eps));
    uint16_t *dst = cache + (size_t)sl * row;
    for (int i = threadIdx.x; i < kvl; i += blockDim.x)
        dst[i] = epd_f2bf(__fmul_rn(kv_norm[i], __fmul_rn(x[i], inv)));
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int ia = interleave ? 2 * j : j, ib = interleave ? 2 * j + 1 : j + half;
        const float a = x[kvl + ia], b = x[kvl + ib], c = s_cos[j], s = s_sin[j];
        dst[kvl + ia] = epd_f2bf(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        dst[kvl + ib] = epd_f2bf(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

/* ---- latent attention: split kernel ------------------------------------------------------------
 */

constexpr int kMlaThreads = 256;
constexpr int kMlaWarps = kMlaThreads / 32;
constexpr int kMlaHeads = 8;
constexpr int kMlaTile = 16;
constexpr int kMlaMaxKvl = 512;
constexpr int kMlaMaxRow = 640; /* kvl + rope */
constexpr int kMlaDims = kMlaMaxKvl / kMlaThreads;

__global__ void __launch_bounds__(kMlaThreads)
    mla_split_kernel(const float *q_lat, const float *q_pe, int pe_stride, const uint16_t *cache,
                     const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                     const int32_t *pos, int nh, int kvl, int rope, int block_size, int split_len,
                     int max_len, float scale_log2, float *ws_acc, float2 *ws_ml)
{
    __shared__ __align__(16) float s_q[kMlaHeads][kMlaMaxRow];
    __shared__ __align__(16) uint32_t s_kv[kMlaTile][kMlaMaxRow / 2];
    __shared__ float s_p[kMlaHeads][kMlaTile];
    __shared__ float s_alpha[kMlaHeads];
    const int t = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    const int h0 = blockIdx.z * kMlaHeads, nrows = min(kMlaHeads, nh - h0);
    const int seq = seq_idx[t];
    const int len = seq < 0 ? 0 : min(pos[t] + 1, max_len);
    const int start = split * split_len;
    if (start >= len) return;
    const int end = min(len, start + split_len);
    const int D = kvl + rope, W = D / 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int32_t *bt = block_table + (size_t)seq * max_blocks;

    for (int i = tid; i < nrows * D; i += kMlaThreads) {
        const int h = i / D, d = i % D;
        const size_t th = (size_t)t * nh + h0 + h;
        s_q[h][d] = d < kvl ? q_lat[th * kvl + d] : q_pe[th * pe_stride + (d - kvl)];
    }
    float m = -INFINITY, l = 0.f; /* head tid's running max (log2 domain) and sum, tid < nrows */
    float acc[kMlaHeads][kMlaDims];
#pragma unroll
    for (int h = 0; h < kMlaHeads; ++h)
#pragma unroll
        for (int i = 0; i < kMlaDims; ++i)
            acc[h][i] = 0.f;

    for (int base = start; base < end; base += kMlaTile) {
        const int n = min(kMlaTile, end - base);
        __syncthreads(); /* the previous tile is consumed (and s_q is complete) */
        for (int i = tid; i < n * W; i += kMlaThreads) {
            const int p = i / W, w = i % W, at = base + p;
            const size_t r = (size_t)__ldg(bt + at / block_size) * block_size + at % block_size;
            s_kv[p][w] = __ldg((const unsigned int *)(cache + r * D) + w);
        }
        __syncthreads();
        for (int idx = warp; idx < nrows * n; idx += kMlaWarps) {
            const int h = idx / n, p = idx % n;
            const float2 *qh = (const float2 *)s_q[h];
            float s = 0.f;
            for (int w = lane; w < W; w += 32) {
                const uint32_t kw = s_kv[p][w];
                const float2 qv = qh[w];
                s += qv.x * epd_bf2f((uint16_t)(kw & 0xffffu)) +
                     qv.y * epd_bf2f((uint16_t)(kw >> 16));
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) s_p[h][p] = s * scale_log2;
        }
        __syncthreads();
        if (tid < nrows) {
            float mx = -INFINITY;
            for (int p = 0; p < n; ++p)
                mx = fmaxf(mx, s_p[tid][p]);
            const float mn = fmaxf(m, mx);
            const float alpha = exp2f(m - mn); /* 0 on the first tile */
            float sum = 0.f;
            for (int p = 0; p < n; ++p) {
                const float e = exp2f(s_p[tid][p] - mn);
                s_p[tid][p] = e;
                sum += e;
            }
            l = l * alpha + sum;
            m = mn;
            s_alpha[tid] = alpha;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kMlaDims; ++i) {
            const int d = tid + i * kMlaThreads;
            if (d >= kvl) break;
#pragma unroll
            for (int h = 0; h < kMlaHeads; ++h) {
                if (h >= nrows) break;
                float a = acc[h][i] * s_alpha[h];
                for (int p = 0; p < n; ++p) {
                    const uint32_t kw = s_kv[p][d >> 1];
                    a += s_p[h][p] * epd_bf2f((uint16_t)((d & 1) ? kw >> 16 : kw & 0xffffu));
                }
                acc[h][i] = a;
            }
        }
    }
    const size_t row0 = (size_t)t * nh + h0;
#pragma unroll
    for (int h = 0; h < kMlaHeads; ++h) {
        if (h >= nrows) break;
#pragma unroll
        for (int i = 0; i < kMlaDims; ++i) {
            const int d = tid + i * kMlaThreads;
            if (d < kvl) ws_acc[((row0 + h) * nsplit + split) * kvl + d] = acc[h][i];
        }
    }
    if (tid < nrows) ws_ml[(row0 + tid) * nsplit + split] = make_float2(m, l);
}

/* ---- expanded form -----------------------------------------------------------------------------
 */

constexpr int kGatherWarps = 8;

/* One warp per (sequence, position): its cache row split into lat and pe. */
__global__ void __launch_bounds__(kGatherWarps * 32)
    mla_gather_kernel(uint16_t *lat, uint16_t *pe, const uint16_t *cache,
                      const int32_t *block_table, int max_blocks, const int32_t *base,
                      const int32_t *seq_len, int kvl, int rope, int block_size)
{
    const int s = blockIdx.y, lane = threadIdx.x & 31;
    const int p = blockIdx.x * kGatherWarps + (threadIdx.x >> 5);
    if (p >= seq_len[s]) return;
    const int32_t *bt = block_table + (size_t)s * max_blocks;
    const size_t src = (size_t)bt[p / block_size] * block_size + p % block_size;
    const size_t dst = (size_t)base[s] + p, D = (size_t)kvl + rope;
    for (int i = lane; i < kvl; i += 32)
        lat[dst * kvl + i] = cache[src * D + i];
    for (int i = lane; i < rope; i += 32)
        pe[dst * rope + i] = cache[src * D + kvl + i];
}

__global__ void mla_expand_kv_kernel(uint16_t *k, uint16_t *v, const float *kvx, const uint16_t *pe,
                                     long long n, int nh, int nope, int rope, int vd, int hdp)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(i % hdp);
        const long long rh = i / hdp, r = rh / nh;
        const float *x = kvx + rh * (nope + vd);
        uint16_t kk = 0, vv = 0;
        if (d < nope)
            kk = epd_f2bf(x[d]);
        else if (d < nope + rope)
            kk = pe[r * rope + (d - nope)];
        if (d < vd) vv = epd_f2bf(x[nope + d]);
        k[i] = kk;
        v[i] = vv;
    }
}

__global__ void mla_pad_q_kernel(float *q_out, const float *q, long long n, int qk, int hdp,
                                 float q_scale)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(i % hdp);
        q_out[i] = d < qk ? q[i / hdp * qk + d] * q_scale : 0.f;
    }
}

__global__ void mla_unpad_kernel(uint16_t *out, const uint16_t *src, long long n, int vd, int hdp)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = src[i / vd * hdp + i % vd];
}

unsigned grid_for(long long n)
{
    long long b = (n + 255) / 256;
    return (unsigned)(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

} // namespace

extern "C" int epd_cu_mla_rope_store(float *q, const float *kv, const float *kv_norm,
                                     const float *inv_freq, float rope_scale, int interleave,
                                     const int32_t *pos, const int32_t *slot, int T, int nh,
                                     int nope, int rope, int kvl, float eps, uint16_t *cache,
                                     epd_stream_t stream)
{
    if (T < 0 || nh < 1 || nope < 0 || rope < 2 || rope % 2 || rope > kMaxRope || kvl < 1)
        return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    mla_rope_store_kernel<<<T, kStoreThreads, 0, (cudaStream_t)stream>>>(
        q, kv, kv_norm, inv_freq, rope_scale, interleave, pos, slot, nh, nope, rope, kvl, eps,
        cache);
    return (int)cudaGetLastError();
}

extern "C" size_t epd_cu_mla_workspace(int T, int nh, int kvl, int max_splits)
{
    if (T <= 0 || nh <= 0 || kvl <= 0 || max_splits <= 0) return 0;
    return (size_t)T * nh * max_splits * ((size_t)kvl * sizeof(float) + sizeof(float2));
}

extern "C" int epd_cu_mla_attention(uint16_t *o_lat, const float *q_lat, const float *q_pe,
                                    int pe_stride, const uint16_t *cache,
                                    const int32_t *block_table, int max_blocks,
                                    const int32_t *seq_idx, const int32_t *pos, int T, int nh,
                                    int kvl, int rope, float scale, int block_size, int split_len,
                                    int max_splits, void *workspace, epd_stream_t stream)
{
    if (T < 0 || nh < 1 || kvl < 2 || kvl % 2 || kvl > kMlaMaxKvl || rope < 0 || rope % 2 ||
        kvl + rope > kMlaMaxRow || pe_stride < rope || block_size < 1 || split_len < 1 ||
        max_splits < 1 || max_splits > 65535 || max_blocks < 1 ||
        (long long)split_len * max_splits > 0x7fffffffLL)
        return cudaErrorInvalidValue;
    const int groups = (nh + kMlaHeads - 1) / kMlaHeads;
    if (groups > 65535) return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    if (!workspace) return cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    float *ws_acc = (float *)workspace;
    float2 *ws_ml = (float2 *)(ws_acc + (size_t)T * nh * max_splits * kvl);
    const int max_len = split_len * max_splits;
    const dim3 grid((unsigned)T, (unsigned)max_splits, (unsigned)groups);
    mla_split_kernel<<<grid, kMlaThreads, 0, st>>>(
        q_lat, q_pe, pe_stride, cache, block_table, max_blocks, seq_idx, pos, nh, kvl, rope,
        block_size, split_len, max_len, scale * kLog2e, ws_acc, ws_ml);
    int err = (int)cudaGetLastError();
    if (err) return err;
    return epd_launch_merge_splits(o_lat, ws_acc, ws_ml, seq_idx, pos, T, nh, kvl, split_len,
                                   max_splits, max_len, st);
}

extern "C" int epd_cu_mla_gather(uint16_t *lat, uint16_t *pe, const uint16_t *cache,
                                 const int32_t *block_table, int max_blocks, const int32_t *base,
                                 const int32_t *seq_len, int S, int max_len, int kvl, int rope,
                                 int block_size, epd_stream_t stream)
{
    if (S < 0 || max_len < 0 || kvl < 1 || rope < 0 || block_size < 1 || max_blocks < 1 ||
        S > 65535)
        return cudaErrorInvalidValue;
    if (S == 0 || max_len == 0) return cudaSuccess;
    const dim3 grid((unsigned)((max_len + kGatherWarps - 1) / kGatherWarps), (unsigned)S);
    mla_gather_kernel<<<grid, kGatherWarps * 32, 0, (cudaStream_t)stream>>>(
        lat, pe, cache, block_table, max_blocks, base, seq_len, kvl, rope, block_size);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_mla_expand_kv(uint16_t *k, uint16_t *v, const float *kvx, const uint16_t *pe,
                                    int rows, int nh, int nope, int rope, int vd, int hdp,
                                    epd_stream_t stream)
{
    if (rows < 0 || nh < 1 || nope < 0 || rope < 0 || vd < 1 || hdp < nope + rope || hdp < vd)
        return cudaErrorInvalidValue;
    const long long n = (long long)rows * nh * hdp;
    if (n == 0) return cudaSuccess;
    mla_expand_kv_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(k, v, kvx, pe, n, nh, nope,
                                                                        rope, vd, hdp);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_mla_pad_q(float *q_out, const float *q, int T, int nh, int qk, int hdp,
                                float q_scale, epd_stream_t stream)
{
    if (T < 0 || nh < 1 || qk < 1 || hdp < qk) return cudaErrorInvalidValue;
    const long long n = (long long)T * nh * hdp;
    if (n == 0) return cudaSuccess;
    mla_pad_q_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(q_out, q, n, qk, hdp, q_scale);
    return (int)cudaGetLastError();
}

extern "C" int epd_cu_mla_unpad(uint16_t *out, const uint16_t *src, int T, int nh, int vd, int hdp,
                                epd_stream_t stream)
{
    if (T < 0 || nh < 1 || vd < 1 || hdp < vd) return cudaErrorInvalidValue;
    const long long n = (long long)T * nh * vd;
    if (n == 0) return cudaSuccess;
    mla_unpad_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(out, src, n, vd, hdp);
    return (int)cudaGetLastError();
}
