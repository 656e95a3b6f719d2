/* Shared between the inference API's files (api_openai.c: completions, chat, models;
 * api_validate.c: validating completion and chat requests; api_text.c: the tokenizer, chat
 * messages, /tokenize, /detokenize). Not a public header. */
#ifndef EPD_API_INTERNAL_H
#define EPD_API_INTERNAL_H

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stddef.h>

#include "api_openai.h"
#include "epd_tok.h"
#include "state.h"

typedef enum tok_state {
    TOK_ABSENT = 0, /* no tokenizer.json in the checkpoint (or no model.path) */
    TOK_LOADED,
    TOK_FAILED, /* tok_err says why */
} tok_state_t;

struct completion;

struct epd_api {
    epd_engine_t *engine;
    epd_metrics_t *metrics;
    epd_state_t *state; /* drained or stopping: new work is refused; NULL: never */
    /* epd_request_duration_seconds{endpoint}: completions and chat apart */
    epd_metric_t *m_dur_cmpl, *m_dur_chat;
    struct completion *inflight; /* requests whose response is not finished (epd_api_fail_all) */
    uint64_t seq;                /* for ids and default seeds */
    /* the checkpoint's tokenizer (api_text.c) */
    tok_state_t tok_state;
    epd_tok_t *tok;
    char tok_dir[512];
    char tok_err[1024];
    double tok_load_s;
    int chat_ok;        /* the tokenizer has a template we render */
    char chat_err[800]; /* why chat is refused when !chat_ok */
    uv_loop_t *loop;    /* the HTTP server's: request parsing and tokenizing run in its pool */
};

typedef struct verr {
    int status;
    char msg[1100];
    char param[64];
    const char *code;
} verr_t;

/* ---- api_validate.c ---- */

/* Prompts one request may carry (one choice each). */
#define MAX_PROMPTS 64
/* OpenAI's limit on stop sequences. */
#define MAX_STOP 4

typedef struct creq {
    int chat;
    int nprompts;
    int32_t *ids[MAX_PROMPTS];
    int len[MAX_PROMPTS];
    int max_tokens; /* -1: not given */
    double temperature, top_p;
    int top_k;
    int have_seed;
    uint64_t seed;
    int stream, include_usage;
    int nstop;
    char *stop[MAX_STOP]; /* [stop_len] bytes, which may hold NUL, + a NUL */
    size_t stop_len[MAX_STOP];
} creq_t;

/* Validates a completions (chat = 0) or chat request body into q (api_creq_free it, also
 * after an error); else v says why. */
int api_parse_request(const epd_api_t *a, const cJSON *root, const epd_engine_info_t *info,
                      int chat, creq_t *q, verr_t *v);
void api_creq_free(creq_t *q);
/* Fills v and returns -1. */
int api_bad(verr_t *v, int status, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
int api_is_int(const cJSON *v);

/* ---- api_openai.c ---- */

void api_send_json(epd_http_res_t *res, int status, cJSON *doc);
void api_send_error(epd_api_t *a, const char *endpoint, epd_http_res_t *res, int status,
                    const char *msg, const char *param, const char *code);
/* The body as one JSON value with nothing after it; NULL after answering 400. */
cJSON *api_parse_body(epd_api_t *a, const char *endpoint, const epd_http_req_t *req,
                      epd_http_res_t *res);
/* The same without answering: NULL with v's 400 (any thread). */
cJSON *api_parse_body_v(const epd_http_req_t *req, verr_t *v);

/* Work of a request off the loop thread (parsing a body, tokenizing: a multi-MB prompt takes
 * seconds): `run` in libuv's thread pool, touching nothing of the loop's (the tokenizer is
 * shared read-only, the engine info is copied), then `done` on the loop, which finishes res and
 * frees the job. req and res stay valid meanwhile (a response not finished keeps them). When
 * the client leaves, a job not yet started is cancelled (done's `cancelled`) and `gone` is set
 * either way; done then finishes res without doing the work's consequences. Embed the struct
 * first in the job's own. */
typedef struct api_job api_job_t;
struct api_job {
    uv_work_t work;
    epd_api_t *a;
    const epd_http_req_t *req;
    epd_http_res_t *res;
    int gone, queued;
    void (*run)(api_job_t *j);
    void (*done)(api_job_t *j, int cancelled);
};
/* Queues j; without a loop (in-memory tests) runs both parts at once. */
void api_job_start(api_job_t *j);
void api_count(epd_api_t *a, const char *endpoint, int status);

/* ---- api_text.c ---- */

/* Ready for text (prompt strings, stop strings, text output); else v says why (400). */
int api_text_ready(const epd_api_t *a, const char *param, verr_t *v);
/* Ready for chat (a loaded tokenizer with a template we render). */
int api_chat_ready(const epd_api_t *a, verr_t *v);

/* Renders `messages` (OpenAI's chat shapes) with the checkpoint's template and encodes the
 * rendering into a malloc'd id array. split_special: special tokens spelled inside the messages
 * are encoded as plain text (the template's own markers stay control tokens), the request field
 * split_special_tokens, true unless the client turns it off. */
int api_encode_chat(const epd_api_t *a, const cJSON *messages, int add_generation_prompt,
                    int disable_thinking, int split_special, int32_t **ids, int *n, verr_t *v);
/* Parses chat_template_kwargs (only enable_thinking is known). */
int api_chat_kwargs(const cJSON *f, int *disable_thinking, verr_t *v);
/* Encodes text into a malloc'd id array; path names the field in errors; flags as
 * epd_tok_encode's. */
int api_encode(const epd_api_t *a, const char *text, size_t len, unsigned flags, const char *path,
               int32_t **ids, int *n, verr_t *v);

int api_text_routes(epd_http_server_t *http, epd_api_t *a);

#endif /* EPD_API_INTERNAL_H */
