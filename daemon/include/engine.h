/* The serving engine of epd: loads the checkpoint on this node's ranks (one thread per rank),
 * joins them into the EP group, and runs lockstep steps (prefill + decode, continuous batching,
 * sampling in the model) for the requests that the HTTP API submits from the libuv loop. A step
 * whose largest rank batch exceeds model.max_batch_tokens takes libep's HT path (prompts in chunks
 * of up to model.max_prefill_tokens); other steps take the LL path.
 *
 * Threads: the loop submits and cancels; each rank thread owns the sequences placed on it and
 * calls the model; results come back to the loop through a uv_async_t (no libuv call is made
 * from a rank thread). Every rank joins every step (zero tokens if it has none); ranks agree on
 * "step, sleep or stop" through one small bootstrap allgather per step, and sleep on a
 * condition variable while the whole group is idle. */
#ifndef EPD_ENGINE_H
#define EPD_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "ep.h"
#include "epd_err.h"
#include "epd_config.h"
#include "metrics.h"
#include "state.h"

struct cJSON;

/* EOS ids read from config.json's eos_token_id (an id or a list). */
#define EPD_ENGINE_MAX_EOS 8

typedef struct epd_engine epd_engine_t;
typedef struct epd_engine_req epd_engine_req_t;

/* How this node's ranks join the cluster-wide EP group: implemented by the control plane for
 * several nodes. Without it (NULL in the options) the node runs compute.ranks_per_node ranks
 * alone, joined by libep's in-process bootstrap. */
typedef struct epd_engine_cluster {
    int rank_base; /* global rank of this node's first rank */
    int nranks;    /* ranks in the whole group (this node's ranks_per_node included) */
    /* Fills the bootstrap of local rank `local` (global rank rank_base + local), from that
     * rank's thread; called once before the first group and again before every re-formed
     * group (`epoch` counts them from 0). The bootstrap's allgather also carries the engine's
     * per-step control word where the EP group has no data-plane allgather
     * (ep_group_allgather), so it must stay usable until the next call. Returns 0 or a
     * negative errno value with a message in err. */
    int (*bootstrap)(void *ctx, int local, unsigned epoch, ep_bootstrap_t *out, epd_err_t *err);
    /* This node got work while the group may be asleep: make every other node call
     * epd_engine_wake. Called from the loop thread; must not block. */
    void (*wake_peers)(void *ctx);
    /* Optional: names the collectives a rank runs through `bs` from now on ("engine: join",
     * "libep: group creation", ...), from that rank's thread, so that ranks found at different
     * points of the protocol are reported as such. `what` is a string literal. Also called
     * with "engine: step" as a rank starts a step's forward pass, once every rank agreed on the
     * step (its exchanges run on libep's data plane; the next bootstrap collective is tagged
     * anew). */
    void (*purpose)(void *ctx, const ep_bootstrap_t *bs, const char *what);
    void *ctx;
} epd_engine_cluster_t;

typedef struct epd_engine_opts {
    uv_loop_t *loop;
    /* model.* (model.max_queued_requests bounds the requests waiting for a rank: beyond it
     * submit refuses with -EAGAIN), compute.ranks_per_node, timeouts.ep_op_ms */
    const epd_config_t *cfg;
    epd_metrics_t *metrics;
    epd_state_t *state;                  /* the engine registers component "engine" */
    const epd_engine_cluster_t *cluster; /* NULL: this node alone */
    /* Once, from the loop, when every rank has loaded its part (status 0) or the load failed
     * (negative, msg names the file/tensor/rank). */
    void (*on_loaded)(void *arg, int status, const char *msg);
    void *arg;
} epd_engine_opts_t;

/* Starts the rank threads, which create the group and load the checkpoint in the background.
 * Returns 0 or a negative errno value (err says why). */
int epd_engine_create(const epd_engine_opts_t *o, epd_engine_t **out, epd_err_t *err);
/* From the loop: stops the ranks (every pending request ends with an error event, delivered
 * before this returns) and releases the engine as its async handle closes. */
void epd_engine_destroy(epd_engine_t *e);
/* Any thread: a peer node has work (see epd_engine_cluster_t.wake_peers). */
void epd_engine_wake(epd_engine_t *e);
/* Any thread: the control plane saw global rank `rank` fail. Aborts the group's waits; the
 * step in flight fails its requests and the ranks re-form the group. */
void epd_engine_peer_down(epd_engine_t *e, int rank, const char *why);

/* What the API needs to validate a request; valid once loaded. */
typedef struct epd_engine_info {
    char model_id[128]; /* the checkpoint directory's name */
    const char *model_type;
    int vocab_size;
    int max_seq_len; /* prompt + completion */
    int num_eos;
    int32_t eos[EPD_ENGINE_MAX_EOS];
    long long created; /* unix time of the load */
    int kv_block_size; /* tokens per KV block */
    int kv_blocks;     /* KV blocks of the smallest pool of this node's ranks */
} epd_engine_info_t;

/* NULL until loaded. */
const epd_engine_info_t *epd_engine_info(const epd_engine_t *e);
/* Model, placement and memory per rank, queue and sequences: for /v1/status. */
struct cJSON *epd_engine_status_cjson(epd_engine_t *e);

/* ---- requests ---- */

typedef struct epd_gen_params {
    const int32_t *prompt; /* [prompt_len], copied */
    int prompt_len;
    int max_tokens; /* prompt_len + max_tokens <= max_seq_len */
    float temperature;
    float top_p;
    int top_k;
    uint64_t seed;
    int stream; /* deliver a token event per generated token */
    /* Ids that end this request like the model's EOS ids do (e.g. the tokenizer's
     * generation_config.json eos_token_id); at most EPD_ENGINE_MAX_EOS, copied. */
    const int32_t *stop_ids;
    int num_stop_ids;
} epd_gen_params_t;

typedef enum epd_finish {
    EPD_FINISH_LENGTH = 0, /* max_tokens (or max_seq_len) reached */
    EPD_FINISH_STOP,       /* an EOS id was generated */
    EPD_FINISH_CANCELLED,  /* epd_engine_cancel */
    EPD_FINISH_ERROR,      /* see status/error */
} epd_finish_t;

typedef struct epd_engine_event {
    int final; /* 0: one generated token (streaming); 1: the request ended */
    int32_t token;
    int index; /* of the token in the completion */
    /* final only */
    epd_finish_t finish;
    int status;            /* EPD_FINISH_ERROR: the HTTP status it maps to (500, 503) */
    const char *error;     /* EPD_FINISH_ERROR: what failed */
    const int32_t *tokens; /* every generated token */
    int num_tokens;
    int prompt_tokens;
} epd_engine_event_t;

/* Called on the loop thread. After the final event the request is gone. */
typedef void (*epd_engine_cb)(void *arg, const epd_engine_event_t *ev);

/* From the loop. Returns 0, -EBUSY (not ready: loading, or re-forming the group), -EAGAIN
 * (queue full), -EINVAL (bad parameters; the API validates first), -E2BIG (prompt + max_tokens
 * need more KV blocks than a rank's whole pool: epd_engine_kv_blocks_for says how many) or
 * -ENOMEM. cb gets exactly one final event for an accepted request.
 *
 * KV: a rank admits a queued request when its pool has free blocks for the prompt (+1 token)
 * beyond what its running sequences need next; when decode growth needs more blocks than are
 * free, the most recently admitted requests are preempted (their blocks freed) and requeued at
 * the front, to prefill prompt + generated tokens again later (tokens already delivered are not
 * delivered twice). */
int epd_engine_submit(epd_engine_t *e, const epd_gen_params_t *p, epd_engine_cb cb, void *arg,
                      epd_engine_req_t **out);
/* KV blocks a request of prompt_len + max_tokens tokens needs at most (after the load). */
int epd_engine_kv_blocks_for(const epd_engine_t *e, int prompt_len, int max_tokens);
/* From the loop: ends the request as soon as its rank sees it (its KV cache is freed); the
 * final event (EPD_FINISH_CANCELLED, or whatever came first) still arrives. */
void epd_engine_cancel(epd_engine_req_t *r);

#endif /* EPD_ENGINE_H */
