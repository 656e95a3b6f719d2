/* The attention kernels (model/cuda/attention.cu) against their plain-C twins on random inputs:
 * epd_cu_qk_norm_rope_store vs epd_qk_norm_rope_store_ref (q within 1e-5 abs/rel, k/v bf16
 * within 1 ulp, rows of skipped slots untouched); epd_cu_attention over paged caches with
 * shuffled block tables and NaN decoy blocks, several sequences of different lengths in one call
 * (decode tokens, a prefill-like run of consecutive positions, a padding token), split_len 64 and
 * 256, vs epd_attention_ref on the widened caches (error within a bf16 rounding of the output
 * plus 2e-3 max|v|; the worst error is printed); one call captured in a CUDA graph and replayed
 * with other positions; and the K/V bandwidth of a decode-shaped call (printed, not checked).
 * Exit 77 (skipped) without a CUDA device. */
#include "test_rng.h"
#include "cuda_harness.h"
#include "attention_ref.h"
#include "cuda_ops.h"
#include "ops.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call) H_CUDA_CHECK(-1, goto fail, call)
#define EXPECT(cond, ...) TEST_CHECK(-1, -1, goto fail, cond, __VA_ARGS__)

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint32_t rnd(void)
{
    return (uint32_t)(test_splitmix64(&rng_state) >> 32);
}

static float urand(float a)
{
    return test_rng_sym(&rng_state, a);
}

static void shuffle(int32_t *p, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint32_t)(i + 1));
        int32_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

static void *dev_copy(const void *src, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess) return NULL;
    if (bytes && cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        cudaFree(d);
        return NULL;
    }
    return d;
}

/* ---- qk_norm_rope_store ---------------------------------------------------------------------- */

static int check_norm_rope(int hd, int nh, int nkv, int T)
{
    int rc = -1;
    const int heads = nh + 2 * nkv, rows = T + 4;
    const size_t rowlen = (size_t)nkv * hd, cache_n = (size_t)rows * rowlen;
    float *qkv = malloc(sizeof(float) * T * heads * hd), *qn = malloc(sizeof(float) * hd);
    float *kn = malloc(sizeof(float) * hd), *inv = malloc(sizeof(float) * hd / 2);
    float *q_ref = malloc(sizeof(float) * T * nh * hd),
          *q_gpu = malloc(sizeof(float) * T * nh * hd);
    uint16_t *k_ref = malloc(2 * cache_n), *v_ref = malloc(2 * cache_n);
    uint16_t *k_gpu = malloc(2 * cache_n), *v_gpu = malloc(2 * cache_n);
    int32_t *pos = malloc(4 * (size_t)T), *slot = malloc(4 * (size_t)T),
            *perm = malloc(4 * (size_t)rows);
    float *d_qkv = NULL, *d_qn = NULL, *d_kn = NULL, *d_inv = NULL, *d_q = NULL;
    int32_t *d_pos = NULL, *d_slot = NULL;
    uint16_t *d_k = NULL, *d_v = NULL;
    EXPECT(qkv && qn && kn && inv && q_ref && q_gpu && k_ref && v_ref && k_gpu && v_gpu && pos &&
               slot && perm,
           "out of host memory");
    for (size_t i = 0; i < (size_t)T * heads * hd; i++)
        qkv[i] = urand(4.0f);
    for (int i = 0; i < hd; i++) {
        qn[i] = 1.0f + urand(0.5f);
        kn[i] = 1.0f + urand(0.5f);
    }
    epd_rope_inv_freq(inv, hd, 1000000.0);
    for (int i = 0; i < rows; i++)
        perm[i] = i;
    shuffle(perm, rows);
    for (int t = 0; t < T; t++) {
        pos[t] = t < 3 ? t : (int32_t)(rnd() % 40000u);
        slot[t] = t % 7 == 5 ? -1 : perm[t];
    }
    memset(k_ref, 0xff, 2 * cache_n);
    memset(v_ref, 0xff, 2 * cache_n);
    EXPECT(epd_qk_norm_rope_store_ref(qkv, qn, kn, inv, pos, slot, T, nh, nkv, hd, 1e-6f, q_ref,
                                      k_ref, v_ref) == 0,
           "twin rejected hd %d", hd);
    d_qkv = dev_copy(qkv, sizeof(float) * T * heads * hd);
    d_qn = dev_copy(qn, sizeof(float) * hd);
    d_kn = dev_copy(kn, sizeof(float) * hd);
    d_inv = dev_copy(inv, sizeof(float) * hd / 2);
    d_pos = dev_copy(pos, 4 * (size_t)T);
    d_slot = dev_copy(slot, 4 * (size_t)T);
    EXPECT(d_qkv && d_qn && d_kn && d_inv && d_pos && d_slot, "cudaMalloc failed");
    CK(cudaMalloc((void **)&d_k, 2 * cache_n));
    CK(cudaMalloc((void **)&d_v, 2 * cache_n));
    CK(cudaMalloc((void **)&d_q, sizeof(float) * T * nh * hd));
    CK(cudaMemset(d_k, 0xff, 2 * cache_n));
    CK(cudaMemset(d_v, 0xff, 2 * cache_n));
    CK(epd_cu_qk_norm_rope_store(d_qkv, d_qn, d_kn, d_inv, d_pos, d_slot, T, nh, nkv, hd, 1e-6f,
                                 d_q, d_k, d_v, NULL));
    CK(cudaMemcpy(q_gpu, d_q, sizeof(float) * T * nh * hd, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(k_gpu, d_k, 2 * cache_n, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(v_gpu, d_v, 2 * cache_n, cudaMemcpyDeviceToHost));
    double worst = 0;
    int qdiff = 0, kvdiff = 0;
    for (size_t i = 0; i < (size_t)T * nh * hd; i++) {
        double e = fabs((double)q_gpu[i] - q_ref[i]);
        EXPECT(e <= 1e-5 * (1 + fabs(q_ref[i])), "hd %d: q[%zu] %.9g vs %.9g", hd, i, q_gpu[i],
               q_ref[i]);
        if (e > worst) worst = e;
        qdiff += q_gpu[i] != q_ref[i];
    }
    for (size_t i = 0; i < cache_n; i++) {
        const uint16_t a[2] = {k_gpu[i], v_gpu[i]}, b[2] = {k_ref[i], v_ref[i]};
        for (int j = 0; j < 2; j++) {
            /* within one ulp: the same sign and adjacent magnitudes (untouched rows: equal) */
            const int d = (int)(a[j] & 0x7fff) - (int)(b[j] & 0x7fff);
            EXPECT(a[j] == b[j] || ((a[j] ^ b[j]) < 0x8000 && (d == 1 || d == -1)),
                   "hd %d: %c cache [%zu] %#06x vs %#06x", hd, j ? 'v' : 'k', i, a[j], b[j]);
            kvdiff += a[j] != b[j];
        }
    }
    printf("qk_norm_rope_store hd %3d nh %2d nkv %d T %2d: q max err %.3g (%d of %d differ), "
           "k/v bf16 %d differ by 1 ulp\n",
           hd, nh, nkv, T, worst, qdiff, T * nh * hd, kvdiff);
    rc = 0;
fail:
    cudaFree(d_v);
    cudaFree(d_k);
    cudaFree(d_q);
    cudaFree(d_slot);
    cudaFree(d_pos);
    cudaFree(d_inv);
    cudaFree(d_kn);
    cudaFree(d_qn);
    cudaFree(d_qkv);
    free(perm);
    free(slot);
    free(pos);
    free(v_gpu);
    free(k_gpu);
    free(v_ref);
    free(k_ref);
    free(q_gpu);
    free(q_ref);
    free(inv);
    free(kn);
    free(qn);
    free(qkv);
    return rc;
}

/* ---- attention ------------------------------------------------------------------------------- */

#define NSEQ 6
#define RUN 40 /* prefill-like run of consecutive positions of the longest sequence */

typedef struct {
    int hd, nh, nkv, bs;
} shape_t;

/* Random paged caches for NSEQ sequences (shuffled blocks, NaN decoys); tokens: each sequence's
 * last position, RUN consecutive positions ending at the longest one's last, and a padding token;
 * for each split_len in {64, 256} the kernel vs the twin. */
static int check_attention(shape_t sh, int graph)
{
    int rc = -1;
    const int hd = sh.hd, nh = sh.nh, nkv = sh.nkv, bs = sh.bs;
    const int lens[NSEQ] = {1, bs > 1 ? bs - 1 : 3, bs, 77, 300, 1100};
    const int T = NSEQ + RUN + 1, n = nh * hd;
    const size_t row = (size_t)nkv * hd;
    int max_blocks = 0, total = 0;
    for (int s = 0; s < NSEQ; s++) {
        int nb = (lens[s] + bs - 1) / bs;
        total += nb;
        if (nb > max_blocks) max_blocks = nb;
    }
    const int pool = total + 5;
    const size_t cache_n = (size_t)pool * bs * row;
    uint16_t *kc = malloc(2 * cache_n), *vc = malloc(2 * cache_n),
             *out_gpu = malloc(2 * (size_t)T * n);
    float *kf = malloc(4 * cache_n), *vf = malloc(4 * cache_n), *q = malloc(4 * (size_t)T * n);
    float *want = malloc(4 * (size_t)T * n), *scores = malloc(4 * 2048);
    int32_t *table = malloc(4 * (size_t)NSEQ * max_blocks), *perm = malloc(4 * (size_t)pool);
    int32_t seq[NSEQ + RUN + 1], pos[NSEQ + RUN + 1];
    uint16_t *d_k = NULL, *d_v = NULL, *d_out = NULL;
    float *d_q = NULL;
    int32_t *d_table = NULL, *d_seq = NULL, *d_pos = NULL;
    void *d_ws = NULL;
    cudaStream_t st = NULL;
    cudaGraph_t g = NULL;
    cudaGraphExec_t ge = NULL;
    EXPECT(kc && vc && out_gpu && kf && vf && q && want && scores && table && perm,
           "out of host memory");
    for (size_t i = 0; i < cache_n; i++)
        kc[i] = vc[i] = 0x7fc0; /* NaN: a read of a decoy block poisons the output */
    for (int i = 0; i < pool; i++)
        perm[i] = i;
    shuffle(perm, pool);
    float vmax = 0;
    for (int s = 0, next = 0; s < NSEQ; s++) {
        const int nb = (lens[s] + bs - 1) / bs;
        for (int j = 0; j < max_blocks; j++)
            table[s * max_blocks + j] = j < nb ? perm[next++] : -1;
        for (int j = 0; j < lens[s]; j++) {
            const size_t at = ((size_t)table[s * max_blocks + j / bs] * bs + j % bs) * row;
            for (size_t i = 0; i < row; i++) {
                const float v = urand(1.0f);
                kc[at + i] = epd_f32_to_bf16(urand(2.0f));
                vc[at + i] = epd_f32_to_bf16(v);
                if (fabsf(epd_bf16_to_f32(vc[at + i])) > vmax)
                    vmax = fabsf(epd_bf16_to_f32(vc[at + i]));
            }
        }
    }
    int T0 = 0;
    for (int s = 0; s < NSEQ; s++)
        seq[T0] = s, pos[T0++] = lens[s] - 1;
    for (int p = lens[NSEQ - 1] - RUN; p < lens[NSEQ - 1]; p++)
        seq[T0] = NSEQ - 1, pos[T0++] = p;
    seq[T0] = -1, pos[T0++] = 5;
    for (size_t i = 0; i < (size_t)T * n; i++)
        q[i] = urand(2.0f);
    epd_bf16_widen(kf, kc, cache_n);
    epd_bf16_widen(vf, vc, cache_n);

    d_k = dev_copy(kc, 2 * cache_n);
    d_v = dev_copy(vc, 2 * cache_n);
    d_q = dev_copy(q, 4 * (size_t)T * n);
    d_table = dev_copy(table, 4 * (size_t)NSEQ * max_blocks);
    d_seq = dev_copy(seq, sizeof(seq));
    d_pos = dev_copy(pos, sizeof(pos));
    EXPECT(d_k && d_v && d_q && d_table && d_seq && d_pos, "cudaMalloc failed");
    CK(cudaMalloc((void **)&d_out, 2 * (size_t)T * n));
    CK(cudaStreamCreate(&st));
    static const int split_lens[2] = {64, 256};
    for (int si = 0; si < 2; si++) {
        const int sl = split_lens[si], ms = (lens[NSEQ - 1] + sl - 1) / sl;
        CK(cudaFree(d_ws));
        d_ws = NULL;
        CK(cudaMalloc(&d_ws, epd_cu_attention_workspace(T, nh, hd, ms)));
        CK(cudaMemset(d_out, 0xff, 2 * (size_t)T * n));
        if (graph) {
            /* captured once with every other position one less, replayed with the real ones */
            int32_t pos2[NSEQ + RUN + 1];
            for (int t = 0; t < T; t++)
                pos2[t] = pos[t] > 0 ? pos[t] - 1 : 0;
            CK(cudaMemcpy(d_pos, pos2, sizeof(pos2), cudaMemcpyHostToDevice));
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
            int e = epd_cu_attention(d_out, d_q, d_k, d_v, d_table, max_blocks, d_seq, d_pos, T, nh,
                                     nkv, hd, bs, sl, ms, d_ws, st);
            CK(cudaStreamEndCapture(st, &g));
            CK(e);
            CK(cudaGraphInstantiate(&ge, g, 0));
            CK(cudaGraphLaunch(ge, st));
            CK(cudaMemcpyAsync(d_pos, pos, sizeof(pos), cudaMemcpyHostToDevice, st));
            CK(cudaGraphLaunch(ge, st));
        } else {
            CK(epd_cu_attention(d_out, d_q, d_k, d_v, d_table, max_blocks, d_seq, d_pos, T, nh, nkv,
                                hd, bs, sl, ms, d_ws, st));
        }
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(out_gpu, d_out, 2 * (size_t)T * n, cudaMemcpyDeviceToHost));
        epd_attention_ref(want, q, kf, vf, table, max_blocks, seq, pos, T, nh, nkv, hd, bs, sl * ms,
                          scores);
        double worst = 0, worst_rel = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < n; i++) {
                const size_t at = (size_t)t * n + i;
                const float a = epd_bf16_to_f32(out_gpu[at]), b = want[at];
                const double e = fabs((double)a - b);
                /* one bf16 rounding of the output, plus the kernel's fp32 sums in other orders */
                const double tol = ldexp(fabs(b), -8) + 2e-3 * vmax;
                EXPECT(e <= tol,
                       "hd %d nh %d nkv %d bs %d split_len %d: token %d (seq %d pos %d) "
                       "[%d]: %.6g vs %.6g",
                       hd, nh, nkv, bs, sl, t, seq[t], pos[t], i, a, b);
                if (e > worst) worst = e;
                if (e / vmax > worst_rel) worst_rel = e / vmax;
            }
        printf("attention hd %3d nh %2d nkv %d bs %2d split_len %3d max_splits %2d%s: max abs err "
               "%.3g (%.3g of max|v|, bound 2e-2)\n",
               hd, nh, nkv, bs, sl, ms, graph ? " (graph)" : "", worst, worst_rel);
        EXPECT(worst <= 2e-2 * vmax, "error above 2e-2 max|v|");
        if (ge) {
            cudaGraphExecDestroy(ge);
            ge = NULL;
        }
        if (g) {
            cudaGraphDestroy(g);
            g = NULL;
        }
    }
    rc = 0;
fail:
    if (ge) cudaGraphExecDestroy(ge);
    if (g) cudaGraphDestroy(g);
    if (st) cudaStreamDestroy(st);
    cudaFree(d_ws);
    cudaFree(d_out);
    cudaFree(d_pos);
    cudaFree(d_seq);
    cudaFree(d_table);
    cudaFree(d_q);
    cudaFree(d_v);
    cudaFree(d_k);
    free(perm);
    free(table);
    free(scores);
    free(want);
    free(q);
    free(vf);
    free(kf);
    free(out_gpu);
    free(vc);
    free(kc);
    return rc;
}

/* ---- decode bandwidth ------------------------------------------------------------------------ */

/* T sequences of len positions (each its own blocks), nh 32, nkv 4, hd 128, block 16: the time of
 * one call and the K/V bytes it must read (T * len * nkv * hd * 2 bytes * 2) per second. */
static int bench_decode(int T, int len, int split_len)
{
    int rc = -1;
    const int nh = 32, nkv = 4, hd = 128, bs = 16, iters = 50;
    const int nb = (len + bs - 1) / bs, ms = (len + split_len - 1) / split_len;
    const size_t cache_n = (size_t)T * nb * bs * nkv * hd;
    int32_t *table = malloc(4 * (size_t)T * nb), *seq = malloc(4 * (size_t)T),
            *pos = malloc(4 * (size_t)T);
    uint16_t *d_k = NULL, *d_v = NULL, *d_out = NULL;
    float *d_q = NULL;
    int32_t *d_table = NULL, *d_seq = NULL, *d_pos = NULL;
    void *d_ws = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    EXPECT(table && seq && pos, "out of host memory");
    for (int i = 0; i < T * nb; i++)
        table[i] = i;
    shuffle(table, T * nb);
    for (int t = 0; t < T; t++)
        seq[t] = t, pos[t] = len - 1;
    d_table = dev_copy(table, 4 * (size_t)T * nb);
    d_seq = dev_copy(seq, 4 * (size_t)T);
    d_pos = dev_copy(pos, 4 * (size_t)T);
    EXPECT(d_table && d_seq && d_pos, "cudaMalloc failed");
    CK(cudaMalloc((void **)&d_k, 2 * cache_n));
    CK(cudaMalloc((void **)&d_v, 2 * cache_n));
    CK(cudaMemset(d_k, 0x3c, 2 * cache_n)); /* 0x3c3c: bf16 0.0115 */
    CK(cudaMemset(d_v, 0x3c, 2 * cache_n));
    CK(cudaMalloc((void **)&d_q, 4 * (size_t)T * nh * hd));
    CK(cudaMemset(d_q, 0, 4 * (size_t)T * nh * hd));
    CK(cudaMalloc((void **)&d_out, 2 * (size_t)T * nh * hd));
    CK(cudaMalloc(&d_ws, epd_cu_attention_workspace(T, nh, hd, ms)));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; i++)
        CK(epd_cu_attention(d_out, d_q, d_k, d_v, d_table, nb, d_seq, d_pos, T, nh, nkv, hd, bs,
                            split_len, ms, d_ws, NULL));
    CK(cudaEventRecord(e0, NULL));
    for (int i = 0; i < iters; i++)
        CK(epd_cu_attention(d_out, d_q, d_k, d_v, d_table, nb, d_seq, d_pos, T, nh, nkv, hd, bs,
                            split_len, ms, d_ws, NULL));
    CK(cudaEventRecord(e1, NULL));
    CK(cudaEventSynchronize(e1));
    float ms_total = 0;
    CK(cudaEventElapsedTime(&ms_total, e0, e1));
    const double us = 1e3 * ms_total / iters;
    const double bytes = (double)T * len * nkv * hd * 2 * 2;
    printf("decode T %3d len %4d nh %d nkv %d hd %d block %d split_len %3d: %.1f us, K/V %.1f MB, "
           "%.0f GB/s\n",
           T, len, nh, nkv, hd, bs, split_len, us, bytes / 1e6, bytes / us / 1e3);
    rc = 0;
fail:
    if (e1) cudaEventDestroy(e1);
    if (e0) cudaEventDestroy(e0);
    cudaFree(d_ws);
    cudaFree(d_out);
    cudaFree(d_q);
    cudaFree(d_v);
    cudaFree(d_k);
    cudaFree(d_pos);
    cudaFree(d_seq);
    cudaFree(d_table);
    free(pos);
    free(seq);
    free(table);
    return rc;
}

int main(int argc, char **argv)
{
    (void)argv;
    if (h_skip_without_gpu()) return H_SKIP;
    int failed = 0;
    failed |= check_norm_rope(16, 2, 2, 7);
    failed |= check_norm_rope(32, 4, 2, 19);
    failed |= check_norm_rope(128, 32, 4, 33);
    failed |= check_norm_rope(256, 4, 1, 5);
    static const shape_t shapes[] = {
        {16, 4, 2, 16}, {16, 8, 8, 1},    {32, 8, 1, 16},  {32, 6, 2, 7},    {64, 12, 1, 16},
        {64, 4, 4, 16}, {128, 32, 4, 16}, {128, 16, 2, 1}, {128, 64, 4, 16}, {256, 4, 2, 16},
    };
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        failed |= check_attention(shapes[i], 0);
    failed |= check_attention(shapes[6], 1);
    if (!failed) {
        failed |= bench_decode(64, 1024, 256);
        if (argc > 1) { /* more shapes, for tuning */
            static const int Ts[] = {1, 8, 64, 256};
            static const int sls[] = {64, 128, 256, 512};
            for (size_t a = 0; a < 4; a++)
                for (size_t b = 0; b < 4; b++)
                    failed |= bench_decode(Ts[a], 1024, sls[b]);
        }
    }
    printf(failed ? "FAILED\n" : "PASSED\n");
    return failed ? 1 : 0;
}
