/* The MoE kernels (moe.cu) against their C twins (moe_ref.c) on random inputs: route fix-ups,
 * local dispatch (as a multiset per expert, through row_of) and combine, the experts' gate_up
 * and down on the offsets and stride layouts with bf16 and fp8 inputs, a CUDA-graph replay;
 * then the experts' time at the Qwen3-30B-A3B shape (printed, not asserted). Exit 77 without a
 * CUDA device. */
#include "cuda_harness.h"
#include "cuda_ops.h"
#include "moe_ref.h"
#include "ops.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_fail;

#define CK(call) H_CUDA_CHECK(-1, exit(1), call)

#define EXPECT(cond, ...) TEST_CHECK(-1, -1, g_fail = 1, cond, __VA_ARGS__)

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 32);
}

static float urand(float a) /* uniform in [-a, a) */
{
    return a * ((float)(rnd() >> 8) * (2.0f / 16777216.0f) - 1.0f);
}

static void *dev_copy(const void *h, size_t n)
{
    void *d = NULL;
    CK(cudaMalloc(&d, n ? n : 1));
    if (n) CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    return d;
}

static void host_copy(void *h, const void *d, size_t n)
{
    if (n) CK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
}

/* Distinct random experts per token: idx [T][k] over E. */
static void random_topk(int32_t *idx, float *w, int T, int k, int E)
{
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                e = (int)(rnd() % (unsigned)E);
                dup = 0;
                for (int q = 0; q < j; q++)
                    dup |= idx[t * k + q] == e;
            } while (dup);
            idx[t * k + j] = e;
            if (w) w[t * k + j] = urand(0.5f) + 0.5f;
        }
}

/* Distance in bf16 ulps of a from b (the ulp of the larger magnitude). */
static double ulps(uint16_t a, uint16_t b)
{
    float fa = epd_bf16_to_f32(a), fb = epd_bf16_to_f32(b);
    float m = fmaxf(fabsf(fa), fabsf(fb));
    if (m == 0.0f) return 0.0;
    int ex;
    frexpf(m, &ex);
    return fabs((double)fa - fb) / ldexp(1.0, ex - 8);
}

/* Elements off by more than one ulp must be rare (a dot product within ~1e-6 of a rounding
 * boundary rounds the other way) and never far off; values below `floor` (cancellation) are
 * compared absolutely. */
static void compare_bf16(const char *what, const uint16_t *got, const uint16_t *want, size_t n,
                         float floor)
{
    size_t over = 0;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        float a = epd_bf16_to_f32(got[i]), b = epd_bf16_to_f32(want[i]);
        if (fabsf(a - b) <= floor) continue;
        double u = ulps(got[i], want[i]);
        if (u > worst) worst = u;
        if (u > 1.0) over++;
    }
    printf("  %-40s %9zu values, max %.1f ulp, %zu beyond 1 ulp\n", what, n, worst, over);
    EXPECT(over <= n / 1000 && worst <= 4.0, "%s: %zu values beyond 1 ulp, max %.1f ulp", what,
           over, worst);
}

/* One expert problem: T tokens routed top-k over L experts, rows packed per expert (offsets
 * layout) or in [L][max_rows] slots (stride layout); gate_up then down, each vs its twin. */
static void check_experts_w(int H, int I, int L, int T, int k, int fp8, int strided, int bn, int bk)
{
    printf("experts H %d I %d L %d T %d k %d %s %s, weights %s [%d, %d]\n", H, I, L, T, k,
           fp8 ? "fp8" : "bf16", strided ? "stride" : "offsets", bn ? "fp8" : "bf16", bn, bk);
    int32_t *idx = malloc((size_t)T * k * 4);
    random_topk(idx, NULL, T, k, L);
    int32_t *counts = calloc((size_t)L, 4), *offsets = calloc((size_t)L, 4);
    for (int i = 0; i < T * k; i++)
        counts[idx[i]]++;
    counts[0] = 0; /* an expert without rows, whatever the draw */
    int max_rows = 0, total = 0;
    for (int l = 0; l < L; l++) {
        offsets[l] = total;
        total += counts[l];
        if (counts[l] > max_rows) max_rows = counts[l];
    }
    const int stride = max_rows + 3;
    const size_t nrows = strided ? (size_t)L * stride : (size_t)total;
    const size_t xbytes = nrows * H * (fp8 ? 1 : 2);
    unsigned char *x = malloc(xbytes ? xbytes : 1);
    float *xs = fp8 ? malloc(nrows * (H / 128) * 4 + 4) : NULL;
    for (size_t i = 0; i < nrows * H; i++) {
        if (fp8) {
            uint8_t q;
            do
                q = (uint8_t)rnd();
            while ((q & 0x7f) == 0x7f); /* no NaN */
            x[i] = q;
        } else {
            ((uint16_t *)x)[i] = epd_f32_to_bf16(urand(1.0f));
        }
    }
    if (fp8)
        for (size_t i = 0; i < nrows * (H / 128); i++)
            xs[i] = (urand(1.0f) + 1.5f) / 448.0f;
    const size_t nw_gu = (size_t)L * 2 * I * H, nw_dn = (size_t)L * H * I;
    uint16_t *wgu = malloc(nw_gu * 2), *wdn = malloc(nw_dn * 2);
    const float agu = 2.0f / sqrtf((float)H), adn = 2.0f / sqrtf((float)I);
    for (size_t i = 0; i < nw_gu; i++)
        wgu[i] = epd_f32_to_bf16(urand(agu));
    for (size_t i = 0; i < nw_dn; i++)
        wdn[i] = epd_f32_to_bf16(urand(adn));
    /* fp8 weights: random codes (no NaN) and block scales near a / 64 */
    const size_t ns_gu = bn ? (size_t)L * 2 * ((I + bn - 1) / bn) * ((H + bk - 1) / bk) : 0;
    const size_t ns_dn = bn ? (size_t)L * ((H + bn - 1) / bn) * ((I + bk - 1) / bk) : 0;
    uint8_t *qgu = malloc(nw_gu), *qdn = malloc(nw_dn);
    float *sgu = malloc(ns_gu * 4 + 4), *sdn = malloc(ns_dn * 4 + 4);
    for (size_t i = 0; bn && i < nw_gu; i++)
        do
            qgu[i] = (uint8_t)rnd();
        while ((qgu[i] & 0x7f) == 0x7f);
    for (size_t i = 0; bn && i < nw_dn; i++)
        do
            qdn[i] = (uint8_t)rnd();
        while ((qdn[i] & 0x7f) == 0x7f);
    for (size_t i = 0; i < ns_gu; i++)
        sgu[i] = agu / 64.0f * (1.0f + urand(0.5f));
    for (size_t i = 0; i < ns_dn; i++)
        sdn[i] = adn / 64.0f * (1.0f + urand(0.5f));

    uint16_t *act_ref = calloc(nrows * I + 1, 2), *act_gpu = calloc(nrows * I + 1, 2);
    uint16_t *y_ref = calloc(nrows * H + 1, 2), *y_gpu = calloc(nrows * H + 1, 2);
    const int32_t *offs = strided ? NULL : offsets;
    if (bn ? epd_ref_expert_gate_up_w8(act_ref, x, xs, counts, offs, stride, qgu, sgu, bn, bk, L, H,
                                       I, max_rows) ||
                 epd_ref_expert_down_w8(y_ref, act_ref, counts, offs, stride, qdn, sdn, bn, bk, L,
                                        H, I, max_rows)
           : epd_ref_expert_gate_up(act_ref, x, xs, counts, offs, stride, wgu, L, H, I, max_rows) ||
                 epd_ref_expert_down(y_ref, act_ref, counts, offs, stride, wdn, L, H, I,
                                     max_rows)) {
        EXPECT(0, "twin refused the shape");
        return;
    }

    void *d_x = dev_copy(x, xbytes);
    float *d_xs = fp8 ? dev_copy(xs, nrows * (H / 128) * 4) : NULL;
    int32_t *d_counts = dev_copy(counts, (size_t)L * 4), *d_offs = dev_copy(offsets, (size_t)L * 4);
    uint16_t *d_wgu = dev_copy(wgu, nw_gu * 2), *d_wdn = dev_copy(wdn, nw_dn * 2);
    uint8_t *d_qgu = bn ? dev_copy(qgu, nw_gu) : NULL, *d_qdn = bn ? dev_copy(qdn, nw_dn) : NULL;
    float *d_sgu = bn ? dev_copy(sgu, ns_gu * 4) : NULL,
          *d_sdn = bn ? dev_copy(sdn, ns_dn * 4) : NULL;
    /* rows outside every expert's range are filled with a marker that must survive */
    uint16_t *d_act, *d_y;
    CK(cudaMalloc((void **)&d_act, nrows * I * 2 + 2));
    CK(cudaMalloc((void **)&d_y, nrows * H * 2 + 2));
    CK(cudaMemset(d_act, 0x7b, nrows * I * 2 + 2));
    CK(cudaMemset(d_y, 0x7b, nrows * H * 2 + 2));
    if (bn)
        CK(epd_cu_expert_gate_up_w8(d_act, d_x, d_xs, d_counts, strided ? NULL : d_offs, stride,
                                    d_qgu, d_sgu, bn, bk, L, H, I, max_rows, NULL));
    else
        CK(epd_cu_expert_gate_up(d_act, d_x, d_xs, d_counts, strided ? NULL : d_offs, stride, d_wgu,
                                 L, H, I, max_rows, NULL));
    /* down runs on the twin's act, so that its comparison is its own */
    uint16_t *d_act_ref = dev_copy(act_ref, nrows * I * 2);
    if (bn)
        CK(epd_cu_expert_down_w8(d_y, d_act_ref, d_counts, strided ? NULL : d_offs, stride, d_qdn,
                                 d_sdn, bn, bk, L, H, I, max_rows, NULL));
    else
        CK(epd_cu_expert_down(d_y, d_act_ref, d_counts, strided ? NULL : d_offs, stride, d_wdn, L,
                              H, I, max_rows, NULL));
    CK(cudaDeviceSynchronize());
    host_copy(act_gpu, d_act, nrows * I * 2);
    host_copy(y_gpu, d_y, nrows * H * 2);

    /* compare the rows of each expert; check that the slots past a count were not written */
    size_t na = 0, ny = 0, untouched_bad = 0;
    uint16_t *a1 = malloc(nrows * I * 2 + 2), *a2 = malloc(nrows * I * 2 + 2);
    uint16_t *y1 = malloc(nrows * H * 2 + 2), *y2 = malloc(nrows * H * 2 + 2);
    for (int l = 0; l < L; l++) {
        size_t base = strided ? (size_t)l * stride : (size_t)offsets[l];
        size_t n = (size_t)counts[l];
        memcpy(a1 + na, act_gpu + base * I, n * I * 2);
        memcpy(a2 + na, act_ref + base * I, n * I * 2);
        memcpy(y1 + ny, y_gpu + base * H, n * H * 2);
        memcpy(y2 + ny, y_ref + base * H, n * H * 2);
        na += n * I;
        ny += n * H;
        if (strided)
            for (size_t r = n; r < (size_t)stride; r++)
                untouched_bad +=
                    act_gpu[(base + r) * I] != 0x7b7b || y_gpu[(base + r) * H] != 0x7b7b;
    }
    EXPECT(untouched_bad == 0, "%zu rows past a count were written", untouched_bad);
    compare_bf16("act (gate_up)", a1, a2, na, 1e-6f);
    compare_bf16("y (down)", y1, y2, ny, 1e-6f);

    cudaFree(d_x);
    cudaFree(d_xs);
    cudaFree(d_counts);
    cudaFree(d_offs);
    cudaFree(d_wgu);
    cudaFree(d_wdn);
    cudaFree(d_act);
    cudaFree(d_y);
    cudaFree(d_act_ref);
    cudaFree(d_qgu);
    cudaFree(d_qdn);
    cudaFree(d_sgu);
    cudaFree(d_sdn);
    free(qgu);
    free(qdn);
    free(sgu);
    free(sdn);
    free(a1);
    free(a2);
    free(y1);
    free(y2);
    free(idx);
    free(counts);
    free(offsets);
    free(x);
    free(xs);
    free(wgu);
    free(wdn);
    free(act_ref);
    free(act_gpu);
    free(y_ref);
    free(y_gpu);
}

static void check_experts(int H, int I, int L, int T, int k, int fp8, int strided)
{
    check_experts_w(H, I, L, T, k, fp8, strided, 0, 0);
}

/* Dispatch: counts and offsets equal; each selection's row inside its expert's range, rows used
 * once, packed row = the token's x. Then combine on those rows vs the twin, to the bit. */
static void check_dispatch_combine(int T, int k, int E, int H)
{
    printf("dispatch+combine T %d k %d E %d H %d\n", T, k, E, H);
    const size_t n = (size_t)T * k;
    int32_t *idx = malloc(n * 4 + 4);
    float *w = malloc(n * 4 + 4);
    random_topk(idx, w, T, k, E);
    for (size_t i = 0; i < n; i += 7)
        idx[i] = -1; /* masked selections */
    uint16_t *x = malloc((size_t)T * H * 2 + 2);
    for (size_t i = 0; i < (size_t)T * H; i++)
        x[i] = epd_f32_to_bf16(urand(1.0f));
    int32_t *c_ref = malloc((size_t)E * 4), *o_ref = malloc((size_t)E * 4);
    int32_t *r_ref = malloc(n * 4 + 4);
    uint16_t *p_ref = malloc(n * H * 2 + 2);
    EXPECT(epd_ref_moe_local_dispatch(p_ref, c_ref, o_ref, r_ref, x, idx, T, k, E, H) == 0,
           "twin dispatch");

    int32_t *d_idx = dev_copy(idx, n * 4), *d_counts, *d_offs, *d_row;
    uint16_t *d_x = dev_copy(x, (size_t)T * H * 2), *d_packed;
    CK(cudaMalloc((void **)&d_counts, (size_t)E * 4));
    CK(cudaMalloc((void **)&d_offs, (size_t)E * 4));
    CK(cudaMalloc((void **)&d_row, n * 4 + 4));
    CK(cudaMalloc((void **)&d_packed, n * H * 2 + 2));
    CK(cudaMemset(d_counts, 0x55, (size_t)E * 4)); /* stale values the launcher must clear */
    for (int rep = 0; rep < 2; rep++) /* twice: counts are recomputed, not accumulated */
        CK(epd_cu_moe_local_dispatch(d_packed, d_counts, d_offs, d_row, d_x, d_idx, T, k, E, H,
                                     NULL));
    CK(cudaDeviceSynchronize());
    int32_t *c = malloc((size_t)E * 4), *o = malloc((size_t)E * 4), *r = malloc(n * 4 + 4);
    uint16_t *p = malloc(n * H * 2 + 2);
    host_copy(c, d_counts, (size_t)E * 4);
    host_copy(o, d_offs, (size_t)E * 4);
    host_copy(r, d_row, n * 4);
    host_copy(p, d_packed, n * H * 2);
    EXPECT(!memcmp(c, c_ref, (size_t)E * 4), "counts differ");
    EXPECT(!memcmp(o, o_ref, (size_t)E * 4), "offsets differ");
    size_t total = 0;
    for (int e = 0; e < E; e++)
        total += (size_t)c_ref[e];
    char *used = calloc(total + 1, 1);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (idx[i] < 0) {
            bad += r[i] != -1;
            continue;
        }
        int e = idx[i];
        if (r[i] < o_ref[e] || r[i] >= o_ref[e] + c_ref[e] || used[r[i]]) {
            bad++;
            continue;
        }
        used[r[i]] = 1;
        bad += memcmp(p + (size_t)r[i] * H, x + (i / k) * H, (size_t)H * 2) != 0;
    }
    printf("  %-40s %9zu selections, %zu wrong\n", "row_of / packed", n, bad);
    EXPECT(bad == 0, "dispatch: %zu selections misplaced", bad);

    /* combine: y over the packed rows, the kernel's own row_of */
    uint16_t *y = malloc(total * H * 2 + 2);
    for (size_t i = 0; i < total * H; i++)
        y[i] = epd_f32_to_bf16(urand(2.0f));
    float *h = malloc((size_t)T * H * 4 + 4), *h_ref = malloc((size_t)T * H * 4 + 4);
    for (size_t i = 0; i < (size_t)T * H; i++)
        h[i] = h_ref[i] = urand(3.0f);
    float *d_w = dev_copy(w, n * 4), *d_h = dev_copy(h, (size_t)T * H * 4);
    uint16_t *d_y = dev_copy(y, total * H * 2);
    CK(epd_cu_moe_local_combine(d_h, d_y, d_row, d_w, T, k, H, NULL));
    CK(cudaDeviceSynchronize());
    host_copy(h, d_h, (size_t)T * H * 4);
    epd_ref_moe_local_combine(h_ref, y, r, w, T, k, H);
    double worst = 0.0;
    for (size_t i = 0; i < (size_t)T * H; i++)
        worst = fmax(worst, fabs((double)h[i] - h_ref[i]));
    printf("  %-40s %9zu values, max |diff| %g\n", "combine h", (size_t)T * H, worst);
    EXPECT(worst == 0.0, "combine differs from the twin by %g", worst);

    cudaFree(d_idx);
    cudaFree(d_counts);
    cudaFree(d_offs);
    cudaFree(d_row);
    cudaFree(d_x);
    cudaFree(d_packed);
    cudaFree(d_w);
    cudaFree(d_h);
    cudaFree(d_y);
    free(idx);
    free(w);
    free(x);
    free(c_ref);
    free(o_ref);
    free(r_ref);
    free(p_ref);
    free(c);
    free(o);
    free(r);
    free(p);
    free(used);
    free(y);
    free(h);
    free(h_ref);
}

static void check_route_fixup(int T, int k, int E)
{
    printf("route_fixup T %d k %d E %d\n", T, k, E);
    const size_t n = (size_t)T * k;
    int32_t *idx = malloc(n * 4), *idx2 = malloc(n * 4), *slot = malloc((size_t)E * 4);
    float *w = malloc(n * 4), *w2 = malloc(n * 4);
    random_topk(idx, w, T, k, E);
    idx[1] = -1;
    for (int e = 0; e < E; e++)
        slot[e] = (e * 5 + 3) % E;
    const int32_t n_valid = T - T / 3;
    unsigned long long *tok = calloc((size_t)E, 8), *tok2 = calloc((size_t)E, 8);
    for (int e = 0; e < E; e++)
        tok[e] = tok2[e] = (unsigned long long)e; /* counts accumulate */
    int32_t *d_idx = dev_copy(idx, n * 4), *d_nv = dev_copy(&n_valid, 4),
            *d_slot = dev_copy(slot, (size_t)E * 4);
    float *d_w = dev_copy(w, n * 4);
    unsigned long long *d_tok = dev_copy(tok, (size_t)E * 8);
    CK(epd_cu_route_fixup(d_idx, d_w, T, k, E, d_nv, d_slot, d_tok, NULL));
    CK(cudaDeviceSynchronize());
    epd_ref_route_fixup(idx, w, T, k, E, &n_valid, slot, tok);
    host_copy(idx2, d_idx, n * 4);
    host_copy(w2, d_w, n * 4);
    host_copy(tok2, d_tok, (size_t)E * 8);
    EXPECT(!memcmp(idx, idx2, n * 4), "route_fixup: ids differ");
    EXPECT(!memcmp(w, w2, n * 4), "route_fixup: weights differ");
    EXPECT(!memcmp(tok, tok2, (size_t)E * 8), "route_fixup: expert_tokens differ");
    cudaFree(d_idx);
    cudaFree(d_nv);
    cudaFree(d_slot);
    cudaFree(d_w);
    cudaFree(d_tok);
    free(idx);
    free(idx2);
    free(slot);
    free(w);
    free(w2);
    free(tok);
    free(tok2);
}

/* gate_up + down at the Qwen3-30B-A3B shape, weights in HBM, L2 flushed before each step. */
static void bench(void)
{
    const int H = 2048, I = 768, L = 128, k = 8;
    const size_t expert_bytes = (size_t)3 * I * H * 2;
    uint16_t *d_wgu, *d_wdn, *d_x, *d_act, *d_y;
    int32_t *d_counts, *d_offs;
    void *d_flush;
    const size_t flush_bytes = (size_t)256 << 20;
    CK(cudaMalloc((void **)&d_wgu, (size_t)L * 2 * I * H * 2));
    CK(cudaMalloc((void **)&d_wdn, (size_t)L * H * I * 2));
    CK(cudaMemset(d_wgu, 0x3c, (size_t)L * 2 * I * H * 2));
    CK(cudaMemset(d_wdn, 0x3b, (size_t)L * H * I * 2));
    CK(cudaMalloc((void **)&d_x, (size_t)256 * k * H * 2));
    CK(cudaMemset(d_x, 0x3c, (size_t)256 * k * H * 2));
    CK(cudaMalloc((void **)&d_act, (size_t)256 * k * I * 2));
    CK(cudaMalloc((void **)&d_y, (size_t)256 * k * H * 2));
    CK(cudaMalloc((void **)&d_counts, L * 4));
    CK(cudaMalloc((void **)&d_offs, L * 4));
    CK(cudaMalloc(&d_flush, flush_bytes));
    cudaEvent_t e0, e1, e2;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventCreate(&e2));
    printf("timing: Qwen3-30B-A3B experts (H %d, I %d, L %d, top-%d), bf16 x, %.1f MB/expert\n", H,
           I, L, k, expert_bytes / 1e6);
    const int Ts[] = {1, 8, 64, 256};
    for (int ti = 0; ti < 4; ti++) {
        const int T = Ts[ti];
        int32_t *idx = malloc((size_t)T * k * 4), counts[128] = {0}, offs[128];
        random_topk(idx, NULL, T, k, L);
        for (int i = 0; i < T * k; i++)
            counts[idx[i]]++;
        int active = 0, max_rows = 0, run = 0;
        for (int l = 0; l < L; l++) {
            offs[l] = run;
            run += counts[l];
            active += counts[l] > 0;
            if (counts[l] > max_rows) max_rows = counts[l];
        }
        CK(cudaMemcpy(d_counts, counts, L * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_offs, offs, L * 4, cudaMemcpyHostToDevice));
        const int reps = 20;
        float tgu = 0, tdn = 0;
        for (int rep = 0; rep < reps + 2; rep++) {
            CK(cudaMemsetAsync(d_flush, rep, flush_bytes, NULL));
            CK(cudaEventRecord(e0, NULL));
            /* max_rows as the LL layout would give it: the buffer's slots, not the batch */
            CK(epd_cu_expert_gate_up(d_act, d_x, NULL, d_counts, d_offs, 0, d_wgu, L, H, I, 256 * k,
                                     NULL));
            CK(cudaEventRecord(e1, NULL));
            CK(epd_cu_expert_down(d_y, d_act, d_counts, d_offs, 0, d_wdn, L, H, I, 256 * k, NULL));
            CK(cudaEventRecord(e2, NULL));
            CK(cudaEventSynchronize(e2));
            float a, b;
            CK(cudaEventElapsedTime(&a, e0, e1));
            CK(cudaEventElapsedTime(&b, e1, e2));
            if (rep >= 2) {
                tgu += a;
                tdn += b;
            }
        }
        tgu = tgu * 1000 / reps;
        tdn = tdn * 1000 / reps;
        const double gb = active * (double)expert_bytes / 1e9;
        printf("  T %3d: %3d active experts, max %2d rows: gate_up %7.1f us (%6.0f GB/s), down "
               "%7.1f us (%6.0f GB/s), both %7.1f us = %6.0f GB/s\n",
               T, active, max_rows, tgu, gb * 2 / 3 / (tgu * 1e-6), tdn, gb / 3 / (tdn * 1e-6),
               tgu + tdn, gb / ((tgu + tdn) * 1e-6));
        free(idx);
    }
    cudaFree(d_wgu);
    cudaFree(d_wdn);
    cudaFree(d_x);
    cudaFree(d_act);
    cudaFree(d_y);
    cudaFree(d_counts);
    cudaFree(d_offs);
    cudaFree(d_flush);
}

/* A step captured into a graph replays with the counts the device holds at replay time. */
static void check_graph(void)
{
    printf("graph capture\n");
    const int H = 128, I = 96, L = 4, S = 20;
    int32_t counts[4] = {3, 0, 20, 9};
    uint16_t *x = malloc((size_t)L * S * H * 2), *wgu = malloc((size_t)L * 2 * I * H * 2),
             *wdn = malloc((size_t)L * H * I * 2);
    for (size_t i = 0; i < (size_t)L * S * H; i++)
        x[i] = epd_f32_to_bf16(urand(1.0f));
    for (size_t i = 0; i < (size_t)L * 2 * I * H; i++)
        wgu[i] = epd_f32_to_bf16(urand(0.2f));
    for (size_t i = 0; i < (size_t)L * H * I; i++)
        wdn[i] = epd_f32_to_bf16(urand(0.2f));
    uint16_t *d_x = dev_copy(x, (size_t)L * S * H * 2),
             *d_wgu = dev_copy(wgu, (size_t)L * 2 * I * H * 2),
             *d_wdn = dev_copy(wdn, (size_t)L * H * I * 2), *d_act, *d_y;
    int32_t *d_counts = dev_copy(counts, sizeof counts);
    CK(cudaMalloc((void **)&d_act, (size_t)L * S * I * 2));
    CK(cudaMalloc((void **)&d_y, (size_t)L * S * H * 2));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    CK(epd_cu_expert_gate_up(d_act, d_x, NULL, d_counts, NULL, S, d_wgu, L, H, I, S,
                             (epd_stream_t)st));
    CK(epd_cu_expert_down(d_y, d_act, d_counts, NULL, S, d_wdn, L, H, I, S, (epd_stream_t)st));
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    counts[1] = 5; /* changed after capture */
    CK(cudaMemcpy(d_counts, counts, sizeof counts, cudaMemcpyHostToDevice));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaStreamSynchronize(st));
    uint16_t *act = calloc((size_t)L * S * I, 2), *y = calloc((size_t)L * S * H, 2);
    uint16_t *y_gpu = calloc((size_t)L * S * H, 2);
    epd_ref_expert_gate_up(act, x, NULL, counts, NULL, S, wgu, L, H, I, S);
    epd_ref_expert_down(y, act, counts, NULL, S, wdn, L, H, I, S);
    host_copy(y_gpu, d_y, (size_t)L * S * H * 2);
    size_t n = 0;
    for (int l = 0; l < L; l++) {
        memmove(y + n, y + (size_t)l * S * H, (size_t)counts[l] * H * 2);
        memmove(y_gpu + n, y_gpu + (size_t)l * S * H, (size_t)counts[l] * H * 2);
        n += (size_t)counts[l] * H;
    }
    compare_bf16("y after graph replay", y_gpu, y, n, 1e-6f);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(st));
    cudaFree(d_x);
    cudaFree(d_wgu);
    cudaFree(d_wdn);
    cudaFree(d_act);
    cudaFree(d_y);
    cudaFree(d_counts);
    free(x);
    free(wgu);
    free(wdn);
    free(act);
    free(y);
    free(y_gpu);
}

int main(int argc, char **argv)
{
    if (h_skip_without_gpu()) return H_SKIP;
    const int timing = !(argc > 1 && !strcmp(argv[1], "--no-timing"));
    check_route_fixup(37, 8, 128);
    check_route_fixup(5, 2, 8);
    check_dispatch_combine(64, 8, 128, 2048);
    check_dispatch_combine(9, 2, 8, 64);
    check_dispatch_combine(300, 4, 1000, 128);
    check_experts(64, 48, 8, 5, 2, 0, 0);   /* tiny, <= 8 rows: one n-tile */
    check_experts(64, 48, 8, 40, 2, 0, 1);  /* tiny, > 16 rows: several passes */
    check_experts(128, 96, 8, 40, 2, 1, 0); /* fp8 */
    check_experts(128, 96, 8, 40, 2, 1, 1);
    check_experts(48, 32, 3, 7, 2, 0, 1);    /* H not a multiple of 32 */
    check_experts(128, 96, 4, 600, 2, 0, 0); /* prefill-sized: 300 rows per expert */
    check_experts(2048, 768, 128, 64, 8, 0, 0);
    check_experts(2048, 768, 128, 64, 8, 1, 1);
    check_experts(2048, 768, 64, 128, 8, 1, 0);
    /* fp8 weights: ragged row blocks, channel blocks of 32..128 (beside fp8 inputs' 128) */
    check_experts_w(128, 96, 8, 5, 2, 0, 0, 40, 64);
    check_experts_w(128, 96, 8, 40, 2, 0, 1, 48, 96);
    check_experts_w(256, 96, 8, 40, 2, 1, 0, 40, 96);
    check_experts_w(128, 96, 8, 40, 2, 1, 1, 128, 32);
    check_experts_w(48, 32, 3, 7, 2, 0, 1, 16, 32);         /* H not a multiple of 32 */
    check_experts_w(128, 96, 4, 600, 2, 0, 0, 128, 128);    /* prefill-sized */
    check_experts_w(2048, 768, 128, 64, 8, 0, 0, 128, 128); /* Qwen3-30B-A3B-FP8 */
    check_experts_w(2048, 768, 128, 64, 8, 1, 1, 128, 128);
    check_graph();
    if (timing) bench();
    printf(g_fail ? "FAILED\n" : "OK\n");
    return g_fail ? 1 : 0;
}
