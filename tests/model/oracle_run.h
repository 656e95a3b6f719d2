/* The oracle workload shared by the in-process (threads) and multi-process (tcp) tests: the
 * transformers reference (oracle/expected.json), and one rank's part of generating it with the
 * model: prompts dealt round-robin over the ranks, prefill in chunks packed with other
 * sequences' decode tokens, every rank stepping the same number of times; before each step the
 * ranks allgather their batch sizes over the bootstrap (as the engine's control word does) and
 * pass the largest to epd_model_forward_step, which picks LL or HT from it. */
#ifndef EPD_TEST_ORACLE_RUN_H
#define EPD_TEST_ORACLE_RUN_H

#include "epd_err.h"
#include "placement.h"
#include "model.h"

#include <stdint.h>

#define ORACLE_MAX_CASES 8
#define ORACLE_MAX_PROMPT 96
#define ORACLE_MAX_NEW 32

typedef struct oracle_case {
    int prompt_len;
    int32_t prompt[ORACLE_MAX_PROMPT];
    int32_t tokens[ORACLE_MAX_NEW]; /* transformers' greedy continuation */
    float *logits;                  /* [new_tokens][vocab] */
} oracle_case_t;

typedef struct oracle {
    int num_cases, new_tokens, vocab;
    oracle_case_t cases[ORACLE_MAX_CASES];
} oracle_t;

/* Reads dir/expected.json. */
int oracle_load(const char *dir, oracle_t *o, epd_err_t *err);
void oracle_free(oracle_t *o);

/* How a run batches. */
typedef struct oracle_opts {
    int chunk;   /* ll_max_tokens: tokens per rank of an LL step */
    int prefill; /* ht_max_tokens when above chunk (else HT is off): tokens per rank and step */
    int ht_min;  /* the model's ht_min_tokens (0: chunk + 1) */
    int stagger; /* case c joins its rank's work at step c * stagger (0: all at once) */
    int kv_block_size;           /* the model's (0: its default) */
    int kv_blocks;               /* the pool's size (0: the default, room for every sequence) */
    epd_model_backend_t backend; /* EPD_MODEL_CPU or EPD_MODEL_CUDA (the group follows it) */
    int device;                  /* cuda: the GPU of every rank (they share it) */
    int no_graphs;               /* cuda: eager decode steps */
    int fp8_dispatch;            /* cuda: LL dispatch in fp8 */
} oracle_opts_t;

/* What a run produced, for every case (filled for the cases of the ranks that ran them). */
typedef struct oracle_result {
    int32_t tokens[ORACLE_MAX_CASES][ORACLE_MAX_NEW];
    float *logits[ORACLE_MAX_CASES]; /* [new_tokens][vocab], caller-allocated */
    epd_model_mem_t mem;             /* of the rank that wrote it */
    /* of the rank that wrote it: steps on each path; HT steps in which this rank had only
     * decode tokens, and HT steps in which it had none */
    int steps_ll, steps_ht, ht_decode_only, ht_idle;
} oracle_result_t;

/* One rank: creates the group (ep_config from the model and opts), loads the model from dir,
 * generates its cases greedily (the model samples with temperature 0; its tokens must be the
 * argmax of the logits it returns), frees each case's sequence as it ends, and checks that the
 * KV pool is whole again at the end; writes tokens/logits of its cases into res. Every rank must
 * call it with the same arguments except bs and res. */
int oracle_run_rank(const char *dir, const oracle_t *o, const ep_bootstrap_t *bs,
                    ep_transport_kind_t transport, const epd_model_placement_t *placement,
                    const oracle_opts_t *opts, oracle_result_t *res, epd_err_t *err);

/* The same workload on R ranks as threads of this process (libep's in-process bootstrap, R <=
 * ORACLE_MAX_RANKS): res[r] gets rank r's results (the caller sets its logits pointers), rc[r]
 * and err[r] its status. Returns 0, or -1 if the threads could not be set up. */
#define ORACLE_MAX_RANKS 4
int oracle_run_threads(const char *dir, const oracle_t *o, int R,
                       const epd_model_placement_t *placement, const oracle_opts_t *opts,
                       oracle_result_t *res, int *rc, epd_err_t *err);

#endif /* EPD_TEST_ORACLE_RUN_H */
