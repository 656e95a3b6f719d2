/* model-bench: the CUDA model's decode step and prefill rate at a real model's shape with random
 * weights made on the GPU (Qwen3-30B-A3B by default: no 61 GB file needed), beside the HBM
 * limit of each step (bytes of weights and KV a step must read, at --hbm-tbs TB/s).
 *
 *   model-bench [--model qwen3-30b-a3b|deepseek-v2-lite] [--batches 1,8,64,256] [--ctx 1024]
 *               [--steps 20] [--prefill 4096] [--ranks 1|2] [--fp8] [--weights bf16|fp8]
 *               [--no-graphs] [--profile] [--layers N --hidden H --experts E --topk K
 *                --moe-inter I --inter Id --heads nh --kv-heads nkv --head-dim hd --vocab V]
 *
 * Each rank is a thread of this process on the same GPU (--ranks 2: EP=2 sharing one GPU, the
 * MoE exchange through libep's LL kernels). Decode: B sequences whose KV already holds ctx
 * random positions, steps of one token each (greedy), the median over --steps after warm-up
 * (the warm-up captures the step's CUDA graph). Prefill: one prompt of --prefill tokens in
 * chunks of the model's largest step. --profile adds a breakdown of an eager decode step by
 * phase (cudaEvents between phases). --fp8 sends the LL dispatch in fp8; --weights fp8 makes the
 * experts random e4m3 codes with fp32 scales in 128 x 128 blocks, as an FP8 checkpoint's (the
 * Qwen3 -FP8 and DeepSeek-V3 layout), and the HBM limit counts them at 1 byte per weight.
 *
 * --model picks the shape from the checkpoint's own config.json (below, parsed by hf_config.c as
 * a checkpoint's would be); the shape options after it override single fields (the Qwen3 set:
 * DeepSeek's MLA dimensions come from the preset only). deepseek-v2-lite: 27 layers, hidden 2048,
 * the first layer dense (intermediate 10944), then 64 routed experts top-6 (moe_intermediate 1408)
 * plus 2 shared, MLA with kv_lora 512, qk_nope 128, qk_rope 64, v 128, no q LoRA, 16 heads,
 * vocab 102400, softmax greedy routing, YaRN. */
#include "cuda_model.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BATCHES 16

/* config.json of each preset (the hub's files, keys the shape and the math depend on) */
static const struct preset {
    const char *name, *json;
} presets[] = {
    {"qwen3-30b-a3b",
     "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 2048, \"intermediate_size\": 6144, "
     "\"moe_intermediate_size\": 768, \"num_hidden_layers\": 48, \"num_attention_heads\": 32, "
     "\"num_key_value_heads\": 4, \"head_dim\": 128, \"vocab_size\": 151936, "
     "\"rms_norm_eps\": 1e-6, \"rope_theta\": 1000000, \"num_experts\": 128, "
     "\"num_experts_per_tok\": 8, \"norm_topk_prob\": true, \"decoder_sparse_step\": 1, "
     "\"mlp_only_layers\": [], \"tie_word_embeddings\": false, "
     "\"max_position_embeddings\": 40960}"},
    {"deepseek-v2-lite",
     "{\"model_type\": \"deepseek_v2\", \"hidden_size\": 2048, \"intermediate_size\": 10944, "
     "\"moe_intermediate_size\": 1408, \"num_hidden_layers\": 27, \"num_attention_heads\": 16, "
     "\"num_key_value_heads\": 16, \"n_routed_experts\": 64, \"n_shared_experts\": 2, "
     "\"num_experts_per_tok\": 6, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, "
     "\"kv_lora_rank\": 512, \"q_lora_rank\": null, \"qk_nope_head_dim\": 128, "
     "\"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"vocab_size\": 102400, "
     "\"rms_norm_eps\": 1e-6, \"rope_theta\": 10000, \"max_position_embeddings\": 163840, "
     "\"norm_topk_prob\": false, \"topk_method\": \"greedy\", \"n_group\": 1, "
     "\"topk_group\": 1, \"routed_scaling_factor\": 1.0, \"scoring_func\": \"softmax\", "
     "\"tie_word_embeddings\": false, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40, "
     "\"original_max_position_embeddings\": 4096, \"beta_fast\": 32, \"beta_slow\": 1, "
     "\"mscale\": 0.707, \"mscale_all_dim\": 0.707}}"},
};

typedef struct bench_opts {
    epd_hf_config_t cfg;
    int batches[MAX_BATCHES], nbatches;
    int ctx, steps, prefill, ranks, fp8, no_graphs, profile, max_batch, max_prefill;
    double hbm_tbs;
    const char *model;
} bench_opts_t;

typedef struct rank_arg {
    const bench_opts_t *o;
    ep_inproc_world_t *world;
    pthread_barrier_t *bar;
    int rank;
    int rc;
} rank_arg_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Bytes a decode step of B tokens at context ctx must read: every replicated weight a step
 * touches (embedding rows aside, lm_head whole), the experts the batch selects (expected
 * distinct experts under uniform routing: E (1 - (1 - k/E)^B) per MoE layer, as DESIGN.md counts
 * them), and the KV of every sequence. Over all ranks (the HBM of one GPU here). */
static double step_bytes(const epd_hf_config_t *c, int B, int ctx)
{
    /* an expert weight: 2 bytes in bf16; 1 in fp8, plus a 4-byte scale per block */
    const double ew = c->fp8.on ? 1.0 + 4.0 / ((double)c->fp8.block_n * c->fp8.block_k) : 2.0;
    double H = c->hidden_size, V = c->vocab_size, hd = c->head_dim, nh = c->num_attention_heads;
    double qd = nh * hd, kvd = c->num_key_value_heads * hd;
    double bytes = V * H * 2 + H * 4; /* lm_head, final norm */
    double E = c->num_experts, k = c->num_experts_per_tok, I = c->moe_intermediate_size;
    double touched = E * (1.0 - pow(1.0 - k / E, B));
    double Is = I * c->n_shared_experts;
    /* MLA: q (or q LoRA), kv_a, kv_b, o and their norms; its cache: the latent and the shared
     * key part per position */
    double kvl = c->kv_lora_rank, rope = c->qk_rope_head_dim, qk = c->qk_nope_head_dim + rope;
    double ql = c->q_lora_rank, vd = c->v_head_dim;
    double mla_w = (ql ? ql * H + nh * qk * ql + ql * 2 : nh * qk * H) * 2 + (kvl + rope) * H * 2 +
                   nh * (c->qk_nope_head_dim + vd) * kvl * 2 + H * nh * vd * 2 + kvl * 4;
    int mla = epd_hf_is_mla(c);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        bytes += 2 * H * 4;
        bytes += mla ? mla_w : (qd + 2 * kvd) * H * 2 + H * qd * 2 + 2 * hd * 4;
        if (epd_hf_layer_is_moe(c, l))
            bytes += E * H * 4 + touched * 3 * I * H * ew + 3 * Is * H * 2 +
                     (c->router_bias ? E * 4 : 0);
        else
            bytes += 3.0 * c->intermediate_size * H * 2;
    }
    double kv_pos = mla ? (kvl + rope) * 2 : 2 * kvd * 2; /* bytes per position and layer */
    bytes += (double)B * ctx * c->num_hidden_layers * kv_pos;
    return bytes;
}

/* Builds a decode step of B tokens (sequence i at position pos) or a prefill chunk. */
typedef struct step_buf {
    int32_t *tokens, *pos, *seq_idx, *seq_len, *block_table, *rows;
    epd_sample_params_t *sample;
    int max_blocks;
} step_buf_t;

static int run_step(cu_model_t *m, step_buf_t *b, epd_step_t *s, int32_t *next)
{
    epd_err_t err = {0};
    int rc = cu_forward(m, s, next, NULL, &err);
    if (rc) fprintf(stderr, "model-bench: rank %d: step failed: %s\n", m->rank, err.msg);
    return rc;
}

static void *rank_main(void *p)
{
    rank_arg_t *a = p;
    const bench_opts_t *o = a->o;
    const epd_hf_config_t *c = &o->cfg;
    epd_err_t err = {0};
    ep_config_t ec;
    ep_config_init(&ec);
    ec.backend = EP_BACKEND_CUDA;
    ec.transport = EP_TRANSPORT_NVLINK;
    ec.num_experts = c->num_experts;
    ec.hidden = c->hidden_size;
    ec.num_topk = c->num_experts_per_tok;
    ec.ll_max_tokens = o->max_batch;
    ec.ht_max_tokens = o->ranks == 1 && o->max_prefill > o->max_batch ? o->max_prefill : 0;
    ec.device = 0;
    ec.num_sms = 24;
    ep_bootstrap_t bs;
    ep_inproc_bootstrap(a->world, a->rank, &bs);
    ep_group_t *g = NULL;
    ep_status_t st = ep_group_create(&ec, &bs, &g);
    if (st != EP_OK) {
        fprintf(stderr, "model-bench: rank %d: ep_group_create: %s\n", a->rank,
                ep_group_last_error(NULL));
        a->rc = 1;
        return NULL;
    }
    int maxB = 1;
    for (int i = 0; i < o->nbatches; i++)
        if (o->batches[i] > maxB) maxB = o->batches[i];
    int max_len = o->ctx + o->steps + 16 > o->prefill + 1 ? o->ctx + o->steps + 16 : o->prefill + 1;
    epd_model_opts_t mo = {
        .group = g,
        .max_seq_len = max_len,
        .device = 0,
        .max_seqs = maxB,
        .kv_block_size = EPD_KV_BLOCK_DEFAULT,
        .fp8_dispatch = o->fp8,
        .no_graphs = o->no_graphs,
    };
    /* blocks: each decode sequence holds nd, the prefill sequence (row 0, reused) np */
    const int bsz = EPD_KV_BLOCK_DEFAULT, nb = (max_len + bsz - 1) / bsz;
    const int nd = (o->ctx + o->steps + 16 + bsz - 1) / bsz, np = (o->prefill + 1 + bsz - 1) / bsz;
    const int kv_blocks = maxB * nd > np ? maxB * nd : np;
    cu_model_t *m = NULL;
    if (epd_cuda_model_create_random(&mo, c, 1234 + (uint64_t)a->rank, kv_blocks, &m, &err)) {
        fprintf(stderr, "model-bench: rank %d: %s\n", a->rank, err.msg);
        a->rc = 1;
        ep_group_destroy(g);
        return NULL;
    }
    /* KV content: random (attention costs the same whatever it holds) */
    epd_cu_fill_uniform_bf16(m->kv_block, m->kv_bytes / 2, 99, -1.0f, 1.0f, m->stream);
    cudaStreamSynchronize(m->stream);
    if (a->rank == 0) {
        printf("model %s: %d layers, hidden %d, %d experts top-%d (moe_inter %d), %d/%d heads of "
               "%d, vocab %d; %d rank(s) on one GPU\n",
               o->model, c->num_hidden_layers, c->hidden_size, c->num_experts,
               c->num_experts_per_tok, c->moe_intermediate_size, c->num_attention_heads,
               c->num_key_value_heads, c->head_dim, c->vocab_size, o->ranks);
        if (epd_hf_is_mla(c))
            printf("MLA: kv_lora %d, qk_nope %d, qk_rope %d, v %d, q_lora %d; %d shared experts, "
                   "first %d layer(s) dense (intermediate %d); latent cache %d bytes per position "
                   "and layer\n",
                   c->kv_lora_rank, c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim,
                   c->q_lora_rank, c->n_shared_experts, c->first_k_dense_replace,
                   c->intermediate_size, (c->kv_lora_rank + c->qk_rope_head_dim) * 2);
        printf("rank 0 holds: replicated %.2f GB, experts %.2f GB, KV %.2f GB (%d blocks), "
               "workspace %.2f GB; expert weights %s, fp8 dispatch %s, graphs %s\n",
               m->replicated_bytes / 1e9, m->expert_bytes / 1e9, m->kv_bytes / 1e9, m->num_blocks,
               m->ws_bytes / 1e9, c->fp8.on ? "fp8 (128x128 blocks)" : "bf16",
               o->fp8 ? "on" : "off", o->no_graphs ? "off" : "on");
        printf("\n| batch | ctx | ms/step (median) | p10 | p90 | tokens/s | HBM limit ms | "
               "%% of limit |\n|---|---|---|---|---|---|---|---|\n");
    }
    step_buf_t b = {.max_blocks = nb};
    size_t T = (size_t)(o->prefill > maxB ? o->prefill : maxB);
    b.tokens = calloc(T, 4);
    b.pos = calloc(T, 4);
    b.seq_idx = calloc(T, 4);
    b.seq_len = calloc((size_t)maxB, 4);
    b.rows = calloc((size_t)maxB, 4);
    b.block_table = calloc((size_t)maxB * nb, 4);
    b.sample = calloc((size_t)maxB, sizeof(epd_sample_params_t));
    int32_t *next = calloc((size_t)maxB, 4);
    double *times = calloc((size_t)o->steps, sizeof(double));
    for (int q = 0; q < maxB; q++)
        for (int j = 0; j < nd; j++)
            b.block_table[(size_t)q * nb + j] = q * nd + j;
    int rc = 0;
    for (int bi = 0; bi < o->nbatches && !rc; bi++) {
        int B = o->batches[bi];
        epd_step_t s = {
            .num_tokens = B,
            .tokens = b.tokens,
            .pos = b.pos,
            .seq_idx = b.seq_idx,
            .num_seqs = B,
            .seq_len = b.seq_len,
            .block_table = b.block_table,
            .max_blocks = nb,
            .num_logits = B,
            .logit_rows = b.rows,
            .sample = b.sample,
            .path = EPD_MOE_LL,
            .step_max_tokens = B,
        };
        int warm = 3;
        for (int it = 0; it < warm + o->steps && !rc; it++) {
            for (int i = 0; i < B; i++) {
                b.tokens[i] = (int32_t)((i * 7919 + it * 104729 + a->rank) % c->vocab_size);
                b.pos[i] = o->ctx + it;
                b.seq_idx[i] = i;
                b.seq_len[i] = o->ctx + it + 1;
                b.rows[i] = i;
                b.sample[i] = (epd_sample_params_t){.temperature = 0, .top_p = 1};
            }
            pthread_barrier_wait(a->bar);
            double t0 = now_s();
            rc = run_step(m, &b, &s, next);
            if (it >= warm) times[it - warm] = (now_s() - t0) * 1e3;
        }
        if (rc) break;
        if (o->profile) {
            m->profile = 1;
            memset(m->phase_ms, 0, sizeof(m->phase_ms));
            m->profiled_steps = 0;
            for (int it = 0; it < 5 && !rc; it++) {
                pthread_barrier_wait(a->bar);
                rc = run_step(m, &b, &s, next);
            }
            m->profile = 0;
        }
        if (a->rank == 0) {
            qsort(times, (size_t)o->steps, sizeof(double), cmp_d);
            double med = times[o->steps / 2],
                   lim = step_bytes(c, B, o->ctx) / (o->hbm_tbs * 1e12) * 1e3;
            printf("| %d | %d | %.2f | %.2f | %.2f | %.0f | %.2f | %.0f%% |\n", B, o->ctx, med,
                   times[o->steps / 10], times[o->steps * 9 / 10], B * o->ranks / med * 1e3, lim,
                   lim / med * 100);
            if (o->profile && m->profiled_steps) {
                double n = (double)m->profiled_steps;
                printf("|   phases, ms (eager, profiled) | norms %.2f | attn GEMMs %.2f | "
                       "attention %.2f | experts %.2f | routing+exchange %.2f | lm_head, "
                       "sampling, rest %.2f |\n",
                       m->phase_ms[0] / n, m->phase_ms[1] / n, m->phase_ms[2] / n,
                       m->phase_ms[3] / n, m->phase_ms[4] / n, m->phase_ms[5] / n);
            }
            fflush(stdout);
        }
    }
    /* prefill: one prompt in chunks of the model's largest step */
    if (!rc && o->prefill > 0) {
        int chunk = m->max_tokens < o->prefill ? m->max_tokens : o->prefill;
        for (int j = 0; j < np; j++)
            b.block_table[j] = j;
        double t0 = 0;
        int done = 0;
        pthread_barrier_wait(a->bar);
        t0 = now_s();
        while (done < o->prefill && !rc) {
            int n = o->prefill - done < chunk ? o->prefill - done : chunk;
            for (int i = 0; i < n; i++) {
                b.tokens[i] = (int32_t)(((done + i) * 7919 + a->rank) % c->vocab_size);
                b.pos[i] = done + i;
                b.seq_idx[i] = 0;
            }
            b.seq_len[0] = done + n;
            b.rows[0] = n - 1;
            b.sample[0] = (epd_sample_params_t){.temperature = 0, .top_p = 1};
            epd_step_t s = {
                .num_tokens = n,
                .tokens = b.tokens,
                .pos = b.pos,
                .seq_idx = b.seq_idx,
                .num_seqs = 1,
                .seq_len = b.seq_len,
                .block_table = b.block_table,
                .max_blocks = nb,
                .num_logits = 1,
                .logit_rows = b.rows,
                .sample = b.sample,
                .path = m->nranks > 1 ? EPD_MOE_LL : EPD_MOE_HT,
                .step_max_tokens = n,
            };
            rc = run_step(m, &b, &s, next);
            done += n;
        }
        double dt = now_s() - t0;
        if (!rc && a->rank == 0)
            printf("\nprefill: %d tokens in chunks of %d: %.1f ms, %.0f tokens/s per rank\n",
                   o->prefill, chunk, dt * 1e3, o->prefill / dt);
    }
    if (a->rank == 0)
        printf("\ngraph steps %llu, eager steps %llu, graphs %d\n",
               (unsigned long long)m->graph_steps, (unsigned long long)m->eager_steps,
               m->num_graphs);
    a->rc = rc;
    epd_cuda_model_destroy(m);
    ep_group_destroy(g);
    free(b.tokens), free(b.pos), free(b.seq_idx), free(b.seq_len), free(b.rows);
    free(b.block_table), free(b.sample), free(next), free(times);
    return NULL;
}

static int parse_list(const char *s, int *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

int main(int argc, char **argv)
{
    bench_opts_t o = {
        .ctx = 1024,
        .steps = 20,
        .prefill = 4096,
        .ranks = 1,
        .max_batch = 256,
        .max_prefill = 4096,
        .hbm_tbs = 4.8,
    };
    epd_hf_config_t *c = &o.cfg;
    o.model = presets[0].name;
    /* --model first: the other shape options override its fields */
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--model")) o.model = argv[i + 1];
    const struct preset *pr = NULL;
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
        if (!strcmp(presets[i].name, o.model)) pr = &presets[i];
    if (!pr) {
        fprintf(stderr, "model-bench: --model %s: not one of qwen3-30b-a3b, deepseek-v2-lite\n",
                o.model);
        return 2;
    }
    epd_err_t perr = {0};
    if (epd_hf_config_parse(pr->json, strlen(pr->json), pr->name, c, &perr)) {
        fprintf(stderr, "model-bench: preset %s: %s\n", pr->name, perr.msg);
        return 2;
    }
    o.nbatches = parse_list("1,8,64,256", o.batches, MAX_BATCHES);
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define INT_OPT(name, field)                                                                       \
    if (!strcmp(k, name) && v) {                                                                   \
        field = atoi(v);                                                                           \
        i++;                                                                                       \
        continue;                                                                                  \
    }
        INT_OPT("--ctx", o.ctx)
        INT_OPT("--steps", o.steps)
        INT_OPT("--prefill", o.prefill)
        INT_OPT("--ranks", o.ranks)
        INT_OPT("--max-batch", o.max_batch)
        INT_OPT("--max-prefill", o.max_prefill)
        INT_OPT("--layers", c->num_hidden_layers)
        INT_OPT("--hidden", c->hidden_size)
        INT_OPT("--experts", c->num_experts)
        INT_OPT("--topk", c->num_experts_per_tok)
        INT_OPT("--moe-inter", c->moe_intermediate_size)
        INT_OPT("--inter", c->intermediate_size)
        INT_OPT("--heads", c->num_attention_heads)
        INT_OPT("--kv-heads", c->num_key_value_heads)
        INT_OPT("--head-dim", c->head_dim)
        INT_OPT("--vocab", c->vocab_size)
#undef INT_OPT
        if (!strcmp(k, "--model") && v) {
            i++;
        } else if (!strcmp(k, "--batches") && v) {
            o.nbatches = parse_list(v, o.batches, MAX_BATCHES);
            i++;
        } else if (!strcmp(k, "--hbm-tbs") && v) {
            o.hbm_tbs = atof(v);
            i++;
        } else if (!strcmp(k, "--weights") && v && (!strcmp(v, "fp8") || !strcmp(v, "bf16"))) {
            c->fp8.on = !strcmp(v, "fp8");
            c->fp8.block_n = c->fp8.block_k = 128;
            i++;
        } else if (!strcmp(k, "--fp8")) {
            o.fp8 = 1;
        } else if (!strcmp(k, "--no-graphs")) {
            o.no_graphs = 1;
        } else if (!strcmp(k, "--profile")) {
            o.profile = 1;
        } else {
            fprintf(stderr,
                    "model-bench: unknown or incomplete option '%s' (see the header of "
                    "model/cuda/model_bench.c)\n",
                    k);
            return 2;
        }
    }
    int maxB = 0;
    for (int i = 0; i < o.nbatches; i++)
        if (o.batches[i] > maxB) maxB = o.batches[i];
    if (o.nbatches < 1 || o.ranks < 1 || o.ranks > 8 || o.steps < 1 || o.ctx < 1 ||
        maxB > o.max_batch || c->num_experts % o.ranks) {
        fprintf(stderr,
                "model-bench: bad options: batches (each <= --max-batch %d), ranks "
                "dividing the experts, steps and ctx >= 1\n",
                o.max_batch);
        return 2;
    }
    setenv("CUDA_MODULE_LOADING", "EAGER", 0); /* as epd does: see daemon/epd.c */
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "model-bench: no CUDA device present\n");
        return 77;
    }
    ep_inproc_world_t *w = NULL;
    if (ep_inproc_world_create(o.ranks, &w) != EP_OK) return 1;
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)o.ranks);
    rank_arg_t args[8];
    pthread_t th[8];
    for (int r = 0; r < o.ranks; r++) {
        args[r] = (rank_arg_t){.o = &o, .world = w, .bar = &bar, .rank = r};
        pthread_create(&th[r], NULL, rank_main, &args[r]);
    }
    int rc = 0;
    for (int r = 0; r < o.ranks; r++) {
        pthread_join(th[r], NULL);
        rc |= args[r].rc;
    }
    ep_inproc_world_destroy(w);
    return rc;
}
