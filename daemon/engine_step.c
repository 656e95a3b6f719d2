/* The rank thread's lockstep loop: admitting requests from the rank's inbox by free KV blocks,
 * planning the rank's batch (decode tokens, then prompt chunks; preempting the most recent
 * requests when the KV pool runs short), the step's control word, the forward step (which
 * samples), and ending requests (their final events go to the loop through engine.c). Forming
 * the group the steps run on is engine_group.c's.
 *
 * Step protocol (every rank, every iteration):
 *   1. under the engine lock: sleep while the group is idle and nothing woke us; take new
 *      requests from this rank's inbox; note whether a wake arrived since the last iteration;
 *   2. plan this rank's batch (decode tokens, then prompt chunks) and allgather a control word
 *      {pending sequences, woke, stop, failed, planned tokens} on the group's data plane
 *      (ep_group_allgather), or over the bootstrap where the group has no such path (see
 *      exchange());
 *   3. all ranks see the same words and decide alike: stop; re-form the group (a rank failed);
 *      sleep (nothing pending anywhere and no fresh wake); or step, with zero tokens if this
 *      rank has none. The largest planned batch picks the step's MoE path for every rank: LL,
 *      or HT when some rank prefills more than model.max_batch_tokens tokens.
 * A wake that lands after a rank's snapshot changes the generation that rank sleeps on, and a
 * wake seen by some ranks only is reported (woke) so that nobody sleeps on it: no rank is left
 * alone in a collective, and none misses a request. */
#include "engine_int.h"
#include "epd_clock.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

/* Idle ranks re-check the stop flag this often (a wake or stop signals them at once anyway). */
#define IDLE_RECHECK_MS 1000

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
        eng_post(rk->e, rk->fin[i], 1, 0, 0);
    rk->fin_n = 0;
}

static void fail_all(rank_t *rk, int status, const char *msg)
{
    for (int i = 0; i < rk->act_n; i++)
        if (!rk->act[i]->done) finalize(rk, rk->act[i], EPD_FINISH_ERROR, status, "%.900s", msg);
    compact(rk);
}

void eng_health_event(epd_engine_t *e, const char *msg)
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

/* ---- KV blocks: planning, admission, preemption ------------------------------------------ */

/* Tokens the request's sequence must hold before its next token can be sampled. */
static int ctx_len(const epd_engine_req_t *r)
{
    return r->prompt_len + r->ngen;
}

/* Blocks the request's sequence must add to hold len positions. */
static int grow_blocks(const rank_t *rk, const epd_engine_req_t *r, int len)
{
    int have = r->seq ? epd_seq_blocks(r->seq) : 0;
    int need = epd_model_kv_blocks_for(rk->model, len) - have;
    return need > 0 ? need : 0;
}

/* Blocks the running requests need before their next token (+1 for the step after). */
static int running_need(const rank_t *rk)
{
    int need = 0;
    for (int i = 0; i < rk->act_n; i++)
        if (!rk->act[i]->done) need += grow_blocks(rk, rk->act[i], ctx_len(rk->act[i]) + 1);
    return need;
}

/* Moves the most recently admitted request back to the front of the inbox, its blocks freed;
 * it keeps its generated tokens and prefills prompt + those again when admitted anew. 0 if no
 * request can be preempted (one running at most: it fits alone, see epd_engine_submit). */
static int preempt_last(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    if (rk->act_n < 2) return 0;
    epd_engine_req_t *r = rk->act[--rk->act_n];
    epd_seq_destroy(r->seq);
    r->seq = NULL;
    r->fed = 0;
    rk->preemptions++;
    epd_metric_add(rk->e->m_preempt, 1);
    EPD_DEBUG(SUB,
              "rank %d: KV pool short (%d of %d blocks free): request preempted after %d "
              "tokens, requeued",
              rk->grank, epd_model_kv_blocks_free(rk->model), epd_model_kv_blocks_total(rk->model),
              r->ngen);
    pthread_mutex_lock(&e->mu);
    r->next = rk->inbox_head;
    rk->inbox_head = r;
    if (!rk->inbox_tail) rk->inbox_tail = r;
    rk->inbox_n++;
    e->queued++;
    rk->nactive--;
    e->active--;
    epd_metric_set(e->m_queue, e->queued);
    epd_metric_set(e->m_active, e->active);
    pthread_mutex_unlock(&e->mu);
    return 1;
}

static epd_batch_item_t item_of(epd_engine_req_t *r, int c)
{
    epd_batch_item_t it = {r->seq, r->toks + r->fed, c, r->fed + c == ctx_len(r), r->sample};
    it.sample.counter = (uint64_t)r->ngen;
    return it;
}

/* One try at this rank's batch: decode tokens first (latency of running sequences), then
 * prefill chunks in admission order with what is left of the token budget and of the free KV
 * blocks. Returns 1 when the free blocks cannot carry the decode tokens or nothing at all. */
static int plan_once(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    /* with HT on, prompt chunks fill up to max_prefill_tokens (decode tokens alone stay below
     * max_batch_tokens, see cap: LL) */
    const int total =
        e->max_prefill_tokens > e->max_batch_tokens ? e->max_prefill_tokens : e->max_batch_tokens;
    const int bs = epd_model_kv_block_size(rk->model);
    int budget = total, n = 0, avail = epd_model_kv_blocks_free(rk->model);
    rk->n_items = rk->prompt_tokens = rk->tokens = 0;
    for (int i = 0; i < rk->act_n && budget > 0; i++) {
        epd_engine_req_t *r = rk->act[i];
        if (ctx_len(r) - r->fed != 1) continue;
        int g = grow_blocks(rk, r, r->fed + 1);
        if (g > avail) return 1;
        avail -= g;
        rk->items[n] = item_of(r, 1);
        rk->item_req[n++] = i;
        budget--;
    }
    int prompt_tokens = 0;
    for (int i = 0; i < rk->act_n && budget > 0; i++) {
        epd_engine_req_t *r = rk->act[i];
        if (ctx_len(r) - r->fed <= 1) continue;
        int c = ctx_len(r) - r->fed < budget ? ctx_len(r) - r->fed : budget;
        int room = (epd_seq_blocks(r->seq) + avail) * bs - r->fed;
        if (c > room) c = room;
        if (c <= 0) continue;
        avail -= grow_blocks(rk, r, r->fed + c);
        rk->items[n] = item_of(r, c);
        rk->item_req[n++] = i;
        budget -= c;
        prompt_tokens += c;
    }
    if (n == 0 && rk->act_n > 0) return 1;
    rk->n_items = n;
    rk->prompt_tokens = prompt_tokens;
    rk->tokens = total - budget;
    return 0;
}

/* Plans this rank's batch before the step's control word (which carries its size), preempting
 * the most recent requests while the KV pool cannot carry the running ones. */
static void plan_step(rank_t *rk)
{
    while (plan_once(rk))
        if (!preempt_last(rk)) {
            /* one request that the pool cannot carry: refused at submit, so not expected */
            for (int i = 0; i < rk->act_n; i++)
                finalize(rk, rk->act[i], EPD_FINISH_ERROR, 500,
                         "rank %d: the KV cache (%d blocks of %d tokens) cannot hold this "
                         "request",
                         rk->grank, epd_model_kv_blocks_total(rk->model),
                         epd_model_kv_block_size(rk->model));
            compact(rk);
        }
}

/* Runs the planned batch; step_max is the largest planned batch of any rank. */
static void step(rank_t *rk, int step_max)
{
    epd_engine_t *e = rk->e;
    int n = rk->n_items, prompt_tokens = rk->prompt_tokens;
    epd_err_t err = {0};
    int64_t t0 = epd_now_ns();
    int rc = epd_model_forward_step(rk->model, rk->items, n, step_max, rk->next, NULL, &err);
    double dt = (double)(epd_now_ns() - t0) * 1e-9;
    if (rk->local == 0) {
        epd_metric_observe(e->m_step, dt);
        epd_metric_observe(e->m_batch, rk->tokens);
        pthread_mutex_lock(&e->mu);
        e->steps++;
        pthread_mutex_unlock(&e->mu);
    }
    epd_metric_set(rk->m_kv_free, epd_model_kv_blocks_free(rk->model));
    if (rc) {
        /* the EP exchange failed (timeout, peer gone, aborted): the group must be re-formed;
         * anything else is a fault of this rank's batch that the other ranks did not notice */
        int ep_fail = rc == EPD_EEXCHANGE;
        char msg[MSG_MAX];
        snprintf(msg, sizeof(msg), "step failed on rank %d: %s", rk->grank, err.msg);
        EPD_ERROR(SUB, "%s (%d request(s) failed)", msg, n);
        eng_health_event(e, msg);
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
        r->fed += rk->items[i].num_tokens;
        if (!rk->items[i].want_logits) continue;
        int32_t tok = rk->next[row++];
        r->out[r->ngen++] = tok;
        generated++;
        if (r->ngen == 1)
            epd_metric_observe(e->m_ttft, (double)(epd_now_ns() - r->t_submit_ns) * 1e-9);
        if (r->stream) eng_post(e, r, 0, tok, r->ngen - 1);
        if (is_eos(e, r, tok))
            finalize(rk, r, EPD_FINISH_STOP, 0, NULL);
        else if (r->ngen >= r->max_tokens || r->prompt_len + r->ngen >= e->max_seq_len)
            finalize(rk, r, EPD_FINISH_LENGTH, 0, NULL);
    }
    if (generated) epd_metric_add(e->m_gen, generated);
    compact(rk);
    epd_model_mem_t mem;
    epd_model_mem(rk->model, &mem);
    epd_metric_set(rk->m_kv_free, mem.kv_blocks_free);
    epd_metric_set(rk->m_kv_bytes, (double)mem.kv_bytes);
    pthread_mutex_lock(&e->mu);
    rk->mem = mem;
    pthread_mutex_unlock(&e->mu);
}

/* ---- the rank thread ---------------------------------------------------------------------- */

/* Step 2's allgather. On the group's data plane a word costs what one small EP op costs; over
 * the bootstrap, in a cluster, it is a round trip through every node's event loop and the
 * control plane, which a GPU decode step of a few ms cannot afford. Either is one collective of
 * every rank of the group, entered at the same point of the protocol, so what the comment at the
 * top says of sleeping and waking holds for both; every rank of a group finds the same plane
 * (libep answers EP_ERR_UNSUPPORTED, before sending anything, alike on every rank of a
 * configuration without the path). The join and group formation stay on the bootstrap. A
 * failure of either is a lost lockstep: the caller fails the step's requests and re-forms. 0, or
 * a negative ep_status_t with msg saying why (naming the rank at fault where libep knows it). */
static int exchange(rank_t *rk, const ctl_word_t *w, char *msg, size_t len)
{
    epd_engine_t *e = rk->e;
    if (!rk->ctl_on_bootstrap) {
        ep_status_t st = ep_group_allgather(rk->group, w, rk->ctl_all, sizeof(*w));
        if (st != EP_ERR_UNSUPPORTED) {
            if (st)
                snprintf(msg, len, "%s (%.700s)", ep_strerror(st), ep_group_last_error(rk->group));
            else if (rk->local == 0) {
                atomic_fetch_add(&e->ctl_data, 1);
                epd_metric_add(e->m_ctl_data, 1);
            }
            return st;
        }
        EPD_INFO(SUB, "rank %d: %.700s; step control words go through the bootstrap", rk->grank,
                 ep_group_last_error(rk->group));
        rk->ctl_on_bootstrap = 1;
    }
    eng_tag(rk, "engine: step control");
    int rc = rk->bs.allgather(rk->bs.ctx, w, rk->ctl_all, sizeof(*w), (unsigned)e->timeout_ms);
    if (rc)
        snprintf(msg, len, "%s", ep_strerror((ep_status_t)rc));
    else if (rk->local == 0) {
        atomic_fetch_add(&e->ctl_bootstrap, 1);
        epd_metric_add(e->m_ctl_boot, 1);
    }
    return rc;
}

/* Step 1 of the protocol: sleep while idle, admit requests, snapshot the control word. */
static void snapshot(rank_t *rk, int idle, ctl_word_t *w)
{
    epd_engine_t *e = rk->e;
    pthread_mutex_lock(&e->mu);
    while (idle && e->gen == rk->last_gen && !e->stop) {
        struct timespec dl;
        epd_deadline_after(&dl, IDLE_RECHECK_MS);
        pthread_cond_timedwait(&e->cv, &e->mu, &dl);
    }
    w->woke = e->gen != rk->last_gen;
    rk->last_gen = e->gen;
    /* admission by free KV blocks: the request's context (+1 token) beyond what the running
     * ones need next; with nothing running the oldest always goes (it fits, see submit) */
    int avail = epd_model_kv_blocks_free(rk->model) - running_need(rk);
    while (rk->inbox_head && rk->act_n < rk->cap) {
        epd_engine_req_t *r = rk->inbox_head;
        int need = epd_model_kv_blocks_for(rk->model, ctx_len(r) + 1);
        if (need > avail && rk->act_n > 0 && !atomic_load(&r->cancelled)) break;
        avail -= need;
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

void eng_serve(rank_t *rk)
{
    epd_engine_t *e = rk->e;
    int idle = 1;
    for (;;) {
        if (rk->reform && eng_reform(rk)) break;
        ctl_word_t w = {.purpose = CTL_STEP};
        snapshot(rk, idle, &w);
        admit_new(rk);
        w.pending += rk->act_n;
        plan_step(rk);
        w.tokens = rk->tokens;
        char why[MSG_MAX];
        int rc = exchange(rk, &w, why, sizeof(why));
        int odd = -1; /* a rank that is not stepping (it joins a group being formed) */
        for (int i = 0; !rc && odd < 0 && i < e->nranks; i++)
            if (rk->ctl_all[i].purpose != CTL_STEP) odd = i;
        if (rc || odd >= 0) {
            char msg[MSG_MAX];
            if (rc)
                snprintf(msg, sizeof(msg), "rank %d lost lockstep with the other ranks: %.900s",
                         rk->grank, why);
            else
                snprintf(msg, sizeof(msg),
                         "rank %d lost lockstep with the other ranks: rank %d sent %s where a "
                         "step's control word was due",
                         rk->grank, odd, eng_ctl_purpose_name(rk->ctl_all[odd].purpose));
            EPD_ERROR(SUB, "%.900s", msg);
            eng_health_event(e, msg);
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
        eng_tag(rk, "engine: step");
        step(rk, step_max);
    }
    fail_all(rk, 503, "the engine is stopping");
}
