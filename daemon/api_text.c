/* The text side of the inference API: the checkpoint's tokenizer (loaded at start, its state
 * for /v1/status and the reason text requests are refused), prompt encoding, OpenAI chat
 * messages rendered with the checkpoint's chat template, and vLLM's POST /tokenize and
 * POST /detokenize. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "api_internal.h"
#include "epd_clock.h"
#include "epd_json.h"
#include "log.h"

#define SUB "api"
#define EP_TOKENIZE "/tokenize"
#define EP_DETOKENIZE "/detokenize"

/* ---- loading ------------------------------------------------------------------------------ */

static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

void epd_api_load_tokenizer(epd_api_t *a, const char *model_dir)
{
    char tj[600], tc[600], gc[600];
    a->tok_state = TOK_ABSENT;
    a->chat_ok = 0;
    snprintf(a->tok_dir, sizeof(a->tok_dir), "%s", model_dir ? model_dir : "");
    if (!model_dir || !model_dir[0]) {
        snprintf(a->tok_err, sizeof(a->tok_err), "this node serves no model (model.path is empty)");
        return;
    }
    snprintf(tj, sizeof(tj), "%s/tokenizer.json", model_dir);
    snprintf(tc, sizeof(tc), "%s/tokenizer_config.json", model_dir);
    snprintf(gc, sizeof(gc), "%s/generation_config.json", model_dir);
    if (!file_exists(tj)) {
        snprintf(a->tok_err, sizeof(a->tok_err),
                 "the checkpoint has no tokenizer (%s does not exist): send prompts as token ids",
                 tj);
        EPD_INFO(SUB, "no tokenizer.json in %s: text requests are refused, token ids served",
                 model_dir);
        return;
    }
    double t0 = epd_now_s();
    epd_err_t err = {0};
    epd_tok_t *tok = NULL;
    int st = epd_tok_load_dir(model_dir, &tok, &err);
    if (st == -ENOTSUP && strstr(err.msg, "chat_template")) {
        /* A chat template we do not render refuses chat only: text completions still work
         * with the vocabulary, its special tokens and generation_config.json's EOS ids. */
        snprintf(a->chat_err, sizeof(a->chat_err),
                 "the checkpoint's chat template is not supported, so chat requests are refused "
                 "(Qwen3's ChatML and DeepSeek-V3's templates are rendered): %.600s",
                 err.msg);
        EPD_WARN(SUB, "%s", a->chat_err);
        epd_err_clear(&err);
        st = epd_tok_load_files(tj, NULL, NULL, file_exists(gc) ? gc : NULL, &tok, &err);
    }
    if (st != 0) {
        a->tok_state = TOK_FAILED;
        snprintf(a->tok_err, sizeof(a->tok_err), "the checkpoint's tokenizer failed to load: %s",
                 err.msg[0] ? err.msg : epd_status_str(st));
        EPD_ERROR(SUB, "%s (text requests are refused; token-id requests are served)", a->tok_err);
        return;
    }
    a->tok = tok;
    a->tok_state = TOK_LOADED;
    a->tok_load_s = epd_now_s() - t0;
    if (epd_tok_chat_kind(tok) != EPD_TOK_CHAT_NONE) {
        a->chat_ok = 1;
    } else if (!a->chat_err[0]) {
        snprintf(a->chat_err, sizeof(a->chat_err),
                 "the checkpoint has no chat template (neither %s/chat_template.jinja nor a "
                 "chat_template in %s), so chat requests are refused",
                 model_dir, tc);
    }
    size_t neos = 0;
    epd_tok_eos_ids(tok, &neos);
    EPD_INFO(SUB, "tokenizer %s: %zu ids, %zu EOS id(s), chat %s, loaded in %.2f s", tj,
             epd_tok_vocab_size(tok), neos,
             a->chat_ok ? epd_tok_chat_kind_name(epd_tok_chat_kind(tok)) : "refused",
             a->tok_load_s);
}

cJSON *epd_api_tokenizer_cjson(const epd_api_t *a)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    static const char *const names[] = {"absent", "loaded", "failed"};
    cJSON_AddStringToObject(o, "state", names[a->tok_state]);
    cJSON_AddStringToObject(o, "dir", a->tok_dir);
    if (a->tok_state != TOK_LOADED) {
        cJSON_AddStringToObject(o, "error", a->tok_err);
        return o;
    }
    cJSON_AddNumberToObject(o, "vocab_size", (double)epd_tok_vocab_size(a->tok));
    size_t n = 0;
    const int32_t *eos = epd_tok_eos_ids(a->tok, &n);
    cJSON *e = cJSON_AddArrayToObject(o, "eos_token_ids");
    for (size_t i = 0; e && i < n; i++)
        cJSON_AddItemToArray(e, cJSON_CreateNumber(eos[i]));
    cJSON_AddStringToObject(o, "chat_template",
                            a->chat_ok ? epd_tok_chat_kind_name(epd_tok_chat_kind(a->tok))
                                       : "refused");
    if (!a->chat_ok) cJSON_AddStringToObject(o, "chat_error", a->chat_err);
    cJSON_AddNumberToObject(o, "load_seconds", a->tok_load_s);
    return o;
}

int api_text_ready(const epd_api_t *a, const char *param, verr_t *v)
{
    if (a->tok_state == TOK_LOADED) return 0;
    return api_bad(v, 400, param, "tokenizer_unavailable",
                   "this request needs the tokenizer, and %s", a->tok_err);
}

int api_chat_ready(const epd_api_t *a, verr_t *v)
{
    if (api_text_ready(a, "messages", v)) return -1;
    if (a->chat_ok) return 0;
    return api_bad(v, 400, "messages", "chat_template_unsupported", "%s", a->chat_err);
}

/* Hands the ids over (or refuses too many); st and err: the encoder's result. */
static int take_ids(int st, const char *err, epd_tok_ids_t out, const char *path, int32_t **ids,
                    int *n, verr_t *v)
{
    if (st != 0) {
        epd_tok_ids_fini(&out);
        if (st == -ENOMEM) return api_bad(v, 500, NULL, NULL, "out of memory");
        return api_bad(v, 400, "prompt", NULL, "%s cannot be tokenized: %s", path,
                       err[0] ? err : epd_status_str(st));
    }
    if (out.len > (size_t)1 << 30) {
        epd_tok_ids_fini(&out);
        return api_bad(v, 400, "prompt", NULL, "%s is too long", path);
    }
    *ids = out.ids; /* the buffer is plain malloc'd memory, handed over */
    *n = (int)out.len;
    return 0;
}

int api_encode(const epd_api_t *a, const char *text, size_t len, unsigned flags, const char *path,
               int32_t **ids, int *n, verr_t *v)
{
    epd_tok_ids_t out = {0};
    epd_err_t err = {0};
    int st = epd_tok_encode(a->tok, text, len, flags, &out, &err);
    return take_ids(st, err.msg, out, path, ids, n, v);
}

/* ---- chat messages ------------------------------------------------------------------------ */

int api_chat_kwargs(const cJSON *f, int *disable_thinking, verr_t *v)
{
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsObject(f))
        return api_bad(v, 400, "chat_template_kwargs", NULL,
                       "'chat_template_kwargs' must be an object, not %s", epd_json_type_name(f));
    for (const cJSON *o = f->child; o; o = o->next) {
        if (strcmp(o->string, "enable_thinking") != 0)
            return api_bad(v, 400, "chat_template_kwargs", NULL,
                           "chat_template_kwargs.%.100s is not supported by this template "
                           "(only enable_thinking)",
                           o->string);
        if (cJSON_IsNull(o)) continue;
        if (!cJSON_IsBool(o))
            return api_bad(v, 400, "chat_template_kwargs", NULL,
                           "chat_template_kwargs.enable_thinking must be a boolean, not %s",
                           epd_json_type_name(o));
        *disable_thinking = cJSON_IsFalse(o);
    }
    return 0;
}

typedef struct msgbuf {
    epd_tok_chat_msg_t *msgs;
    epd_tok_tool_call_t **calls; /* [n] */
    char **owned;                /* [n]: joined content parts */
    int n;
} msgbuf_t;

static void msgbuf_free(msgbuf_t *m)
{
    for (int i = 0; i < m->n; i++) {
        if (m->calls) free(m->calls[i]);
        if (m->owned) free(m->owned[i]);
    }
    free(m->calls);
    free(m->owned);
    free(m->msgs);
}

/* content: a string, or a list of {"type": "text", "text": ...} parts (joined with "\n", as
 * vLLM does), or null for an assistant message that carries tool calls. */
static int parse_content(const cJSON *c, int i, int has_calls, const char **out, size_t *out_len,
                         char **owned, verr_t *v)
{
    *out_len = 0;
    if (cJSON_IsString(c)) {
        *out = c->valuestring;
        *out_len = epd_json_strlen(c); /* text may hold U+0000 */
        return 0;
    }
    if ((!c || cJSON_IsNull(c)) && has_calls) {
        *out = NULL; /* "only tool calls": DeepSeek-V3's template renders it apart from "" */
        return 0;
    }
    if (!c || cJSON_IsNull(c))
        return api_bad(v, 400, "messages", NULL,
                       "messages[%d].content is required (a string or a list of text parts)", i);
    if (!cJSON_IsArray(c))
        return api_bad(v, 400, "messages", NULL,
                       "messages[%d].content must be a string or a list of text parts, not %s", i,
                       epd_json_type_name(c));
    size_t total = 1;
    int j = 0;
    for (const cJSON *p = c->child; p; p = p->next, j++) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "type");
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(p, "text");
        if (!cJSON_IsObject(p) || !cJSON_IsString(t))
            return api_bad(v, 400, "messages", NULL,
                           "messages[%d].content[%d] must be an object with a string 'type'", i, j);
        if (strcmp(t->valuestring, "text") != 0)
            return api_bad(v, 400, "messages", NULL,
                           "messages[%d].content[%d]: parts of type '%.64s' are not supported "
                           "(this model takes text only)",
                           i, j, t->valuestring);
        if (!cJSON_IsString(x))
            return api_bad(v, 400, "messages", NULL,
                           "messages[%d].content[%d].text must be a string, not %s", i, j,
                           epd_json_type_name(x));
        total += epd_json_strlen(x) + 1;
    }
    char *s = malloc(total);
    if (!s) return api_bad(v, 500, NULL, NULL, "out of memory");
    size_t o = 0;
    for (const cJSON *p = c->child; p; p = p->next) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(p, "text");
        if (p != c->child) s[o++] = '\n';
        size_t l = epd_json_strlen(x);
        memcpy(s + o, x->valuestring, l);
        o += l;
    }
    s[o] = '\0';
    *owned = s;
    *out = s;
    *out_len = o;
    return 0;
}

static int parse_tool_calls(const cJSON *tc, int i, epd_tok_tool_call_t **out, size_t *n, verr_t *v)
{
    if (!tc || cJSON_IsNull(tc)) return 0;
    if (!cJSON_IsArray(tc))
        return api_bad(v, 400, "messages", NULL, "messages[%d].tool_calls must be a list, not %s",
                       i, epd_json_type_name(tc));
    int cnt = cJSON_GetArraySize(tc), j = 0;
    if (cnt == 0) return 0;
    epd_tok_tool_call_t *calls = calloc((size_t)cnt, sizeof(*calls));
    if (!calls) return api_bad(v, 500, NULL, NULL, "out of memory");
    for (const cJSON *c = tc->child; c; c = c->next, j++) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        if (!cJSON_IsObject(c) || !cJSON_IsObject(fn) || !cJSON_IsString(name) ||
            !cJSON_IsString(args)) {
            free(calls);
            return api_bad(v, 400, "messages", NULL,
                           "messages[%d].tool_calls[%d] must be {\"type\": \"function\", "
                           "\"function\": {\"name\": string, \"arguments\": string}}",
                           i, j);
        }
        calls[j].name = name->valuestring;
        calls[j].arguments = args->valuestring;
    }
    *out = calls;
    *n = (size_t)cnt;
    return 0;
}

int api_encode_chat(const epd_api_t *a, const cJSON *messages, int add_generation_prompt,
                    int disable_thinking, int split_special, int32_t **ids, int *n_ids, verr_t *v)
{
    if (!messages || cJSON_IsNull(messages))
        return api_bad(v, 400, "messages", NULL, "'messages' is required: a list of messages");
    if (!cJSON_IsArray(messages))
        return api_bad(v, 400, "messages", NULL, "'messages' must be a list, not %s",
                       epd_json_type_name(messages));
    int n = cJSON_GetArraySize(messages);
    if (n == 0)
        return api_bad(v, 400, "messages", NULL, "'messages' is empty: give at least one message");
    msgbuf_t m = {.msgs = calloc((size_t)n, sizeof(*m.msgs)),
                  .calls = calloc((size_t)n, sizeof(*m.calls)),
                  .owned = calloc((size_t)n, sizeof(*m.owned)),
                  .n = n};
    int rc = -1, i = 0;
    if (!m.msgs || !m.calls || !m.owned) {
        api_bad(v, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    for (const cJSON *e = messages->child; e; e = e->next, i++) {
        if (!cJSON_IsObject(e)) {
            api_bad(v, 400, "messages", NULL, "messages[%d] must be an object, not %s", i,
                    epd_json_type_name(e));
            goto fail;
        }
        const cJSON *role = NULL, *content = NULL, *reasoning = NULL, *tc = NULL;
        for (const cJSON *f = e->child; f; f = f->next) {
            if (!strcmp(f->string, "role")) {
                role = f;
            } else if (!strcmp(f->string, "content")) {
                content = f;
            } else if (!strcmp(f->string, "reasoning_content")) {
                reasoning = f;
            } else if (!strcmp(f->string, "tool_calls")) {
                tc = f;
            } else if (!strcmp(f->string, "name") || !strcmp(f->string, "tool_call_id")) {
                if (!cJSON_IsString(f) && !cJSON_IsNull(f)) {
                    api_bad(v, 400, "messages", NULL, "messages[%d].%s must be a string, not %s", i,
                            f->string, epd_json_type_name(f));
                    goto fail;
                }
            } else {
                api_bad(v, 400, "messages", NULL, "messages[%d].%.64s is not supported", i,
                        f->string);
                goto fail;
            }
        }
        if (!cJSON_IsString(role)) {
            api_bad(v, 400, "messages", NULL, "messages[%d].role must be a string, not %s", i,
                    role ? epd_json_type_name(role) : "missing");
            goto fail;
        }
        m.msgs[i].role = role->valuestring;
        if (parse_tool_calls(tc, i, &m.calls[i], &m.msgs[i].n_tool_calls, v)) goto fail;
        m.msgs[i].tool_calls = m.calls[i];
        if (parse_content(content, i, m.msgs[i].n_tool_calls > 0, &m.msgs[i].content,
                          &m.msgs[i].content_len, &m.owned[i], v))
            goto fail;
        if (reasoning && !cJSON_IsNull(reasoning)) {
            if (!cJSON_IsString(reasoning)) {
                api_bad(v, 400, "messages", NULL,
                        "messages[%d].reasoning_content must be a string, not %s", i,
                        epd_json_type_name(reasoning));
                goto fail;
            }
            m.msgs[i].reasoning_content = reasoning->valuestring;
            m.msgs[i].reasoning_content_len = epd_json_strlen(reasoning);
        }
    }
    epd_tok_chat_opts_t opts = {.add_generation_prompt = add_generation_prompt != 0,
                                .disable_thinking = disable_thinking != 0};
    epd_err_t err = {0};
    epd_tok_ids_t out = {0};
    int st = epd_tok_chat_encode(a->tok, m.msgs, (size_t)n, &opts,
                                 split_special ? EPD_TOK_ENCODE_SPLIT_SPECIAL : 0, &out, &err);
    if (st == -EINVAL || st == -ENOTSUP) {
        epd_tok_ids_fini(&out);
        api_bad(v, 400, "messages", NULL, "the messages cannot be rendered: %s",
                err.msg[0] ? err.msg : epd_status_str(st));
        goto fail;
    }
    if (take_ids(st, err.msg, out, "the rendered chat", ids, n_ids, v)) goto fail;
    rc = 0;
fail:
    msgbuf_free(&m);
    return rc;
}

/* ---- /tokenize, /detokenize --------------------------------------------------------------- */

/* info: the engine's, NULL while none is loaded */
static int check_model(const epd_engine_info_t *info, const cJSON *f, verr_t *v)
{
    if (!cJSON_IsString(f))
        return api_bad(v, 400, "model", NULL, "'model' must be a string, not %s",
                       epd_json_type_name(f));
    if (info && (strcmp(f->valuestring, info->model_id) != 0 ||
                 epd_json_strlen(f) != strlen(f->valuestring)))
        return api_bad(v, 404, "model", "model_not_found",
                       "The model '%.200s' does not exist; this server serves '%s'", f->valuestring,
                       info->model_id);
    return 0;
}

/* /tokenize off the loop (a multi-MB prompt takes seconds to tokenize). */
typedef struct tokenize_job {
    api_job_t job; /* first */
    int have_info;
    epd_engine_info_t info; /* copied on the loop */
    char *body;             /* the answer as JSON text and a newline ([body_len]), or NULL with v */
    size_t body_len;
    verr_t v;
} tokenize_job_t;

static void tokenize_run(api_job_t *job)
{
    tokenize_job_t *j = (tokenize_job_t *)job;
    const epd_api_t *a = job->a;
    const epd_engine_info_t *info = j->have_info ? &j->info : NULL;
    verr_t v = {0};
    int32_t *ids = NULL;
    int n = 0;
    cJSON *root = api_parse_body_v(job->req, &j->v);
    if (!root) return;
    const cJSON *prompt = NULL, *messages = NULL, *kwargs = NULL;
    /* split_special_tokens (transformers' name): -1 not given; chat defaults to 1, a prompt
     * (the client's whole text, as transformers) to 0 */
    int add_gen = 1, add_special = 1, disable_thinking = 0, split_special = -1;
    if (!cJSON_IsObject(root)) {
        api_bad(&v, 400, NULL, NULL, "the request body must be a JSON object, not %s",
                epd_json_type_name(root));
        goto fail;
    }
    for (const cJSON *f = root->child; f; f = f->next) {
        const char *k = f->string;
        if (!strcmp(k, "model")) {
            if (check_model(info, f, &v)) goto fail;
        } else if (!strcmp(k, "prompt")) {
            prompt = f;
        } else if (!strcmp(k, "messages")) {
            messages = f;
        } else if (!strcmp(k, "add_generation_prompt") || !strcmp(k, "add_special_tokens") ||
                   !strcmp(k, "split_special_tokens")) {
            if (!cJSON_IsBool(f)) {
                api_bad(&v, 400, k, NULL, "'%s' must be a boolean, not %s", k,
                        epd_json_type_name(f));
                goto fail;
            }
            *(!strcmp(k, "add_special_tokens")     ? &add_special
              : !strcmp(k, "split_special_tokens") ? &split_special
                                                   : &add_gen) = cJSON_IsTrue(f);
        } else if (!strcmp(k, "chat_template_kwargs")) {
            kwargs = f;
        } else {
            api_bad(&v, 400, k, "unknown_parameter",
                    "Unrecognized request argument supplied: %.100s", k);
            goto fail;
        }
    }
    if (!prompt == !messages) {
        api_bad(&v, 400, prompt ? "messages" : "prompt", NULL,
                "give exactly one of 'prompt' (a string) and 'messages' (a chat)");
        goto fail;
    }
    if (prompt) {
        if (api_text_ready(a, "prompt", &v)) goto fail;
        if (!cJSON_IsString(prompt)) {
            api_bad(&v, 400, "prompt", NULL, "'prompt' must be a string, not %s",
                    epd_json_type_name(prompt));
            goto fail;
        }
        /* add_special_tokens: the BOS of a tokenizer whose config asks for one (DeepSeek-V3;
         * Qwen3 adds none); a chat rendering carries the template's own */
        if (api_encode(a, prompt->valuestring, epd_json_strlen(prompt),
                       (split_special == 1 ? EPD_TOK_ENCODE_SPLIT_SPECIAL : 0) |
                           (add_special ? EPD_TOK_ENCODE_ADD_SPECIAL : 0),
                       "prompt", &ids, &n, &v))
            goto fail;
    } else {
        if (api_chat_ready(a, &v) || api_chat_kwargs(kwargs, &disable_thinking, &v) ||
            api_encode_chat(a, messages, add_gen, disable_thinking, split_special != 0, &ids, &n,
                            &v))
            goto fail;
    }
    cJSON *doc = cJSON_CreateObject();
    cJSON *t = doc ? cJSON_AddArrayToObject(doc, "tokens") : NULL;
    for (int i = 0; t && i < n; i++)
        cJSON_AddItemToArray(t, cJSON_CreateNumber(ids[i]));
    if (doc) {
        cJSON_AddNumberToObject(doc, "count", n);
        if (info)
            cJSON_AddNumberToObject(doc, "max_model_len", info->max_seq_len);
        else
            cJSON_AddNullToObject(doc, "max_model_len");
    }
    if (!t) {
        cJSON_Delete(doc);
        doc = NULL;
        api_bad(&v, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    /* printed here: ids of a multi-MB prompt take as long to print as to tokenize */
    char *text = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    size_t tl = text ? strlen(text) : 0;
    j->body = text ? malloc(tl + 1) : NULL;
    if (!j->body) {
        cJSON_free(text);
        api_bad(&v, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    memcpy(j->body, text, tl);
    j->body[tl] = '\n';
    j->body_len = tl + 1;
    cJSON_free(text);
    free(ids);
    cJSON_Delete(root);
    return;
fail:
    free(ids);
    cJSON_Delete(root);
    j->v = v;
}

static void tokenize_done(api_job_t *job, int cancelled)
{
    tokenize_job_t *j = (tokenize_job_t *)job;
    verr_t *v = &j->v;
    if (cancelled || job->gone)
        api_send_error(job->a, EP_TOKENIZE, job->res, 499, "the client closed the request", NULL,
                       NULL);
    else if (j->body) {
        epd_http_respond(job->res, 200, "application/json", j->body, j->body_len);
        api_count(job->a, EP_TOKENIZE, 200);
    } else {
        api_send_error(job->a, EP_TOKENIZE, job->res, v->status, v->msg,
                       v->param[0] ? v->param : NULL, v->code);
    }
    free(j->body);
    free(j);
}

static void h_tokenize(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_api_t *a = ctx;
    tokenize_job_t *j = calloc(1, sizeof(*j));
    if (!j) {
        api_send_error(a, EP_TOKENIZE, res, 500, "out of memory", NULL, NULL);
        return;
    }
    j->job =
        (api_job_t){.a = a, .req = req, .res = res, .run = tokenize_run, .done = tokenize_done};
    const epd_engine_info_t *info = a->engine ? epd_engine_info(a->engine) : NULL;
    if (info) {
        j->have_info = 1;
        j->info = *info;
    }
    api_job_start(&j->job);
}

static void h_detokenize(const epd_http_req_t *req, epd_http_res_t *res, void *ctx)
{
    epd_api_t *a = ctx;
    verr_t v = {0};
    int32_t *ids = NULL;
    char *text = NULL;
    cJSON *root = api_parse_body(a, EP_DETOKENIZE, req, res);
    if (!root) return;
    const cJSON *tokens = NULL;
    if (!cJSON_IsObject(root)) {
        api_bad(&v, 400, NULL, NULL, "the request body must be a JSON object, not %s",
                epd_json_type_name(root));
        goto fail;
    }
    for (const cJSON *f = root->child; f; f = f->next) {
        if (!strcmp(f->string, "model")) {
            if (check_model(a->engine ? epd_engine_info(a->engine) : NULL, f, &v)) goto fail;
        } else if (!strcmp(f->string, "tokens")) {
            tokens = f;
        } else {
            api_bad(&v, 400, f->string, "unknown_parameter",
                    "Unrecognized request argument supplied: %.100s", f->string);
            goto fail;
        }
    }
    if (api_text_ready(a, "tokens", &v)) goto fail;
    if (!cJSON_IsArray(tokens)) {
        api_bad(&v, 400, "tokens", NULL, "'tokens' must be a list of token ids, not %s",
                tokens ? epd_json_type_name(tokens) : "missing");
        goto fail;
    }
    int n = cJSON_GetArraySize(tokens), i = 0;
    size_t vocab = epd_tok_vocab_size(a->tok);
    ids = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (!ids) {
        api_bad(&v, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    for (const cJSON *t = tokens->child; t; t = t->next, i++) {
        if (!api_is_int(t) || t->valuedouble < 0 || t->valuedouble >= (double)vocab) {
            api_bad(&v, 400, "tokens", NULL,
                    "tokens[%d] must be a token id in the tokenizer's vocabulary (0..%zu)", i,
                    vocab - 1);
            goto fail;
        }
        ids[i] = (int32_t)t->valuedouble;
    }
    size_t len = 0;
    epd_err_t err = {0};
    int st = epd_tok_decode(a->tok, ids, (size_t)n, 0, &text, &len, &err);
    if (st != 0) {
        api_bad(&v, st == -ENOMEM ? 500 : 400, "tokens", NULL, "cannot decode: %s",
                err.msg[0] ? err.msg : epd_status_str(st));
        goto fail;
    }
    cJSON *doc = cJSON_CreateObject();
    if (doc && !cJSON_AddItemToObject(doc, "prompt", epd_json_string_n(text, len))) {
        cJSON_Delete(doc); /* the response is then "out of memory" */
        doc = NULL;
    }
    api_send_json(res, 200, doc);
    api_count(a, EP_DETOKENIZE, 200);
    cJSON_Delete(doc);
    free(text);
    free(ids);
    cJSON_Delete(root);
    return;
fail:
    free(text);
    free(ids);
    cJSON_Delete(root);
    api_send_error(a, EP_DETOKENIZE, res, v.status, v.msg, v.param[0] ? v.param : NULL, v.code);
}

int api_text_routes(epd_http_server_t *http, epd_api_t *a)
{
    int rc;
    if ((rc = epd_http_route(http, "POST", EP_TOKENIZE, h_tokenize, a)) ||
        (rc = epd_http_route(http, "POST", EP_DETOKENIZE, h_detokenize, a)))
        return rc;
    return 0;
}
