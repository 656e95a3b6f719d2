/* Device helpers shared by libep's kernels: system-scope release/acquire on peer memory, the
 * bounded wait that reports a stalled peer, and the bf16 / fp8 e4m3 conversions (bit-exact with
 * the plain-C reference twins: bf16 round-to-nearest-even, e4m3 saturating to +-448). */
#ifndef EP_CUDA_COMMON_CUH
#define EP_CUDA_COMMON_CUH

#include "ep_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define EPK_CHECK_LAUNCH() ((int)cudaGetLastError())

__device__ __forceinline__ uint64_t epk_globaltimer()
{
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ uint64_t epk_ld_acquire_sys(const uint64_t *p)
{
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void epk_st_release_sys(uint64_t *p, uint64_t v)
{
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* Adds v to a (possibly remote) counter after every store this thread has observed, including
 * those of its block ordered before by __syncthreads() (the release is cumulative). */
__device__ __forceinline__ void epk_red_release_sys(uint64_t *p, uint64_t v)
{
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int epk_ld_volatile_host(const int *p)
{
    return *(const volatile int *)p;
}

__device__ __forceinline__ void epk_fail_raw(int *err, int code, int peer, int what)
{
    volatile int *e = err;
    if (e[EPK_ERR_CODE] != 0) return;
    e[EPK_ERR_PEER] = peer;
    e[EPK_ERR_WHAT] = what;
    __threadfence_system();
    e[EPK_ERR_CODE] = code;
    __threadfence_system();
}

/* Spins until *word >= target. Returns false (after recording who stalled) when timeout_ns of
 * %globaltimer pass, or at once when another wait of the group already failed. */
static __device__ __noinline__ bool epk_wait_ge_raw(int *err, unsigned long long timeout_ns,
                                                    const uint64_t *word, uint64_t target, int peer,
                                                    int what, unsigned nap_ns = 0)
{
    if (epk_ld_acquire_sys(word) >= target) return true;
    uint64_t start = epk_globaltimer();
    for (unsigned spin = 1;; ++spin) {
        if (nap_ns) __nanosleep(nap_ns);
        if (epk_ld_acquire_sys(word) >= target) return true;
        if ((spin & 255u) == 0) {
            if (epk_ld_volatile_host(err + EPK_ERR_CODE) != 0) return false;
            if (epk_globaltimer() - start > timeout_ns) {
                epk_fail_raw(err, EPK_CODE_TIMEOUT, peer, what);
                return false;
            }
        }
    }
}

/* On the proxy path the words live in host memory: every poll is a read across PCIe, and many
 * blocks polling tightly slow down the stores the sending blocks make over the same link, so
 * they nap between polls. */
__device__ __forceinline__ bool epk_wait_ge(const epk_ctx_t &c, const uint64_t *word,
                                            uint64_t target, int peer, int what)
{
    return epk_wait_ge_raw(c.err, c.timeout_ns, word, target, peer, what, c.proxy ? 500 : 0);
}

__device__ __forceinline__ bool epk_failed(const epk_ctx_t &c)
{
    return epk_ld_volatile_host(c.err + EPK_ERR_CODE) != 0;
}

__device__ __forceinline__ uint64_t *epk_at(const epk_ctx_t &c, int rank, size_t off)
{
    return (uint64_t *)(c.base[rank] + off);
}

/* bf16 bits -> float (exact). */
__device__ __forceinline__ float epk_bf16_to_f(uint16_t b)
{
    return __uint_as_float((uint32_t)b << 16);
}

/* float -> bf16 bits, round to nearest even (NaN stays NaN). */
__device__ __forceinline__ uint16_t epk_f_to_bf16(float f)
{
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    return *reinterpret_cast<uint16_t *>(&h);
}

/* float -> fp8 e4m3 bits, round to nearest even, saturating to +-448. */
__device__ __forceinline__ uint8_t epk_f_to_e4m3(float f)
{
    return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}

/* Two floats -> two packed e4m3 (lo in the low byte). */
__device__ __forceinline__ uint16_t epk_f2_to_e4m3x2(float lo, float hi)
{
    return (uint16_t)__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

/* Unpacks 8 bf16 held in a uint4 into floats. */
__device__ __forceinline__ void epk_unpack8(const uint4 &v, float *f)
{
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 epk_pack8(const float *f)
{
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w[i] = (uint32_t)epk_f_to_bf16(f[2 * i]) | ((uint32_t)epk_f_to_bf16(f[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* Block-wide exclusive prefix sum of one int per thread (blockDim.x <= 1024, a multiple of 32).
 * Returns the thread's exclusive prefix; *total gets the block's sum. Uses `sh` [32 + 1]. */
__device__ __forceinline__ int epk_block_scan(int v, int *total, int *sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int w = 0; w < nw; ++w) {
            int t = sh[w];
            sh[w] = run;
            run += t;
        }
        sh[32] = run;
    }
    __syncthreads();
    int r = sh[warp] + x - v;
    *total = sh[32];
    __syncthreads();
    return r;
}

/* One warp writes dst[0..H) = bf16(sum over ranks d = 0..R-1, in that order, in fp32, of the
 * bf16 row row_of(d)), skipping ranks for which row_of returns nullptr. Each lane issues the
 * loads of U vectors together before adding them. The HT combines (NVLink pull, copy-engine
 * staged, proxy path) all sum this way, so their results agree bit for bit. */
template <int U, typename RowOf>
__device__ __forceinline__ void epk_warp_sum_rows(uint4 *dst, int H, int R, RowOf row_of)
{
    const int nvec = H / 8, lane = threadIdx.x & 31;
    for (int v0 = 0; v0 < nvec; v0 += 32 * U) {
        float acc[U][8];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int q = 0; q < 8; ++q)
                acc[u][q] = 0.f;
        for (int d = 0; d < R; ++d) {
            const uint4 *src = row_of(d);
            if (!src) continue;
            uint4 val[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = v0 + u * 32 + lane;
                if (v < nvec) val[u] = src[v];
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float f[8];
                epk_unpack8(val[u], f);
#pragma unroll
                for (int q = 0; q < 8; ++q)
                    acc[u][q] += f[q];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            if (v < nvec) dst[v] = epk_pack8(acc[u]);
        }
    }
}

/* ---- module loading ------------------------------------------------------------------------ */

/* Loads the modules of these kernels now (each file's epk_preload_* calls it with its kernels):
 * a lazily loaded module can need the device idle, which never happens while another rank's
 * kernel spins waiting for this one. 0 or the first cudaError_t. */
static inline int epk_preload_kernels()
{
    return 0;
}
template <typename K, typename... More> static int epk_preload_kernels(K kernel, More... more)
{
    cudaFuncAttributes a;
    cudaError_t e = cudaFuncGetAttributes(&a, kernel);
    return e != cudaSuccess ? (int)e : epk_preload_kernels(more...);
}

/* ---- LL sequence state (local part of the buffer, kernels/ep_cuda.h) ---------------------- */
struct epk_ll_state {
    uint64_t seq[2][2];  /* [buf][dispatch, combine]: ops completed on that buffer */
    unsigned fin[2][2];  /* receive blocks finished in the current op */
    unsigned sfin[2][2]; /* proxy path: send blocks finished in the current op */
    uint64_t gate[2][2]; /* proxy path: op whose data block 0 saw arrive (epk_wait_all) */
};
static_assert(sizeof(epk_ll_state) <= 128, "the layout reserves 128 bytes");

__device__ __forceinline__ epk_ll_state *epk_ll_state_of(const epk_ctx_t &c)
{
    return (epk_ll_state *)(c.base[c.rank] + c.lay.ll_state);
}

/* The end of an LL op's receive half (phase 0: dispatch, 1: combine), reached by every thread
 * of a receive block: thread 0 of the last of `blocks` blocks records op `seq` as completed on
 * buffer `buf` and resets the count for the next op. */
__device__ __forceinline__ void epk_ll_recv_done(epk_ll_state *st, int buf, int phase,
                                                 unsigned blocks, uint64_t seq)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&st->fin[buf][phase], 1u) == blocks - 1) {
            st->fin[buf][phase] = 0;
            st->seq[buf][phase] = seq;
            __threadfence();
        }
    }
}

/* Blocks of an LL kernel's launch: mode 1 runs the send half, 2 the receive half, else both. */
static inline int epk_ll_grid(int mode, int send_blocks, int recv_blocks)
{
    return mode == 1   ? send_blocks
           : mode == 2 ? recv_blocks
                       : (send_blocks > recv_blocks ? send_blocks : recv_blocks);
}

/* ---- proxy path (kernels/ep_cuda.h, epk_ring_t) ------------------------------------------ */

/* Where this rank's stores meant for rank d go: d's window over NVLink; on the proxy path its
 * own window, from which the proxy's puts copy the bytes out. */
__device__ __forceinline__ uint8_t *epk_dst(const epk_ctx_t &c, int d)
{
    return c.proxy ? c.win : c.base[d];
}

/* Appends one command (one thread). Gives up, returning false, when the group already failed or
 * the ring stays full for timeout_ns (recorded as a stalled ring: the proxy is not draining). */
static __device__ __noinline__ bool epk_ring_push(const epk_ctx_t &c, int op, int peer, uint64_t a,
                                                  uint64_t b, uint32_t len)
{
    const unsigned long long slot = atomicAdd(c.ring.tail, 1ull);
    if (slot - epk_ld_acquire_sys(c.ring.head) >= c.ring.nslots) {
        const uint64_t start = epk_globaltimer();
        for (unsigned spin = 1; slot - epk_ld_acquire_sys(c.ring.head) >= c.ring.nslots; ++spin) {
            if ((spin & 255u) == 0) {
                if (epk_failed(c)) return false;
                if (epk_globaltimer() - start > c.timeout_ns) {
                    epk_fail_raw(c.err, EPK_CODE_TIMEOUT, c.rank, EPK_WAIT_RING);
                    return false;
                }
            }
        }
    }
    epk_cmd_t *cmd = c.ring.slots + (slot & (c.ring.nslots - 1));
    volatile uint64_t *w = (volatile uint64_t *)cmd;
    w[0] = a;
    w[1] = b;
    w[2] = (uint64_t)len | (uint64_t)peer << 32 | (uint64_t)op << 48;
    __threadfence_system();
    *(volatile uint32_t *)&cmd->seq = (uint32_t)(slot + 1);
    return true;
}

/* The receive halves' wait: until counters[s] >= target for every source s (thread s of the
 * block waits for source s). On the proxy path the counters are in host memory and every poll
 * crosses PCIe, so only block 0 polls them and then opens `gate` (device memory) to `seq` for
 * the other blocks. Returns false (every thread) when the wait failed. */
__device__ __forceinline__ bool epk_wait_all(const epk_ctx_t &c, const uint64_t *counters,
                                             uint64_t target, uint64_t *gate, uint64_t seq,
                                             int what, int *s_fail)
{
    const int R = c.nranks;
    if (threadIdx.x == 0) *s_fail = 0;
    __syncthreads();
    if ((!c.proxy || blockIdx.x == 0) && (int)threadIdx.x < R)
        if (!epk_wait_ge(c, counters + threadIdx.x, target, threadIdx.x, what)) *s_fail = 1;
    __syncthreads();
    if (c.proxy && !*s_fail && threadIdx.x == 0) {
        if (blockIdx.x == 0)
            epk_st_release_sys(gate, seq);
        else if (!epk_wait_ge_raw(c.err, c.timeout_ns, gate, seq, c.rank, what))
            *s_fail = 1;
    }
    __syncthreads();
    return !*s_fail;
}

/* Proxy path: adds v to a counter of this rank's own window that no one else writes (the
 * counter of messages from itself), after this thread's earlier stores, without an atomic on
 * host memory. */
__device__ __forceinline__ void epk_self_add(const epk_ctx_t &c, size_t off, uint64_t v)
{
    uint64_t *p = (uint64_t *)(c.win + off);
    __threadfence_system();
    epk_st_release_sys(p, *(volatile uint64_t *)p + v);
}

/* Proxy path: the block's thread 0 learns whether its block is the last of `blocks` to finish
 * the send half (then it resets the count for the next op). Every block's stores and commands
 * come before the last block's, which therefore issues the signals. */
__device__ __forceinline__ bool epk_last_sender(unsigned *count, unsigned blocks)
{
    __threadfence_system();
    if (atomicAdd(count, 1u) != blocks - 1) return false;
    *count = 0;
    __threadfence();
    return true;
}

#endif /* EP_CUDA_COMMON_CUH */
