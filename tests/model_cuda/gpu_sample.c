/* epd_cu_sample against its twin epd_sample_ref on random rows (V = 151936 and small V, random
 * temperature / top-k / top-p / seed / counter): greedy rows equal always, sampled rows equal
 * for >= 99%, and every GPU token one the twin kept (p > 0 after its filtering); rows at or past
 * *n_dev untouched. Prints the time of sampling 256 rows of V = 151936. Exit 77 without a CUDA
 * device. */
#include "test_rng.h"
#include "cuda_harness.h"
#include "cuda_ops.h"
#include "sample.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call) H_CUDA_CHECK(-1, exit(1), call)

static uint64_t rng_state = 0x5a3e1e01u;
static uint64_t rng_next(void)
{
    return test_splitmix64(&rng_state);
}
static double rng_unit(void)
{
    return test_rng_unit(&rng_state);
}
static float rng_normal(void)
{
    return test_rng_normal(&rng_state);
}

/* Language-model-like rows: a normal background, a few boosted tokens; sometimes exact ties,
 * a NaN or -inf; sometimes a flat row. */
static void random_row(float *x, int V)
{
    const int kind = (int)(rng_next() % 4);
    const float sigma = kind == 3 ? 0.05f : (float)(1 + 2 * rng_unit());
    for (int i = 0; i < V; i++)
        x[i] = sigma * rng_normal();
    if (kind != 3) {
        const int boosted = 1 + (int)(rng_next() % 20);
        for (int j = 0; j < boosted; j++)
            x[rng_next() % (uint64_t)V] += (float)(5 + 10 * rng_unit());
    }
    if (kind == 1)
        for (int i = 0; i < V; i++)
            x[i] = roundf(x[i] * 4) / 4;
    if (rng_next() % 5 == 0) x[rng_next() % (uint64_t)V] = NAN;
    if (rng_next() % 5 == 0) x[rng_next() % (uint64_t)V] = -INFINITY;
}

static epd_sample_params_t random_params(int V)
{
    static const float temps[] = {0, 0.3f, 0.7f, 1, 1.3f};
    static const float tops_p[] = {1, 1, 0.95f, 0.9f, 0.5f, 1e-6f};
    const int ks[] = {0, 0, 1, 20, 50, V - 1, V + 1};
    epd_sample_params_t sp = {0};
    sp.temperature = temps[rng_next() % 5];
    sp.top_p = tops_p[rng_next() % 6];
    sp.top_k = ks[rng_next() % 7];
    if (sp.top_k < 0) sp.top_k = 0;
    sp.seed = rng_next();
    sp.counter = rng_next() % 4096;
    return sp;
}

struct tally {
    long greedy, greedy_eq, sampled, sampled_eq, not_kept;
};

/* M rows of V: GPU vs twin; the last `skip` rows are past *n_dev. */
static void run_batch(int M, int V, int skip, struct tally *tl)
{
    const size_t n = (size_t)M * V;
    float *x = malloc(sizeof(float) * n), *scratch = malloc(sizeof(float) * (size_t)V);
    epd_sample_params_t *sp = malloc(sizeof(*sp) * (size_t)M);
    int32_t *got = malloc(sizeof(int32_t) * (size_t)M);
    for (int m = 0; m < M; m++) {
        random_row(x + (size_t)m * V, V);
        sp[m] = random_params(V);
    }
    float *d_x;
    epd_sample_params_t *d_sp;
    int32_t *d_next, *d_n;
    void *d_ws;
    const int32_t n_valid = M - skip;
    CK(cudaMalloc((void **)&d_x, sizeof(float) * n));
    CK(cudaMalloc((void **)&d_sp, sizeof(*sp) * (size_t)M));
    CK(cudaMalloc((void **)&d_next, sizeof(int32_t) * (size_t)M));
    CK(cudaMalloc((void **)&d_n, sizeof(int32_t)));
    CK(cudaMalloc(&d_ws, epd_cu_sample_workspace(M, V)));
    CK(cudaMemcpy(d_x, x, sizeof(float) * n, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_sp, sp, sizeof(*sp) * (size_t)M, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_n, &n_valid, sizeof(int32_t), cudaMemcpyHostToDevice));
    CK(cudaMemset(d_next, 0xff, sizeof(int32_t) * (size_t)M));
    CK(epd_cu_sample(d_next, d_x, d_sp, M, V, skip ? d_n : NULL, d_ws, NULL));
    CK(cudaMemcpy(got, d_next, sizeof(int32_t) * (size_t)M, cudaMemcpyDeviceToHost));
    for (int m = 0; m < M; m++) {
        if (m >= n_valid) {
            if (got[m] != -1) {
                fprintf(stderr, "FAIL row %d past n_dev %d written (%d)\n", m, n_valid, got[m]);
                tl->not_kept++;
            }
            continue;
        }
        const float *xr = x + (size_t)m * V;
        int32_t want = epd_sample_ref(xr, V, &sp[m], scratch);
        const int32_t am = epd_sample_argmax(xr, V);
        const int greedy = sp[m].temperature == 0 || isinf(xr[am]);
        if (greedy) {
            tl->greedy++;
            tl->greedy_eq += got[m] == want;
            if (got[m] != want)
                fprintf(stderr, "FAIL greedy row V=%d: GPU %d, twin %d\n", V, got[m], want);
            continue;
        }
        tl->sampled++;
        tl->sampled_eq += got[m] == want;
        /* scratch holds the twin's p after its filtering */
        if (got[m] < 0 || got[m] >= V || !(scratch[got[m]] > 0)) {
            tl->not_kept++;
            fprintf(stderr, "FAIL V=%d T=%g k=%d p=%g: GPU token %d not kept by the twin\n", V,
                    (double)sp[m].temperature, sp[m].top_k, (double)sp[m].top_p, got[m]);
        } else if (got[m] != want) {
            fprintf(stderr, "note: V=%d T=%g k=%d p=%g: GPU %d, twin %d\n", V,
                    (double)sp[m].temperature, sp[m].top_k, (double)sp[m].top_p, got[m], want);
        }
    }
    cudaFree(d_x), cudaFree(d_sp), cudaFree(d_next), cudaFree(d_n), cudaFree(d_ws);
    free(x), free(scratch), free(sp), free(got);
}

static void time_sampling(void)
{
    const int M = 256, V = 151936;
    const size_t n = (size_t)M * V;
    float *x = malloc(sizeof(float) * n);
    epd_sample_params_t *sp = malloc(sizeof(*sp) * (size_t)M);
    for (int m = 0; m < M; m++) {
        random_row(x + (size_t)m * V, V);
        sp[m] = (epd_sample_params_t){
            .temperature = 0.7f, .top_p = 0.9f, .top_k = 50, .seed = (uint64_t)m, .counter = 1};
    }
    float *d_x;
    epd_sample_params_t *d_sp;
    int32_t *d_next;
    void *d_ws;
    CK(cudaMalloc((void **)&d_x, sizeof(float) * n));
    CK(cudaMalloc((void **)&d_sp, sizeof(*sp) * (size_t)M));
    CK(cudaMalloc((void **)&d_next, sizeof(int32_t) * (size_t)M));
    CK(cudaMalloc(&d_ws, epd_cu_sample_workspace(M, V)));
    CK(cudaMemcpy(d_x, x, sizeof(float) * n, cudaMemcpyHostToDevice));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    const char *names[3] = {"temperature 0.7, top_k 50, top_p 0.9", "temperature 0.7 only",
                            "greedy"};
    for (int variant = 0; variant < 3; variant++) {
        for (int m = 0; m < M; m++) {
            sp[m].top_k = variant == 0 ? 50 : 0;
            sp[m].top_p = variant == 0 ? 0.9f : 1.0f;
            sp[m].temperature = variant == 2 ? 0.0f : 0.7f;
        }
        CK(cudaMemcpy(d_sp, sp, sizeof(*sp) * (size_t)M, cudaMemcpyHostToDevice));
        CK(epd_cu_sample(d_next, d_x, d_sp, M, V, NULL, d_ws, NULL));
        const int reps = 10;
        CK(cudaEventRecord(a, NULL));
        for (int r = 0; r < reps; r++)
            CK(epd_cu_sample(d_next, d_x, d_sp, M, V, NULL, d_ws, NULL));
        CK(cudaEventRecord(b, NULL));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        printf("sampling %d rows of V=%d (%s): %.3f ms\n", M, V, names[variant], ms / reps);
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    cudaFree(d_x), cudaFree(d_sp), cudaFree(d_next), cudaFree(d_ws);
    free(x), free(sp);
}

int main(void)
{
    if (h_skip_without_gpu()) return H_SKIP;
    struct tally tl = {0};
    run_batch(256, 151936, 0, &tl);
    run_batch(200, 151936, 17, &tl);
    const int small[] = {1, 2, 7, 100, 1000, 1023, 1025, 5000, 32000};
    for (int k = 0; k < 9; k++)
        run_batch(300, small[k], k % 2 ? 11 : 0, &tl);
    printf("greedy rows %ld/%ld equal; sampled rows %ld/%ld equal (%.3f%%); %ld not kept\n",
           tl.greedy_eq, tl.greedy, tl.sampled_eq, tl.sampled,
           100.0 * (double)tl.sampled_eq / (double)(tl.sampled ? tl.sampled : 1), tl.not_kept);
    time_sampling();
    CK(cudaDeviceSynchronize());
    const int ok = tl.greedy_eq == tl.greedy && tl.not_kept == 0 &&
                   (double)tl.sampled_eq >= 0.99 * (double)tl.sampled;
    printf("gpu_sample: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
