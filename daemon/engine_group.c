/* Forming and re-forming the engine's EP group: each rank's bootstrap, group creation and
 * teardown, the join word every rank sends when a group forms, re-formation after a failure,
 * and the rank thread's body (first formation with the model load, serving through
 * engine_step.c, teardown). */
#include "engine_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* Pause between attempts to re-form a group whose creation failed. */
#define REFORM_RETRY_MS 200
/* How long the ranks of a forming group wait in the join for the slowest one: a node that just
 * (re)started loads its part of the checkpoint while the others wait for it. */
#define JOIN_WAIT_MS 300000u

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

const char *eng_ctl_purpose_name(int32_t p)
{
    return p == CTL_JOIN   ? "the group's join word"
           : p == CTL_STEP ? "a step's control word"
                           : "an unknown word";
}

/* Names what the rank's next bootstrap collectives are for (see epd_engine_cluster_t). */
void eng_tag(rank_t *rk, const char *what)
{
    epd_engine_t *e = rk->e;
    if (e->have_cluster && e->cluster.purpose && rk->have_bs)
        e->cluster.purpose(e->cluster.ctx, &rk->bs, what);
}

/* ep_group_destroy runs a barrier through the group's bootstrap. */
static void destroy_group(rank_t *rk, ep_group_t *g)
{
    if (!g) return;
    eng_tag(rk, "libep: group teardown");
    ep_group_destroy(g);
}

static int get_bootstrap(rank_t *rk, char *msg, size_t len)
{
    epd_engine_t *e = rk->e;
    rk->have_bs = 0;
    if (e->have_cluster) {
        epd_err_t err = {0};
        int rc = e->cluster.bootstrap(e->cluster.ctx, rk->local, rk->epoch, &rk->bs, &err);
        if (rc) {
            snprintf(msg, len, "%s", err.msg);
            return rc;
        }
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
    eng_tag(rk, "libep: group creation");
    ep_status_t st = ep_group_create(&rk->epcfg, &rk->bs, g);
    if (st != EP_OK) {
        snprintf(msg, len, "rank %d: ep_group_create: %s (%s)", rk->grank, ep_strerror(st),
                 ep_group_last_error(NULL));
        return EPD_EEXCHANGE;
    }
    return 0;
}

/* Step 4: every rank says how its formation went and learns how everyone's went. 0 when every
 * rank joined; JOIN_LOAD_FAILED when some rank could not load the model (msg names it);
 * EPD_EEXCHANGE when the join's exchange failed, -EPROTO when the ranks are at different points
 * of the protocol, -EAGAIN when some rank could not form (msg says which). */
static int join(rank_t *rk, int status, unsigned timeout_ms, char *msg, size_t len)
{
    epd_engine_t *e = rk->e;
    ctl_word_t w = {.purpose = CTL_JOIN, .failed = status};
    if (timeout_ms < (unsigned)e->timeout_ms) timeout_ms = (unsigned)e->timeout_ms;
    eng_tag(rk, "engine: join");
    int rc = rk->bs.allgather(rk->bs.ctx, &w, rk->ctl_all, sizeof(w), timeout_ms);
    if (rc) {
        snprintf(msg, len, "rank %d: joining the EP group with the other ranks failed: %s",
                 rk->grank, ep_strerror((ep_status_t)rc));
        return EPD_EEXCHANGE;
    }
    int load_failed = -1, form_failed = -1;
    for (int i = 0; i < e->nranks; i++) {
        const ctl_word_t *c = &rk->ctl_all[i];
        if (c->purpose != CTL_JOIN) {
            snprintf(msg, len,
                     "rank %d: rank %d answered the group's join with %s: the ranks are at "
                     "different points of the protocol",
                     rk->grank, i, eng_ctl_purpose_name(c->purpose));
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
int eng_reform(rank_t *rk)
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
        eng_post(e, r, 1, 0, 0);
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
            rk->ctl_on_bootstrap = 0;
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

/* Load progress of one rank, from its loading thread: for status, and a log line every 10%. */
static void on_progress(void *arg, uint64_t done, uint64_t total)
{
    rank_t *rk = arg;
    atomic_store(&rk->load_done, done);
    atomic_store(&rk->load_total, total);
    int decile = total ? (int)(done * 10 / total) : 10;
    if (decile > rk->load_decile) {
        rk->load_decile = decile;
        EPD_INFO(SUB, "rank %d: loaded %d%% of its weights (%llu of %llu bytes)", rk->grank,
                 decile * 10, (unsigned long long)done, (unsigned long long)total);
    }
}

/* Ranks of this node on the GPU of rank rk (compute.gpus may repeat an ordinal). */
static int gpu_share(const epd_engine_t *e, const rank_t *rk)
{
    int n = 0;
    for (int i = 0; i < e->R; i++)
        n += e->ranks[i].epcfg.device == rk->epcfg.device;
    return n > 0 ? n : 1;
}

/* The first formation, steps 1-3: the group, the model on it, the rank's buffers. */
static int rank_load(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    epd_err_t err = {0};
    int rc = create_group(rk, &rk->group, rk->load_msg, sizeof(rk->load_msg));
    if (rc) return rc;
    rk->ctl_on_bootstrap = 0;
    epd_model_opts_t mo = {
        .dir = e->model_path,
        .group = rk->group,
        .placement = e->explicit_placement ? &e->placement : NULL,
        .max_seq_len = e->max_seq_len,
        .backend = e->backend == EPD_BACKEND_CUDA ? EPD_MODEL_CUDA : EPD_MODEL_CPU,
        .device = e->backend == EPD_BACKEND_CUDA ? rk->epcfg.device : 0,
        .max_seqs = rk->cap,
        .kv_block_size = e->kv_block_size,
        .kv_blocks = e->kv_blocks,
        .kv_memory_fraction = e->kv_memory_fraction,
        .gpu_share = gpu_share(e, rk),
        .fp8_dispatch = e->fp8_dispatch,
        .no_graphs = !e->cuda_graphs,
        .progress = on_progress,
        .progress_arg = rk,
    };
    if ((rc = epd_model_load(&mo, &rk->model, &err)) != 0) {
        snprintf(rk->load_msg, sizeof(rk->load_msg), "rank %d: %s", rk->grank, err.msg);
        return rc;
    }
    /* a step has at most max_prefill_tokens items (one token each at least) */
    size_t B = (size_t)(e->max_prefill_tokens > e->max_batch_tokens ? e->max_prefill_tokens
                                                                    : e->max_batch_tokens);
    rk->next = malloc(sizeof(int32_t) * B);
    rk->items = calloc(B, sizeof(*rk->items));
    rk->item_req = calloc(B, sizeof(int));
    rk->act = calloc((size_t)rk->cap, sizeof(*rk->act));
    rk->fin = calloc((size_t)rk->cap, sizeof(*rk->fin));
    rk->exp_prev = calloc((size_t)e->hf.num_experts, sizeof(uint64_t));
    rk->exp_now = calloc((size_t)e->hf.num_experts, sizeof(uint64_t));
    if (!rk->next || !rk->items || !rk->item_req || !rk->act || !rk->fin || !rk->exp_prev ||
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
    epd_metric_set(epd_metrics_gauge(e->metrics, "epd_model_workspace_bytes",
                                     "Bytes of activations and scratch a rank holds.", lab),
                   (double)mem.workspace_bytes);
    rk->m_kv_total = epd_metrics_gauge(e->metrics, "epd_kv_blocks_total",
                                       "Blocks of a rank's paged KV cache.", lab);
    rk->m_kv_free = epd_metrics_gauge(e->metrics, "epd_kv_blocks_free",
                                      "Free blocks of a rank's paged KV cache.", lab);
    rk->m_kv_bytes =
        epd_metrics_gauge(e->metrics, "epd_model_kv_bytes",
                          "Bytes a rank's KV cache holds (cpu: allocated so far).", lab);
    epd_metric_set(rk->m_kv_total, mem.kv_blocks_total);
    epd_metric_set(rk->m_kv_free, mem.kv_blocks_free);
    epd_metric_set(rk->m_kv_bytes, (double)mem.kv_bytes);
    pthread_mutex_lock(&e->mu);
    rk->mem = mem;
    /* what a request may need at most: the smallest pool of this node's ranks */
    if (e->info.kv_blocks == 0 || mem.kv_blocks_total < e->info.kv_blocks)
        e->info.kv_blocks = mem.kv_blocks_total;
    e->info.kv_block_size = mem.kv_block_size;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

void *eng_rank_main(void *arg)
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
            eng_health_event(e, msg);
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
    if (!rk->load_rc) eng_serve(rk);
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
