/* Internal state of the serving engine, shared by its files: engine.c (the loop side: create,
 * destroy, submit and cancel, wake and peer-down notices, status, metrics, and the hand-over of
 * results to the loop), engine_step.c (the rank thread's lockstep loop: admitting requests,
 * planning a batch, steps, sampling, ending requests) and engine_group.c (forming and
 * re-forming the EP group: bootstrap, group creation, the join, re-formation after a failure,
 * and the rank thread's body). Not a public interface. */
#ifndef EPD_ENGINE_INT_H
#define EPD_ENGINE_INT_H

#include "hf_config.h"
#include "epd_clock.h"
#include "placement.h"
#include "model.h"

#include "engine.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define SUB "engine"
/* Window of the tokens/s gauge, in 1-second samples. */
#define RATE_WINDOW_S 10
/* Messages that quote a model error (EPD_ERR_MSG_MAX) with a prefix. */
#define MSG_MAX 1024

typedef struct rank rank_t;

struct epd_engine_req {
    epd_engine_t *e;
    epd_engine_cb cb;
    void *arg;
    int32_t *toks;   /* [prompt_len + max_tokens]: the prompt, then the generated tokens */
    int32_t *prompt; /* = toks */
    int prompt_len, max_tokens, stream;
    int num_stop_ids;
    int32_t stop_ids[EPD_ENGINE_MAX_EOS];
    epd_sample_params_t sample; /* counter set per step (r->ngen) */
    atomic_int cancelled;
    epd_engine_req_t *next; /* inbox link */
    int64_t t_submit_ns;
    /* owned by the rank thread until the final event */
    epd_seq_t *seq;
    /* fed: tokens of toks in the sequence; the request wants its next token once all of
     * toks[0 .. prompt_len + ngen) are (after a preemption it prefills them again) */
    int fed, ngen, done;
    int32_t *out; /* = toks + prompt_len: [max_tokens] */
    epd_finish_t finish;
    int status;
    char error[512];
};

/* The engine's bootstrap collectives all carry this word, tagged with their purpose, so that
 * ranks at different points of the protocol (one joining a group, one stepping) see it at once
 * and say so, instead of exchanging data they would misread. */
typedef struct ctl_word {
    int32_t purpose; /* CTL_JOIN or CTL_STEP */
    int32_t pending, woke, stop;
    int32_t failed; /* CTL_STEP: this rank's step failed; CTL_JOIN: a join_status */
    int32_t tokens; /* CTL_STEP: tokens of this rank's planned batch */
} ctl_word_t;

#define CTL_JOIN 0x4a4f494e /* "JOIN": the last collective of every group formation */
#define CTL_STEP 0x53544550 /* "STEP": the per-step control word */

/* What a rank brings to the join of a new group. */
enum join_status {
    JOIN_OK = 0,
    JOIN_LOAD_FAILED = 1, /* first formation: this rank could not load its part of the model */
    JOIN_FORM_FAILED = 2, /* this attempt's group could not be created or attached */
};

struct rank {
    epd_engine_t *e;
    int local, grank;
    pthread_t th;
    int started;
    ep_bootstrap_t bs;
    int have_bs;
    unsigned epoch;
    ep_config_t epcfg;
    ep_group_t *group; /* swapped under e->mu (peer_down aborts it from another thread) */
    epd_model_t *model;
    /* under e->mu */
    epd_engine_req_t *inbox_head, *inbox_tail;
    int inbox_n, nactive, abort_flag, in_reform;
    /* rank thread only */
    epd_engine_req_t **act;
    int act_n, cap;
    /* finalized this pass, not yet posted: the loop thread frees a request once its final
     * event arrives, so it is posted only after compact() dropped it from act */
    epd_engine_req_t **fin;
    int fin_n;
    uint64_t last_gen;
    int fail_flag, reform;
    /* this group has no data-plane allgather (EP_ERR_UNSUPPORTED): its step words go through
     * the bootstrap; cleared whenever a group is formed */
    int ctl_on_bootstrap;
    int32_t *next;           /* [max_batch_tokens] sampled tokens of a step */
    epd_batch_item_t *items; /* the planned batch: n_items, prompt_tokens of tokens */
    int *item_req;
    int n_items, tokens, prompt_tokens;
    ctl_word_t *ctl_all;
    uint64_t *exp_prev, *exp_now;
    uint64_t preemptions; /* rank thread writes, status reads (approximate) */
    epd_model_mem_t mem;  /* under e->mu: after the load and each step, for status */
    epd_metric_t *m_kv_total, *m_kv_free, *m_kv_bytes, *m_ws_bytes;
    /* load progress, from the loading thread; read by status */
    _Atomic uint64_t load_done, load_total;
    int load_decile;
    int load_rc;
    char load_msg[MSG_MAX];
};

typedef struct out_ev {
    epd_engine_req_t *r;
    int final;
    int32_t token;
    int index;
} out_ev_t;

struct epd_engine {
    uv_loop_t *loop;
    uv_async_t async;
    uv_timer_t rate_timer;
    int handles_open;
    char model_path[4096];
    int R, rank_base, nranks, max_batch_tokens, max_prefill_tokens, max_seq_len, timeout_ms,
        max_queue;
    epd_metrics_t *metrics;
    epd_state_t *state;
    int state_id;
    epd_engine_cluster_t cluster;
    int have_cluster;
    ep_inproc_world_t *world;
    epd_hf_config_t hf;
    epd_model_placement_t placement;
    int explicit_placement;
    rank_t *ranks;
    void (*on_loaded)(void *arg, int status, const char *msg);
    void *on_loaded_arg;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t gen;
    int stop, queued, active, loaded, load_failed, load_reported, n_reforming;
    char load_msg[MSG_MAX];
    atomic_int ready;
    uint64_t steps, step_failures, reforms;
    /* step control words exchanged by rank 0 of this node, by plane (engine_step.c) */
    _Atomic uint64_t ctl_data, ctl_bootstrap;
    char last_failure[MSG_MAX];
    long long last_failure_time;

    pthread_mutex_t ob_mu;
    out_ev_t *ob;
    int ob_n, ob_cap;

    epd_engine_info_t info;
    int info_ok;

    epd_metric_t *m_step, *m_queue, *m_active, *m_gen, *m_prompt, *m_ttft, *m_rate;
    epd_metric_t *m_step_fail, *m_reform, *m_batch, *m_preempt, *m_ctl_data, *m_ctl_boot;
    epd_backend_t backend;
    int max_seqs; /* model.max_seqs_per_rank */
    int *gpus;    /* compute.gpus (cuda), [R] */
    int kv_block_size, kv_blocks, kv_memory_fraction_set;
    double kv_memory_fraction;
    int cuda_graphs, fp8_dispatch;
    epd_metric_t **m_expert; /* [E] */
    double rate_ring[RATE_WINDOW_S + 1];
    int rate_n;
};

static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* engine.c: hands an event to the loop (any thread; a final event frees the request there) */
void eng_post(epd_engine_t *e, epd_engine_req_t *r, int final, int32_t token, int index);

/* engine_step.c */
/* Records a failure for /v1/status and the step-failure counter (any thread). */
void eng_health_event(epd_engine_t *e, const char *msg);
/* The rank's lockstep loop, until the engine stops. */
void eng_serve(rank_t *rk);

/* engine_group.c */
const char *eng_ctl_purpose_name(int32_t p);
void eng_tag(rank_t *rk, const char *what);
int eng_reform(rank_t *rk);
void *eng_rank_main(void *arg);

#endif /* EPD_ENGINE_INT_H */
