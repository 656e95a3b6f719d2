/* POST /v1/completions, POST /v1/chat/completions and GET /v1/models in OpenAI's shapes:
 * errors in OpenAI's error object (the request validation that names the parameter and the
 * index is api_validate.c), submission of one engine request per prompt, incremental detokenization
 * with stop strings, the JSON response or the server-sent-event stream, cancellation when the
 * client goes away, and the request metrics.
 *
 * Text: with the checkpoint's tokenizer loaded (api_text.c) prompts may be strings, `stop`
 * strings end generation, and every choice carries its "text". Generated ids are decoded by
 * the tokenizer's streaming decoder (never half a UTF-8 character); the text that could still
 * turn into a stop string (the longest suffix that is a prefix of one) is held back from the
 * stream until it cannot. Without a tokenizer, prompts are token ids and "text" is "".
 *
 * Extensions: each completion choice carries its generated ids in "token_ids"; a list of
 * prompts gives one choice per prompt, and prompt i samples with seed + i. */
#define _GNU_SOURCE /* memmem */
#include "api_openai.h"
#include "epd_clock.h"
#include "http.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "api_internal.h"
#include "epd_json.h"
#include "log.h"

#define SUB "api"
#define EP_COMPLETIONS "/v1/completions"
#define EP_CHAT "/v1/chat/completions"
#define EP_MODELS "/v1/models"
/* OpenAI's default when max_tokens is absent (completions; chat defaults to the context). */
#define DEFAULT_MAX_TOKENS 16

void api_count(epd_api_t *a, const char *endpoint, int status)
{
    char lab[96];
    snprintf(lab, sizeof(lab), "endpoint=\"%s\",status=\"%d\"", endpoint, status);
    epd_metric_add(epd_metrics_counter(a->metrics, "epd_requests_total",
                                       "Inference API requests, by endpoint and status.", lab),
                   1);
}

void api_send_json(epd_http_res_t *res, int status, cJSON *doc)
{
    static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                              "\"server_error\",\"param\":null,\"code\":null}}\n";
    epd_http_respond_json(res, status, doc, 500, oom);
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

void api_send_error(epd_api_t *a, const char *endpoint, epd_http_res_t *res, int status,
                    const char *msg, const char *param, const char *code)
{
    cJSON *doc = error_doc(status, msg, param, code);
    if (status == 429 || status == 503) epd_http_res_header(res, "Retry-After", "1");
    api_send_json(res, status, doc);
    cJSON_Delete(doc);
    api_count(a, endpoint, status);
}

/* v: 400 with the reason, its param and code */
static void body_bad(verr_t *v, const char *msg, const char *param, const char *code)
{
    v->status = 400;
    snprintf(v->msg, sizeof(v->msg), "%s", msg);
    snprintf(v->param, sizeof(v->param), "%.*s", (int)sizeof(v->param) - 1, param ? param : "");
    v->code = code;
}

cJSON *api_parse_body_v(const epd_http_req_t *req, verr_t *v)
{
    const char *end = NULL;
    cJSON *root = epd_json_parse(req->body, req->body_len, &end);
    char msg[400];
    if (!root) {
        if (req->body_len == 0)
            snprintf(msg, sizeof(msg), "the request body is empty; send a JSON object");
        else
            snprintf(msg, sizeof(msg), "the request body is not valid JSON (error at byte %td)",
                     end ? end - req->body : (ptrdiff_t)0);
        body_bad(v, msg, NULL, "invalid_json");
        return NULL;
    }
    /* trailing bytes after the value */
    const char *p = end;
    while (p && p < req->body + req->body_len && strchr(" \t\r\n", *p))
        p++;
    if (p && p < req->body + req->body_len) {
        snprintf(msg, sizeof(msg),
                 "the request body is not valid JSON (unexpected data at byte %td)", p - req->body);
        cJSON_Delete(root);
        body_bad(v, msg, NULL, "invalid_json");
        return NULL;
    }
    /* cJSON keeps both members of a repeated key: refused, never half applied */
    char path[200];
    const cJSON *dup = epd_json_find_duplicate(root, path, sizeof(path));
    if (dup) {
        snprintf(msg, sizeof(msg),
                 "the request body has the key '%.100s' more than once (at %s): a key may "
                 "appear once in an object",
                 dup->string, path);
        cJSON_Delete(root);
        body_bad(v, msg, path, "duplicate_key");
        return NULL;
    }
    return root;
}

cJSON *api_parse_body(epd_api_t *a, const char *endpoint, const epd_http_req_t *req,
                      epd_http_res_t *res)
{
    verr_t v = {0};
    cJSON *root = api_parse_body_v(req, &v);
    if (!root)
        api_send_error(a, endpoint, res, v.status, v.msg, v.param[0] ? v.param : NULL, v.code);
    return root;
}

/* ---- work off the loop -------------------------------------------------------------------- */

/* The client left while the job waited or ran: a job not yet started is cancelled; one
 * running finishes, and its done callback sees `gone`. */
static void job_gone(epd_http_res_t *res, void *arg)
{
    (void)res;
    api_job_t *j = arg;
    j->gone = 1;
    if (j->queued) uv_cancel((uv_req_t *)&j->work);
}

static void job_work(uv_work_t *w)
{
    api_job_t *j = w->data;
    j->run(j);
}

static void job_after(uv_work_t *w, int status)
{
    api_job_t *j = w->data;
    j->queued = 0;
    epd_http_res_on_close(j->res, NULL, NULL);
    j->done(j, status == UV_ECANCELED);
}

void api_job_start(api_job_t *j)
{
    j->work.data = j;
    if (j->a->loop) {
        epd_http_res_on_close(j->res, job_gone, j);
        if (uv_queue_work(j->a->loop, &j->work, job_work, job_after) == 0) {
            j->queued = 1;
            return;
        }
        epd_http_res_on_close(j->res, NULL, NULL);
    }
    j->run(j); /* no loop (in-memory tests) or the pool refused: on this thread */
    j->done(j, 0);
}

/* ---- generation state --------------------------------------------------------------------- */

typedef struct completion completion_t;

typedef struct choice {
    completion_t *c;
    int index;
    epd_engine_req_t *er; /* NULL once its final event arrived */
    /* the completion's ids; with a tokenizer, the ids consumed so far (up to the one that
     * completed a stop string) */
    int32_t *tokens;
    int ntok, cap;
    int sent_tok; /* ids already in stream chunks */
    epd_finish_t finish;
    int stopped; /* a stop string matched: the text ends where it began */
    epd_tok_stream_t *ds;
    char *text; /* decoded so far: [tlen] (+ NUL) */
    size_t tlen, tcap;
    size_t sent; /* bytes of text already streamed */
    size_t scan; /* the stop-string search resumes here */
} choice_t;

struct completion {
    epd_api_t *api;
    completion_t *prev, *next; /* in api->inflight */
    epd_http_res_t *res;       /* NULL once the response is finished */
    int closed, stream, include_usage, n, remaining;
    int chat, text; /* text: the tokenizer decodes the output */
    char id[48];
    long long created;
    char model[128];
    choice_t *ch;
    int prompt_tokens, completion_tokens;
    int failed, fail_status;
    const char *fail_code; /* the error's "code", or NULL */
    int done_after_fail;   /* a failed stream still ends with data: [DONE] (shutdown) */
    char fail_msg[600];
    double t0;
    int nstop;
    char *stop[MAX_STOP];
    size_t stop_len[MAX_STOP], max_stop;
    /* EOS ids (config.json's and the tokenizer's): they end the text and add none to it */
    int neos;
    int32_t eos[2 * EPD_ENGINE_MAX_EOS];
};

static const char *finish_name(epd_finish_t f)
{
    return f == EPD_FINISH_STOP ? "stop" : "length";
}

static const char *endpoint_of(const completion_t *c)
{
    return c->chat ? EP_CHAT : EP_COMPLETIONS;
}

static cJSON *base_doc(const completion_t *c, int chunk)
{
    cJSON *doc = cJSON_CreateObject();
    if (!doc) return NULL;
    cJSON_AddStringToObject(doc, "id", c->id);
    cJSON_AddStringToObject(doc, "object",
                            c->chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                    : "text_completion");
    cJSON_AddNumberToObject(doc, "created", (double)c->created);
    cJSON_AddStringToObject(doc, "model", c->model);
    return doc;
}

static void add_finish(cJSON *o, const char *finish)
{
    if (finish)
        cJSON_AddStringToObject(o, "finish_reason", finish);
    else
        cJSON_AddNullToObject(o, "finish_reason");
}

/* A completions choice (or stream chunk): text, ids, finish. */
static cJSON *choice_obj(int index, const char *text, size_t tlen, const int32_t *ids, int n,
                         const char *finish)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "index", index);
    /* the text may hold U+0000, written as \u0000 */
    cJSON *t = tlen ? epd_json_string_n(text, tlen) : cJSON_CreateStringReference("");
    if (!t || !cJSON_AddItemToObject(o, "text", t)) {
        cJSON_Delete(t);
        cJSON_Delete(o);
        return NULL;
    }
    cJSON *arr = cJSON_AddArrayToObject(o, "token_ids");
    for (int i = 0; arr && i < n; i++)
        cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
    cJSON_AddNullToObject(o, "logprobs");
    add_finish(o, finish);
    return o;
}

/* A chat choice: message (whole response) or delta (stream chunk). role/content may be NULL. */
static cJSON *chat_choice_obj(int index, int delta, const char *role, const char *text, size_t tlen,
                              const char *finish)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "index", index);
    cJSON *m = cJSON_AddObjectToObject(o, delta ? "delta" : "message");
    if (m && role) cJSON_AddStringToObject(m, "role", role);
    if (m && text) /* the text may hold U+0000, written as \u0000 */
        cJSON_AddItemToObject(m, "content", epd_json_string_n(text, tlen));
    cJSON_AddNullToObject(o, "logprobs");
    add_finish(o, finish);
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

/* A chunk of one choice: the text [sent, upto) and the ids not yet sent; finish or NULL. */
static void send_chunk(completion_t *c, choice_t *ch, size_t upto, const char *finish)
{
    cJSON *doc = base_doc(c, 1);
    cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
    const char *t = ch->text ? ch->text + ch->sent : "";
    size_t tl = upto - ch->sent;
    int nt = ch->ntok - ch->sent_tok;
    if (chs) {
        if (c->chat)
            cJSON_AddItemToArray(
                chs, chat_choice_obj(ch->index, 1, NULL, finish ? NULL : t, tl, finish));
        else
            cJSON_AddItemToArray(chs, choice_obj(ch->index, t, tl, ch->tokens + ch->sent_tok,
                                                 finish ? 0 : nt, finish));
    }
    sse_send(c, doc);
    cJSON_Delete(doc);
    if (!finish) {
        ch->sent = upto;
        ch->sent_tok = ch->ntok;
    }
}

static void completion_free(completion_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else if (c->api->inflight == c)
        c->api->inflight = c->next;
    if (c->next) c->next->prev = c->prev;
    for (int i = 0; i < c->n; i++) {
        free(c->ch[i].tokens);
        free(c->ch[i].text);
        epd_tok_stream_destroy(c->ch[i].ds);
    }
    for (int i = 0; i < c->nstop; i++)
        free(c->stop[i]);
    free(c->ch);
    free(c);
}

static void fail(completion_t *c, int status, const char *msg)
{
    if (c->failed) return;
    c->failed = 1;
    c->fail_status = status;
    snprintf(c->fail_msg, sizeof(c->fail_msg), "%s", msg);
}

static int push_token(choice_t *ch, int32_t tok)
{
    if (ch->ntok == ch->cap) {
        int cap = ch->cap ? ch->cap * 2 : 32;
        int32_t *t = realloc(ch->tokens, sizeof(int32_t) * (size_t)cap);
        if (!t) return -ENOMEM;
        ch->tokens = t;
        ch->cap = cap;
    }
    ch->tokens[ch->ntok++] = tok;
    return 0;
}

static int append_text(choice_t *ch, const char *s, size_t n)
{
    if (ch->tlen + n + 1 > ch->tcap) {
        size_t cap = ch->tcap ? ch->tcap : 256;
        while (cap < ch->tlen + n + 1)
            cap *= 2;
        char *t = realloc(ch->text, cap);
        if (!t) return -ENOMEM;
        ch->text = t;
        ch->tcap = cap;
    }
    memcpy(ch->text + ch->tlen, s, n);
    ch->tlen += n;
    ch->text[ch->tlen] = '\0';
    return 0;
}

/* The earliest stop string in the text since the last search: the text is cut there. */
static void find_stop(completion_t *c, choice_t *ch)
{
    if (!c->nstop || ch->stopped) return;
    size_t best = (size_t)-1;
    for (int i = 0; i < c->nstop; i++) {
        if (ch->tlen < c->stop_len[i]) continue;
        const char *p =
            memmem(ch->text + ch->scan, ch->tlen - ch->scan, c->stop[i], c->stop_len[i]);
        if (p && (size_t)(p - ch->text) < best) best = (size_t)(p - ch->text);
    }
    if (best != (size_t)-1) {
        ch->stopped = 1;
        ch->tlen = best;
        ch->text[best] = '\0';
        epd_engine_cancel(ch->er);
        return;
    }
    /* a later match starts at most max_stop - 1 bytes before the current end */
    ch->scan = ch->tlen + 1 > c->max_stop ? ch->tlen + 1 - c->max_stop : 0;
}

/* Bytes at the end of the text that may be the start of a stop string: not streamed yet. */
static size_t holdback(const completion_t *c, const choice_t *ch)
{
    size_t hold = 0, avail = ch->tlen - ch->sent;
    for (int i = 0; i < c->nstop; i++) {
        size_t k = c->stop_len[i] - 1 < avail ? c->stop_len[i] - 1 : avail;
        for (; k > hold; k--)
            if (!memcmp(ch->text + ch->tlen - k, c->stop[i], k)) {
                hold = k;
                break;
            }
    }
    return hold;
}

/* One generated id (text mode): decode, look for stop strings, stream what is safe. */
static void take_token(completion_t *c, choice_t *ch, int32_t tok)
{
    if (ch->stopped || c->failed) return;
    if (push_token(ch, tok)) {
        fail(c, 500, "out of memory");
        return;
    }
    for (int i = 0; i < c->neos; i++)
        if (c->eos[i] == tok) return;
    const char *piece = NULL;
    size_t plen = 0;
    /* an id the tokenizer does not know (the model's padding rows) decodes to nothing */
    if (epd_tok_stream_push(ch->ds, tok, &piece, &plen, NULL) != 0) plen = 0;
    if (plen && append_text(ch, piece, plen)) {
        fail(c, 500, "out of memory");
        return;
    }
    find_stop(c, ch);
    if (!c->stream) return;
    size_t safe = ch->stopped ? ch->tlen : ch->tlen - holdback(c, ch);
    if (safe > ch->sent) send_chunk(c, ch, safe, NULL);
}

/* Writes the response (once), counts it and lets go of it; the completion lives on until its
 * engine requests have ended. A client that left counts as 499, stream or not. */
static void send_response(completion_t *c)
{
    epd_api_t *a = c->api;
    int status = c->failed ? c->fail_status : 200;
    if (!c->res) return;
    epd_http_res_on_close(c->res, NULL, NULL);
    if (c->stream) {
        if (c->failed) {
            cJSON *err = error_doc(status, c->fail_msg, NULL, c->fail_code);
            sse_send(c, err);
            cJSON_Delete(err);
        } else if (c->include_usage) {
            cJSON *doc = base_doc(c, 1);
            if (doc) {
                cJSON_AddArrayToObject(doc, "choices");
                add_usage(doc, c);
            }
            sse_send(c, doc);
            cJSON_Delete(doc);
        }
        if ((!c->failed || c->done_after_fail) && !c->closed)
            epd_http_stream_write(c->res, "data: [DONE]\n\n", 14);
        epd_http_stream_end(c->res);
    } else if (c->failed) {
        cJSON *err = error_doc(status, c->fail_msg, NULL, c->fail_code);
        if (status == 503) epd_http_res_header(c->res, "Retry-After", "1");
        api_send_json(c->res, status, err);
        cJSON_Delete(err);
    } else {
        cJSON *doc = base_doc(c, 0);
        cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
        for (int i = 0; chs && i < c->n; i++) {
            choice_t *ch = &c->ch[i];
            const char *fin = finish_name(ch->finish);
            cJSON_AddItemToArray(
                chs, c->chat ? chat_choice_obj(i, 0, "assistant", ch->text ? ch->text : "",
                                               ch->tlen, fin)
                             : choice_obj(i, ch->text, ch->tlen, ch->tokens, ch->ntok, fin));
        }
        if (doc) add_usage(doc, c);
        api_send_json(c->res, 200, doc);
        cJSON_Delete(doc);
    }
    c->res = NULL;
    if (c->closed) status = 499; /* the client closed the request (nginx's code) */
    api_count(a, endpoint_of(c), status);
    epd_metric_observe(c->chat ? a->m_dur_chat : a->m_dur_cmpl, epd_now_s() - c->t0);
}

static void finish_response(completion_t *c)
{
    send_response(c);
    completion_free(c);
}

void epd_api_fail_all(epd_api_t *a, const char *why)
{
    if (!a) return;
    completion_t *c = a->inflight, *next;
    for (; c; c = next) {
        next = c->next;
        if (!c->res) continue;
        c->failed = 0; /* the shutdown is the reason the client gets */
        fail(c, 503, why);
        c->fail_code = "shutdown";
        c->done_after_fail = 1;
        send_response(c);
        for (int i = 0; i < c->n; i++)
            epd_engine_cancel(c->ch[i].er);
    }
}

static void on_event(void *arg, const epd_engine_event_t *ev)
{
    choice_t *ch = arg;
    completion_t *c = ch->c;
    if (!ev->final) {
        if (c->text) {
            take_token(c, ch, ev->token);
        } else if (c->stream && !c->failed) {
            if (push_token(ch, ev->token))
                fail(c, 500, "out of memory");
            else
                send_chunk(c, ch, ch->sent, NULL);
        }
        return;
    }
    ch->er = NULL;
    c->prompt_tokens += ev->prompt_tokens;
    if (ev->finish == EPD_FINISH_ERROR) {
        fail(c, ev->status ? ev->status : 500, ev->error ? ev->error : "failed");
    } else if (c->text) {
        /* ids that came without a token event (not streamed from the engine) */
        for (int i = ch->ntok; i < ev->num_tokens && !ch->stopped && !c->failed; i++)
            take_token(c, ch, ev->tokens[i]);
        if (!ch->stopped && !c->failed) {
            const char *piece = NULL;
            size_t plen = 0;
            epd_tok_stream_flush(ch->ds, &piece, &plen);
            if (plen && append_text(ch, piece, plen)) fail(c, 500, "out of memory");
            find_stop(c, ch);
        }
    } else if (!c->failed) {
        ch->ntok = 0;
        for (int i = 0; i < ev->num_tokens && !c->failed; i++)
            if (push_token(ch, ev->tokens[i])) fail(c, 500, "out of memory");
    }
    ch->finish = ch->stopped ? EPD_FINISH_STOP : ev->finish;
    c->completion_tokens += ch->ntok;
    if (c->stream && !c->failed && (ch->stopped || ev->finish != EPD_FINISH_CANCELLED)) {
        if (ch->tlen > ch->sent || (!c->chat && ch->ntok > ch->sent_tok))
            send_chunk(c, ch, ch->tlen, NULL);
        send_chunk(c, ch, ch->tlen, finish_name(ch->finish));
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

static void make_id(epd_api_t *a, const char *prefix, char *out, size_t len)
{
    unsigned char b[12];
    if (getrandom(b, sizeof(b), GRND_NONBLOCK) != (ssize_t)sizeof(b)) {
        uint64_t x = (uint64_t)time(NULL) * 6364136223846793005ull + ++a->seq;
        memcpy(b, &x, 8);
        memset(b + 8, (int)a->seq, 4);
    }
    size_t o = (size_t)snprintf(out, len, "%s", prefix);
    for (size_t i = 0; i < sizeof(b) && o + 2 < len; i++)
        o += (size_t)snprintf(out + o, len - o, "%02x", b[i]);
}

/* A completions or chat request's body parsed, validated and tokenized off the loop. */
typedef struct parse_job {
    api_job_t job; /* first */
    int chat, rc;
    double t0;
    epd_engine_info_t info; /* copied on the loop */
    creq_t q;
    verr_t v;
} parse_job_t;

static void parse_run(api_job_t *job)
{
    parse_job_t *j = (parse_job_t *)job;
    cJSON *root = api_parse_body_v(job->req, &j->v);
    if (!root) {
        j->rc = -1;
        return;
    }
    j->rc = api_parse_request(job->a, root, &j->info, j->chat, &j->q, &j->v);
    cJSON_Delete(root);
}

static void submit(epd_api_t *a, epd_http_res_t *res, int chat, double t0, creq_t q);

static void parse_done(api_job_t *job, int cancelled)
{
    parse_job_t *j = (parse_job_t *)job;
    const char *ep = j->chat ? EP_CHAT : EP_COMPLETIONS;
    if (cancelled || job->gone) {
        if (!cancelled) api_creq_free(&j->q);
        /* the client closed the request (nginx's 499, as for completions it leaves) */
        api_send_error(job->a, ep, job->res, 499, "the client closed the request", NULL, NULL);
    } else if (j->rc) {
        api_creq_free(&j->q);
        api_send_error(job->a, ep, job->res, j->v.status, j->v.msg,
                       j->v.param[0] ? j->v.param : NULL, j->v.code);
    } else {
        submit(job->a, job->res, j->chat, j->t0, j->q);
    }
    free(j);
}

static void handle(epd_api_t *a, const epd_http_req_t *req, epd_http_res_t *res, int chat)
{
    const char *ep = chat ? EP_CHAT : EP_COMPLETIONS;
    double t0 = epd_now_s();
    const epd_engine_info_t *info = a->engine ? epd_engine_info(a->engine) : NULL;
    if (a->state && epd_state_drained(a->state)) {
        api_send_error(a, ep, res, 503,
                       "this node is draining (POST /v1/admin/drain): it finishes the requests "
                       "it has and takes no new ones; send this one to another node",
                       NULL, "draining");
        return;
    }
    if (a->state && epd_state_phase(a->state) >= EPD_PHASE_DRAINING) {
        api_send_error(a, ep, res, 503, "this node is stopping; send the request to another node",
                       NULL, "stopping");
        return;
    }
    if (!a->engine) {
        api_send_error(a, ep, res, 503, "this node serves no model (model.path is empty)", NULL,
                       "no_model");
        return;
    }
    if (!info) {
        api_send_error(a, ep, res, 503,
                       "the model is not ready (loading, or re-forming the EP group); see /readyz",
                       NULL, "not_ready");
        return;
    }
    parse_job_t *j = calloc(1, sizeof(*j));
    if (!j) {
        api_send_error(a, ep, res, 500, "out of memory", NULL, NULL);
        return;
    }
    j->job = (api_job_t){.a = a, .req = req, .res = res, .run = parse_run, .done = parse_done};
    j->chat = chat;
    j->t0 = t0;
    j->info = *info;
    api_job_start(&j->job);
}

/* On the loop: a validated request becomes one engine request per prompt. */
static void submit(epd_api_t *a, epd_http_res_t *res, int chat, double t0, creq_t q)
{
    const char *ep = chat ? EP_CHAT : EP_COMPLETIONS;
    /* the engine may have gone while the request was parsed */
    const epd_engine_info_t *info = a->engine ? epd_engine_info(a->engine) : NULL;
    if (!info) {
        api_creq_free(&q);
        api_send_error(a, ep, res, 503,
                       "the model is not ready (loading, or re-forming the EP group); see /readyz",
                       NULL, "not_ready");
        return;
    }
    completion_t *c = calloc(1, sizeof(*c));
    if (c) c->ch = calloc((size_t)q.nprompts, sizeof(*c->ch));
    if (!c || !c->ch) {
        free(c);
        api_creq_free(&q);
        api_send_error(a, ep, res, 500, "out of memory", NULL, NULL);
        return;
    }
    c->api = a;
    c->res = res;
    c->next = a->inflight;
    if (c->next) c->next->prev = c;
    a->inflight = c;
    c->chat = chat;
    c->text = a->tok_state == TOK_LOADED;
    c->stream = q.stream;
    c->include_usage = q.include_usage;
    c->n = q.nprompts;
    c->t0 = t0;
    c->created = (long long)time(NULL);
    c->nstop = q.nstop;
    for (int i = 0; i < q.nstop; i++) {
        c->stop[i] = q.stop[i];
        c->stop_len[i] = q.stop_len[i];
        if (c->stop_len[i] > c->max_stop) c->max_stop = c->stop_len[i];
    }
    q.nstop = 0; /* owned by c now */
    snprintf(c->model, sizeof(c->model), "%s", info->model_id);
    make_id(a, chat ? "chatcmpl-" : "cmpl-", c->id, sizeof(c->id));
    uint64_t seed = q.seed;
    if (!q.have_seed) {
        unsigned char b[8];
        if (getrandom(b, sizeof(b), GRND_NONBLOCK) == (ssize_t)sizeof(b))
            memcpy(&seed, b, sizeof(seed));
        else
            seed = (uint64_t)time(NULL) ^ (++a->seq << 32);
    }
    /* the tokenizer's EOS ids (generation_config.json) end generation like config.json's */
    int32_t stop_ids[EPD_ENGINE_MAX_EOS];
    int nstop_ids = 0;
    if (c->text) {
        size_t ne = 0;
        const int32_t *eos = epd_tok_eos_ids(a->tok, &ne);
        for (size_t i = 0; i < ne && nstop_ids < EPD_ENGINE_MAX_EOS; i++)
            if (eos[i] >= 0 && eos[i] < info->vocab_size) stop_ids[nstop_ids++] = eos[i];
        for (int i = 0; i < nstop_ids; i++)
            c->eos[c->neos++] = stop_ids[i];
        for (int i = 0; i < info->num_eos; i++)
            c->eos[c->neos++] = info->eos[i];
    }
    int submit_rc = 0, gp_prompt_len = 0, gp_max_tokens = 0;
    for (int i = 0; i < q.nprompts; i++) {
        choice_t *ch = &c->ch[i];
        ch->c = c;
        ch->index = i;
        if (c->text && epd_tok_stream_create(a->tok, EPD_TOK_DECODE_SKIP_SPECIAL, &ch->ds) != 0) {
            submit_rc = -ENOMEM;
            break;
        }
        int mt = q.max_tokens;
        if (mt < 0) { /* not given: OpenAI's default, within what the context leaves */
            mt = info->max_seq_len - q.len[i];
            if (!chat && mt > DEFAULT_MAX_TOKENS) mt = DEFAULT_MAX_TOKENS;
            /* nor more than a rank's KV pool holds (prompt + completion - 1 positions) */
            long room = (long)info->kv_blocks * info->kv_block_size - q.len[i] + 1;
            if (info->kv_block_size > 0 && mt > room) mt = room > 1 ? (int)room : 1;
        }
        gp_prompt_len = q.len[i];
        gp_max_tokens = mt;
        epd_gen_params_t gp = {.prompt = q.ids[i],
                               .prompt_len = q.len[i],
                               .max_tokens = mt,
                               .temperature = (float)q.temperature,
                               .top_p = (float)q.top_p,
                               .top_k = q.top_k,
                               .seed = seed + (uint64_t)i,
                               /* stop strings are looked for as each id arrives */
                               .stream = q.stream || c->nstop > 0,
                               .stop_ids = stop_ids,
                               .num_stop_ids = nstop_ids};
        submit_rc = epd_engine_submit(a->engine, &gp, on_event, ch, &ch->er);
        if (submit_rc) break;
        c->remaining++;
    }
    api_creq_free(&q);
    if (submit_rc == -E2BIG) {
        /* the KV pool of a rank could never hold this request, even alone */
        const epd_engine_info_t *ki = epd_engine_info(a->engine);
        char kmsg[256];
        snprintf(kmsg, sizeof(kmsg),
                 "prompt + max_tokens needs %d KV blocks, the pool has %d (blocks of %d "
                 "tokens; model.kv_blocks)",
                 epd_engine_kv_blocks_for(a->engine, gp_prompt_len, gp_max_tokens),
                 ki ? ki->kv_blocks : 0, ki ? ki->kv_block_size : 0);
        api_send_error(a, ep, res, 400, kmsg, "max_tokens", NULL);
        c->res = NULL;
        for (int i = 0; i < c->n; i++)
            epd_engine_cancel(c->ch[i].er);
        if (c->remaining == 0) completion_free(c);
        return;
    }
    if (submit_rc) {
        int st = submit_rc == -EAGAIN ? 429 : submit_rc == -EBUSY ? 503 : 500;
        const char *msg = submit_rc == -EAGAIN
                              ? "the request queue is full (model.max_queued_requests); "
                                "retry later"
                          : submit_rc == -EBUSY  ? "the model is not ready; see /readyz"
                          : submit_rc == -ENOMEM ? "out of memory"
                                                 : "the engine refused the request";
        api_send_error(a, ep, res, st, msg, NULL, submit_rc == -EAGAIN ? "queue_full" : NULL);
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
        /* chat streams open with the assistant's role, as OpenAI's do */
        for (int i = 0; chat && i < c->n; i++) {
            cJSON *doc = base_doc(c, 1);
            cJSON *chs = doc ? cJSON_AddArrayToObject(doc, "choices") : NULL;
            if (chs) cJSON_AddItemToArray(chs, chat_choice_obj(i, 1, "assistant", "", 0, NULL));
            sse_send(c, doc);
            cJSON_Delete(doc);
        }
    }
}

static void h_completions(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    handle(ctx, req, res, 0);
}

static void h_chat(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    handle(ctx, req, res, 1);
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
    api_send_json(res, 200, data ? doc : NULL);
    cJSON_Delete(doc);
    api_count(a, EP_MODELS, 200);
}

int epd_api_create(epd_http_server_t *http, epd_engine_t *engine, epd_metrics_t *metrics,
                   epd_api_t **out)
{
    static const double dur_b[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    epd_api_t *a = calloc(1, sizeof(*a));
    if (!a) return -ENOMEM;
    a->engine = engine;
    a->metrics = metrics;
    snprintf(a->tok_err, sizeof(a->tok_err), "this node serves no model (model.path is empty)");
    static const char dur_help[] = "Completion requests from arrival to the last byte.";
    const int nb = (int)(sizeof(dur_b) / sizeof(dur_b[0]));
    a->m_dur_cmpl = epd_metrics_histogram(metrics, "epd_request_duration_seconds", dur_help,
                                          "endpoint=\"" EP_COMPLETIONS "\"", dur_b, nb);
    a->m_dur_chat = epd_metrics_histogram(metrics, "epd_request_duration_seconds", dur_help,
                                          "endpoint=\"" EP_CHAT "\"", dur_b, nb);
    int rc;
    if (!a->m_dur_cmpl || !a->m_dur_chat) {
        free(a);
        return -ENOMEM;
    }
    if ((rc = epd_http_route(http, "POST", EP_COMPLETIONS, h_completions, a)) ||
        (rc = epd_http_route(http, "POST", EP_CHAT, h_chat, a)) ||
        (rc = epd_http_route(http, "GET", EP_MODELS, h_models, a)) ||
        (rc = api_text_routes(http, a))) {
        free(a); /* the server is torn down by the caller on this error */
        return rc;
    }
    *out = a;
    return 0;
}

void epd_api_set_loop(epd_api_t *a, uv_loop_t *loop)
{
    a->loop = loop;
}

void epd_api_set_state(epd_api_t *a, epd_state_t *state)
{
    if (a) a->state = state;
}

void epd_api_detach_engine(epd_api_t *a)
{
    if (a) a->engine = NULL;
}

void epd_api_destroy(epd_api_t *a)
{
    if (!a) return;
    epd_tok_destroy(a->tok);
    free(a);
}
