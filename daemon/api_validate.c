/* Validation of POST /v1/completions and POST /v1/chat/completions bodies (api_openai.c
 * serves them): every field OpenAI defines is checked, with errors in OpenAI's shape naming the
 * parameter and the index; prompts (token ids, or text through the tokenizer) and chat messages
 * (rendered with the checkpoint's template) become the token ids of a creq_t. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"
#include "epd_json.h"
#include "sample.h"

/* A bound on the length of one stop sequence. */
#define MAX_STOP_BYTES 512

/* ---- validation --------------------------------------------------------------------------- */

int api_bad(verr_t *v, int status, const char *param, const char *code, const char *fmt, ...)
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
#define bad api_bad

void api_creq_free(creq_t *q)
{
    for (int i = 0; i < q->nprompts; i++)
        free(q->ids[i]);
    for (int i = 0; i < q->nstop; i++)
        free(q->stop[i]);
}

int api_is_int(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

#define is_int api_is_int

/* One prompt: a non-empty list of token ids in the vocabulary. */
static int parse_ids(const cJSON *arr, const char *path, int vocab, int32_t **out, int *len,
                     verr_t *v)
{
    int n = cJSON_GetArraySize(arr), i = 0;
    if (n == 0) return bad(v, 400, "prompt", NULL, "%s is empty: give at least one token id", path);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    if (!ids) return bad(v, 500, NULL, NULL, "out of memory");
    for (const cJSON *t = arr->child; t; t = t->next, i++) {
        if (cJSON_IsNumber(t) && !isfinite(t->valuedouble)) {
            free(ids);
            return bad(v, 400, "prompt", NULL,
                       "%s[%d]: token id %g is outside the vocabulary (0..%d)", path, i,
                       t->valuedouble, vocab - 1);
        }
        if (!is_int(t)) {
            free(ids);
            return bad(v, 400, "prompt", NULL,
                       "%s[%d] must be an integer token id like %s[0], not %s", path, i, path,
                       cJSON_IsNumber(t) ? "a fraction" : epd_json_type_name(t));
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

static int add_text_prompt(const epd_api_t *a, const cJSON *s, const char *path, creq_t *q,
                           verr_t *v)
{
    if (api_text_ready(a, "prompt", v)) return -1;
    if (q->nprompts == MAX_PROMPTS)
        return bad(v, 400, "prompt", NULL, "at most %d prompts per request", MAX_PROMPTS);
    int32_t *ids = NULL;
    int n = 0;
    /* as transformers' add_special_tokens=True: a BOS where tokenizer_config.json asks for one */
    if (api_encode(a, s->valuestring, epd_json_strlen(s), EPD_TOK_ENCODE_ADD_SPECIAL, path, &ids,
                   &n, v))
        return -1;
    if (n == 0) {
        free(ids);
        return bad(v, 400, "prompt", NULL, "%s is empty (no tokens): give some text", path);
    }
    q->ids[q->nprompts] = ids;
    q->len[q->nprompts++] = n;
    return 0;
}

/* A string, a list of strings, a list of token ids, or a list of lists of token ids. */
static int parse_prompt(const epd_api_t *a, const cJSON *p, int vocab, creq_t *q, verr_t *v)
{
    if (!p || cJSON_IsNull(p))
        return bad(v, 400, "prompt", NULL,
                   "'prompt' is required: a string, a list of strings, a list of token ids or "
                   "a list of such lists");
    if (cJSON_IsString(p)) return add_text_prompt(a, p, "prompt", q, v);
    if (!cJSON_IsArray(p))
        return bad(v, 400, "prompt", NULL,
                   "'prompt' must be a string, a list of strings, a list of token ids or a list "
                   "of such lists, not %s",
                   epd_json_type_name(p));
    if (!p->child) return bad(v, 400, "prompt", NULL, "'prompt' is an empty list");
    if (cJSON_IsArray(p->child) || cJSON_IsString(p->child)) {
        int strings = cJSON_IsString(p->child), i = 0;
        for (const cJSON *e = p->child; e; e = e->next, i++) {
            char path[32];
            snprintf(path, sizeof(path), "prompt[%d]", i);
            if (strings ? !cJSON_IsString(e) : !cJSON_IsArray(e))
                return bad(v, 400, "prompt", NULL, "%s must be %s like prompt[0], not %s", path,
                           strings ? "a string" : "a list of token ids", epd_json_type_name(e));
            if (strings) {
                if (add_text_prompt(a, e, path, q, v)) return -1;
                continue;
            }
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

static int parse_stop(const epd_api_t *a, const cJSON *f, creq_t *q, verr_t *v)
{
    if (cJSON_IsNull(f)) return 0;
    if (!cJSON_IsString(f) && !cJSON_IsArray(f))
        return bad(v, 400, "stop", NULL, "'stop' must be a string or a list of strings, not %s",
                   epd_json_type_name(f));
    if (cJSON_IsString(f) && !epd_json_strlen(f)) return 0;
    if (cJSON_IsArray(f) && !f->child) return 0;
    if (api_text_ready(a, "stop", v)) {
        char why[sizeof(v->msg)];
        snprintf(why, sizeof(why), "%s", a->tok_err);
        return bad(v, 400, "stop", "tokenizer_unavailable",
                   "'stop' sequences are text, so they need the tokenizer, and %.1000s", why);
    }
    const cJSON *one = cJSON_IsString(f) ? f : f->child;
    int i = 0;
    for (const cJSON *s = one; s; s = cJSON_IsString(f) ? NULL : s->next, i++) {
        if (!cJSON_IsString(s))
            return bad(v, 400, "stop", NULL, "stop[%d] must be a string, not %s", i,
                       epd_json_type_name(s));
        size_t l = epd_json_strlen(s); /* text may hold U+0000 */
        if (l == 0) return bad(v, 400, "stop", NULL, "stop[%d] is empty", i);
        if (l > MAX_STOP_BYTES)
            return bad(v, 400, "stop", NULL, "stop[%d] is longer than %d bytes", i, MAX_STOP_BYTES);
        if (q->nstop == MAX_STOP)
            return bad(v, 400, "stop", NULL, "at most %d stop sequences", MAX_STOP);
        if (!(q->stop[q->nstop] = malloc(l + 1))) return bad(v, 500, NULL, NULL, "out of memory");
        memcpy(q->stop[q->nstop], s->valuestring, l + 1);
        q->stop_len[q->nstop++] = l;
    }
    return 0;
}

static int get_number(const cJSON *f, const char *name, double lo, double hi, int lo_open,
                      double *out, verr_t *v)
{
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsNumber(f))
        return bad(v, 400, name, NULL, "'%s' must be a number, not %s", name,
                   epd_json_type_name(f));
    double x = f->valuedouble; /* a literal beyond a double (1e400) parses as +-inf */
    if (!isfinite(x) || (lo_open ? x <= lo : x < lo) || x > hi)
        return bad(v, 400, name, NULL, "'%s' is %g; it must be in %s%g, %g]", name, x,
                   lo_open ? "(" : "[", lo, hi);
    *out = x;
    return 0;
}

static int get_bool(const cJSON *f, const char *name, int *out, verr_t *v)
{
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsBool(f))
        return bad(v, 400, name, NULL, "'%s' must be a boolean, not %s", name,
                   epd_json_type_name(f));
    *out = cJSON_IsTrue(f);
    return 0;
}

/* Fields OpenAI defines that we do not implement: accepted at their neutral value only. */
static int unsupported(const cJSON *f, verr_t *v)
{
    const char *k = f->string;
    int neutral = cJSON_IsNull(f);
    if (!strcmp(k, "echo") || !strcmp(k, "logprobs") || !strcmp(k, "parallel_tool_calls"))
        neutral |= cJSON_IsFalse(f) || (is_int(f) && f->valuedouble == 0);
    else if (!strcmp(k, "best_of"))
        neutral |= is_int(f) && f->valuedouble == 1;
    else if (!strcmp(k, "top_logprobs"))
        neutral |= is_int(f) && f->valuedouble == 0;
    else if (!strcmp(k, "frequency_penalty") || !strcmp(k, "presence_penalty"))
        neutral |= cJSON_IsNumber(f) && f->valuedouble == 0;
    else if (!strcmp(k, "logit_bias"))
        neutral |= cJSON_IsObject(f) && !f->child;
    else if (!strcmp(k, "suffix"))
        neutral |= cJSON_IsString(f) && !f->valuestring[0];
    else if (!strcmp(k, "tools"))
        neutral |= cJSON_IsArray(f) && !f->child;
    else if (!strcmp(k, "tool_choice"))
        neutral |= cJSON_IsString(f) && !strcmp(f->valuestring, "none");
    if (neutral) return 0;
    return bad(v, 400, k, NULL, "'%s' is not supported by this server (leave it out)", k);
}

/* The sampler's own rules (epd_sample_check) on the values it will get, 32-bit floats: a value
 * in range as a double may not be as a float (top_p 1e-46 rounds to 0). */
static int check_sampling(const creq_t *q, verr_t *v)
{
    epd_sample_params_t sp = {
        .temperature = (float)q->temperature, .top_p = (float)q->top_p, .top_k = q->top_k};
    if (q->top_p > 0 && !(sp.top_p > 0))
        return bad(v, 400, "top_p", NULL,
                   "'top_p' is %g, which is 0 as the 32-bit float the sampler uses; it must be "
                   "in (0, 1] and at least 1e-45",
                   q->top_p);
    epd_err_t se;
    if (epd_sample_check(&sp, &se) == 0) return 0;
    /* the sampler's message starts with the parameter's name */
    static const char *const names[] = {"temperature", "top_p", "top_k"};
    const char *param = NULL;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strncmp(se.msg, names[i], strlen(names[i])) && se.msg[strlen(names[i])] == ':')
            param = names[i];
    return bad(v, 400, param, NULL, "'%s' is refused by the sampler: %.900s",
               param ? param : "sampling", se.msg);
}

int api_parse_request(const epd_api_t *a, const cJSON *root, const epd_engine_info_t *info,
                      int chat, creq_t *q, verr_t *v)
{
    memset(q, 0, sizeof(*q));
    q->chat = chat;
    q->max_tokens = -1;
    q->temperature = 1.0; /* OpenAI's defaults */
    q->top_p = 1.0;
    if (!cJSON_IsObject(root))
        return bad(v, 400, NULL, NULL, "the request body must be a JSON object, not %s",
                   epd_json_type_name(root));
    static const char *const unsup[] = {"echo",        "logprobs",           "best_of",
                                        "logit_bias",  "frequency_penalty",  "presence_penalty",
                                        "suffix",      "top_logprobs",       "tools",
                                        "tool_choice", "parallel_tool_calls"};
    const cJSON *stream_options = NULL, *messages = NULL, *kwargs = NULL;
    int add_gen = 1, disable_thinking = 0, split_special = 1;
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
                return bad(v, 400, "model", NULL, "'model' must be a string, not %s",
                           epd_json_type_name(f));
            if (strcmp(f->valuestring, info->model_id) != 0 ||
                epd_json_strlen(f) != strlen(f->valuestring))
                return bad(v, 404, "model", "model_not_found",
                           "The model '%.200s' does not exist; this server serves '%s'",
                           f->valuestring, info->model_id);
        } else if (!chat && !strcmp(k, "prompt")) {
            if (q->nprompts) /* api_parse_body refuses repeated keys; never half apply one */
                return bad(v, 400, "prompt", NULL, "'prompt' is given more than once");
            if (parse_prompt(a, f, info->vocab_size, q, v)) return -1;
        } else if (chat && !strcmp(k, "messages")) {
            messages = f;
        } else if (chat && !strcmp(k, "chat_template_kwargs")) {
            kwargs = f;
        } else if (chat && !strcmp(k, "add_generation_prompt")) { /* vLLM's extension */
            if (get_bool(f, k, &add_gen, v)) return -1;
        } else if (chat && !strcmp(k, "split_special_tokens")) { /* transformers' name */
            if (get_bool(f, k, &split_special, v)) return -1;
        } else if (!strcmp(k, "max_tokens") || (chat && !strcmp(k, "max_completion_tokens"))) {
            if (cJSON_IsNull(f)) continue;
            if (!cJSON_IsNumber(f))
                return bad(v, 400, k, NULL, "'%s' must be an integer, not %s", k,
                           epd_json_type_name(f));
            if (!isfinite(f->valuedouble)) /* a literal beyond a double (1e400) */
                return bad(v, 400, k, NULL,
                           "'%s' is out of range (beyond a double): it must be an integer in "
                           "[1, %d] (the model's context length)",
                           k, info->max_seq_len);
            if (f->valuedouble < 1 || f->valuedouble > info->max_seq_len)
                return bad(v, 400, k, NULL,
                           "'%s' is %g, out of range: it must be an integer in [1, %d] (the "
                           "model's context length)",
                           k, f->valuedouble, info->max_seq_len);
            if (!is_int(f))
                return bad(v, 400, k, NULL, "'%s' must be an integer, not a fraction (%g)", k,
                           f->valuedouble);
            q->max_tokens = (int)f->valuedouble;
        } else if (!strcmp(k, "stop")) {
            if (parse_stop(a, f, q, v)) return -1;
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
                           cJSON_IsNumber(f) ? "that number" : epd_json_type_name(f));
            q->have_seed = 1;
            q->seed = (uint64_t)(int64_t)f->valuedouble;
        } else if (!strcmp(k, "stream")) {
            if (get_bool(f, "stream", &q->stream, v)) return -1;
        } else if (!strcmp(k, "stream_options")) {
            if (cJSON_IsNull(f)) continue;
            if (!cJSON_IsObject(f))
                return bad(v, 400, "stream_options", NULL,
                           "'stream_options' must be an object, not %s", epd_json_type_name(f));
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
                           chat ? "'n' > 1 is not supported"
                                : "'n' > 1 is not supported: send a list of prompts (one choice "
                                  "each) instead");
        } else if (!strcmp(k, "user")) {
            if (!cJSON_IsString(f) && !cJSON_IsNull(f))
                return bad(v, 400, "user", NULL, "'user' must be a string, not %s",
                           epd_json_type_name(f));
        } else {
            return bad(v, 400, k, "unknown_parameter",
                       "Unrecognized request argument supplied: %.100s", k);
        }
    }
    if (check_sampling(q, v)) return -1;
    if (chat) {
        if (api_chat_ready(a, v) || api_chat_kwargs(kwargs, &disable_thinking, v) ||
            api_encode_chat(a, messages, add_gen, disable_thinking, split_special, &q->ids[0],
                            &q->len[0], v))
            return -1;
        q->nprompts = 1;
        if (q->len[0] == 0) return bad(v, 400, "messages", NULL, "the rendered chat has no tokens");
        for (int i = 0; i < q->len[0]; i++)
            if (q->ids[0][i] >= info->vocab_size)
                return bad(v, 400, "messages", NULL,
                           "the rendered chat has token id %d, outside the model's vocabulary "
                           "(0..%d)",
                           q->ids[0][i], info->vocab_size - 1);
    }
    if (q->nprompts == 0) return parse_prompt(a, NULL, info->vocab_size, q, v);
    if (stream_options && !q->stream)
        return bad(v, 400, "stream_options", NULL,
                   "'stream_options' is only allowed when 'stream' is true");
    /* ids of text prompts come from the tokenizer, whose id space may exceed the model's */
    for (int i = 0; i < q->nprompts; i++)
        for (int j = 0; j < q->len[i]; j++)
            if (q->ids[i][j] >= info->vocab_size)
                return bad(v, 400, "prompt", NULL,
                           "prompt %d tokenizes to id %d, outside the model's vocabulary (0..%d)",
                           i, q->ids[i][j], info->vocab_size - 1);
    /* the context: prompt + completion within max_seq_len */
    for (int i = 0; i < q->nprompts; i++) {
        int room = info->max_seq_len - q->len[i];
        const char *which = chat ? "messages" : q->nprompts > 1 ? "prompt[" : "prompt";
        char idx[16] = "";
        if (!chat && q->nprompts > 1) snprintf(idx, sizeof(idx), "%d]", i);
        if (room < 1)
            return bad(v, 400, chat ? "messages" : "prompt", "context_length_exceeded",
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
