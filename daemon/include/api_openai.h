/* The OpenAI-style inference API of epd: POST /v1/completions (text or token-id prompts),
 * POST /v1/chat/completions, JSON or server-sent events, GET /v1/models, and vLLM's
 * POST /tokenize and /detokenize, on top of the engine and the checkpoint's tokenizer. Runs on
 * the loop thread. */
#ifndef EPD_API_OPENAI_H
#define EPD_API_OPENAI_H

#include "engine.h"
#include "http.h"
#include "metrics.h"
#include "state.h"

typedef struct epd_api epd_api_t;

/* Registers the routes. engine may be NULL (no model.path): completions then answer 503 and
 * /v1/models lists nothing. Returns 0 or a negative errno value. */
int epd_api_create(epd_http_server_t *http, epd_engine_t *engine, epd_metrics_t *metrics,
                   epd_api_t **out);
/* Loads <model_dir>/tokenizer.json (with tokenizer_config.json and generation_config.json) if
 * the file exists. Never fails the daemon: a missing or broken tokenizer is logged and kept as
 * the reason that text requests are refused (token-id requests are still served). */
void epd_api_load_tokenizer(epd_api_t *a, const char *model_dir);
/* The tokenizer's state for /v1/status: {"state": "loaded"|"absent"|"failed", ...}. */
struct cJSON *epd_api_tokenizer_cjson(const epd_api_t *a);
/* Completions and chat refuse new work with 503 while the state is drained ("draining") or
 * stopping ("stopping"); requests already taken finish. */
/* Request parsing and tokenizing then run in loop's thread pool (uv_queue_work), so that a
 * multi-MB prompt does not hold up the loop (/healthz, other clients). Without (tests that feed
 * in-memory connections), on the loop. */
void epd_api_set_loop(epd_api_t *a, uv_loop_t *loop);
void epd_api_set_state(epd_api_t *a, epd_state_t *state);
/* Answers every request still in flight now, before the server closes its connections:
 * 503 with an OpenAI error naming `why` (code "shutdown"), or on a stream that already began
 * an error event and `data: [DONE]`. Their engine requests are cancelled. */
void epd_api_fail_all(epd_api_t *a, const char *why);
/* Forgets the engine (before it is destroyed): later requests get 503. */
void epd_api_detach_engine(epd_api_t *a);
/* After the engine is destroyed (every request has ended) and the server stopped. */
void epd_api_destroy(epd_api_t *a);

#endif /* EPD_API_OPENAI_H */
