/* The engine's failure paths, in-process through the full HTTP path (in-memory connections):
 * a peer marked down in the middle of a step (epd_engine_peer_down, what the control plane
 * calls), a rank that stops answering (the step times out within timeouts.ep_op_ms), and the
 * queue limit (model.max_queued_requests -> 429 with Retry-After), and a KV pool so small that
 * concurrent requests preempt each other (every one still gets transformers' greedy tokens).
 *
 * The test plays the control plane: its epd_engine_cluster_t bootstrap wraps libep's
 * in-process one, and its purpose hook can hold one rank's thread as it starts a step ("engine:
 * step", once every rank agreed on the step through the step's control word, which travels on
 * libep's data plane), which is how a rank "stops answering" while its peers are already inside
 * the step's MoE exchange. After each failure the engine must re-form the group and serve greedy
 * tokens equal to transformers' (tests/model/oracle/expected.json, read here). */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "api_openai.h"
#include "epd_clock.h"
#include "engine.h"
#include "epd_config.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "state.h"

#define NRANKS_MAX 4
/* Bound on every wait of the test: the loop runs until a condition holds or this passes. */
#define WAIT_MS 20000
/* Longest a held rank waits for its release (the test releases it much sooner). */
#define HOLD_MAX_MS 30000
#define LONG_TOKENS 400 /* a generation that is still running when the failure comes */

/* ---- a growing output buffer per in-memory connection ---- */

typedef struct client {
    epd_http_conn_t *c;
    char *buf;
    size_t len, cap;
} client_t;

static void capture(void *ctx, const char *d, size_t n)
{
    client_t *cl = ctx;
    if (cl->len + n + 1 > cl->cap) {
        size_t cap = cl->cap ? cl->cap : 4096;
        while (cap < cl->len + n + 1)
            cap *= 2;
        char *b = realloc(cl->buf, cap);
        assert_non_null(b);
        cl->buf = b;
        cl->cap = cap;
    }
    memcpy(cl->buf + cl->len, d, n);
    cl->len += n;
    cl->buf[cl->len] = 0;
}

/* ---- the harness: loop, engine, API, and the bootstrap that can hold a rank ---- */

typedef struct harness harness_t;
typedef struct hrank {
    harness_t *h;
    int rank;
    ep_bootstrap_t inner;
} hrank_t;

struct harness {
    uv_loop_t loop;
    uv_timer_t tick;
    epd_metrics_t *m;
    epd_state_t *st;
    epd_config_t cfg;
    epd_http_server_t *http;
    epd_engine_t *e;
    epd_api_t *api;
    int loaded, load_status;
    ep_inproc_world_t *world;
    hrank_t hr[NRANKS_MAX];
    epd_engine_cluster_t cl;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int hold_rank; /* whose next collective holds its thread (-1: nobody's) */
    int held, release;
};

/* As a step starts: the armed rank stays here, as a thread that stopped answering. */
static void maybe_hold(hrank_t *hr)
{
    harness_t *h = hr->h;
    pthread_mutex_lock(&h->mu);
    if (h->hold_rank == hr->rank) {
        h->hold_rank = -1;
        h->held = 1;
        pthread_cond_broadcast(&h->cv);
        struct timespec dl;
        epd_deadline_after(&dl, HOLD_MAX_MS);
        while (!h->release)
            if (pthread_cond_timedwait(&h->cv, &h->mu, &dl) == ETIMEDOUT) break;
        h->held = 0;
        h->release = 0;
    }
    pthread_mutex_unlock(&h->mu);
}

static int h_allgather(void *ctx, const void *in, void *out, size_t len, unsigned timeout_ms)
{
    hrank_t *hr = ctx;
    return hr->inner.allgather(hr->inner.ctx, in, out, len, timeout_ms);
}

static int h_barrier(void *ctx, unsigned timeout_ms)
{
    hrank_t *hr = ctx;
    return hr->inner.barrier(hr->inner.ctx, timeout_ms);
}

static void h_purpose(void *ctx, const ep_bootstrap_t *bs, const char *what)
{
    (void)ctx;
    if (!strcmp(what, "engine: step")) maybe_hold(bs->ctx);
}

static int h_bootstrap(void *ctx, int local, unsigned epoch, ep_bootstrap_t *out, epd_err_t *err)
{
    harness_t *h = ctx;
    (void)epoch; /* one process: every epoch rendezvouses in the same world */
    if (local < 0 || local >= h->cfg.ranks_per_node)
        return epd_err_set(err, -EINVAL, "no local rank %d", local);
    hrank_t *hr = &h->hr[local];
    ep_inproc_bootstrap(h->world, local, &hr->inner);
    *out = (ep_bootstrap_t){.rank = local,
                            .nranks = h->cfg.ranks_per_node,
                            .ctx = hr,
                            .allgather = h_allgather,
                            .barrier = h_barrier};
    return 0;
}

static void on_loaded(void *arg, int status, const char *msg)
{
    harness_t *h = arg;
    h->loaded = 1;
    h->load_status = status;
    if (status) fprintf(stderr, "load failed: %s\n", msg);
}

static void on_tick(uv_timer_t *t)
{
    (void)t; /* keeps uv_run(UV_RUN_ONCE) returning so that conditions are re-checked */
}

typedef int (*pred_fn)(harness_t *h, void *arg);

/* Runs the loop until pred holds; fails the test after WAIT_MS. */
static void run_until(harness_t *h, pred_fn pred, void *arg, const char *what)
{
    struct timespec now, dl;
    epd_deadline_after(&dl, WAIT_MS);
    while (!pred(h, arg)) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > dl.tv_sec || (now.tv_sec == dl.tv_sec && now.tv_nsec > dl.tv_nsec))
            fail_msg("timed out after %d ms waiting for %s", WAIT_MS, what);
        uv_run(&h->loop, UV_RUN_ONCE);
    }
}

static int p_loaded(harness_t *h, void *arg)
{
    (void)arg;
    return h->loaded;
}

/* kv_block_size, kv_blocks: 0 for the defaults; prefill: model.max_prefill_tokens (-1: the
 * default) */
static harness_t *harness_create_kv(int ranks, int ep_op_ms, int max_queued, int kv_block_size,
                                    int kv_blocks, int prefill)
{
    harness_t *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    epd_config_defaults(&h->cfg);
    h->cfg.backend = EPD_BACKEND_CPU;
    h->cfg.ranks_per_node = ranks;
    snprintf(h->cfg.model_path, sizeof(h->cfg.model_path), "%s", EPD_ORACLE_DIR);
    h->cfg.max_batch_tokens = 8;
    h->cfg.max_seq_len = 512;
    h->cfg.ep_timeout_ms = ep_op_ms;
    h->cfg.max_queued_requests = max_queued;
    if (kv_block_size) h->cfg.kv_block_size = kv_block_size;
    if (kv_blocks) h->cfg.kv_blocks = kv_blocks;
    if (prefill >= 0) h->cfg.max_prefill_tokens = prefill;
    h->hold_rank = -1;
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->cv, &ca);
    pthread_condattr_destroy(&ca);
    for (int i = 0; i < ranks; i++)
        h->hr[i] = (hrank_t){h, i, {0}};
    assert_int_equal(ep_inproc_world_create(ranks, &h->world), EP_OK);
    h->cl = (epd_engine_cluster_t){
        .rank_base = 0, .nranks = ranks, .bootstrap = h_bootstrap, .purpose = h_purpose, .ctx = h};

    assert_int_equal(uv_loop_init(&h->loop), 0);
    uv_timer_init(&h->loop, &h->tick);
    uv_timer_start(&h->tick, on_tick, 5, 5);
    assert_non_null(h->m = epd_metrics_create());
    assert_non_null(h->st = epd_state_create());
    epd_http_limits_t lim = {.max_header_bytes = 16384,
                             .max_body_bytes = 1 << 20,
                             .max_connections = 64,
                             .idle_timeout_ms = 60000,
                             .header_timeout_ms = 60000};
    assert_int_equal(epd_http_server_create(&h->loop, &lim, h->m, &h->http), 0);
    epd_engine_opts_t eo = {.loop = &h->loop,
                            .cfg = &h->cfg,
                            .metrics = h->m,
                            .state = h->st,
                            .cluster = &h->cl,
                            .on_loaded = on_loaded,
                            .arg = h};
    epd_err_t err = {0};
    int rc = epd_engine_create(&eo, &h->e, &err);
    if (rc) fail_msg("epd_engine_create: %s", err.msg);
    assert_int_equal(epd_api_create(h->http, h->e, h->m, &h->api), 0);
    run_until(h, p_loaded, NULL, "the model to load");
    assert_int_equal(h->load_status, 0);
    return h;
}

static harness_t *harness_create(int ranks, int ep_op_ms, int max_queued)
{
    return harness_create_kv(ranks, ep_op_ms, max_queued, 0, 0, -1);
}

static void harness_destroy(harness_t *h)
{
    pthread_mutex_lock(&h->mu);
    h->release = 1; /* a rank still held must be able to stop */
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    epd_api_detach_engine(h->api);
    epd_engine_destroy(h->e);
    epd_http_server_destroy(h->http);
    uv_close((uv_handle_t *)&h->tick, NULL);
    uv_run(&h->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&h->loop), 0);
    epd_api_destroy(h->api);
    epd_state_destroy(h->st);
    epd_metrics_destroy(h->m);
    ep_inproc_world_destroy(h->world);
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

static void arm_hold(harness_t *h, int rank)
{
    pthread_mutex_lock(&h->mu);
    h->hold_rank = rank;
    pthread_mutex_unlock(&h->mu);
}

static void release_hold(harness_t *h)
{
    pthread_mutex_lock(&h->mu);
    h->release = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

static int p_held(harness_t *h, void *arg)
{
    (void)arg;
    pthread_mutex_lock(&h->mu);
    int held = h->held;
    pthread_mutex_unlock(&h->mu);
    return held;
}

/* ---- HTTP through in-memory connections ---- */

static void post(harness_t *h, client_t *cl, const char *body)
{
    memset(cl, 0, sizeof(*cl));
    cl->c = epd_http_conn_open_memory(h->http, capture, cl);
    assert_non_null(cl->c);
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n",
                     strlen(body));
    assert_int_equal(epd_http_conn_feed(cl->c, head, (size_t)n), 1);
    epd_http_conn_feed(cl->c, body, strlen(body));
}

static void client_close(client_t *cl)
{
    if (cl->c) epd_http_conn_close_memory(cl->c);
    free(cl->buf);
    memset(cl, 0, sizeof(*cl));
}

/* A whole response: Content-Length bytes of body, or the last chunk of a chunked one. */
static int p_response(harness_t *h, void *arg)
{
    (void)h;
    client_t *cl = arg;
    if (!cl->buf) return 0;
    const char *end = strstr(cl->buf, "\r\n\r\n");
    if (!end) return 0;
    const char *cls = strstr(cl->buf, "Content-Length: ");
    if (cls && cls < end) return cl->len >= (size_t)(end + 4 - cl->buf) + strtoul(cls + 16, 0, 10);
    return cl->len >= 5 && !strcmp(cl->buf + cl->len - 5, "0\r\n\r\n");
}

/* A streamed chunk that carries a token (the finish chunk's token_ids is empty). */
static int p_first_token(harness_t *h, void *arg)
{
    (void)h;
    client_t *cl = arg;
    for (const char *p = cl->buf; p && (p = strstr(p, "\"token_ids\":[")) != NULL; p++)
        if (p[13] >= '0' && p[13] <= '9') return 1;
    return 0;
}

static int status_of(const client_t *cl)
{
    assert_non_null(cl->buf);
    assert_memory_equal(cl->buf, "HTTP/1.1 ", 9);
    return atoi(cl->buf + 9);
}

static int has_header(const client_t *cl, const char *line)
{
    const char *end = strstr(cl->buf, "\r\n\r\n");
    const char *at = strstr(cl->buf, line);
    return at && end && at < end;
}

static cJSON *body_json(const client_t *cl)
{
    const char *b = strstr(cl->buf, "\r\n\r\n");
    assert_non_null(b);
    cJSON *doc = cJSON_Parse(b + 4);
    if (!doc) fail_msg("response body is not JSON: %s", b + 4);
    return doc;
}

/* The error object of a streamed response's error event. */
static cJSON *sse_error(const client_t *cl)
{
    const char *at = strstr(cl->buf, "data: {\"error\"");
    if (!at) fail_msg("no SSE error event in: %.2000s", cl->buf);
    const char *end = strstr(at, "\n\n");
    assert_non_null(end);
    cJSON *doc = cJSON_ParseWithLength(at + 6, (size_t)(end - at - 6));
    assert_non_null(doc);
    return doc;
}

static const char *error_message(const cJSON *doc)
{
    const cJSON *m = cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "error"), "message");
    assert_true(cJSON_IsString(m));
    return m->valuestring;
}

/* ---- metrics, readiness ---- */

static double metric(harness_t *h, const char *name)
{
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(epd_metrics_render(h->m, &text, &len), 0);
    double v = 0;
    size_t n = strlen(name);
    for (const char *l = text; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (!strncmp(l, name, n) && l[n] == ' ') v = strtod(l + n + 1, NULL);
    free(text);
    return v;
}

static int p_reformed_and_ready(harness_t *h, void *arg)
{
    double want = *(double *)arg;
    return metric(h, "epd_engine_group_reforms_total") >= want && epd_engine_info(h->e) != NULL;
}

/* ---- the oracle ---- */

static cJSON *load_expected(void)
{
    FILE *f = fopen(EPD_ORACLE_DIR "/expected.json", "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)n + 1);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)n, f), (size_t)n);
    text[n] = 0;
    fclose(f);
    cJSON *doc = cJSON_Parse(text);
    free(text);
    assert_non_null(doc);
    return doc;
}

static char *ids_json(const cJSON *arr, int max)
{
    static char buf[4096];
    size_t k = 0;
    int i = 0;
    buf[k++] = '[';
    for (const cJSON *v = arr->child; v && i < max; v = v->next, i++)
        k += (size_t)snprintf(buf + k, sizeof(buf) - k, "%s%d", i ? "," : "", v->valueint);
    snprintf(buf + k, sizeof(buf) - k, "]");
    return buf;
}

/* Every oracle case, greedy, through the API: tokens equal transformers'. */
static void check_greedy(harness_t *h)
{
    cJSON *exp = load_expected();
    const cJSON *cases = cJSON_GetObjectItem(exp, "cases");
    int ncase = 0;
    for (const cJSON *c = cases ? cases->child : NULL; c; c = c->next, ncase++) {
        const cJSON *want = cJSON_GetObjectItem(c, "tokens");
        int nt = cJSON_GetArraySize(want);
        char body[4096];
        snprintf(body, sizeof(body), "{\"prompt\":%s,\"max_tokens\":%d,\"temperature\":0}",
                 ids_json(cJSON_GetObjectItem(c, "prompt"), 1 << 20), nt);
        client_t cl;
        post(h, &cl, body);
        run_until(h, p_response, &cl, "a greedy completion");
        if (status_of(&cl) != 200) fail_msg("case %d: %s", ncase, cl.buf);
        cJSON *doc = body_json(&cl);
        const cJSON *got = cJSON_GetObjectItem(
            cJSON_GetArrayItem(cJSON_GetObjectItem(doc, "choices"), 0), "token_ids");
        char g[4096];
        snprintf(g, sizeof(g), "%s", ids_json(got, 1 << 20));
        assert_string_equal(g, ids_json(want, nt));
        cJSON_Delete(doc);
        client_close(&cl);
    }
    assert_true(ncase >= 3);
    cJSON_Delete(exp);
}

/* got[c] (token ids as JSON) equal transformers' tokens of case c. */
static void check_greedy_cases(char got[][4096], int n)
{
    cJSON *exp = load_expected();
    const cJSON *c = cJSON_GetObjectItem(exp, "cases")->child;
    for (int i = 0; i < n && c; i++, c = c->next) {
        const cJSON *want = cJSON_GetObjectItem(c, "tokens");
        if (strcmp(got[i], ids_json(want, 1 << 20)))
            fail_msg("case %d: %s, transformers %s", i, got[i], ids_json(want, 1 << 20));
    }
    cJSON_Delete(exp);
}

/* ---- the tests ---- */

/* What the control plane does when a peer's heartbeats stop, from its own thread. */
static void *mark_down(void *arg)
{
    harness_t *h = arg;
    epd_engine_peer_down(h->e, 1, "the control plane lost rank 1's heartbeats");
    release_hold(h);
    return NULL;
}

/* Rank 1 is held right after a step's control word, so rank 0 is inside the step's MoE
 * exchange, waiting for it; the control plane then marks rank 1 down. Both running requests
 * (one per rank) fail: 503 + Retry-After for the JSON one, an error event for the stream. */
static void test_peer_down_fails_step_and_reforms(void **state)
{
    (void)state;
    harness_t *h = harness_create(2, 10000, 16);
    client_t a, b;
    char body[256];
    snprintf(body, sizeof(body), "{\"prompt\":[303,339,294],\"max_tokens\":%d,\"temperature\":0}",
             LONG_TOKENS);
    post(h, &a, body); /* rank 0 (the least loaded, first) */
    snprintf(body, sizeof(body),
             "{\"prompt\":[24],\"max_tokens\":%d,\"temperature\":0,\"stream\":true}", LONG_TOKENS);
    post(h, &b, body); /* rank 1 */
    run_until(h, p_first_token, &b, "the stream's first token");
    assert_int_equal(metric(h, "epd_engine_active_sequences"), 2);
    double fails0 = metric(h, "epd_engine_step_failures_total");
    arm_hold(h, 1);
    run_until(h, p_held, NULL, "rank 1 to stop answering");
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, mark_down, h), 0);
    run_until(h, p_response, &a, "the JSON request to fail");
    run_until(h, p_response, &b, "the stream to fail");
    pthread_join(th, NULL);

    assert_int_equal(status_of(&a), 503);
    assert_true(has_header(&a, "\r\nRetry-After: 1\r\n"));
    cJSON *doc = body_json(&a);
    const char *msg = error_message(doc);
    if (!strstr(msg, "step failed on rank 0") || !strstr(msg, "rank 1 marked down"))
        fail_msg("unexpected message: %s", msg);
    cJSON_Delete(doc);
    assert_int_equal(status_of(&b), 200); /* the stream had started */
    doc = sse_error(&b);
    msg = error_message(doc);
    if (!strstr(msg, "step failed on rank 1") || !strstr(msg, "aborted"))
        fail_msg("unexpected stream message: %s", msg);
    cJSON_Delete(doc);
    assert_null(strstr(b.buf, "[DONE]"));
    client_close(&a);
    client_close(&b);

    /* the health event, and the step failures of both ranks */
    assert_true(metric(h, "epd_engine_step_failures_total") >= fails0 + 2);
    double one = 1;
    run_until(h, p_reformed_and_ready, &one, "the group to re-form");
    assert_int_equal(metric(h, "epd_engine_group_reforms_total"), 1);
    assert_int_equal(metric(h, "epd_engine_active_sequences"), 0);
    check_greedy(h);
    harness_destroy(h);
}

/* Rank 1 stops answering after a step's control word and nobody marks it down: rank 0's MoE
 * exchange times out within timeouts.ep_op_ms and its request fails naming rank 1; once rank 1
 * answers again the group re-forms and serves correctly. */
static void test_stalled_rank_times_out_and_reforms(void **state)
{
    (void)state;
    harness_t *h = harness_create(2, 300, 16);
    client_t a;
    char body[256];
    snprintf(body, sizeof(body),
             "{\"prompt\":[303,339,294],\"max_tokens\":%d,\"temperature\":0,\"stream\":true}",
             LONG_TOKENS);
    post(h, &a, body);
    run_until(h, p_first_token, &a, "the first token");
    arm_hold(h, 1);
    run_until(h, p_held, NULL, "rank 1 to stop answering");
    run_until(h, p_response, &a, "the stream to fail");
    release_hold(h);
    cJSON *doc = sse_error(&a);
    const char *msg = error_message(doc);
    if (!strstr(msg, "step failed on rank 0") || !strstr(msg, "timed out") ||
        !strstr(msg, "peer rank 1"))
        fail_msg("unexpected message: %s", msg);
    cJSON_Delete(doc);
    client_close(&a);
    assert_true(metric(h, "epd_engine_step_failures_total") >= 1);
    double one = 1;
    run_until(h, p_reformed_and_ready, &one, "the group to re-form");
    check_greedy(h);
    harness_destroy(h);
}

/* model.max_queued_requests 1: with the only rank held, one request waits and the next gets
 * 429 with Retry-After; once the rank answers both earlier requests complete correctly. */
static void test_queue_limit_429(void **state)
{
    (void)state;
    harness_t *h = harness_create(1, 10000, 1);
    client_t a, b, c;
    post(h, &a, "{\"prompt\":[24],\"max_tokens\":64,\"temperature\":0,\"stream\":true}");
    run_until(h, p_first_token, &a, "the first token");
    arm_hold(h, 0);
    run_until(h, p_held, NULL, "rank 0 to stop answering");
    post(h, &b, "{\"prompt\":[303,339,294,53,332,244],\"max_tokens\":16,\"temperature\":0}");
    assert_int_equal(metric(h, "epd_engine_queue_depth"), 1);
    post(h, &c, "{\"prompt\":[24],\"max_tokens\":4}");
    run_until(h, p_response, &c, "the refusal");
    assert_int_equal(status_of(&c), 429);
    assert_true(has_header(&c, "\r\nRetry-After: 1\r\n"));
    cJSON *doc = body_json(&c);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "error"), "code")->valuestring,
                        "queue_full");
    if (!strstr(error_message(doc), "model.max_queued_requests"))
        fail_msg("429 message: %s", error_message(doc));
    cJSON_Delete(doc);
    /* two prompts in one request while the queue is full: refused as a whole */
    client_t d;
    post(h, &d, "{\"prompt\":[[24],[25]],\"max_tokens\":4}");
    run_until(h, p_response, &d, "the second refusal");
    assert_int_equal(status_of(&d), 429);
    client_close(&d);

    release_hold(h);
    run_until(h, p_response, &a, "the held stream");
    run_until(h, p_response, &b, "the queued request");
    assert_int_equal(status_of(&b), 200);
    doc = body_json(&b);
    const cJSON *got = cJSON_GetObjectItem(
        cJSON_GetArrayItem(cJSON_GetObjectItem(doc, "choices"), 0), "token_ids");
    cJSON *exp = load_expected();
    const cJSON *want =
        cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(exp, "cases"), 0), "tokens");
    char g[4096];
    snprintf(g, sizeof(g), "%s", ids_json(got, 1 << 20));
    assert_string_equal(g, ids_json(want, 16));
    cJSON_Delete(exp);
    cJSON_Delete(doc);
    assert_non_null(strstr(a.buf, "[DONE]"));
    assert_int_equal(metric(h, "epd_engine_queue_depth"), 0);
    assert_int_equal(metric(h, "epd_engine_step_failures_total"), 0);
    client_close(&a);
    client_close(&b);
    client_close(&c);
    harness_destroy(h);
}

/* At least *arg requests wait in the engine's queue. */
static int p_queued(harness_t *h, void *arg)
{
    return metric(h, "epd_engine_queue_depth") >= *(int *)arg;
}

/* Submits every oracle case at once (greedy, its expected length) and fills got[c] with the
 * token ids each completion returned, as JSON text. together: rank 0's first step (case 0's) is
 * held until every case is queued, so that they all run side by side however the machine
 * schedules the clients. */
static int submit_all_cases(harness_t *h, char got[][4096], int max_cases, int together)
{
    cJSON *exp = load_expected();
    const cJSON *cases = cJSON_GetObjectItem(exp, "cases");
    client_t cl[8];
    int n = 0;
    for (const cJSON *c = cases ? cases->child : NULL; c && n < max_cases && n < 8;
         c = c->next, n++) {
        char body[4096];
        snprintf(body, sizeof(body), "{\"prompt\":%s,\"max_tokens\":%d,\"temperature\":0}",
                 ids_json(cJSON_GetObjectItem(c, "prompt"), 1 << 20),
                 cJSON_GetArraySize(cJSON_GetObjectItem(c, "tokens")));
        if (together && n == 0) arm_hold(h, 0);
        post(h, &cl[n], body);
        if (together && n == 0) run_until(h, p_held, NULL, "rank 0 to hold case 0's step");
    }
    if (together) {
        run_until(h, p_queued, &(int){n - 1}, "every other case to be queued");
        release_hold(h);
    }
    for (int i = 0; i < n; i++) {
        run_until(h, p_response, &cl[i], "a completion");
        if (status_of(&cl[i]) != 200) fail_msg("case %d: %s", i, cl[i].buf);
        cJSON *doc = body_json(&cl[i]);
        const cJSON *ids = cJSON_GetObjectItem(
            cJSON_GetArrayItem(cJSON_GetObjectItem(doc, "choices"), 0), "token_ids");
        snprintf(got[i], 4096, "%s", ids_json(ids, 1 << 20));
        cJSON_Delete(doc);
        client_close(&cl[i]);
    }
    cJSON_Delete(exp);
    return n;
}

/* KV blocks of 4 tokens, a pool of 12: the four oracle cases need 26 blocks together (7, 9, 6
 * and 4) but each fits alone, so running requests are preempted and re-prefilled as decode
 * grows them. Every request completes with the tokens of a run with the default (large) pool,
 * which are transformers' greedy tokens. LL only (model.max_prefill_tokens 0), so that a
 * re-prefilled context computes exactly what its decode steps did. A request that no pool of
 * 12 blocks can hold is refused with 400. */
static void test_kv_preemption(void **state)
{
    (void)state;
    char big[8][4096], tiny[8][4096];
    harness_t *h = harness_create_kv(1, 10000, 16, 4, 0, 0);
    int n = submit_all_cases(h, big, 8, 0);
    assert_int_equal(metric(h, "epd_engine_preemptions_total"), 0);
    harness_destroy(h);

    h = harness_create_kv(1, 10000, 16, 4, 12, 0);
    assert_int_equal(metric(h, "epd_kv_blocks_total{rank=\"0\"}"), 12);
    assert_int_equal(submit_all_cases(h, tiny, 8, 1), n);
    for (int i = 0; i < n; i++)
        if (strcmp(big[i], tiny[i]))
            fail_msg("case %d: %s with a pool of 12 blocks, %s with the default pool", i, tiny[i],
                     big[i]);
    if (!(metric(h, "epd_engine_preemptions_total") > 0))
        fail_msg("no request was preempted: the pool was not short");
    assert_int_equal(metric(h, "epd_kv_blocks_free{rank=\"0\"}"), 12);
    assert_int_equal(metric(h, "epd_engine_active_sequences"), 0);
    assert_int_equal(metric(h, "epd_engine_queue_depth"), 0);

    client_t c;
    post(h, &c, "{\"prompt\":[24,25,26],\"max_tokens\":64}");
    run_until(h, p_response, &c, "the refusal");
    assert_int_equal(status_of(&c), 400);
    cJSON *doc = body_json(&c);
    if (!strstr(error_message(doc), "prompt + max_tokens needs 17 KV blocks, the pool has 12"))
        fail_msg("400 message: %s", error_message(doc));
    cJSON_Delete(doc);
    client_close(&c);
    harness_destroy(h);
    check_greedy_cases(big, n);
}

/* A config built without the table's defaults: a clear error, no engine. */
static void test_queue_limit_validated(void **state)
{
    (void)state;
    epd_config_t cfg;
    epd_config_defaults(&cfg);
    snprintf(cfg.model_path, sizeof(cfg.model_path), "%s", EPD_ORACLE_DIR);
    cfg.max_queued_requests = 0;
    uv_loop_t loop;
    uv_loop_init(&loop);
    epd_engine_opts_t eo = {.loop = &loop, .cfg = &cfg};
    epd_engine_t *e = NULL;
    epd_err_t err = {0};
    assert_int_equal(epd_engine_create(&eo, &e, &err), -EINVAL);
    assert_null(e);
    assert_non_null(strstr(err.msg, "model.max_queued_requests is 0"));
    uv_loop_close(&loop);
}

int main(void)
{
    epd_log_set_level(EPD_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_queue_limit_validated),
        cmocka_unit_test(test_queue_limit_429),
        cmocka_unit_test(test_peer_down_fails_step_and_reforms),
        cmocka_unit_test(test_stalled_rank_times_out_and_reforms),
        cmocka_unit_test(test_kv_preemption),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
