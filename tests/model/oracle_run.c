/* The oracle workload: reading expected.json and one rank's greedy generation of its cases. */
#include "oracle_run.h"
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int ints(const cJSON *a, int32_t *out, int max)
{
    int n = 0;
    for (const cJSON *v = a ? a->child : NULL; v; v = v->next) {
        if (n == max || !cJSON_IsNumber(v)) return -1;
        out[n++] = (int32_t)v->valueint;
    }
    return n;
}

int oracle_load(const char *dir, oracle_t *o, epd_err_t *err)
{
    char path[1024], *text = NULL;
    size_t len;
    memset(o, 0, sizeof(*o));
    snprintf(path, sizeof(path), "%s/expected.json", dir);
    int rc = epd_read_text_file(path, 64u << 20, &text, &len, err);
    if (rc) return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root) return epd_err_set(err, -EINVAL, "%s: not JSON", path);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    const cJSON *nt = cJSON_GetObjectItemCaseSensitive(root, "new_tokens");
    if (!cJSON_IsArray(cases) || !cJSON_IsNumber(nt) || nt->valueint > ORACLE_MAX_NEW) {
        rc = epd_err_set(err, -EINVAL, "%s: no cases/new_tokens", path);
        goto out;
    }
    o->new_tokens = nt->valueint;
    for (const cJSON *c = cases->child; c; c = c->next) {
        if (o->num_cases == ORACLE_MAX_CASES) {
            rc = epd_err_set(err, -EINVAL, "%s: too many cases", path);
            goto out;
        }
        oracle_case_t *oc = &o->cases[o->num_cases++];
        oc->prompt_len =
            ints(cJSON_GetObjectItemCaseSensitive(c, "prompt"), oc->prompt, ORACLE_MAX_PROMPT);
        int nt2 = ints(cJSON_GetObjectItemCaseSensitive(c, "tokens"), oc->tokens, ORACLE_MAX_NEW);
        const cJSON *lg = cJSON_GetObjectItemCaseSensitive(c, "logits");
        if (oc->prompt_len < 1 || nt2 != o->new_tokens || cJSON_GetArraySize(lg) != o->new_tokens) {
            rc = epd_err_set(err, -EINVAL, "%s: case %d malformed", path, o->num_cases - 1);
            goto out;
        }
        int V = cJSON_GetArraySize(lg->child);
        if (o->vocab == 0) o->vocab = V;
        oc->logits = malloc(sizeof(float) * (size_t)V * (size_t)o->new_tokens);
        if (!oc->logits || V != o->vocab) {
            rc = epd_err_set(err, -EINVAL, "%s: case %d logits", path, o->num_cases - 1);
            goto out;
        }
        int s = 0;
        for (const cJSON *row = lg->child; row; row = row->next, s++) {
            int i = 0;
            for (const cJSON *v = row->child; v && i < V; v = v->next, i++)
                oc->logits[(size_t)s * V + i] = (float)v->valuedouble;
            if (i != V || cJSON_GetArraySize(row) != V) {
                rc = epd_err_set(err, -EINVAL, "%s: case %d row %d", path, o->num_cases - 1, s);
                goto out;
            }
        }
    }
out:
    cJSON_Delete(root);
    return rc;
}

void oracle_free(oracle_t *o)
{
    for (int i = 0; i < o->num_cases; i++)
        free(o->cases[i].logits);
}

/* Progress of one case on its rank. */
typedef struct gen_state {
    int c;   /* case index */
    int fed; /* prompt tokens in the cache */
    int gen; /* tokens generated */
    epd_seq_t *seq;
} gen_state_t;

static int budget_of(const oracle_opts_t *op)
{
    return op->prefill > op->chunk ? op->prefill : op->chunk;
}

/* Packs step `step`'s batch: each sequence that has joined adds, in order, its next prefill
 * chunk or its one decode token while the budget lasts. Returns the item count; item i belongs
 * to st[map[i]]. */
static int plan(const oracle_t *o, gen_state_t *st, int n, const oracle_opts_t *op, int step,
                epd_batch_item_t *items, int *map)
{
    int budget = budget_of(op), k = 0;
    for (int i = 0; i < n && budget > 0; i++) {
        const oracle_case_t *oc = &o->cases[st[i].c];
        if (st[i].gen == o->new_tokens || step < st[i].c * op->stagger) continue;
        epd_batch_item_t *it = &items[k];
        it->seq = st[i].seq;
        if (st[i].fed < oc->prompt_len) {
            int m = oc->prompt_len - st[i].fed;
            it->num_tokens = m < budget ? m : budget;
            it->tokens = oc->prompt + st[i].fed;
            it->want_logits = st[i].fed + it->num_tokens == oc->prompt_len;
        } else {
            it->num_tokens = 1;
            it->tokens = NULL; /* the caller points it at the last generated token */
            it->want_logits = 1;
        }
        it->sample = (epd_sample_params_t){.top_p = 1, .counter = (uint64_t)st[i].gen};
        budget -= it->num_tokens;
        map[k++] = i;
    }
    return k;
}

/* Steps rank r needs for its cases (the plan replayed on lengths alone). */
static int steps_for_rank(const oracle_t *o, int r, int R, const oracle_opts_t *op)
{
    gen_state_t st[ORACLE_MAX_CASES];
    epd_batch_item_t items[ORACLE_MAX_CASES];
    int map[ORACLE_MAX_CASES], n = 0, steps = 0;
    for (int c = r; c < o->num_cases; c += R)
        st[n++] = (gen_state_t){.c = c};
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++)
            left += st[i].gen < o->new_tokens;
        if (!left) return steps;
        int k = plan(o, st, n, op, steps, items, map);
        steps++;
        for (int i = 0; i < k; i++) {
            gen_state_t *s = &st[map[i]];
            if (s->fed < o->cases[s->c].prompt_len) s->fed += items[i].num_tokens;
            if (items[i].want_logits) s->gen++;
        }
    }
}

int oracle_run_rank(const char *dir, const oracle_t *o, const ep_bootstrap_t *bs,
                    ep_transport_kind_t transport, const epd_model_placement_t *placement,
                    const oracle_opts_t *op, oracle_result_t *res, epd_err_t *err)
{
    int rc = 0, r = bs->rank, R = bs->nranks, n = 0;
    char path[1024];
    epd_hf_config_t hf;
    ep_group_t *g = NULL;
    epd_model_t *m = NULL;
    gen_state_t st[ORACLE_MAX_CASES];
    float *logits = NULL;
    memset(st, 0, sizeof(st));
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if ((rc = epd_hf_config_load(path, &hf, err))) return rc;
    ep_config_t cfg;
    ep_config_init(&cfg);
    cfg.transport = transport;
    cfg.timeout_ms = 20000;
    if (op->backend == EPD_MODEL_CUDA) {
        cfg.backend = EP_BACKEND_CUDA;
        cfg.device = op->device;
    }
    epd_model_ep_config(&hf, op->chunk, op->prefill, &cfg);
    ep_status_t es = ep_group_create(&cfg, bs, &g);
    if (es != EP_OK)
        return epd_err_set(err, -EIO, "rank %d: ep_group_create: %s (%s)", r, ep_strerror(es),
                           ep_group_last_error(NULL));
    epd_model_opts_t opts = {.dir = dir,
                             .group = g,
                             .placement = placement,
                             .max_seq_len = ORACLE_MAX_PROMPT + ORACLE_MAX_NEW,
                             .ht_min_tokens = op->ht_min,
                             .kv_block_size = op->kv_block_size,
                             .kv_blocks = op->kv_blocks,
                             .backend = op->backend,
                             .device = op->device,
                             .no_graphs = op->no_graphs,
                             .fp8_dispatch = op->fp8_dispatch};
    if ((rc = epd_model_load(&opts, &m, err))) goto out;
    epd_model_mem(m, &res->mem);
    for (int c = r; c < o->num_cases; c += R) {
        st[n].c = c;
        if ((rc = epd_seq_create(m, &st[n].seq, err))) goto out;
        n++;
    }
    int steps = 0;
    for (int q = 0; q < R; q++) {
        int s = steps_for_rank(o, q, R, op);
        steps = s > steps ? s : steps;
    }
    logits = malloc(sizeof(float) * (size_t)o->vocab * ORACLE_MAX_CASES);
    if (!logits) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int step = 0; step < steps; step++) {
        epd_batch_item_t items[ORACLE_MAX_CASES];
        int map[ORACLE_MAX_CASES];
        int k = plan(o, st, n, op, step, items, map), mine = 0, prompt = 0;
        for (int i = 0; i < k; i++) {
            gen_state_t *s = &st[map[i]];
            if (!items[i].tokens) items[i].tokens = &res->tokens[s->c][s->gen - 1];
            mine += items[i].num_tokens;
            prompt |= s->fed < o->cases[s->c].prompt_len;
        }
        /* the step's agreement: every rank learns every rank's batch size */
        int32_t sizes[EP_MAX_RANKS], max = 0;
        int32_t me = mine;
        if ((rc = bs->allgather(bs->ctx, &me, sizes, sizeof(me), 20000)) != 0) {
            rc = epd_err_set(err, -EIO, "rank %d: step %d: allgather of batch sizes: %s", r, step,
                             ep_strerror((ep_status_t)rc));
            goto out;
        }
        for (int q = 0; q < R; q++)
            max = sizes[q] > max ? sizes[q] : max;
        int ht = epd_model_step_path(m, max) == EPD_MOE_HT;
        res->steps_ht += ht;
        res->steps_ll += !ht;
        res->ht_decode_only += ht && k > 0 && !prompt;
        res->ht_idle += ht && k == 0;
        /* a rank out of work still joins the step with zero items */
        int32_t next[ORACLE_MAX_CASES];
        if ((rc = epd_model_forward_step(m, items, k, max, next, logits, err))) goto out;
        for (int i = 0, row = 0; i < k; i++) {
            gen_state_t *s = &st[map[i]];
            if (s->fed < o->cases[s->c].prompt_len) s->fed += items[i].num_tokens;
            if (!items[i].want_logits) continue;
            const float *lg = logits + (size_t)row++ * o->vocab;
            memcpy(res->logits[s->c] + (size_t)s->gen * o->vocab, lg, sizeof(float) * o->vocab);
            if (next[row - 1] != epd_sample_argmax(lg, o->vocab)) {
                rc = epd_err_set(err, -EPROTO,
                                 "rank %d: case %d token %d: the model sampled %d, the argmax of "
                                 "its logits is %d",
                                 r, s->c, s->gen, next[row - 1], epd_sample_argmax(lg, o->vocab));
                goto out;
            }
            res->tokens[s->c][s->gen] = next[row - 1];
            if (++s->gen == o->new_tokens) { /* done: its blocks go back to the pool */
                epd_seq_destroy(s->seq);
                s->seq = NULL;
            }
        }
    }
    uint64_t counts[2];
    epd_model_path_counts(m, counts);
    if (counts[EPD_MOE_LL] != (uint64_t)res->steps_ll ||
        counts[EPD_MOE_HT] != (uint64_t)res->steps_ht) {
        rc = epd_err_set(err, -EPROTO,
                         "rank %d: the model took LL %llu and HT %llu times; the steps' sizes "
                         "called for %d and %d",
                         r, (unsigned long long)counts[EPD_MOE_LL],
                         (unsigned long long)counts[EPD_MOE_HT], res->steps_ll, res->steps_ht);
        goto out;
    }
    for (int i = 0; i < n; i++)
        if (st[i].gen != o->new_tokens) {
            rc = epd_err_set(err, -EPROTO, "rank %d: case %d generated %d of %d tokens in %d steps",
                             r, st[i].c, st[i].gen, o->new_tokens, steps);
            goto out;
        }
    for (int i = 0; i < n; i++) {
        epd_seq_destroy(st[i].seq);
        st[i].seq = NULL;
    }
    if (epd_model_kv_blocks_free(m) != epd_model_kv_blocks_total(m)) {
        rc = epd_err_set(err, -EPROTO,
                         "rank %d: %d of %d KV blocks free after every sequence "
                         "ended",
                         r, epd_model_kv_blocks_free(m), epd_model_kv_blocks_total(m));
        goto out;
    }
out:
    free(logits);
    for (int i = 0; i < n; i++)
        epd_seq_destroy(st[i].seq);
    epd_model_destroy(m);
    ep_group_destroy(g);
    return rc;
}

typedef struct thread_arg {
    const char *dir;
    const oracle_t *o;
    ep_inproc_world_t *world;
    const epd_model_placement_t *placement;
    const oracle_opts_t *opts;
    oracle_result_t *res;
    int *rc;
    epd_err_t *err;
    int rank;
} thread_arg_t;

static void *rank_thread(void *p)
{
    thread_arg_t *a = p;
    ep_bootstrap_t bs;
    ep_inproc_bootstrap(a->world, a->rank, &bs);
    a->rc[a->rank] = oracle_run_rank(a->dir, a->o, &bs, EP_TRANSPORT_AUTO, a->placement, a->opts,
                                     &a->res[a->rank], &a->err[a->rank]);
    return NULL;
}

int oracle_run_threads(const char *dir, const oracle_t *o, int R,
                       const epd_model_placement_t *placement, const oracle_opts_t *opts,
                       oracle_result_t *res, int *rc, epd_err_t *err)
{
    ep_inproc_world_t *world = NULL;
    if (R < 1 || R > ORACLE_MAX_RANKS || ep_inproc_world_create(R, &world) != EP_OK) return -1;
    pthread_t th[ORACLE_MAX_RANKS];
    thread_arg_t args[ORACLE_MAX_RANKS];
    int started = 0, ret = 0;
    for (int r = 0; r < R; r++) {
        args[r] = (thread_arg_t){dir, o, world, placement, opts, res, rc, err, r};
        if (pthread_create(&th[r], NULL, rank_thread, &args[r]) != 0) {
            ret = -1;
            break;
        }
        started++;
    }
    for (int r = 0; r < started; r++)
        pthread_join(th[r], NULL);
    ep_inproc_world_destroy(world);
    return ret;
}
