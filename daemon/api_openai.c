/* POST /v1/completions and GET /v1/models in OpenAI's shapes: request validation (errors in
 * OpenAI's error object, naming the parameter and the index), submission of one engine
 * request per prompt, the JSON response or the server-sent-event stream, cancellation when
 * the client goes away, and the request metrics.
 *
 * Extension: no tokenizer yet, so prompts are token ids and each choice carries its generated
 * ids in "token_ids" (its "text" is ""). A list of prompts (a list of lists of ids) gives one
 * choice per prompt; prompt i samples with seed + i. */
#include "api_openai.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"

#define SUB "api"
#define EP_COMPLETIONS "/v1/completions"
#define EP_MODELS "/v1/models"
/* OpenAI's default when max_tokens is absent. */
#define DEFAULT_MAX_TOKENS 16
/* Prompts one request may carry (one choice each). */
#define MAX_PROMPTS 64

struct epd_api {
    epd_engine_t *engine;
    epd_metrics_t *metrics;
    epd_metric_t *m_dur;
    uint64_t seq; /* for ids and default seeds */
};

typedef struct completion completion_t;

typedef struct choice {
    completion_t *c;
    int index;
    epd_engine_req_t *er; /* NULL once its final event arrived */
    int32_t *tokens;
    int ntok;
    epd_finish_t finish;
} choice_t;

struct completion {
    epd_api_t *api;
    epd_http_res_t *res; /* NULL once the response is finished */
    int closed, stream, include_usage, n, remaining;
    char id[40];
    long long created;
    char model[128];
    choice_t *ch;
    int prompt_tokens, completion_tokens;
    int failed, fail_status;
    char fail_msg[600];
    double t0;
};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void count(epd_api_t *a, const char *endpoint, int status)
{
    char lab[96];
    snprintf(lab, sizeof(lab), "endpoint=\"%s\",status=\"%d\"", endpoint, status);
    epd_metric_add(epd_metrics_counter(a->metrics, "epd_requests_total",
                                       "Inference API requests, by endpoint and status.", lab),
                   1);
}

static void send_json(epd_http_res_t *res, int status, cJSON *doc)
{
    char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
    if (!text) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":null}}\n";
        epd_http_respond(res, 500, "application/json", oom, sizeof(oom) - 1);
        return;
    }
    size_t n = strlen(text);
    char *body = malloc(n + 2);
    if (body) {
        memcpy(body, text, n);
        body[n] = '\n';
        epd_http_respond(res, status, "application/json", body, n + 1);
        free(body);
    } else {
        epd_http_respond(res, status, "application/json", text, n);
    }
    cJSON_free(text);
}

static const char *error_type(int status)
{
    switch (status) {
    case 404:
        return "invalid_request_error";
    case 429:
        return "rate_limit_error";
    default:
        return status < 500 ? "invalid_request_error" : "server_error";
    }
}

static cJSON *error_doc(int status, const char *msg, const char *param, const char *code)
{
    cJSON *doc = cJSON_CreateObject();
    cJSON *e = doc ? cJSON_AddObjectToObject(doc, "error") : NULL;
    if (!e) {
        cJSON_Delete(doc);
        return NULL;
    }
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", error_type(status));
    if (param)
        cJSON_AddStringToObject(e, "param", param);
    else
        cJSON_AddNullToObject(e, "param");
    if (code)
        cJSON_AddStringToObject(e, "code", code);
    else
        cJSON_AddNullToObject(e, "code");
    return doc;
}

static void send_error(epd_api_t *a, const char *endpoint, epd_http_res_t *res, int status,
                       const char *msg, const char *param, const char *code)
{
    cJSON *doc = error_doc(status, msg, param, code);
    if (status == 429 || status == 503) epd_http_res_header(res, "Retry-After", "1");
    send_json(res, status, doc);
    cJSON_Delete(doc);
    count(a, endpoint, status);
}

/* ---- validation --------------------------------------------------------------------------- */

typedef struct verr {
    int status;
    char msg[600];
    char param[64];
    const char *code;
} verr_t;

static int bad(verr_t *v, int status, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int bad(verr_t *v, int status, const char *param, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->msg, sizeof(v->msg), fmt, ap);
    va_end(ap);
    v->status = status;
    snprintf(v->param, sizeof(v->param), "%s", param ? param : "");
    v->code = code;
    return -1;
}

typedef struct creq {
    int nprompts;
    int32_t *ids[MAX_PROMPTS];
    int len[MAX_PROMPTS];
    int max_tokens; /* -1: not given */
    double temperature, top_p;
    int top_k;
    int have_seed;
    uint64_t seed;
    int stream, include_usage;
} creq_t;

static void creq_free(creq_t *q)
{
    for (int i = 0; i < q->nprompts; i++)
        free(q->ids[i]);
}

static int is_int(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

static const char *type_name(const cJSON *v)
{
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    return "an object";
}

/* One prompt: a non-empty list of token ids in the vocabulary. */
static int parse_ids(const cJSON *arr, const char *path, int vocab, int32_t **out, int *len,
                     verr_t *v)
{
    int n = cJSON_GetArraySize(arr), i = 0;
    if (n == 0) return bad(v, 400, "prompt", NULL, "%s is empty: give at least one token id", path);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    if (!ids) return bad(v, 500, NULL, NULL, "out of memory");
    for (const cJSON *t = arr->child; t; t = t->next, i++) {
        if (cJSON_IsString(t)) {
            free(ids);
            return bad(v, 400, "prompt", NULL,
                       "%s[%d] is a string: this server has no tokenizer yet, so prompts are "
                       "lists of token ids (integers)",
                       path, i);
        }
        if (!is_int(t)) {
            free(ids);
            return bad(v, 400, "prompt", NULL, "%s[%d] must be an integer token id, not %s", path,
                       i, cJSON_IsNumber(t) ? "a fraction" : type_name(t));
        }
        if (t->valuedouble < 0 || t->valuedouble >= vocab) {
            free(ids);
            return bad(v, 400, "prompt", NULL,
                       "%s[%d]: token id %.0f is outside the vocabulary (0..%d)", path, i,
                       t->valuedouble, vocab - 1);
        }
        ids[i] = (int32_t)t->valuedouble;
    }
    *out = ids;
    *len = n;
    return 0;
}

static int parse_prompt(const cJSON *p, int vocab, creq_t *q, verr_t *v)
{
    if (!p || cJSON_IsNull(p))
        return bad(v, 400, "prompt", NULL, "'prompt' is required: a list of token ids");
    if (cJSON_IsString(p))
        return bad(v, 400, "prompt", NULL,
                   "'prompt' is a string: this server has no tokenizer yet; send a list of token "
                   "ids (integers), or a list of such lists");
    if (!cJSON_IsArray(p))
        return bad(v, 400, "prompt", NULL,
                   "'prompt' must be a list of token ids (or a list of such lists), not %s",
                   type_name(p));
    if (p->child && cJSON_IsArray(p->child)) {
        int i = 0;
        for (const cJSON *e = p->child; e; e = e->next, i++) {
            char path[32];
            snprintf(path, sizeof(path), "prompt[%d]", i);
            if (!cJSON_IsArray(e))
                return bad(v, 400, "prompt", NULL,
                           "%s must be a list of token ids like prompt[0], not %s", path,
                           type_name(e));
            if (q->nprompts == MAX_PROMPTS)
                return bad(v, 400, "prompt", NULL, "at most %d prompts per request", MAX_PROMPTS);
            if (parse_ids(e, path, vocab, &q->ids[q->nprompts], &q->len[q->nprompts], v)) return -1;
            q->nprompts++;
        }
        return 0;
    }
    if (parse_ids(p, "prompt", vocab, &q->ids[0], &q->len[0], v)) return -1;
    q->nprompts = 1;
    return 0;
}

static int get_number(const cJSON *f, const char *name, double lo, double hi, int lo_open,
                      double *out, verr_t *v)
{
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return bad(v, 400, name, NULL, "'%s' must be a number, not %s", name, type_name(f));
    double x = f->valuedouble;
    if ((lo_open ? x <= lo : x < lo) || x > hi)
        return bad(v, 400, name, NULL, "'%s' is %g; it must be in %s%g, %g]", name, x,
                   lo_open ? "(" : "[", lo, hi);
    *out = x;
    return 0;
}

static int get_bool(const cJSON *f, const char *name, int *out, verr_t *v)
{
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsBool(f))
        return bad(v, 400, name, NULL, "'%s' must be a boolean, not %s", name, type_name(f));
    *out = cJSON_IsTrue(f);
    return 0;
}

/* Fields OpenAI defines that we do not implement: accepted at their neutral value only. */
static int unsupported(const cJSON *f, verr_t *v)
{
    const char *k = f->string;
    int neutral = cJSON_IsNull(f);
    if (!strcmp(k, "echo"))
        neutral |= cJSON_IsFalse(f);
    else if (!strcmp(k, "logprobs"))
        neutral |= is_int(f) && f->valuedouble == 0;
    else if (!strcmp(k, "best_of"))
        neutral |= is_int(f) && f->valuedouble == 1;
    else if (!strcmp(k, "frequency_penalty") || !strcmp(k, "presence_penalty"))
        neutral |= cJSON_IsNumber(f) && f->valuedouble == 0;
    else if (!strcmp(k, "logit_bias"))
        neutral |= cJSON_IsObject(f) && !f->child;
    else if (!strcmp(k, "suffix"))
        neutral |= cJSON_IsString(f) && !f->valuestring[0];
    else if (!strcmp(k, "stop"))
        neutral |= (cJSON_IsArray(f) && !f->child) || (cJSON_IsString(f) && !f->valuestring[0]);
    if (neutral) return 0;
    if (!strcmp(k, "stop"))
        return bad(v, 400, k, NULL,
                   "'stop' sequences are text and this server has no tokenizer yet: not "
                   "supported (generation stops at max_tokens or at the model's EOS id)");
    return bad(v, 400, k, NULL, "'%s' is not supported by this server (leave it out)", k);
}

static int parse_request(const cJSON *root, const epd_engine_info_t *info, creq_t *q, verr_t *v)
{
    memset(q, 0, sizeof(*q));
    q->max_tokens = -1;
    q->temperature = 1.0; /* OpenAI's defaults */
    q->top_p = 1.0;
    if (!cJSON_IsObject(root))
        return bad(v, 400, NULL, NULL, "the request body must be a JSON object, not %s",
                   type_name(root));
    static const char *const unsup[] = {
        "echo",   "logprobs", "best_of", "logit_bias", "frequency_penalty", "presence_penalty",
        "suffix", "stop"};
    const cJSON *stream_options = NULL;
    for (const cJSON *f = root->child; f; f = f->next) {
        const char *k = f->string;
        int known = 0;
        for (size_t i = 0; i < sizeof(unsup) / sizeof(unsup[0]); i++)
            if (!strcmp(k, unsup[i])) {
                if (unsupported(f, v)) return -1;
                known = 1;
            }
        if (known) continue;
        if (!strcmp(k, "model")) {
            if (!cJSON_IsString(f))
                return bad(v, 400, "model", NULL, "'model' must be a string, not %s", type_name(f));
            if (strcmp(f->valuestring, info->model_id) != 0)
                return bad(v, 404, "model", "model_not_found",
                           "The model '%.200s' does not exist; this server serves '%s'",
                           f->valuestring, info->model_id);
        } else if (!strcmp(k, "prompt")) {
            if (parse_prompt(f, info->vocab_size, q, v)) return -1;
        } else if (!strcmp(k, "max_tokens")) {
            if (cJSON_IsNull(f)) continue;
            if (!is_int(f))
                return bad(v, 400, "max_tokens", NULL, "'max_tokens' must be an integer, not %s",
                           cJSON_IsNumber(f) ? "a fraction" : type_name(f));
            if (f->valuedouble < 1 || f->valuedouble > info->max_seq_len)
                return bad(v, 400, "max_tokens", NULL,
                           "'max_tokens' is %.0f; it must be in [1, %d] (the model's context "
                           "length)",
                           f->valuedouble, info->max_seq_len);
            q->max_tokens = (int)f->valuedouble;
        } else if (!strcmp(k, "temperature")) {
            if (get_number(f, "temperature", 0, 2, 0, &q->temperature, v)) return -1;
        } else if (!strcmp(k, "top_p")) {
            if (get_number(f, "top_p", 0, 1, 1, &q->top_p, v)) return -1;
        } else if (!strcmp(k, "top_k")) { /* extension (vLLM's name) */
            if (cJSON_IsNull(f)) continue;
            if (!is_int(f) || f->valuedouble < 0 || f->valuedouble > 1e9)
                return bad(v, 400, "top_k", NULL,
                           "'top_k' must be a non-negative integer (0: off)");
            q->top_k = (int)f->valuedouble;
        } else if (!strcmp(k, "seed")) {
            if (cJSON_IsNull(f)) continue;
            if (!is_int(f) || fabs(f->valuedouble) > 9007199254740992.0)
                return bad(v, 400, "seed", NULL,
                           "'seed' must be an integer of at most 2^53 in magnitude, not %s",
                           cJSON_IsNumber(f) ? "that number" : type_name(f));
            q->have_seed = 1;
            q->seed = (uint64_t)(int64_t)f->valuedouble;
        } else if (!strcmp(k, "stream")) {
            if (get_bool(f, "stream", &q->stream, v)) return -1;
        } else if (!strcmp(k, "stream_options")) {
            if (cJSON_IsNull(f)) continue;
            if (!cJSON_IsObject(f))
                return bad(v, 400, "stream_options", NULL,
                           "'stream_options' must be an object, not %s", type_name(f));
            stream_options = f;
            for (const cJSON *o = f->child; o; o = o->next) {
                if (strcmp(o->string, "include_usage") != 0)
                    return bad(v, 400, "stream_options", NULL,
                               "stream_options.%.100s is not supported (only include_usage)",
                               o->string);
                if (get_bool(o, "stream_options.include_usage", &q->include_usage, v)) return -1;
            }
        } else if (!strcmp(k, "n")) {
            if (cJSON_IsNull(f)) continue;
            if (!is_int(f) || f->valuedouble < 1)
                return bad(v, 400, "n", NULL, "'n' must be a positive integer");
            if (f->valuedouble > 1)
                return bad(v, 400, "n", NULL,
                           "'n' > 1 is not supported: send a list of prompts (one choice each) "
                           "instead");
        } else if (!strcmp(k, "user")) {
            if (!cJSON_IsString(f) && !cJSON_IsNull(f))
                return bad(v, 400, "user", NULL, "'user' must be a string, not %s", type_name(f));
        } else {
            return bad(v, 400, k, "unknown_parameter",
                       "Unrecognized request argument supplied: %.100s", k);
        }
    }
    if (q->nprompts == 0) return parse_prompt(NULL, info->vocab_size, q, v);
    if (stream_options && !q->stream)
        return bad(v, 400, "stream_options", NULL,
                   "'stream_options' is only allowed when 'stream' is true");
    /* the context: prompt + completion within max_seq_len */
    for (int i = 0; i < q->nprompts; i++) {
        int room = info->max_seq_len - q->len[i];
        const char *which = q->nprompts > 1 ? "prompt[" : "prompt";
        char idx[16] = "";
        if (q->nprompts > 1) snprintf(idx, sizeof(idx), "%d]", i);
        if (room < 1)
            return bad(v, 400, "prompt", "context_length_exceeded",
                       "This model's maximum context length is %d tokens; %s%s has %d tokens, "
                       "which leaves no room for a completion",
                       info->max_seq_len, which, idx, q->len[i]);
        if (q->max_tokens > room)
            return bad(v, 400, "max_tokens", "context_length_exceeded",
                       "This model's maximum context length is %d tokens. However, you "
                       "requested %d tokens (%d in %s%s; %d for the completion). Please reduce "
                       "the prompt or max_tokens.",
                       info->max_seq_len, q->len[i] + q->max_tokens, q->len[i], which, idx,
                       q->max_tokens);
    }
    return 0;
}

/* ---- responses ---------------------------------------------------------------------------- */

static const char *finish_name(epd_finish_t f)
{
    return f == EPD_FINISH_STOP ? "stop" : "length";
}

static cJSON *base_doc(const completion_t *c)
{
    cJSON *doc = cJSON_CreateObject();
    if (!doc) return NULL;
    cJSON_AddStringToObject(doc, "id", c->id);
    cJSON_AddStringToObject(doc, "object", "text_completion");
    cJSON_AddNumberToObject(doc, "created", (double)c->created);
    cJSON_AddStringToObject(doc, "model", c->model);
    return doc;
}

static cJSON *choice_obj(int index, const int32_t *ids, int n, const char *finish)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "index", index);
    cJSON_AddStringToObject(o, "text", "");
    cJSON *t = cJSON_AddArrayToObject(o, "token_ids");
    for (int i = 0; t && i < n; i++)
        cJSON_AddItemToArray(t, cJSON_CreateNumber(ids[i]));
    cJSON_AddNullToObject(o, "logprobs");
    if (finish)
        cJSON_AddStringToObject(o, "finish_reason", finish);
    else
        cJSON_AddNullToObject(o, "finish_reason");
    return o;
}

static void add_usage(cJSON *doc, const completion_t *c)
{
    cJSON *u = cJSON_AddObjectToObject(doc, "usage");
    if (!u) return;
    cJSON_AddNumberToObject(u, "prompt_tokens", c->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", c->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", c->prompt_tokens + c->completion_tokens);
}

/* One "data: ..." event; a client that cannot keep up (or left) ends the stream. */
static void sse_send(completion_t *c, cJSON *doc)
{
    if (!c->res || c->closed) return;
    char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
    if (!text) return;
    size_t n = strlen(text);
    char *buf = malloc(n + 8);
    int rc = -ENOMEM;
    if (buf) {
        memcpy(buf, "data: ", 6);
        memcpy(buf + 6, text, n);
        memcpy(buf + 6 + n, "\n\n", 2);
        rc = epd_http_stream_write(c->res, buf, n + 8);
        free(buf);
    }
    cJSON_free(text);
    if (rc != 0 && !c->closed) {
        if (rc == -ENOBUFS)
            EPD_WARN(SUB, "%s: the client does not read its stream; cancelling it", c->id);
        c->closed = 1;
        for (int i = 0; i < c->n; i++)
            epd_engine_cancel(c->ch[i].er);
    }
}

static void completion_free(completion_t *c)
{
    for (int i = 0; i < c->n; i++)
        free(c->ch[i].tokens);
    free(c->ch);
    free(c);
}

static void finish_response(completion_t *c)
{
    epd_api_t *a = c->api;
    int status = c->failed ? c->fail_status : 200;
    if (c->res) {
        epd_http_res_on_close(c->res, NULL, NULL);
        if (c->stream) {
            if (c->failed) {
                cJSON *err = error_doc(status, c->fail_msg, NULL, NULL);
                sse_send(c, err);
                cJSON_Delete(err);
            } else if (c->include_usage) {
                cJSON *doc = base_doc(c);
                if (doc) {
                    cJSON_AddArrayToObject(doc, "choices");
                    add_usage(doc, c);
                }
                sse_send(c, doc);
                cJSON_Delete(doc);
            }
            if (!c->failed && !c->closed) epd_http_stream_write(c->res, "data: [DONE]\n\n", 14);
            epd_http_stream_end(c->res);
            if (c->closed && !c->failed) status = 499; /* client closed the request */
        } else if (c->failed) {
            cJSON *err = error_doc(status, c->fail_msg, NULL, NULL);
            if (status == 503) epd_http_res_header(c->res, "Retry-After", "1");
            send_json(c->res, status, err);
            cJSON_Delete(err);
        } else {
            cJSON *doc = base_doc(c);
            cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
            for (int i = 0; chs && i < c->n; i++)
                cJSON_AddItemToArray(chs, choice_obj(i, c->ch[i].tokens, c->ch[i].ntok,
                                                     finish_name(c->ch[i].finish)));
            if (doc) add_usage(doc, c);
            send_json(c->res, 200, doc);
            cJSON_Delete(doc);
        }
        c->res = NULL;
        count(a, EP_COMPLETIONS, status);
        epd_metric_observe(a->m_dur, mono_s() - c->t0);
    }
    completion_free(c);
}

static void on_event(void *arg, const epd_engine_event_t *ev)
{
    choice_t *ch = arg;
    completion_t *c = ch->c;
    if (!ev->final) {
        if (c->stream) {
            cJSON *doc = base_doc(c);
            cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
            if (chs) cJSON_AddItemToArray(chs, choice_obj(ch->index, &ev->token, 1, NULL));
            sse_send(c, doc);
            cJSON_Delete(doc);
        }
        return;
    }
    ch->er = NULL;
    ch->finish = ev->finish;
    c->prompt_tokens += ev->prompt_tokens;
    c->completion_tokens += ev->num_tokens;
    if (ev->finish == EPD_FINISH_ERROR) {
        if (!c->failed) {
            c->failed = 1;
            c->fail_status = ev->status ? ev->status : 500;
            snprintf(c->fail_msg, sizeof(c->fail_msg), "%s", ev->error ? ev->error : "failed");
        }
    } else if (ev->num_tokens > 0) {
        ch->tokens = malloc(sizeof(int32_t) * (size_t)ev->num_tokens);
        if (ch->tokens) {
            memcpy(ch->tokens, ev->tokens, sizeof(int32_t) * (size_t)ev->num_tokens);
            ch->ntok = ev->num_tokens;
        } else if (!c->failed) {
            c->failed = 1;
            c->fail_status = 500;
            snprintf(c->fail_msg, sizeof(c->fail_msg), "out of memory");
        }
    }
    if (c->stream && !c->failed && ev->finish != EPD_FINISH_CANCELLED) {
        cJSON *doc = base_doc(c);
        cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
        if (chs) cJSON_AddItemToArray(chs, choice_obj(ch->index, NULL, 0, finish_name(ev->finish)));
        sse_send(c, doc);
        cJSON_Delete(doc);
    }
    if (--c->remaining == 0) finish_response(c);
}

static void on_client_gone(epd_http_res_t *res, void *arg)
{
    completion_t *c = arg;
    c->closed = 1;
    for (int i = 0; i < c->n; i++)
        epd_engine_cancel(c->ch[i].er);
}

static void make_id(epd_api_t *a, char *out, size_t len)
{
    unsigned char b[12];
    if (getrandom(b, sizeof(b), GRND_NONBLOCK) != (ssize_t)sizeof(b)) {
        uint64_t x = (uint64_t)time(NULL) * 6364136223846793005ull + ++a->seq;
        memcpy(b, &x, 8);
        memset(b + 8, (int)a->seq, 4);
    }
    size_t o = (size_t)snprintf(out, len, "cmpl-");
    for (size_t i = 0; i < sizeof(b) && o + 2 < len; i++)
        o += (size_t)snprintf(out + o, len - o, "%02x", b[i]);
}

static void h_completions(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_api_t *a = ctx;
    double t0 = mono_s();
    const epd_engine_info_t *info = a->engine ? epd_engine_info(a->engine) : NULL;
    if (!a->engine) {
        send_error(a, EP_COMPLETIONS, res, 503, "this node serves no model (model.path is empty)",
                   NULL, "no_model");
        return;
    }
    if (!info) {
        send_error(a, EP_COMPLETIONS, res, 503,
                   "the model is not ready (loading, or re-forming the EP group); see /readyz",
                   NULL, "not_ready");
        return;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(req->body, req->body_len, &end, 0);
    if (!root) {
        char msg[160];
        if (req->body_len == 0)
            snprintf(msg, sizeof(msg), "the request body is empty; send a JSON object");
        else
            snprintf(msg, sizeof(msg), "the request body is not valid JSON (error at byte %td)",
                     end ? end - req->body : (ptrdiff_t)0);
        send_error(a, EP_COMPLETIONS, res, 400, msg, NULL, "invalid_json");
        return;
    }
    /* trailing bytes after the value */
    const char *p = end;
    while (p && p < req->body + req->body_len && strchr(" \t\r\n", *p))
        p++;
    if (p && p < req->body + req->body_len) {
        char msg[160];
        snprintf(msg, sizeof(msg),
                 "the request body is not valid JSON (unexpected data at byte %td)", p - req->body);
        cJSON_Delete(root);
        send_error(a, EP_COMPLETIONS, res, 400, msg, NULL, "invalid_json");
        return;
    }
    creq_t q;
    verr_t v = {0};
    int rc = parse_request(root, info, &q, &v);
    cJSON_Delete(root);
    if (rc) {
        creq_free(&q);
        send_error(a, EP_COMPLETIONS, res, v.status, v.msg, v.param[0] ? v.param : NULL, v.code);
        return;
    }

    completion_t *c = calloc(1, sizeof(*c));
    if (c) c->ch = calloc((size_t)q.nprompts, sizeof(*c->ch));
    if (!c || !c->ch) {
        free(c);
        creq_free(&q);
        send_error(a, EP_COMPLETIONS, res, 500, "out of memory", NULL, NULL);
        return;
    }
    c->api = a;
    c->res = res;
    c->stream = q.stream;
    c->include_usage = q.include_usage;
    c->n = q.nprompts;
    c->t0 = t0;
    c->created = (long long)time(NULL);
    snprintf(c->model, sizeof(c->model), "%s", info->model_id);
    make_id(a, c->id, sizeof(c->id));
    uint64_t seed = q.seed;
    if (!q.have_seed) {
        unsigned char b[8];
        if (getrandom(b, sizeof(b), GRND_NONBLOCK) == (ssize_t)sizeof(b))
            memcpy(&seed, b, sizeof(seed));
        else
            seed = (uint64_t)time(NULL) ^ (++a->seq << 32);
    }
    int submit_rc = 0;
    for (int i = 0; i < q.nprompts; i++) {
        choice_t *ch = &c->ch[i];
        ch->c = c;
        ch->index = i;
        int mt = q.max_tokens;
        if (mt < 0) { /* not given: OpenAI's default, within what the context leaves */
            mt = info->max_seq_len - q.len[i];
            if (mt > DEFAULT_MAX_TOKENS) mt = DEFAULT_MAX_TOKENS;
        }
        epd_gen_params_t gp = {.prompt = q.ids[i],
                               .prompt_len = q.len[i],
                               .max_tokens = mt,
                               .temperature = (float)q.temperature,
                               .top_p = (float)q.top_p,
                               .top_k = q.top_k,
                               .seed = seed + (uint64_t)i,
                               .stream = q.stream};
        submit_rc = epd_engine_submit(a->engine, &gp, on_event, ch, &ch->er);
        if (submit_rc) break;
        c->remaining++;
    }
    creq_free(&q);
    if (submit_rc) {
        int st = submit_rc == -EAGAIN ? 429 : submit_rc == -EBUSY ? 503 : 500;
        const char *msg = submit_rc == -EAGAIN
                              ? "the request queue is full (model.max_queued_requests); "
                                "retry later"
                          : submit_rc == -EBUSY ? "the model is not ready; see /readyz"
                                                : "the engine refused the request";
        send_error(a, EP_COMPLETIONS, res, st, msg, NULL,
                   submit_rc == -EAGAIN ? "queue_full" : NULL);
        c->res = NULL;
        for (int i = 0; i < c->n; i++)
            epd_engine_cancel(c->ch[i].er);
        if (c->remaining == 0) completion_free(c);
        return;
    }
    epd_http_res_on_close(res, on_client_gone, c);
    if (c->stream) {
        epd_http_res_header(res, "Cache-Control", "no-cache");
        epd_http_stream_begin(res, 200, "text/event-stream");
    }
}

static void h_models(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_api_t *a = ctx;
    const epd_engine_info_t *info = a->engine ? epd_engine_info(a->engine) : NULL;
    cJSON *doc = cJSON_CreateObject();
    cJSON *data = NULL;
    if (doc) {
        cJSON_AddStringToObject(doc, "object", "list");
        data = cJSON_AddArrayToObject(doc, "data");
    }
    if (data && info) {
        cJSON *m = cJSON_CreateObject();
        if (m) {
            cJSON_AddStringToObject(m, "id", info->model_id);
            cJSON_AddStringToObject(m, "object", "model");
            cJSON_AddNumberToObject(m, "created", (double)info->created);
            cJSON_AddStringToObject(m, "owned_by", "epd");
            cJSON_AddNumberToObject(m, "max_model_len", info->max_seq_len);
            cJSON_AddItemToArray(data, m);
        }
    }
    send_json(res, 200, data ? doc : NULL);
    cJSON_Delete(doc);
    count(a, EP_MODELS, 200);
}

int epd_api_create(epd_http_server_t *http, epd_engine_t *engine, epd_metrics_t *metrics,
                   epd_api_t **out)
{
    static const double dur_b[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    epd_api_t *a = calloc(1, sizeof(*a));
    if (!a) return -ENOMEM;
    a->engine = engine;
    a->metrics = metrics;
    a->m_dur = epd_metrics_histogram(metrics, "epd_request_duration_seconds",
                                     "Completion requests from arrival to the last byte.",
                                     "endpoint=\"" EP_COMPLETIONS "\"", dur_b,
                                     (int)(sizeof(dur_b) / sizeof(dur_b[0])));
    int rc;
    if (!a->m_dur) {
        free(a);
        return -ENOMEM;
    }
    if ((rc = epd_http_route(http, "POST", EP_COMPLETIONS, h_completions, a)) ||
        (rc = epd_http_route(http, "GET", EP_MODELS, h_models, a))) {
        free(a); /* the server is torn down by the caller on this error */
        return rc;
    }
    *out = a;
    return 0;
}

void epd_api_detach_engine(epd_api_t *a)
{
    if (a) a->engine = NULL;
}

void epd_api_destroy(epd_api_t *a)
{
    free(a);
}
