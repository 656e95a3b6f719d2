/* The CUDA model against transformers and against the fp32 C model, on an oracle checkpoint
 * (tests/model/oracle: Qwen3-MoE, bf16 weights, 3 layers with a dense one in the middle, expert
 * top-4 of 16; or the directory given as argv[1]: oracle_dsv3 / oracle_dsv2, DeepSeek-V3 and V2
 * with MLA, YaRN, shared experts and their routers), through model.h exactly as the engine drives
 * it (oracle_run.c's workload: prompts in chunks packed with other sequences' decode tokens):
 *   - 1 rank, prompts in LL chunks of 8, decode steps replayed as CUDA graphs;
 *   - the same with every step eager (graphs off): the same tokens;
 *   - 1 rank with whole prompts in one step (prefill up to 40 tokens);
 *   - 2 ranks as threads sharing the GPU, the MoE exchange through libep's LL kernels;
 *   - the same with fp8 dispatch.
 * Each run: greedy tokens equal transformers' up to the first position where transformers' own
 * top-2 margin is below the measured error bound (bf16 may flip a near-tie; the continuation
 * then legitimately differs and is not compared), logits within CUDA_TOL of transformers' and
 * of the C model's, the KV pool whole after every sequence ended, and GPU memory back to its
 * starting figure once the model and group are gone.
 *
 * Tolerance. The C model is within 0.0117 of transformers (bf16 at the MoE exchange only); the
 * CUDA model also rounds every GEMM input, the KV cache and the expert activations to bf16.
 * CUDA_TOL bounds the measured maxima on the Qwen3-MoE oracle, printed by each run. The DeepSeek
 * oracles are held to the same bound, which no device run has measured yet: MLA's cuda path
 * rounds q to bf16 before the absorption, the latent cache and the latent attention's output to
 * bf16 (decode), or keys and values per head to bf16 (prefill's expanded form). Their "whole
 * prompts" run takes the expanded form, the chunked runs both forms (prefill chunks expanded,
 * decode steps absorbed). Exit 77 without a GPU. */
#include "cuda_harness.h"
#include "oracle_run.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_TOL 0.08f
#define FP8_TOL 0.25f

static oracle_t g_oracle;
static const char *g_dir = EPD_ORACLE_DIR;

/* Runs the workload on R threads; out gets every case's tokens and logits. */
static int run_ranks(int R, const oracle_opts_t *opts, oracle_result_t *out)
{
    oracle_result_t res[ORACLE_MAX_RANKS];
    int rc[ORACLE_MAX_RANKS] = {0};
    epd_err_t err[ORACLE_MAX_RANKS];
    memset(res, 0, sizeof(res));
    memset(err, 0, sizeof(err));
    for (int r = 0; r < R; r++)
        for (int c = 0; c < g_oracle.num_cases; c++)
            res[r].logits[c] = out->logits[c];
    if (oracle_run_threads(g_dir, &g_oracle, R, NULL, opts, res, rc, err)) return -1;
    int fail = 0;
    for (int r = 0; r < R; r++)
        if (rc[r]) {
            fprintf(stderr, "FAIL: R=%d rank %d: %s\n", R, r, err[r].msg);
            fail = -1;
        }
    for (int c = 0; c < g_oracle.num_cases; c++)
        memcpy(out->tokens[c], res[c % R].tokens[c], sizeof(out->tokens[c]));
    return fail;
}

static oracle_result_t *result_new(void)
{
    oracle_result_t *r = calloc(1, sizeof(*r));
    for (int c = 0; c < g_oracle.num_cases; c++)
        r->logits[c] = calloc((size_t)g_oracle.new_tokens * g_oracle.vocab, sizeof(float));
    return r;
}

static void result_free(oracle_result_t *r)
{
    for (int c = 0; c < g_oracle.num_cases; c++)
        free(r->logits[c]);
    free(r);
}

/* transformers' top-1 minus top-2 logit at (case c, position i) */
static float margin(int c, int i)
{
    const float *l = g_oracle.cases[c].logits + (size_t)i * g_oracle.vocab;
    float a = -INFINITY, b = -INFINITY;
    for (int v = 0; v < g_oracle.vocab; v++)
        if (l[v] > a)
            b = a, a = l[v];
        else if (l[v] > b)
            b = l[v];
    return a - b;
}

/* Compares a run with transformers and with the C model's run (cpu, may be NULL). */
static int check(const char *name, const oracle_result_t *got, const oracle_result_t *cpu,
                 float tol)
{
    int fails = 0, compared = 0, flips = 0;
    float worst_hf = 0, worst_cpu = 0;
    for (int c = 0; c < g_oracle.num_cases; c++) {
        const oracle_case_t *oc = &g_oracle.cases[c];
        for (int i = 0; i < g_oracle.new_tokens; i++) {
            /* logits at position i are comparable while the inputs so far were the same */
            const float *lg = got->logits[c] + (size_t)i * g_oracle.vocab;
            const float *hf = oc->logits + (size_t)i * g_oracle.vocab;
            for (int v = 0; v < g_oracle.vocab; v++) {
                float d = fabsf(lg[v] - hf[v]);
                if (!(d <= worst_hf)) worst_hf = d;
                if (cpu) {
                    float e = fabsf(lg[v] - cpu->logits[c][(size_t)i * g_oracle.vocab + v]);
                    if (!(e <= worst_cpu)) worst_cpu = e;
                }
            }
            compared++;
            if (got->tokens[c][i] != oc->tokens[i]) {
                float mg = margin(c, i);
                if (mg < 2 * tol) {
                    flips++;
                    printf("  %s: case %d token %d: %d vs transformers' %d, a near-tie (margin "
                           "%.4f): not compared further\n",
                           name, c, i, got->tokens[c][i], oc->tokens[i], mg);
                } else {
                    fails++;
                    printf("FAIL: %s: case %d token %d: %d vs transformers' %d (margin %.4f)\n",
                           name, c, i, got->tokens[c][i], oc->tokens[i], mg);
                }
                break;
            }
        }
    }
    printf("%s: %d positions compared, %d near-tie flips; max |logit - transformers| %.4f, "
           "max |logit - C model| %.4f (bound %.3f)\n",
           name, compared, flips, worst_hf, worst_cpu, tol);
    if (!(worst_hf <= tol) || !(worst_cpu <= tol)) {
        printf("FAIL: %s: logits beyond the bound\n", name);
        fails++;
    }
    return fails;
}

static size_t gpu_free(void)
{
    size_t f = 0, t = 0;
    cudaMemGetInfo(&f, &t);
    return f;
}

int main(int argc, char **argv)
{
    if (argc > 1) g_dir = argv[1];
    setenv("CUDA_MODULE_LOADING", "EAGER", 0); /* as epd does: see daemon/epd.c */
    if (h_skip_without_gpu()) return H_SKIP;
    epd_err_t err = {0};
    printf("oracle: %s\n", g_dir);
    if (oracle_load(g_dir, &g_oracle, &err)) {
        fprintf(stderr, "FAIL: %s\n", err.msg);
        return 1;
    }
    int fails = 0;
    oracle_result_t *cpu = result_new();
    oracle_opts_t o = {.chunk = 8};
    if (run_ranks(1, &o, cpu)) return 1;
    fails += check("cpu 1 rank (reference run)", cpu, NULL, 0.03f);

    cudaSetDevice(0);
    cudaFree(0);
    size_t free0 = gpu_free();
    struct {
        const char *name;
        int R;
        oracle_opts_t o;
        float tol;
    } runs[] = {
        {"cuda 1 rank, LL chunks of 8, graphs",
         1,
         {.chunk = 8, .backend = EPD_MODEL_CUDA, .kv_blocks = 64},
         CUDA_TOL},
        {"cuda 1 rank, eager",
         1,
         {.chunk = 8, .backend = EPD_MODEL_CUDA, .kv_blocks = 64, .no_graphs = 1},
         CUDA_TOL},
        {"cuda 1 rank, whole prompts (40-token steps)",
         1,
         {.chunk = 8, .prefill = 40, .backend = EPD_MODEL_CUDA, .kv_blocks = 64},
         CUDA_TOL},
        {"cuda 1 rank, KV blocks of 1",
         1,
         {.chunk = 8, .kv_block_size = 1, .backend = EPD_MODEL_CUDA, .kv_blocks = 512},
         CUDA_TOL},
        {"cuda 2 ranks on one GPU, LL exchange",
         2,
         {.chunk = 8, .backend = EPD_MODEL_CUDA, .kv_blocks = 64},
         CUDA_TOL},
        {"cuda 2 ranks on one GPU, fp8 dispatch",
         2,
         {.chunk = 8, .backend = EPD_MODEL_CUDA, .kv_blocks = 64, .fp8_dispatch = 1},
         FP8_TOL},
    };
    oracle_result_t *first = NULL;
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        oracle_result_t *r = result_new();
        if (run_ranks(runs[i].R, &runs[i].o, r)) {
            fails++;
            result_free(r);
            continue;
        }
        fails += check(runs[i].name, r, cpu, runs[i].tol);
        if (runs[i].o.fp8_dispatch) { /* other roundings: its own near-ties */
            result_free(r);
            continue;
        }
        if (!first) {
            first = r;
            continue;
        }
        for (int c = 0; c < g_oracle.num_cases; c++)
            if (memcmp(r->tokens[c], first->tokens[c], sizeof(r->tokens[c]))) {
                printf("FAIL: %s: case %d's tokens differ from the first cuda run's\n",
                       runs[i].name, c);
                fails++;
            }
        result_free(r);
    }
    if (first) result_free(first);
    cudaDeviceSynchronize();
    size_t free1 = gpu_free();
    /* the runtime's own pools may keep a few MiB; the model's allocations are GiB-sized */
    long long leak = (long long)free0 - (long long)free1;
    printf("GPU memory free before %.1f MiB, after %.1f MiB\n", free0 / 1048576.0,
           free1 / 1048576.0);
    if (leak > (64ll << 20)) {
        printf("FAIL: %.1f MiB of GPU memory not given back\n", leak / 1048576.0);
        fails++;
    }
    result_free(cpu);
    oracle_free(&g_oracle);
    printf(fails ? "FAIL: %d check(s)\n" : "PASS\n", fails);
    return fails ? 1 : 0;
}
