/* Attention of the CUDA model: the per-head q/k RMSNorm + RoPE + paged KV store that follows the
 * fused QKV GEMM, and causal GQA over the paged bf16 cache by flash-decoding (a split kernel and
 * a merge kernel). Twins: epd_qk_norm_rope_store_ref (attention_ref.c) and epd_attention_paged
 * (model/attention.c).
 *
 * Split kernel, one block of kWarps warps per (token t, kv head, group of up to 8 query heads,
 * split s); it covers positions [s * split_len, min(len, (s + 1) * split_len)) with
 * len = min(pos[t] + 1, split_len * max_splits). Its warps take 16-position tiles in turn
 * (warp w: tiles w, w + kWarps, ...), each with its own online softmax; the block then merges
 * its warps (in warp order) and writes one partial per (t, head, s) to the workspace.
 *
 * The products run on the tensor cores (mma.m16n8k16, bf16 in, fp32 accumulate) with the 16
 * rows of the A operand holding the 8 heads twice: rows 0-7 the bf16 high parts (of q, then of
 * the softmax weights p), rows 8-15 the bf16 low parts (x - bf16(x)). K and V are bf16 already,
 * so each score and each weighted V sum is hi + lo, exact to ~2^-17 relative, accumulated in
 * fp32: the result is as accurate as an fp32 CUDA-core loop, at tensor-core speed. The heads of a
 * kv head's group share every K/V load (GQA); groups of more than 8 heads take several blocks,
 * which read the same K/V (mostly from L2).
 *
 * Within a tile, a thread's K loads are 16-byte vectors of one position's row (dims permuted into
 * the MMA's k order, the same permutation applied to q, so the dot products are unchanged), and
 * its V loads are 16-byte vectors of 8 dims of four positions, paired into the B operand with
 * byte permutes. No shared memory in the hot loop.
 *
 * Workspace: acc fp32 [T][nh][max_splits][hd] (unnormalised sum of 2^(s2 - m) v), then
 * ml float2 [T][nh][max_splits] (m: max of the split's scores s2 = q.k / sqrt(hd) * log2(e);
 * l: sum of 2^(s2 - m)). Only splits below a token's length are written; the merge reads only
 * those. */
#include "cuda_ops.h"
#include "kernel_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace
{

/* ---- shared helpers ------------------------------------------------------------------------ */

/* (a, b) -> packed bf16x2 high parts and low parts: a = bf16(a) + bf16(a - bf16(a)) to ~16
 * significant bits (the subtraction is exact). */
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t &hi, uint32_t &lo)
{
    const uint16_t ha = epd_f2bf(a), hb = epd_f2bf(b);
    const uint16_t la = epd_f2bf(a - epd_bf2f(ha)), lb = epd_f2bf(b - epd_bf2f(hb));
    hi = (uint32_t)ha | (uint32_t)hb << 16;
    lo = (uint32_t)la | (uint32_t)lb << 16;
}

/* W consecutive 32-bit words (2W bf16) in one vector load through the read-only path. */
template <int W> __device__ __forceinline__ void ld_words(const uint16_t *p, uint32_t (&w)[W]);
template <> __device__ __forceinline__ void ld_words<1>(const uint16_t *p, uint32_t (&w)[1])
{
    w[0] = __ldg((const unsigned int *)p);
}
template <> __device__ __forceinline__ void ld_words<2>(const uint16_t *p, uint32_t (&w)[2])
{
    const uint2 v = __ldg((const uint2 *)p);
    w[0] = v.x;
    w[1] = v.y;
}
template <> __device__ __forceinline__ void ld_words<4>(const uint16_t *p, uint32_t (&w)[4])
{
    const uint4 v = __ldg((const uint4 *)p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
}

template <int W> __device__ __forceinline__ void zero_words(uint32_t (&w)[W])
{
#pragma unroll
    for (int i = 0; i < W; ++i)
        w[i] = 0;
}

/* ---- q/k norm + rope + store ----------------------------------------------------------------- */

constexpr int kNormThreads = 256; /* 8 warps; warp w takes heads w, w + 8, ... of the token */
constexpr int kMaxHd = 256;

/* One block per token. Same arithmetic as the twin (epd_rmsnorm, epd_rope_apply): the sum of
 * squares in fp64 (lane-strided partial sums, then a butterfly: the order differs from the C
 * loop, the fp64 sum rounds to the same fp32 scale but for ties), inv = (float)(1 / sqrt(ss / hd
 * + eps)) in fp64, y = w * (x * inv), the angle pos * inv_freq as an fp32 product, cos and sin in
 * fp64 rounded to fp32, and every product and sum rounded separately (no FMA contraction). */
__global__ void __launch_bounds__(kNormThreads)
    qk_norm_rope_store_kernel(const float *qkv, const float *q_norm, const float *k_norm,
                              const float *inv_freq, const int32_t *pos, const int32_t *slot,
                              int nh, int nkv, int hd, float eps, float *q_out, uint16_t *k_cache,
                              uint16_t *v_cache)
{
    __shared__ float s_cos[kMaxHd / 2], s_sin[kMaxHd / 2];
    __shared__ float s_x[kNormThreads / 32][kMaxHd];
    const int t = blockIdx.x, half = hd / 2, heads = nh + 2 * nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float ang = __fmul_rn(p, inv_freq[i]);
        double s, c;
        sincos((double)ang, &s, &c);
        s_cos[i] = (float)c;
        s_sin[i] = (float)s;
    }
    __syncthreads();
    const int sl = slot[t];
    const float *row = qkv + (size_t)t * heads * hd;
    float *x = s_x[warp];
    for (int h = warp; h < heads; h += nw) {
        const float *src = row + (size_t)h * hd;
        if (h >= nh + nkv) { /* v: stored as is */
            if (sl < 0) continue;
            uint16_t *dst = v_cache + ((size_t)sl * nkv + (h - nh - nkv)) * hd;
            for (int i = lane; i < hd; i += 32)
                dst[i] = epd_f2bf(src[i]);
            continue;
        }
        const bool is_q = h < nh;
        if (!is_q && sl < 0) continue;
        double ss = 0;
        for (int i = lane; i < hd; i += 32) {
            const float v = src[i];
            x[i] = v;
            ss += (double)v * (double)v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float inv = (float)(1.0 / sqrt(ss / hd + (double)eps));
        const float *w = is_q ? q_norm : k_norm;
        __syncwarp();
        for (int i = lane; i < half; i += 32) {
            const float a = __fmul_rn(w[i], __fmul_rn(x[i], inv));
            const float b = __fmul_rn(w[i + half], __fmul_rn(x[i + half], inv));
            const float c = s_cos[i], s = s_sin[i];
            const float ya = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
            const float yb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
            if (is_q) {
                float *dst = q_out + ((size_t)t * nh + h) * hd;
                dst[i] = ya;
                dst[i + half] = yb;
            } else {
                uint16_t *dst = k_cache + ((size_t)sl * nkv + (h - nh)) * hd;
                dst[i] = epd_f2bf(ya);
                dst[i + half] = epd_f2bf(yb);
            }
        }
        __syncwarp(); /* x is the next head's */
    }
}

/* ---- attention: split kernel ----------------------------------------------------------------- */

constexpr int kWarps = 4; /* warps per split block */
constexpr int kHeads = 8; /* query heads per split block (hi rows 0-7, lo rows 8-15) */
constexpr int kTile = 16; /* positions per warp step: two n8 tiles of scores, one k16 of P.V */
constexpr float kLog2e = 1.4426950408889634f;

/* Cache row of position p of a sequence: block_table entry p / block_size, offset p % bs. */
struct Pager {
    const int32_t *bt;
    int bs, shift; /* shift >= 0: bs == 1 << shift */
    __device__ __forceinline__ size_t row(int p) const
    {
        int b, o;
        if (shift >= 0) {
            b = p >> shift;
            o = p & (bs - 1);
        } else {
            b = p / bs;
            o = p - b * bs;
        }
        return (size_t)__ldg(bt + b) * bs + o;
    }
};

/* The layout of one thread's operands for head dim HD (g = lane / 4, c = lane % 4).
 * K: the quad of lanes of a position loads its row in KL vectors of KW bf16 each: load j of lane
 *    c holds dims j*4*KW + c*KW .. + KW - 1, i.e. the B fragments of KW/4 k-steps; so k-step ks,
 *    MMA k index 2c + e + 8h (e, h in {0, 1}) is dim qk_dim(ks, c, h, e).
 * V: lane (g, c) loads dims ch*8*VPT + g*VPT .. + VPT - 1 (VC vectors, ch < VC) of the four tile
 *    positions 2c, 2c+1, 2c+8, 2c+9 (the B rows it holds); output n-tile nt = ch*VPT + i has
 *    column n = dim ch*8*VPT + n*VPT + i. */
template <int HD> struct Layout {
    static constexpr int KS = HD / 16;
    static constexpr int KW = HD >= 32 ? 8 : 4;
    static constexpr int KL = HD / (4 * KW);
    static constexpr int KSPL = KW / 4; /* k-steps per K load */
    static constexpr int VPT = HD >= 64 ? 8 : HD / 8;
    static constexpr int VC = HD / (8 * VPT);
    static constexpr int NT = HD / 8;
    __device__ static constexpr int qk_dim(int ks, int c, int h, int e)
    {
        return (ks / KSPL) * 4 * KW + c * KW + (ks % KSPL) * 4 + 2 * h + e;
    }
    __device__ static constexpr int out_dim(int nt, int col)
    {
        return (nt / VPT) * 8 * VPT + col * VPT + nt % VPT;
    }
};

template <int HD>
__global__ void __launch_bounds__(kWarps * 32)
    attn_split_kernel(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                      const int32_t *block_table, int max_blocks, const int32_t *seq_idx,
                      const int32_t *pos, int nh, int nkv, int block_size, int bs_shift,
                      int split_len, int max_len, float scale_log2, float *ws_acc, float2 *ws_ml)
{
    using L = Layout<HD>;
    const int t = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    const int G = nh / nkv, per_kv = (G + kHeads - 1) / kHeads;
    const int kvh = blockIdx.z / per_kv, h0 = kvh * G + (blockIdx.z % per_kv) * kHeads;
    const int nrows = min(kHeads, kvh * G + G - h0);
    const int seq = seq_idx[t];
    const int len = seq < 0 ? 0 : min(pos[t] + 1, max_len);
    const int start = split * split_len;
    if (start >= len) return;
    const int end = min(len, start + split_len);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const Pager pg{block_table + (size_t)seq * max_blocks, block_size, bs_shift};
    const size_t stride = (size_t)nkv * HD; /* elements per cache row */
    const uint16_t *kb = k_cache + (size_t)kvh * HD, *vb = v_cache + (size_t)kvh * HD;

    /* A fragments of q for head h0 + g (zero rows past the group): per k-step, hi and lo of the
     * k pairs 2c.. and 2c+8.. */
    uint32_t qa[L::KS][4];
    {
        const bool live = g < nrows;
        const float *qh = q + ((size_t)t * nh + h0 + (live ? g : 0)) * HD;
#pragma unroll
        for (int ks = 0; ks < L::KS; ++ks)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int d = L::qk_dim(ks, c, h, 0);
                const float x0 = live ? qh[d] : 0.f, x1 = live ? qh[d + 1] : 0.f;
                split_bf16x2(x0, x1, qa[ks][2 * h], qa[ks][2 * h + 1]);
            }
    }

    float m = -INFINITY, l = 0.f; /* running max (log2 domain) and this lane's share of the sum */
    float o[L::NT][4];
#pragma unroll
    for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            o[nt][i] = 0.f;

    for (int base = start + warp * kTile; base < end; base += kWarps * kTile) {
        /* all of the tile's K and V loads first, so that they are in flight together */
        uint32_t kw[2][L::KL][L::KW / 2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const int p = base + nt * 8 + g;
            if (p < end) {
                const uint16_t *r = kb + pg.row(p) * stride + c * L::KW;
#pragma unroll
                for (int j = 0; j < L::KL; ++j)
                    ld_words<L::KW / 2>(r + j * 4 * L::KW, kw[nt][j]);
            } else {
#pragma unroll
                for (int j = 0; j < L::KL; ++j)
                    zero_words<L::KW / 2>(kw[nt][j]);
            }
        }
        uint32_t vw[4][L::VC][L::VPT / 2];
#pragma unroll
        for (int r4 = 0; r4 < 4; ++r4) {
            const int p = base + 2 * c + (r4 & 1) + 8 * (r4 >> 1);
            if (p < end) {
                const uint16_t *r = vb + pg.row(p) * stride + g * L::VPT;
#pragma unroll
                for (int ch = 0; ch < L::VC; ++ch)
                    ld_words<L::VPT / 2>(r + ch * 8 * L::VPT, vw[r4][ch]);
            } else {
#pragma unroll
                for (int ch = 0; ch < L::VC; ++ch)
                    zero_words<L::VPT / 2>(vw[r4][ch]);
            }
        }

        /* scores: rows g (hi) and g+8 (lo) of head g, columns = tile positions nt*8 + 2c + e */
        float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < L::KS; ++ks)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const uint32_t *w = kw[nt][ks / L::KSPL] + (ks % L::KSPL) * 2;
                epd_mma_bf16(sacc[nt], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], w[0], w[1]);
            }
        float s[4], mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int p = base + nt * 8 + 2 * c + e;
                const float v = (sacc[nt][e] + sacc[nt][2 + e]) * scale_log2;
                s[2 * nt + e] = p < end ? v : -INFINITY;
                mx = fmaxf(mx, s[2 * nt + e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        /* position base is valid and in every quad's columns: mn is finite */
        const float mn = fmaxf(m, mx);
        const float alpha = exp2f(m - mn); /* 0 on the first tile (m = -inf) */
        m = mn;
        float pr[4], psum = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            pr[i] = exp2f(s[i] - mn);
            psum += pr[i];
        }
        l = l * alpha + psum;
#pragma unroll
        for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                o[nt][i] *= alpha;
        /* A fragments of P: rows g (hi) / g+8 (lo), k = tile positions 2c.. (n-tile 0 of the
         * scores) and 2c+8.. (n-tile 1) */
        uint32_t pa[4];
        split_bf16x2(pr[0], pr[1], pa[0], pa[1]);
        split_bf16x2(pr[2], pr[3], pa[2], pa[3]);
#pragma unroll
        for (int nt = 0; nt < L::NT; ++nt) {
            const int ch = nt / L::VPT, i = nt % L::VPT, wi = i >> 1;
            const unsigned sel = (i & 1) ? 0x7632u : 0x5410u; /* high or low bf16 of both */
            const uint32_t b0 = __byte_perm(vw[0][ch][wi], vw[1][ch][wi], sel);
            const uint32_t b1 = __byte_perm(vw[2][ch][wi], vw[3][ch][wi], sel);
            epd_mma_bf16(o[nt], pa[0], pa[1], pa[2], pa[3], b0, b1);
        }
    }
    /* the quad's shares of l: (c0 + c1) + (c2 + c3) */
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    /* merge the warps: acc = sum over warps in order of 2^(m_w - M) acc_w (hi + lo rows) */
    __shared__ float s_m[kWarps][kHeads], s_l[kWarps][kHeads];
    __shared__ float s_acc[kHeads][HD + 4]; /* +4: the rows g of a store fall in distinct banks */
    if (c == 0) {
        s_m[warp][g] = m;
        s_l[warp][g] = l;
    }
    __syncthreads();
    float mb = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
        mb = fmaxf(mb, s_m[w][g]);
    const float f = exp2f(m - mb); /* warps without a tile: m = -inf, o = 0 */
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        if (warp == w) {
#pragma unroll
            for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int d = L::out_dim(nt, 2 * c + e);
                    const float v = (o[nt][e] + o[nt][2 + e]) * f;
                    s_acc[g][d] = w == 0 ? v : s_acc[g][d] + v;
                }
        }
        __syncthreads();
    }
    const size_t row0 = (size_t)t * nh + h0;
    for (int i = threadIdx.x; i < nrows * HD; i += blockDim.x) {
        const int r = i / HD, d = i % HD;
        ws_acc[((row0 + r) * nsplit + split) * HD + d] = s_acc[r][d];
    }
    if ((int)threadIdx.x < nrows) {
        const int r = threadIdx.x;
        float M = -INFINITY, S = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
            M = fmaxf(M, s_m[w][r]);
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
            S += s_l[w][r] * exp2f(s_m[w][r] - M);
        ws_ml[(row0 + r) * nsplit + split] = make_float2(M, S);
    }
}

bool hd_supported(int hd)
{
    return hd == 16 || hd == 32 || hd == 64 || hd == 128 || hd == 256;
}

template <int HD>
void launch_split(dim3 grid, cudaStream_t st, const float *q, const uint16_t *k_cache,
                  const uint16_t *v_cache, const int32_t *block_table, int max_blocks,
                  const int32_t *seq_idx, const int32_t *pos, int nh, int nkv, int block_size,
                  int bs_shift, int split_len, int max_len, float scale_log2, float *ws_acc,
                  float2 *ws_ml)
{
    attn_split_kernel<HD><<<grid, kWarps * 32, 0, st>>>(
        q, k_cache, v_cache, block_table, max_blocks, seq_idx, pos, nh, nkv, block_size, bs_shift,
        split_len, max_len, scale_log2, ws_acc, ws_ml);
}

} // namespace

extern "C" int epd_cu_qk_norm_rope_store(const float *qkv, const float *q_norm, const float *k_norm,
                                         const float *inv_freq, const int32_t *pos,
                                         const int32_t *slot, int T, int nh, int nkv, int hd,
                                         float eps, float *q_out, uint16_t *k_cache,
                                         uint16_t *v_cache, epd_stream_t stream)
{
    if (T < 0 || nh <= 0 || nkv <= 0 || hd <= 0 || hd > kMaxHd || hd % 2)
        return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    qk_norm_rope_store_kernel<<<T, kNormThreads, 0, (cudaStream_t)stream>>>(
        qkv, q_norm, k_norm, inv_freq, pos, slot, nh, nkv, hd, eps, q_out, k_cache, v_cache);
    return (int)cudaGetLastError();
}

extern "C" size_t epd_cu_attention_workspace(int T, int nh, int hd, int max_splits)
{
    if (T <= 0 || nh <= 0 || hd <= 0 || max_splits <= 0) return 0;
    return (size_t)T * nh * max_splits * ((size_t)hd * sizeof(float) + sizeof(float2));
}

extern "C" int epd_cu_attention(uint16_t *out, const float *q, const uint16_t *k_cache,
                                const uint16_t *v_cache, const int32_t *block_table, int max_blocks,
                                const int32_t *seq_idx, const int32_t *pos, int T, int nh, int nkv,
                                int hd, int block_size, int split_len, int max_splits,
                                void *workspace, epd_stream_t stream)
{
    if (T < 0 || nh <= 0 || nkv <= 0 || nh % nkv || !hd_supported(hd) || block_size <= 0 ||
        split_len <= 0 || max_splits <= 0 || max_splits > 65535 || max_blocks <= 0 ||
        (long long)split_len * max_splits > 0x7fffffffLL)
        return cudaErrorInvalidValue;
    const int per_kv = (nh / nkv + kHeads - 1) / kHeads;
    if ((long long)nkv * per_kv > 65535) return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    if (!workspace) return cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    float *ws_acc = (float *)workspace;
    float2 *ws_ml = (float2 *)(ws_acc + (size_t)T * nh * max_splits * hd);
    const int max_len = split_len * max_splits;
    const int bs_shift = (block_size & (block_size - 1)) ? -1 : __builtin_ctz((unsigned)block_size);
    const float scale_log2 = 1.0f / sqrtf((float)hd) * kLog2e;
    const dim3 grid((unsigned)T, (unsigned)max_splits, (unsigned)(nkv * per_kv));
#define EPD_ATTN_LAUNCH(HD)                                                                        \
    launch_split<HD>(grid, st, q, k_cache, v_cache, block_table, max_blocks, seq_idx, pos, nh,     \
                     nkv, block_size, bs_shift, split_len, max_len, scale_log2, ws_acc, ws_ml)
    switch (hd) {
    case 16:
        EPD_ATTN_LAUNCH(16);
        break;
    case 32:
        EPD_ATTN_LAUNCH(32);
        break;
    case 64:
        EPD_ATTN_LAUNCH(64);
        break;
    case 128:
        EPD_ATTN_LAUNCH(128);
        break;
    default:
        EPD_ATTN_LAUNCH(256);
        break;
    }
#undef EPD_ATTN_LAUNCH
    int err = (int)cudaGetLastError();
    if (err) return err;
    return epd_launch_merge_splits(out, ws_acc, ws_ml, seq_idx, pos, T, nh, hd, split_len,
                                   max_splits, max_len, st);
}
