/* The serving engine's loop side: create and destroy, the scheduler that places requests on
 * ranks (submit, cancel), wake and peer-down notices, /v1/status, the metrics, and the
 * hand-over of results to the libuv loop. The rank threads run engine_step.c (the lockstep
 * steps) and engine_group.c (forming and re-forming the EP group); engine_int.h is the state
 * the files share. */

#include "engine_int.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

/* ---- hand-over to the loop ---------------------------------------------------------------- */

void eng_post(epd_engine_t *e, epd_engine_req_t *r, int final, int32_t token, int index)
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
            eng_post(e, r, final, token, index);
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
    epd_seq_destroy(r->seq);
    free(r->toks);
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

/* ---- loop-side API ------------------------------------------------------------------------ */

/* The EOS ids of the checkpoint's config.json (read with the rest of it), but for ids outside
 * the vocabulary, which could never be generated. */
static void read_eos(epd_engine_t *e)
{
    for (int i = 0; i < e->hf.num_eos && e->info.num_eos < EPD_ENGINE_MAX_EOS; i++)
        if (e->hf.eos_token_ids[i] >= 0 && e->hf.eos_token_ids[i] < e->hf.vocab_size)
            e->info.eos[e->info.num_eos++] = e->hf.eos_token_ids[i];
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
    e->m_ctl_data = epd_metrics_counter(m, "epd_engine_step_control_total",
                                        "Step control words rank 0 of this node exchanged, by "
                                        "plane: the EP group's data plane, or the bootstrap (the "
                                        "control plane in a cluster).",
                                        "plane=\"data\"");
    e->m_ctl_boot = epd_metrics_counter(m, "epd_engine_step_control_total",
                                        "Step control words rank 0 of this node exchanged, by "
                                        "plane: the EP group's data plane, or the bootstrap (the "
                                        "control plane in a cluster).",
                                        "plane=\"bootstrap\"");
    e->m_preempt = epd_metrics_counter(m, "epd_engine_preemptions_total",
                                       "Running requests preempted (KV blocks freed, requeued) "
                                       "because a rank's KV pool ran short.",
                                       NULL);
    static const double batch_b[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096};
    e->m_batch = epd_metrics_histogram(m, "epd_step_batch_tokens",
                                       "Tokens in one lockstep step on rank 0 of this node "
                                       "(decode tokens and prompt chunks).",
                                       NULL, batch_b, (int)(sizeof(batch_b) / sizeof(batch_b[0])));
    e->m_expert = calloc((size_t)e->hf.num_experts, sizeof(*e->m_expert));
    if (!e->m_step || !e->m_queue || !e->m_active || !e->m_gen || !e->m_prompt || !e->m_ttft ||
        !e->m_rate || !e->m_step_fail || !e->m_reform || !e->m_batch || !e->m_preempt ||
        !e->m_ctl_data || !e->m_ctl_boot || !e->m_expert)
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

int epd_engine_create(const epd_engine_opts_t *o, epd_engine_t **out, epd_err_t *err)
{
    const epd_config_t *cfg = o->cfg;
    epd_err_t merr = {0}; /* the model library's, prefixed with the setting into err */
    int rc;
    *out = NULL;
    if (cfg->backend == EPD_BACKEND_CUDA && cfg->num_gpus < cfg->ranks_per_node) {
        return epd_err_set(
            err, -EINVAL,
            "compute.backend \"cuda\": %d rank(s) per node but %d GPU(s) in compute.gpus",
            cfg->ranks_per_node, cfg->num_gpus);
    }
    if (cfg->max_queued_requests < 1) {
        return epd_err_set(err, -EINVAL, "model.max_queued_requests is %d; it must be at least 1",
                           cfg->max_queued_requests);
    }
    epd_engine_t *e = calloc(1, sizeof(*e));
    if (!e) return epd_err_set(err, -ENOMEM, "out of memory");
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
    e->backend = cfg->backend;
    e->max_seqs = cfg->max_seqs_per_rank > 0 ? cfg->max_seqs_per_rank : 64;
    e->kv_block_size = cfg->kv_block_size;
    e->kv_blocks = cfg->kv_blocks;
    e->kv_memory_fraction = cfg->kv_memory_fraction;
    e->cuda_graphs = cfg->cuda_graphs;
    e->fp8_dispatch = cfg->fp8_dispatch;
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
    if ((rc = epd_hf_config_load(path, &e->hf, &merr)) != 0) {
        epd_err_set(err, rc, "model.path: %s", merr.msg);
        goto fail_early;
    }
    if (e->hf.num_experts % e->nranks) {
        rc = epd_err_set(err, -EINVAL,
                         "the model's %d experts cannot be split evenly over %d rank(s) "
                         "(compute.ranks_per_node)",
                         e->hf.num_experts, e->nranks);
        goto fail_early;
    }
    if (cfg->placement == EPD_PLACEMENT_EXPLICIT) {
        rc = epd_model_placement_explicit(e->hf.num_experts, e->nranks, cfg->expert_map,
                                          cfg->num_expert_map, &e->placement, &merr);
        e->explicit_placement = 1;
    } else {
        rc = epd_model_placement_contiguous(e->hf.num_experts, e->nranks, &e->placement, &merr);
    }
    if (rc) {
        epd_err_set(err, rc, "model.expert_map: %s", merr.msg);
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
        epd_err_set(err, rc, "out of memory for the engine's metrics");
        goto fail_early;
    }
    e->state_id = epd_state_register(e->state, "engine");
    if (e->state_id < 0) {
        rc = epd_err_set(err, e->state_id, "cannot register the engine's readiness: %s",
                         strerror(-e->state_id));
        goto fail_early;
    }
    epd_state_set(e->state, e->state_id, 0, "loading %s on %d rank(s)", cfg->model_path, e->R);
    if (!e->have_cluster && ep_inproc_world_create(e->R, &e->world) != EP_OK) {
        rc = epd_err_set(err, -ENOMEM, "out of memory for the in-process bootstrap");
        goto fail_early;
    }
    if (!(e->ranks = calloc((size_t)e->R, sizeof(*e->ranks)))) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto fail_early;
    }
    /* the cuda model runs several ranks' prefill through LL in chunks (its HT path is not
     * wired yet); a one-rank group takes whole prefill steps locally */
    if (e->backend == EPD_BACKEND_CUDA && e->nranks > 1 &&
        e->max_prefill_tokens > e->max_batch_tokens) {
        EPD_INFO(SUB,
                 "compute.backend cuda with %d ranks: prompts prefill through LL in chunks of "
                 "model.max_batch_tokens (%d); model.max_prefill_tokens (%d) applies to one-rank "
                 "groups",
                 e->nranks, e->max_batch_tokens, e->max_prefill_tokens);
        e->max_prefill_tokens = e->max_batch_tokens;
    }
    /* the rank's decode tokens leave at least one token of every step to prefill */
    int cap = e->max_batch_tokens > 1 ? e->max_batch_tokens - 1 : 1;
    if (cap > e->max_seqs) cap = e->max_seqs;
    for (int i = 0; i < e->R; i++) {
        rank_t *rk = &e->ranks[i];
        rk->e = e;
        rk->local = i;
        rk->grank = e->rank_base + i;
        rk->cap = cap;
        ep_config_init(&rk->epcfg);
        if (e->backend == EPD_BACKEND_CUDA) {
            /* one GPU per rank; two ranks may share one (compute.gpus [0, 0]) */
            rk->epcfg.backend = EP_BACKEND_CUDA;
            /* ranks of this node over NVLink; several nodes through the proxy path */
            rk->epcfg.transport = !e->have_cluster                       ? EP_TRANSPORT_NVLINK
                                  : cfg->transport == EPD_TRANSPORT_RDMA ? EP_TRANSPORT_RDMA
                                                                         : EP_TRANSPORT_TCP;
            rk->epcfg.device = cfg->gpus[i];
            rk->epcfg.num_sms = cfg->num_sms;
        } else {
            rk->epcfg.backend = EP_BACKEND_CPU;
            rk->epcfg.transport = EP_TRANSPORT_AUTO;
        }
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
        if ((rc = pthread_create(&e->ranks[i].th, NULL, eng_rank_main, &e->ranks[i])) != 0) {
            epd_err_set(err, -rc, "cannot start rank thread %d: %s", i, strerror(rc));
            epd_engine_destroy(e);
            return -rc;
        }
        e->ranks[i].started = 1;
    }
    EPD_INFO(SUB, "loading %s (%s, %d layers, %d experts, top-%d, vocab %d) on %d rank(s)",
             cfg->model_path, e->hf.model_type, e->hf.num_hidden_layers, e->hf.num_experts,
             e->hf.num_experts_per_tok, e->hf.vocab_size, e->R);
    if (e->hf.num_nextn_predict_layers > 0)
        EPD_INFO(SUB,
                 "skipping the checkpoint's %d multi-token-prediction layer(s) "
                 "(num_nextn_predict_layers; model.layers.%d and after are not loaded)",
                 e->hf.num_nextn_predict_layers, e->hf.num_hidden_layers);
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
        free(rk->next);
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
    eng_health_event(e, msg);
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
    epd_sample_params_t sp = {
        .temperature = p->temperature, .top_p = p->top_p, .top_k = p->top_k, .seed = p->seed};
    if (epd_sample_check(&sp, NULL) != 0) return -EINVAL;
    /* a request that could never fit a rank's pool, even alone */
    if (epd_engine_kv_blocks_for(e, p->prompt_len, p->max_tokens) > e->info.kv_blocks)
        return -E2BIG;
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
    r->sample = sp;
    r->toks = malloc(sizeof(int32_t) * ((size_t)p->prompt_len + (size_t)p->max_tokens));
    if (!r->toks) {
        free_req(r);
        return -ENOMEM;
    }
    r->prompt = r->toks;
    r->out = r->toks + p->prompt_len;
    memcpy(r->prompt, p->prompt, sizeof(int32_t) * (size_t)p->prompt_len);
    r->t_submit_ns = epd_now_ns();

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

int epd_engine_kv_blocks_for(const epd_engine_t *e, int prompt_len, int max_tokens)
{
    int bs = e->info.kv_block_size > 0 ? e->info.kv_block_size : 1;
    /* the last generated token is never fed back */
    long len = (long)prompt_len + max_tokens - 1;
    return len <= 0 ? 0 : (int)((len + bs - 1) / bs);
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
    unsigned long long ctl_data = atomic_load(&e->ctl_data),
                       ctl_boot = atomic_load(&e->ctl_bootstrap);
    char last[MSG_MAX], lmsg[MSG_MAX];
    long long last_t = e->last_failure_time;
    snprintf(last, sizeof(last), "%s", e->last_failure);
    snprintf(lmsg, sizeof(lmsg), "%s", e->load_msg);
    int per_rank[EP_MAX_RANKS] = {0};
    epd_model_mem_t *rmem = calloc((size_t)e->R, sizeof(*rmem));
    for (int i = 0; i < e->R && i < EP_MAX_RANKS; i++)
        per_rank[i] = e->ranks[i].nactive;
    for (int i = 0; rmem && i < e->R; i++)
        rmem[i] = e->ranks[i].mem;
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
        epd_model_mem_estimate(
            c, e->nranks, e->backend == EPD_BACKEND_CUDA ? EPD_MODEL_CUDA : EPD_MODEL_CPU, &est);
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
            /* every rank holds the same shapes; the estimate counts the loaders' table */
            cJSON_AddStringToObject(o, "backend", epd_backend_name(e->backend));
            cJSON_AddNumberToObject(o, "expert_bytes", (double)est.expert_bytes);
            cJSON_AddNumberToObject(o, "replicated_bytes", (double)est.replicated_bytes);
            if (here && local < EP_MAX_RANKS)
                cJSON_AddNumberToObject(o, "active_sequences", per_rank[local]);
            if (here) {
                const rank_t *rk = &e->ranks[local];
                cJSON *ld = cJSON_AddObjectToObject(o, "load");
                if (ld) {
                    cJSON_AddNumberToObject(ld, "bytes_done", (double)atomic_load(&rk->load_done));
                    cJSON_AddNumberToObject(ld, "bytes_total",
                                            (double)atomic_load(&rk->load_total));
                }
            }
            if (here && rmem && rmem[local].kv_block_size > 0) {
                const epd_model_mem_t *mm = &rmem[local];
                cJSON *kv = cJSON_AddObjectToObject(o, "kv");
                if (kv) {
                    cJSON_AddNumberToObject(kv, "blocks_total", mm->kv_blocks_total);
                    cJSON_AddNumberToObject(kv, "blocks_free", mm->kv_blocks_free);
                    cJSON_AddNumberToObject(kv, "block_size", mm->kv_block_size);
                    cJSON_AddNumberToObject(kv, "block_bytes", (double)mm->kv_block_bytes);
                    cJSON_AddNumberToObject(kv, "bytes", (double)mm->kv_bytes);
                    cJSON_AddNumberToObject(kv, "preemptions", (double)e->ranks[local].preemptions);
                }
                cJSON_AddNumberToObject(o, "workspace_bytes", (double)mm->workspace_bytes);
            }
            cJSON_AddItemToArray(ranks, o);
        }
    }
    free(rmem);
    cJSON_AddNumberToObject(doc, "queue_depth", queued);
    cJSON_AddNumberToObject(doc, "max_queue", e->max_queue);
    cJSON_AddNumberToObject(doc, "active_sequences", active);
    cJSON_AddNumberToObject(doc, "steps", (double)steps);
    cJSON_AddNumberToObject(doc, "step_failures", (double)fails);
    cJSON_AddNumberToObject(doc, "group_reforms", (double)reforms);
    cJSON *ctl = cJSON_AddObjectToObject(doc, "step_control");
    if (ctl) {
        cJSON_AddNumberToObject(ctl, "data_plane", (double)ctl_data);
        cJSON_AddNumberToObject(ctl, "bootstrap", (double)ctl_boot);
    }
    if (last[0]) {
        cJSON *lf = cJSON_AddObjectToObject(doc, "last_failure");
        if (lf) {
            cJSON_AddStringToObject(lf, "message", last);
            cJSON_AddNumberToObject(lf, "time", (double)last_t);
        }
    }
    return doc;
}
