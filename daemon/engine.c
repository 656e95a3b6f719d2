/* The serving engine: rank threads that load the checkpoint and run lockstep steps, the
 * scheduler that places requests on ranks, and the hand-over of results to the libuv loop.
 *
 * Step protocol (every rank, every iteration):
 *   1. under the engine lock: sleep while the group is idle and nothing woke us; take new
 *      requests from this rank's inbox; note whether a wake arrived since the last iteration;
 *   2. plan this rank's batch (decode tokens, then prompt chunks) and allgather a control word
 *      {pending sequences, woke, stop, failed, planned tokens} over the bootstrap;
 *   3. all ranks see the same words and decide alike: stop; re-form the group (a rank failed);
 *      sleep (nothing pending anywhere and no fresh wake); or step, with zero tokens if this
 *      rank has none. The largest planned batch picks the step's MoE path for every rank: LL,
 *      or HT when some rank prefills more than model.max_batch_tokens tokens.
 * A wake that lands after a rank's snapshot changes the generation that rank sleeps on, and a
 * wake seen by some ranks only is reported (woke) so that nobody sleeps on it: no rank is left
 * alone in a collective, and none misses a request. */
#include "hf_config.h"
#include "placement.h"
#include "qwen3_moe.h"
#include "safetensors.h"
#include "sampler.h"

#include "engine.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

#define SUB "engine"
/* Idle ranks re-check the stop flag this often (a wake or stop signals them at once anyway). */
#define IDLE_RECHECK_MS 1000
/* Pause between attempts to re-form a group whose creation failed. */
#define REFORM_RETRY_MS 200
/* How long the ranks of a forming group wait in the join for the slowest one: a node that just
 * (re)started loads its part of the checkpoint while the others wait for it. */
#define JOIN_WAIT_MS 300000u
/* Window of the tokens/s gauge, in 1-second samples. */
#define RATE_WINDOW_S 10
/* Messages that quote a model error (EPD_ERR_MSG_MAX) with a prefix. */
#define MSG_MAX 1024

typedef struct rank rank_t;

struct epd_engine_req {
    epd_engine_t *e;
    epd_engine_cb cb;
    void *arg;
    int32_t *prompt;
    int prompt_len, max_tokens, stream;
    int num_stop_ids;
    int32_t stop_ids[EPD_ENGINE_MAX_EOS];
    epd_sampler_t sampler;
    atomic_int cancelled;
    epd_engine_req_t *next; /* inbox link */
    int64_t t_submit_ns;
    /* owned by the rank thread until the final event */
    epd_seq_t *seq;
    int fed, ngen, done;
    int32_t *out; /* [max_tokens] */
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
    float *logits;
    epd_batch_item_t *items; /* the planned batch: n_items, prompt_tokens of tokens */
    int *item_req;
    int n_items, tokens, prompt_tokens;
    ctl_word_t *ctl_all;
    uint64_t *exp_prev, *exp_now;
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
    char last_failure[MSG_MAX];
    long long last_failure_time;

    pthread_mutex_t ob_mu;
    out_ev_t *ob;
    int ob_n, ob_cap;

    epd_engine_info_t info;
    int info_ok;

    epd_metric_t *m_step, *m_queue, *m_active, *m_gen, *m_prompt, *m_ttft, *m_rate;
    epd_metric_t *m_step_fail, *m_reform;
    epd_metric_t **m_expert; /* [E] */
    double rate_ring[RATE_WINDOW_S + 1];
    int rate_n;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void deadline_after(struct timespec *ts, unsigned ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- hand-over to the loop ---------------------------------------------------------------- */

static void post(epd_engine_t *e, epd_engine_req_t *r, int final, int32_t token, int index)
{
    pthread_mutex_lock(&e->ob_mu);
    if (e->ob_n == e->ob_cap) {
        int cap = e->ob_cap ? 2 * e->ob_cap : 64;
        out_ev_t *n = realloc(e->ob, sizeof(*n) * (size_t)cap);
        if (!n) {
            /* a token event can be dropped (the final one carries every token); a final one
             * cannot: wait for the loop to drain the queue */
            pthread_mutex_unlock(&e->ob_mu);
            if (!final) return;
            uv_async_send(&e->async);
            sleep_ms(10);
            post(e, r, final, token, index);
            return;
        }
        e->ob = n;
        e->ob_cap = cap;
    }
    e->ob[e->ob_n++] = (out_ev_t){r, final, token, index};
    pthread_mutex_unlock(&e->ob_mu);
    uv_async_send(&e->async);
}

static void free_req(epd_engine_req_t *r)
{
    if (!r) return;
    epd_sampler_fini(&r->sampler);
    epd_seq_destroy(r->seq);
    free(r->prompt);
    free(r->out);
    free(r);
}

static void deliver(epd_engine_t *e, const out_ev_t *o)
{
    epd_engine_req_t *r = o->r;
    epd_engine_event_t ev = {.final = o->final, .token = o->token, .index = o->index};
    if (o->final) {
        ev.finish = r->finish;
        ev.status = r->status;
        ev.error = r->error;
        ev.tokens = r->out;
        ev.num_tokens = r->ngen;
        ev.prompt_tokens = r->prompt_len;
    }
    r->cb(r->arg, &ev);
    if (o->final) free_req(r);
}

static void drain_outbox(epd_engine_t *e)
{
    for (;;) {
        pthread_mutex_lock(&e->ob_mu);
        out_ev_t *batch = e->ob;
        int n = e->ob_n;
        e->ob = NULL;
        e->ob_n = e->ob_cap = 0;
        pthread_mutex_unlock(&e->ob_mu);
        if (n == 0) {
            free(batch);
            return;
        }
        for (int i = 0; i < n; i++)
            deliver(e, &batch[i]);
        free(batch);
    }
}

static void on_async(uv_async_t *h)
{
    epd_engine_t *e = h->data;
    pthread_mutex_lock(&e->mu);
    int report = !e->load_reported && (e->loaded == e->R || e->load_failed);
    int failed = e->load_failed;
    char msg[MSG_MAX];
    snprintf(msg, sizeof(msg), "%s", e->load_msg);
    if (report) e->load_reported = 1;
    pthread_mutex_unlock(&e->mu);
    if (report && e->on_loaded) e->on_loaded(e->on_loaded_arg, failed ? -EIO : 0, msg);
    drain_outbox(e);
}

/* ---- requests on a rank ------------------------------------------------------------------- */

/* Ends a request on its rank thread: frees its KV cache, posts the final event. */
static void finalize(rank_t *rk, epd_engine_req_t *r, epd_finish_t why, int status, const char *fmt,
                     ...) __attribute__((format(printf, 5, 6)));

static void finalize(rank_t *rk, epd_engine_req_t *r, epd_finish_t why, int status, const char *fmt,
                     ...)
{
    epd_engine_t *e = rk->e;
    r->finish = why;
    r->status = status;
    r->error[0] = 0;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->error, sizeof(r->error), fmt, ap);
        va_end(ap);
    }
    epd_seq_destroy(r->seq);
    r->seq = NULL;
    r->done = 1;
    pthread_mutex_lock(&e->mu);
    rk->nactive--;
    e->active--;
    epd_metric_set(e->m_active, e->active);
    pthread_mutex_unlock(&e->mu);
    rk->fin[rk->fin_n++] = r; /* posted by compact() */
}

/* Drops finished requests from act, then hands their final events to the loop (which frees
 * them): every finalize() is followed by a compact() in the same pass. */
static void compact(rank_t *rk)
{
    int k = 0;
    for (int i = 0; i < rk->act_n; i++)
        if (!rk->act[i]->done) rk->act[k++] = rk->act[i];
    rk->act_n = k;
    for (int i = 0; i < rk->fin_n; i++)
        post(rk->e, rk->fin[i], 1, 0, 0);
    rk->fin_n = 0;
}

static void fail_all(rank_t *rk, int status, const char *msg)
{
    for (int i = 0; i < rk->act_n; i++)
        if (!rk->act[i]->done) finalize(rk, rk->act[i], EPD_FINISH_ERROR, status, "%.900s", msg);
    compact(rk);
}

static void health_event(epd_engine_t *e, const char *msg)
{
    pthread_mutex_lock(&e->mu);
    snprintf(e->last_failure, sizeof(e->last_failure), "%.900s", msg);
    e->last_failure_time = (long long)time(NULL);
    e->step_failures++;
    pthread_mutex_unlock(&e->mu);
    epd_metric_add(e->m_step_fail, 1);
}

/* ---- one step ----------------------------------------------------------------------------- */

static int is_eos(const epd_engine_t *e, const epd_engine_req_t *r, int32_t t)
{
    for (int i = 0; i < e->info.num_eos; i++)
        if (e->info.eos[i] == t) return 1;
    for (int i = 0; i < r->num_stop_ids; i++)
        if (r->stop_ids[i] == t) return 1;
    return 0;
}

static void account_experts(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    epd_model_expert_tokens(rk->model, rk->exp_now);
    for (int x = 0; x < e->hf.num_experts; x++) {
        uint64_t d = rk->exp_now[x] - rk->exp_prev[x];
        if (d) epd_metric_add(e->m_expert[x], (double)d);
        rk->exp_prev[x] = rk->exp_now[x];
    }
}

/* Plans this rank's batch before the step's control word (which carries its size). */
static void plan_step(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    /* with HT on, prompt chunks fill up to max_prefill_tokens (decode tokens alone stay below
     * max_batch_tokens, see cap: LL) */
    const int total =
        e->max_prefill_tokens > e->max_batch_tokens ? e->max_prefill_tokens : e->max_batch_tokens;
    int budget = total, n = 0;
    /* decode tokens first (latency of running sequences), then prefill chunks in arrival
     * order with what is left of the budget */
    for (int i = 0; i < rk->act_n && budget > 0; i++) {
        epd_engine_req_t *r = rk->act[i];
        if (r->fed < r->prompt_len) continue;
        rk->items[n] = (epd_batch_item_t){r->seq, &r->out[r->ngen - 1], 1, 1};
        rk->item_req[n++] = i;
        budget--;
    }
    int prompt_tokens = 0;
    for (int i = 0; i < rk->act_n && budget > 0; i++) {
        epd_engine_req_t *r = rk->act[i];
        if (r->fed >= r->prompt_len) continue;
        int c = r->prompt_len - r->fed < budget ? r->prompt_len - r->fed : budget;
        rk->items[n] =
            (epd_batch_item_t){r->seq, r->prompt + r->fed, c, r->fed + c == r->prompt_len};
        rk->item_req[n++] = i;
        budget -= c;
        prompt_tokens += c;
    }
    rk->n_items = n;
    rk->prompt_tokens = prompt_tokens;
    rk->tokens = total - budget;
}

/* Runs the planned batch; step_max is the largest planned batch of any rank. */
static void step(rank_t *rk, int step_max)
{
    epd_engine_t *e = rk->e;
    int n = rk->n_items, prompt_tokens = rk->prompt_tokens;
    epd_err_t err = {0};
    int64_t t0 = now_ns();
    int rc = epd_model_forward_step(rk->model, rk->items, n, step_max, rk->logits, &err);
    double dt = (double)(now_ns() - t0) * 1e-9;
    if (rk->local == 0) {
        epd_metric_observe(e->m_step, dt);
        pthread_mutex_lock(&e->mu);
        e->steps++;
        pthread_mutex_unlock(&e->mu);
    }
    if (rc) {
        /* the EP exchange failed (timeout, peer gone, aborted): the group must be re-formed;
         * anything else is a bad batch on this rank that the other ranks did not notice */
        int ep_fail = rc == -ETIMEDOUT || rc == -EIO;
        char msg[MSG_MAX];
        snprintf(msg, sizeof(msg), "step failed on rank %d: %s", rk->grank, err.msg);
        EPD_ERROR(SUB, "%s (%d request(s) failed)", msg, n);
        health_event(e, msg);
        for (int i = 0; i < n; i++) {
            epd_engine_req_t *r = rk->act[rk->item_req[i]];
            if (!r->done) finalize(rk, r, EPD_FINISH_ERROR, ep_fail ? 503 : 500, "%.900s", msg);
        }
        compact(rk);
        if (ep_fail) rk->fail_flag = 1;
        return;
    }
    account_experts(rk);
    if (prompt_tokens) epd_metric_add(e->m_prompt, prompt_tokens);
    int generated = 0;
    for (int i = 0, row = 0; i < n; i++) {
        epd_engine_req_t *r = rk->act[rk->item_req[i]];
        int prefill = r->fed < r->prompt_len;
        if (prefill) r->fed += rk->items[i].num_tokens;
        if (!rk->items[i].want_logits) continue;
        const float *lg = rk->logits + (size_t)row++ * (size_t)e->hf.vocab_size;
        int32_t tok = epd_sampler_pick(&r->sampler, lg);
        r->out[r->ngen++] = tok;
        generated++;
        if (r->ngen == 1) epd_metric_observe(e->m_ttft, (double)(now_ns() - r->t_submit_ns) * 1e-9);
        if (r->stream) post(e, r, 0, tok, r->ngen - 1);
        if (is_eos(e, r, tok))
            finalize(rk, r, EPD_FINISH_STOP, 0, NULL);
        else if (r->ngen >= r->max_tokens || r->prompt_len + r->ngen >= e->max_seq_len)
            finalize(rk, r, EPD_FINISH_LENGTH, 0, NULL);
    }
    if (generated) epd_metric_add(e->m_gen, generated);
    compact(rk);
}

/* ---- group (re)formation ------------------------------------------------------------------ */

/* Every formation of the group, the first (with the model load) and each re-formation after a
 * failure, runs the same collectives on every rank, so that a rank that restarts with its node
 * meets the ranks that survived at the same place:
 *   1. the bootstrap of the current cluster epoch (get_bootstrap);
 *   2. libep's collectives of ep_group_create;
 *   3. (first formation only, no collective) the model load; later ones attach the new group;
 *   4. the join: one CTL_JOIN word per rank, saying whether that rank loaded and attached;
 *   5. steps: one CTL_STEP word per step.
 * The join is where ranks wait for a peer that is still reading its checkpoint (JOIN_WAIT_MS);
 * no rank serves before every rank of the group has joined. */

static const char *ctl_purpose_name(int32_t p)
{
    return p == CTL_JOIN   ? "the group's join word"
           : p == CTL_STEP ? "a step's control word"
                           : "an unknown word";
}

/* Names what the rank's next bootstrap collectives are for (see epd_engine_cluster_t). */
static void tag(rank_t *rk, const char *what)
{
    epd_engine_t *e = rk->e;
    if (e->have_cluster && e->cluster.purpose && rk->have_bs)
        e->cluster.purpose(e->cluster.ctx, &rk->bs, what);
}

/* ep_group_destroy runs a barrier through the group's bootstrap. */
static void destroy_group(rank_t *rk, ep_group_t *g)
{
    if (!g) return;
    tag(rk, "libep: group teardown");
    ep_group_destroy(g);
}

static int get_bootstrap(rank_t *rk, char *msg, size_t len)
{
    epd_engine_t *e = rk->e;
    rk->have_bs = 0;
    if (e->have_cluster) {
        int rc = e->cluster.bootstrap(e->cluster.ctx, rk->local, rk->epoch, &rk->bs, msg, len);
        if (rc) return rc;
    } else {
        ep_inproc_bootstrap(e->world, rk->local, &rk->bs);
    }
    rk->have_bs = 1;
    return 0;
}

static int create_group(rank_t *rk, ep_group_t **g, char *msg, size_t len)
{
    int rc = get_bootstrap(rk, msg, len);
    if (rc) return rc;
    tag(rk, "libep: group creation");
    ep_status_t st = ep_group_create(&rk->epcfg, &rk->bs, g);
    if (st != EP_OK) {
        snprintf(msg, len, "rank %d: ep_group_create: %s (%s)", rk->grank, ep_strerror(st),
                 ep_group_last_error(NULL));
        return -EIO;
    }
    return 0;
}

/* Step 4: every rank says how its formation went and learns how everyone's went. 0 when every
 * rank joined; JOIN_LOAD_FAILED when some rank could not load the model (msg names it); a
 * negative errno when the join itself failed or some rank could not form (msg says which). */
static int join(rank_t *rk, int status, unsigned timeout_ms, char *msg, size_t len)
{
    epd_engine_t *e = rk->e;
    ctl_word_t w = {.purpose = CTL_JOIN, .failed = status};
    if (timeout_ms < (unsigned)e->timeout_ms) timeout_ms = (unsigned)e->timeout_ms;
    tag(rk, "engine: join");
    int rc = rk->bs.allgather(rk->bs.ctx, &w, rk->ctl_all, sizeof(w), timeout_ms);
    if (rc) {
        snprintf(msg, len, "rank %d: joining the EP group with the other ranks failed: %s",
                 rk->grank, ep_strerror((ep_status_t)rc));
        return -EIO;
    }
    int load_failed = -1, form_failed = -1;
    for (int i = 0; i < e->nranks; i++) {
        const ctl_word_t *c = &rk->ctl_all[i];
        if (c->purpose != CTL_JOIN) {
            snprintf(msg, len,
                     "rank %d: rank %d answered the group's join with %s: the ranks are at "
                     "different points of the protocol",
                     rk->grank, i, ctl_purpose_name(c->purpose));
            return -EPROTO;
        }
        if (c->failed == JOIN_LOAD_FAILED && load_failed < 0) load_failed = i;
        if (c->failed != JOIN_OK && c->failed != JOIN_LOAD_FAILED && form_failed < 0)
            form_failed = i;
    }
    if (load_failed >= 0) {
        snprintf(msg, len, "rank %d failed to load", load_failed);
        return JOIN_LOAD_FAILED;
    }
    if (form_failed >= 0) {
        snprintf(msg, len, "rank %d could not create or attach its EP group", form_failed);
        return -EAGAIN;
    }
    return 0;
}

/* Readiness: every local rank loaded and none is re-forming (e->mu held). */
static int can_serve_locked(const epd_engine_t *e)
{
    return e->loaded == e->R && e->n_reforming == 0 && !e->load_failed && !e->stop;
}

static void set_ready(epd_engine_t *e)
{
    atomic_store(&e->ready, 1);
    epd_state_set(e->state, e->state_id, 1, "serving %s on %d rank(s)", e->info.model_id,
                  e->nranks);
}

/* Takes every request that waits in a local rank's inbox (e->mu held); returns them linked. */
static epd_engine_req_t *sweep_inboxes_locked(epd_engine_t *e)
{
    epd_engine_req_t *all = NULL, **tail = &all;
    for (int i = 0; i < e->R; i++) {
        rank_t *o = &e->ranks[i];
        if (!o->inbox_head) continue;
        *tail = o->inbox_head;
        tail = &o->inbox_tail->next;
        e->queued -= o->inbox_n;
        o->inbox_head = o->inbox_tail = NULL;
        o->inbox_n = 0;
    }
    epd_metric_set(e->m_queue, e->queued);
    return all;
}

/* Destroys the failed group and forms a new one with every other rank (steps 1-4). Requests
 * still queued fail with 503 as the engine stops being ready. 0, or 1 on stop. */
static int reform(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    epd_engine_req_t *swept = NULL;
    char why[MSG_MAX];
    pthread_mutex_lock(&e->mu);
    if (!rk->in_reform) {
        rk->in_reform = 1;
        if (e->n_reforming++ == 0) {
            atomic_store(&e->ready, 0);
            snprintf(why, sizeof(why), "%.900s",
                     e->last_failure[0] ? e->last_failure : "a failure");
            epd_state_set(e->state, e->state_id, 0, "re-forming the EP group after: %s", why);
            swept = sweep_inboxes_locked(e);
        }
    }
    ep_group_t *old = rk->group;
    rk->group = NULL;
    rk->abort_flag = 0;
    pthread_mutex_unlock(&e->mu);
    /* re-forming can take as long as a peer takes to restart: nothing waits for it (these fail
     * before the old group's teardown, whose barrier may wait for a dead peer) */
    while (swept) {
        epd_engine_req_t *r = swept;
        swept = r->next;
        r->next = NULL;
        r->finish = EPD_FINISH_ERROR;
        r->status = 503;
        snprintf(r->error, sizeof(r->error), "the EP group is re-forming after: %.400s", why);
        post(e, r, 1, 0, 0);
    }
    destroy_group(rk, old);
    for (int attempt = 1;; attempt++) {
        pthread_mutex_lock(&e->mu);
        int stop = e->stop;
        pthread_mutex_unlock(&e->mu);
        if (stop) return 1;
        rk->epoch++;
        char msg[MSG_MAX];
        ep_group_t *g = NULL;
        int rc = create_group(rk, &g, msg, sizeof(msg));
        if (rc == 0) {
            epd_err_t err = {0};
            int set = epd_model_set_group(rk->model, g, &err);
            if (set) snprintf(msg, sizeof(msg), "rank %d: %s", rk->grank, err.msg);
            /* with its group created, this rank is where the others wait for its join word,
             * even when attaching failed: they learn it at once instead of after their timeout
             * (a rank whose ep_group_create failed stopped somewhere among libep's collectives
             * and cannot join; the others' collectives fail or time out as well) */
            char jmsg[MSG_MAX];
            int jr = join(rk, set ? JOIN_FORM_FAILED : JOIN_OK,
                          set ? (unsigned)e->timeout_ms : JOIN_WAIT_MS, jmsg, sizeof(jmsg));
            if (set) {
                rc = set;
            } else if (jr != 0) {
                rc = jr < 0 ? jr : -EIO;
                if (jr == JOIN_LOAD_FAILED)
                    snprintf(msg, sizeof(msg), "%.900s its part of the model", jmsg);
                else
                    snprintf(msg, sizeof(msg), "%.1000s", jmsg);
            }
        }
        if (rc == 0) {
            pthread_mutex_lock(&e->mu);
            rk->group = g;
            rk->in_reform = 0;
            e->n_reforming--;
            int ready = can_serve_locked(e);
            if (rk->local == 0) e->reforms++;
            pthread_mutex_unlock(&e->mu);
            if (rk->local == 0) {
                epd_metric_add(e->m_reform, 1);
                EPD_INFO(SUB, "EP group re-formed (generation %u)", rk->epoch);
            }
            if (ready) set_ready(e);
            rk->reform = 0;
            rk->fail_flag = 0;
            return 0;
        }
        destroy_group(rk, g);
        static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(4, 10000);
        epd_log_ratelimited(&rl, EPD_LOG_ERROR, SUB, "re-forming the EP group, attempt %d: %s",
                            attempt, msg);
        sleep_ms(REFORM_RETRY_MS);
    }
}

/* ---- the rank thread ---------------------------------------------------------------------- */

/* Step 1 of the protocol: sleep while idle, admit requests, snapshot the control word. */
static void snapshot(rank_t *rk, int idle, ctl_word_t *w)
{
    epd_engine_t *e = rk->e;
    pthread_mutex_lock(&e->mu);
    while (idle && e->gen == rk->last_gen && !e->stop) {
        struct timespec dl;
        deadline_after(&dl, IDLE_RECHECK_MS);
        pthread_cond_timedwait(&e->cv, &e->mu, &dl);
    }
    w->woke = e->gen != rk->last_gen;
    rk->last_gen = e->gen;
    while (rk->inbox_head && rk->act_n < rk->cap) {
        epd_engine_req_t *r = rk->inbox_head;
        rk->inbox_head = r->next;
        if (!rk->inbox_head) rk->inbox_tail = NULL;
        r->next = NULL;
        rk->inbox_n--;
        e->queued--;
        rk->nactive++;
        e->active++;
        rk->act[rk->act_n++] = r;
    }
    epd_metric_set(e->m_queue, e->queued);
    epd_metric_set(e->m_active, e->active);
    w->pending = rk->inbox_n; /* admit_new adds the sequences that stay active */
    w->stop = e->stop;
    w->failed = rk->fail_flag || rk->abort_flag;
    rk->abort_flag = 0;
    pthread_mutex_unlock(&e->mu);
}

static void admit_new(rank_t *rk)
{
    for (int i = 0; i < rk->act_n; i++) {
        epd_engine_req_t *r = rk->act[i];
        if (r->seq || r->done) continue;
        epd_err_t err = {0};
        if (epd_seq_create(rk->model, &r->seq, &err) != 0)
            finalize(rk, r, EPD_FINISH_ERROR, 503, "rank %d: %s", rk->grank, err.msg);
    }
    for (int i = 0; i < rk->act_n; i++)
        if (!rk->act[i]->done && atomic_load(&rk->act[i]->cancelled))
            finalize(rk, rk->act[i], EPD_FINISH_CANCELLED, 0, NULL);
    compact(rk);
}

static void serve(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    int idle = 1;
    for (;;) {
        if (rk->reform && reform(rk)) break;
        ctl_word_t w = {.purpose = CTL_STEP};
        snapshot(rk, idle, &w);
        admit_new(rk);
        w.pending += rk->act_n;
        plan_step(rk);
        w.tokens = rk->tokens;
        tag(rk, "engine: step control");
        int rc = rk->bs.allgather(rk->bs.ctx, &w, rk->ctl_all, sizeof(w), (unsigned)e->timeout_ms);
        int odd = -1; /* a rank that is not stepping (it joins a group being formed) */
        for (int i = 0; !rc && odd < 0 && i < e->nranks; i++)
            if (rk->ctl_all[i].purpose != CTL_STEP) odd = i;
        if (rc || odd >= 0) {
            char msg[MSG_MAX];
            if (rc)
                snprintf(msg, sizeof(msg), "rank %d lost lockstep with the other ranks: %s",
                         rk->grank, ep_strerror((ep_status_t)rc));
            else
                snprintf(msg, sizeof(msg),
                         "rank %d lost lockstep with the other ranks: rank %d sent %s where a "
                         "step's control word was due",
                         rk->grank, odd, ctl_purpose_name(rk->ctl_all[odd].purpose));
            EPD_ERROR(SUB, "%.900s", msg);
            health_event(e, msg);
            fail_all(rk, 503, msg);
            rk->reform = 1;
            idle = 1;
            continue;
        }
        int stop = 0, failed = 0, woke = 0, step_max = 0;
        long pending = 0;
        for (int i = 0; i < e->nranks; i++) {
            stop |= rk->ctl_all[i].stop;
            failed |= rk->ctl_all[i].failed;
            woke |= rk->ctl_all[i].woke;
            pending += rk->ctl_all[i].pending;
            if (rk->ctl_all[i].tokens > step_max) step_max = rk->ctl_all[i].tokens;
        }
        if (stop) break;
        if (failed) {
            rk->reform = 1;
            idle = 0;
            continue;
        }
        if (pending == 0 && !woke) {
            idle = 1;
            continue;
        }
        idle = 0;
        step(rk, step_max);
    }
    fail_all(rk, 503, "the engine is stopping");
}

/* The first formation, steps 1-3: the group, the model on it, the rank's buffers. */
static int rank_load(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    epd_err_t err = {0};
    int rc = create_group(rk, &rk->group, rk->load_msg, sizeof(rk->load_msg));
    if (rc) return rc;
    epd_model_opts_t mo = {.dir = e->model_path,
                           .group = rk->group,
                           .placement = e->explicit_placement ? &e->placement : NULL,
                           .max_seq_len = e->max_seq_len};
    if ((rc = epd_model_load(&mo, &rk->model, &err)) != 0) {
        snprintf(rk->load_msg, sizeof(rk->load_msg), "rank %d: %s", rk->grank, err.msg);
        return rc;
    }
    size_t V = (size_t)e->hf.vocab_size, B = (size_t)e->max_batch_tokens;
    rk->logits = malloc(sizeof(float) * V * B);
    rk->items = calloc(B, sizeof(*rk->items));
    rk->item_req = calloc(B, sizeof(int));
    rk->act = calloc((size_t)rk->cap, sizeof(*rk->act));
    rk->fin = calloc((size_t)rk->cap, sizeof(*rk->fin));
    rk->exp_prev = calloc((size_t)e->hf.num_experts, sizeof(uint64_t));
    rk->exp_now = calloc((size_t)e->hf.num_experts, sizeof(uint64_t));
    if (!rk->logits || !rk->items || !rk->item_req || !rk->act || !rk->fin || !rk->exp_prev ||
        !rk->exp_now) {
        snprintf(rk->load_msg, sizeof(rk->load_msg), "rank %d: out of memory for the engine",
                 rk->grank);
        return -ENOMEM;
    }
    epd_model_mem_t mem;
    epd_model_mem(rk->model, &mem);
    char lab[64];
    snprintf(lab, sizeof(lab), "rank=\"%d\"", rk->grank);
    epd_metric_set(epd_metrics_gauge(e->metrics, "epd_model_expert_bytes",
                                     "Bytes of expert weights a rank of this node holds.", lab),
                   (double)mem.expert_bytes);
    epd_metric_set(epd_metrics_gauge(e->metrics, "epd_model_replicated_bytes",
                                     "Bytes of replicated (non-expert) weights a rank holds.", lab),
                   (double)mem.replicated_bytes);
    return 0;
}

static void *rank_main(void *arg)
{
    rank_t *rk = arg;
    epd_engine_t *e = rk->e;
    /* the join's words are allocated first: a rank that fails to load must still tell the
     * others, so that none serves alone */
    rk->ctl_all = calloc((size_t)e->nranks, sizeof(ctl_word_t));
    if (!rk->ctl_all) {
        rk->load_rc = -ENOMEM;
        snprintf(rk->load_msg, sizeof(rk->load_msg), "rank %d: out of memory for the engine",
                 rk->grank);
    } else {
        rk->load_rc = rank_load(rk);
    }
    int reform_first = 0;
    if (rk->have_bs && rk->ctl_all) {
        char msg[MSG_MAX];
        /* a rank without a group is out of step with the others' collectives: it only tries
         * to tell them, within one EP op */
        int jr = join(rk, rk->load_rc ? JOIN_LOAD_FAILED : JOIN_OK,
                      rk->group ? JOIN_WAIT_MS : (unsigned)e->timeout_ms, msg, sizeof(msg));
        if (jr == JOIN_LOAD_FAILED && !rk->load_rc) {
            rk->load_rc = -EIO;
            snprintf(rk->load_msg, sizeof(rk->load_msg), "%s", msg);
        } else if (jr != 0 && !rk->load_rc) {
            /* this rank holds its part of the model: it forms the group again with the
             * others (a peer restarted, a collective timed out) rather than giving up */
            EPD_WARN(SUB, "%.900s; forming the group again", msg);
            health_event(e, msg);
            reform_first = 1;
        }
    }
    pthread_mutex_lock(&e->mu);
    if (rk->load_rc) {
        /* the first rank's own error names the file or tensor; keep it over "rank N failed" */
        if (!e->load_failed || strstr(e->load_msg, "failed to load"))
            snprintf(e->load_msg, sizeof(e->load_msg), "%s", rk->load_msg);
        e->load_failed = 1;
    } else {
        e->loaded++;
        if (reform_first) {
            rk->in_reform = 1;
            e->n_reforming++;
        }
    }
    int all_loaded = e->loaded == e->R, ready = can_serve_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (all_loaded)
        EPD_INFO(SUB, "model %s loaded on %d local rank(s) of %d", e->info.model_id, e->R,
                 e->nranks);
    if (ready) set_ready(e);
    uv_async_send(&e->async);
    rk->reform = reform_first;
    if (!rk->load_rc) serve(rk);
    /* group destruction is collective: every rank thread leaves together */
    epd_model_destroy(rk->model);
    rk->model = NULL;
    pthread_mutex_lock(&e->mu);
    ep_group_t *g = rk->group;
    rk->group = NULL;
    pthread_mutex_unlock(&e->mu);
    destroy_group(rk, g);
    return NULL;
}

/* ---- loop-side API ------------------------------------------------------------------------ */

static void read_eos(epd_engine_t *e)
{
    char path[4200], *text = NULL;
    size_t len;
    snprintf(path, sizeof(path), "%s/config.json", e->model_path);
    if (epd_read_text_file(path, 16u << 20, &text, &len, NULL) != 0) return;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (cJSON_IsNumber(eos)) {
        e->info.eos[e->info.num_eos++] = (int32_t)eos->valuedouble;
    } else if (cJSON_IsArray(eos)) {
        for (const cJSON *v = eos->child; v && e->info.num_eos < EPD_ENGINE_MAX_EOS; v = v->next)
            if (cJSON_IsNumber(v)) e->info.eos[e->info.num_eos++] = (int32_t)v->valuedouble;
    }
    int k = 0; /* ids outside the vocabulary could never be generated */
    for (int i = 0; i < e->info.num_eos; i++)
        if (e->info.eos[i] >= 0 && e->info.eos[i] < e->hf.vocab_size)
            e->info.eos[k++] = e->info.eos[i];
    e->info.num_eos = k;
    cJSON_Delete(root);
}

static void on_rate_timer(uv_timer_t *t)
{
    epd_engine_t *e = t->data;
    double v = epd_metric_value(e->m_gen);
    if (e->rate_n == RATE_WINDOW_S + 1) {
        memmove(e->rate_ring, e->rate_ring + 1, sizeof(double) * RATE_WINDOW_S);
        e->rate_n--;
    }
    e->rate_ring[e->rate_n++] = v;
    if (e->rate_n > 1) epd_metric_set(e->m_rate, (v - e->rate_ring[0]) / (double)(e->rate_n - 1));
}

static int register_metrics(epd_engine_t *e)
{
    static const double step_b[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                    0.05,   0.1,   0.25,   0.5,   1,    2.5};
    static const double ttft_b[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
    epd_metrics_t *m = e->metrics;
    e->m_step = epd_metrics_histogram(m, "epd_engine_step_duration_seconds",
                                      "Duration of one lockstep step (forward pass) on rank 0 "
                                      "of this node.",
                                      NULL, step_b, (int)(sizeof(step_b) / sizeof(step_b[0])));
    e->m_queue = epd_metrics_gauge(m, "epd_engine_queue_depth",
                                   "Requests waiting for a place on a rank.", NULL);
    e->m_active = epd_metrics_gauge(m, "epd_engine_active_sequences",
                                    "Sequences being prefilled or decoded on this node.", NULL);
    e->m_gen = epd_metrics_counter(m, "epd_generated_tokens_total",
                                   "Completion tokens generated on this node.", NULL);
    e->m_prompt = epd_metrics_counter(m, "epd_prompt_tokens_total",
                                      "Prompt tokens prefilled on this node.", NULL);
    e->m_ttft = epd_metrics_histogram(m, "epd_time_to_first_token_seconds",
                                      "From a request's submission to its first token.", NULL,
                                      ttft_b, (int)(sizeof(ttft_b) / sizeof(ttft_b[0])));
    e->m_rate = epd_metrics_gauge(m, "epd_generated_tokens_per_second",
                                  "Completion tokens per second over the last 10 seconds.", NULL);
    e->m_step_fail = epd_metrics_counter(m, "epd_engine_step_failures_total",
                                         "Steps that failed (EP error, lost lockstep); their "
                                         "requests failed.",
                                         NULL);
    e->m_reform = epd_metrics_counter(m, "epd_engine_group_reforms_total",
                                      "Times the EP group was re-formed after a failure.", NULL);
    e->m_expert = calloc((size_t)e->hf.num_experts, sizeof(*e->m_expert));
    if (!e->m_step || !e->m_queue || !e->m_active || !e->m_gen || !e->m_prompt || !e->m_ttft ||
        !e->m_rate || !e->m_step_fail || !e->m_reform || !e->m_expert)
        return -ENOMEM;
    for (int x = 0; x < e->hf.num_experts; x++) {
        char lab[32];
        snprintf(lab, sizeof(lab), "expert=\"%d\"", x);
        e->m_expert[x] =
            epd_metrics_counter(m, "epd_expert_tokens_total",
                                "Tokens routed to each expert (all MoE layers), by the routers "
                                "of this node's ranks.",
                                lab);
    }
    return 0;
}

static const char *basename_of(const char *p)
{
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        n--;
    size_t s = n;
    while (s > 0 && p[s - 1] != '/')
        s--;
    static _Thread_local char buf[128];
    size_t len = n - s < sizeof(buf) - 1 ? n - s : sizeof(buf) - 1;
    memcpy(buf, p + s, len);
    buf[len] = 0;
    return buf;
}

static void on_handle_closed(uv_handle_t *h)
{
    epd_engine_t *e = h->data;
    if (--e->handles_open > 0) return;
    free(e->m_expert);
    epd_model_placement_fini(&e->placement);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->ob_mu);
    free(e->ranks);
    free(e);
}

int epd_engine_create(const epd_engine_opts_t *o, epd_engine_t **out, char *errbuf, size_t errlen)
{
    const epd_config_t *cfg = o->cfg;
    epd_err_t err = {0};
    int rc;
    *out = NULL;
    if (cfg->backend != EPD_BACKEND_CPU) {
        snprintf(errbuf, errlen,
                 "compute.backend \"%s\": the engine runs on the cpu backend only so far",
                 epd_backend_name(cfg->backend));
        return -ENOTSUP;
    }
    if (cfg->max_queued_requests < 1) {
        snprintf(errbuf, errlen, "model.max_queued_requests is %d; it must be at least 1",
                 cfg->max_queued_requests);
        return -EINVAL;
    }
    epd_engine_t *e = calloc(1, sizeof(*e));
    if (!e) {
        snprintf(errbuf, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_condattr_t ca;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->ob_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cv, &ca);
    pthread_condattr_destroy(&ca);
    e->loop = o->loop;
    e->metrics = o->metrics;
    e->state = o->state;
    e->on_loaded = o->on_loaded;
    e->on_loaded_arg = o->arg;
    e->R = cfg->ranks_per_node;
    e->max_batch_tokens = cfg->max_batch_tokens;
    e->max_prefill_tokens = cfg->max_prefill_tokens;
    e->timeout_ms = cfg->ep_timeout_ms;
    e->max_queue = cfg->max_queued_requests;
    snprintf(e->model_path, sizeof(e->model_path), "%s", cfg->model_path);
    if (o->cluster) {
        e->cluster = *o->cluster;
        e->have_cluster = 1;
        e->rank_base = o->cluster->rank_base;
        e->nranks = o->cluster->nranks;
    } else {
        e->nranks = e->R;
    }

    /* what can be checked before the threads start, so that the message is the first one */
    char path[4200];
    snprintf(path, sizeof(path), "%s/config.json", cfg->model_path);
    if ((rc = epd_hf_config_load(path, &e->hf, &err)) != 0) {
        snprintf(errbuf, errlen, "model.path: %s", err.msg);
        goto fail_early;
    }
    if (e->hf.num_experts % e->nranks) {
        snprintf(errbuf, errlen,
                 "the model's %d experts cannot be split evenly over %d rank(s) "
                 "(compute.ranks_per_node)",
                 e->hf.num_experts, e->nranks);
        rc = -EINVAL;
        goto fail_early;
    }
    if (cfg->placement == EPD_PLACEMENT_EXPLICIT) {
        rc = epd_model_placement_explicit(e->hf.num_experts, e->nranks, cfg->expert_map,
                                          cfg->num_expert_map, &e->placement, &err);
        e->explicit_placement = 1;
    } else {
        rc = epd_model_placement_contiguous(e->hf.num_experts, e->nranks, &e->placement, &err);
    }
    if (rc) {
        snprintf(errbuf, errlen, "model.expert_map: %s", err.msg);
        goto fail_early;
    }
    e->max_seq_len = cfg->max_seq_len;
    if (e->hf.max_position_embeddings > 0 && e->max_seq_len > e->hf.max_position_embeddings) {
        EPD_INFO(SUB,
                 "model.max_seq_len %d exceeds the model's max_position_embeddings %d; "
                 "serving up to %d",
                 e->max_seq_len, e->hf.max_position_embeddings, e->hf.max_position_embeddings);
        e->max_seq_len = e->hf.max_position_embeddings;
    }
    snprintf(e->info.model_id, sizeof(e->info.model_id), "%s", basename_of(cfg->model_path));
    e->info.model_type = e->hf.model_type;
    e->info.vocab_size = e->hf.vocab_size;
    e->info.max_seq_len = e->max_seq_len;
    e->info.created = (long long)time(NULL);
    read_eos(e);
    if ((rc = register_metrics(e)) != 0) {
        snprintf(errbuf, errlen, "out of memory for the engine's metrics");
        goto fail_early;
    }
    e->state_id = epd_state_register(e->state, "engine");
    if (e->state_id < 0) {
        rc = e->state_id;
        snprintf(errbuf, errlen, "cannot register the engine's readiness: %s", strerror(-rc));
        goto fail_early;
    }
    epd_state_set(e->state, e->state_id, 0, "loading %s on %d rank(s)", cfg->model_path, e->R);
    if (!e->have_cluster && ep_inproc_world_create(e->R, &e->world) != EP_OK) {
        snprintf(errbuf, errlen, "out of memory for the in-process bootstrap");
        rc = -ENOMEM;
        goto fail_early;
    }
    if (!(e->ranks = calloc((size_t)e->R, sizeof(*e->ranks)))) {
        snprintf(errbuf, errlen, "out of memory");
        rc = -ENOMEM;
        goto fail_early;
    }
    int cap = e->max_batch_tokens > 1 ? e->max_batch_tokens - 1 : 1;
    if (cap > EPD_ENGINE_MAX_SEQS_PER_RANK) cap = EPD_ENGINE_MAX_SEQS_PER_RANK;
    for (int i = 0; i < e->R; i++) {
        rank_t *rk = &e->ranks[i];
        rk->e = e;
        rk->local = i;
        rk->grank = e->rank_base + i;
        rk->cap = cap;
        ep_config_init(&rk->epcfg);
        rk->epcfg.backend = EP_BACKEND_CPU;
        rk->epcfg.transport = EP_TRANSPORT_AUTO;
        rk->epcfg.timeout_ms = (unsigned)e->timeout_ms;
        epd_model_ep_config(&e->hf, e->max_batch_tokens, e->max_prefill_tokens, &rk->epcfg);
    }

    uv_async_init(e->loop, &e->async, on_async);
    e->async.data = e;
    uv_timer_init(e->loop, &e->rate_timer);
    e->rate_timer.data = e;
    e->handles_open = 2;
    uv_timer_start(&e->rate_timer, on_rate_timer, 1000, 1000);
    uv_unref((uv_handle_t *)&e->rate_timer);

    for (int i = 0; i < e->R; i++) {
        if ((rc = pthread_create(&e->ranks[i].th, NULL, rank_main, &e->ranks[i])) != 0) {
            snprintf(errbuf, errlen, "cannot start rank thread %d: %s", i, strerror(rc));
            epd_engine_destroy(e);
            return -rc;
        }
        e->ranks[i].started = 1;
    }
    EPD_INFO(SUB, "loading %s (%s, %d layers, %d experts, top-%d, vocab %d) on %d rank(s)",
             cfg->model_path, e->hf.model_type, e->hf.num_hidden_layers, e->hf.num_experts,
             e->hf.num_experts_per_tok, e->hf.vocab_size, e->R);
    *out = e;
    return 0;

fail_early:
    ep_inproc_world_destroy(e->world);
    free(e->ranks);
    free(e->m_expert);
    epd_model_placement_fini(&e->placement);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->ob_mu);
    free(e);
    return rc;
}

void epd_engine_destroy(epd_engine_t *e)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->stop = 1;
    e->gen++;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    atomic_store(&e->ready, 0);
    for (int i = 0; i < e->R; i++)
        if (e->ranks[i].started) pthread_join(e->ranks[i].th, NULL);
    drain_outbox(e);
    /* requests that never reached a rank */
    for (int i = 0; i < e->R; i++) {
        rank_t *rk = &e->ranks[i];
        while (rk->inbox_head) {
            epd_engine_req_t *r = rk->inbox_head;
            rk->inbox_head = r->next;
            r->finish = EPD_FINISH_ERROR;
            r->status = 503;
            snprintf(r->error, sizeof(r->error), "the engine is stopping");
            deliver(e, &(out_ev_t){r, 1, 0, 0});
        }
        for (int j = 0; j < rk->act_n; j++) /* only after a failed load: never started */
            if (!rk->act[j]->done) {
                epd_engine_req_t *r = rk->act[j];
                r->finish = EPD_FINISH_ERROR;
                r->status = 503;
                snprintf(r->error, sizeof(r->error), "the engine is stopping");
                deliver(e, &(out_ev_t){r, 1, 0, 0});
            }
        free(rk->logits);
        free(rk->items);
        free(rk->item_req);
        free(rk->act);
        free(rk->fin);
        free(rk->ctl_all);
        free(rk->exp_prev);
        free(rk->exp_now);
    }
    ep_inproc_world_destroy(e->world);
    e->world = NULL;
    uv_close((uv_handle_t *)&e->async, on_handle_closed);
    uv_close((uv_handle_t *)&e->rate_timer, on_handle_closed);
}

void epd_engine_wake(epd_engine_t *e)
{
    pthread_mutex_lock(&e->mu);
    e->gen++;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void epd_engine_peer_down(epd_engine_t *e, int rank, const char *why)
{
    char msg[MSG_MAX];
    snprintf(msg, sizeof(msg), "rank %d is down: %s", rank, why ? why : "no reason given");
    EPD_WARN(SUB, "%s; aborting the EP group", msg);
    health_event(e, msg);
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->R; i++) {
        rank_t *rk = &e->ranks[i];
        /* a rank without a group is re-forming already: its next group is made with the
         * cluster as it is now (a peer down fails its collectives), so the news is old to it */
        if (!rk->group) continue;
        ep_group_abort(rk->group, rank);
        rk->abort_flag = 1;
    }
    e->gen++;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

const epd_engine_info_t *epd_engine_info(const epd_engine_t *e)
{
    return e && atomic_load(&((epd_engine_t *)e)->ready) ? &e->info : NULL;
}

int epd_engine_submit(epd_engine_t *e, const epd_gen_params_t *p, epd_engine_cb cb, void *arg,
                      epd_engine_req_t **out)
{
    *out = NULL;
    if (!atomic_load(&e->ready)) return -EBUSY;
    if (p->prompt_len < 1 || p->max_tokens < 1 || p->prompt_len + p->max_tokens > e->max_seq_len)
        return -EINVAL;
    for (int i = 0; i < p->prompt_len; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= e->hf.vocab_size) return -EINVAL;
    if (p->num_stop_ids < 0 || p->num_stop_ids > EPD_ENGINE_MAX_EOS ||
        (p->num_stop_ids > 0 && !p->stop_ids))
        return -EINVAL;
    epd_engine_req_t *r = calloc(1, sizeof(*r));
    if (!r) return -ENOMEM;
    r->num_stop_ids = p->num_stop_ids;
    for (int i = 0; i < p->num_stop_ids; i++)
        r->stop_ids[i] = p->stop_ids[i];
    r->e = e;
    r->cb = cb;
    r->arg = arg;
    r->prompt_len = p->prompt_len;
    r->max_tokens = p->max_tokens;
    r->stream = p->stream;
    r->prompt = malloc(sizeof(int32_t) * (size_t)p->prompt_len);
    r->out = malloc(sizeof(int32_t) * (size_t)p->max_tokens);
    epd_sampling_t sp = {.temperature = p->temperature, .top_p = p->top_p, .top_k = p->top_k};
    if (!r->prompt || !r->out) {
        free_req(r);
        return -ENOMEM;
    }
    if (epd_sampler_init(&r->sampler, &sp, p->seed, e->hf.vocab_size, NULL) != 0) {
        free_req(r);
        return -EINVAL;
    }
    memcpy(r->prompt, p->prompt, sizeof(int32_t) * (size_t)p->prompt_len);
    r->t_submit_ns = now_ns();

    pthread_mutex_lock(&e->mu);
    if (!atomic_load(&e->ready)) { /* a re-formation began since the check above */
        pthread_mutex_unlock(&e->mu);
        free_req(r);
        return -EBUSY;
    }
    if (e->queued >= e->max_queue) {
        pthread_mutex_unlock(&e->mu);
        free_req(r);
        return -EAGAIN;
    }
    rank_t *best = &e->ranks[0];
    for (int i = 1; i < e->R; i++)
        if (e->ranks[i].inbox_n + e->ranks[i].nactive < best->inbox_n + best->nactive)
            best = &e->ranks[i];
    if (best->inbox_tail)
        best->inbox_tail->next = r;
    else
        best->inbox_head = r;
    best->inbox_tail = r;
    best->inbox_n++;
    e->queued++;
    e->gen++;
    epd_metric_set(e->m_queue, e->queued);
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->have_cluster && e->cluster.wake_peers) e->cluster.wake_peers(e->cluster.ctx);
    *out = r;
    return 0;
}

void epd_engine_cancel(epd_engine_req_t *r)
{
    if (!r) return;
    atomic_store(&r->cancelled, 1);
    epd_engine_wake(r->e); /* an idle group still has to see it */
}

cJSON *epd_engine_status_cjson(epd_engine_t *e)
{
    cJSON *doc = cJSON_CreateObject();
    if (!doc) return NULL;
    const epd_hf_config_t *c = &e->hf;
    pthread_mutex_lock(&e->mu);
    int loaded = e->loaded, failed = e->load_failed, queued = e->queued, active = e->active;
    unsigned long long steps = e->steps, fails = e->step_failures, reforms = e->reforms;
    char last[MSG_MAX], lmsg[MSG_MAX];
    long long last_t = e->last_failure_time;
    snprintf(last, sizeof(last), "%s", e->last_failure);
    snprintf(lmsg, sizeof(lmsg), "%s", e->load_msg);
    int per_rank[EP_MAX_RANKS] = {0};
    for (int i = 0; i < e->R && i < EP_MAX_RANKS; i++)
        per_rank[i] = e->ranks[i].nactive;
    pthread_mutex_unlock(&e->mu);

    cJSON_AddStringToObject(doc, "state",
                            failed                   ? "failed"
                            : loaded < e->R          ? "loading"
                            : atomic_load(&e->ready) ? "serving"
                                                     : "re-forming");
    if (failed) cJSON_AddStringToObject(doc, "error", lmsg);
    cJSON *m = cJSON_AddObjectToObject(doc, "model");
    if (m) {
        cJSON_AddStringToObject(m, "id", e->info.model_id);
        cJSON_AddStringToObject(m, "path", e->model_path);
        cJSON_AddStringToObject(m, "type", c->model_type);
        cJSON_AddNumberToObject(m, "layers", c->num_hidden_layers);
        cJSON *ml = cJSON_AddArrayToObject(m, "moe_layers");
        for (int l = 0; ml && l < c->num_hidden_layers; l++)
            if (epd_hf_layer_is_moe(c, l)) cJSON_AddItemToArray(ml, cJSON_CreateNumber(l));
        cJSON_AddNumberToObject(m, "hidden_size", c->hidden_size);
        cJSON_AddNumberToObject(m, "experts", c->num_experts);
        cJSON_AddNumberToObject(m, "experts_per_token", c->num_experts_per_tok);
        cJSON_AddNumberToObject(m, "vocab_size", c->vocab_size);
        cJSON_AddNumberToObject(m, "max_seq_len", e->max_seq_len);
        cJSON_AddNumberToObject(m, "max_batch_tokens", e->max_batch_tokens);
        cJSON_AddNumberToObject(m, "max_prefill_tokens", e->max_prefill_tokens);
        cJSON *eos = cJSON_AddArrayToObject(m, "eos_token_ids");
        for (int i = 0; eos && i < e->info.num_eos; i++)
            cJSON_AddItemToArray(eos, cJSON_CreateNumber(e->info.eos[i]));
    }
    cJSON *pl = cJSON_AddObjectToObject(doc, "placement");
    if (pl) {
        cJSON_AddStringToObject(pl, "kind", e->explicit_placement ? "explicit" : "contiguous");
        cJSON_AddNumberToObject(pl, "ranks", e->nranks);
        cJSON_AddNumberToObject(pl, "experts_per_rank", e->placement.local);
        cJSON *ranks = cJSON_AddArrayToObject(pl, "by_rank");
        epd_model_mem_t est;
        epd_model_mem_estimate(c, e->nranks, &est);
        for (int r = 0; ranks && r < e->nranks; r++) {
            cJSON *o = cJSON_CreateObject();
            if (!o) break;
            cJSON_AddNumberToObject(o, "rank", r);
            cJSON *ex = cJSON_AddArrayToObject(o, "experts");
            for (int l = 0; ex && l < e->placement.local; l++)
                cJSON_AddItemToArray(
                    ex, cJSON_CreateNumber(epd_model_placement_local_expert(&e->placement, r, l)));
            int local = r - e->rank_base;
            int here = local >= 0 && local < e->R;
            cJSON_AddBoolToObject(o, "on_this_node", here);
            /* every rank holds the same shapes; the estimate is exact for the cpu backend */
            cJSON_AddNumberToObject(o, "expert_bytes", (double)est.expert_bytes);
            cJSON_AddNumberToObject(o, "replicated_bytes", (double)est.replicated_bytes);
            if (here && local < EP_MAX_RANKS)
                cJSON_AddNumberToObject(o, "active_sequences", per_rank[local]);
            cJSON_AddItemToArray(ranks, o);
        }
    }
    cJSON_AddNumberToObject(doc, "queue_depth", queued);
    cJSON_AddNumberToObject(doc, "max_queue", e->max_queue);
    cJSON_AddNumberToObject(doc, "active_sequences", active);
    cJSON_AddNumberToObject(doc, "steps", (double)steps);
    cJSON_AddNumberToObject(doc, "step_failures", (double)fails);
    cJSON_AddNumberToObject(doc, "group_reforms", (double)reforms);
    if (last[0]) {
        cJSON *lf = cJSON_AddObjectToObject(doc, "last_failure");
        if (lf) {
            cJSON_AddStringToObject(lf, "message", last);
            cJSON_AddNumberToObject(lf, "time", (double)last_t);
        }
    }
    return doc;
}
