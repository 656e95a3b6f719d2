/* The OpenAI-style inference API of epd: POST /v1/completions (text or token-id prompts),
 * POST /v1/chat/completions, JSON or server-sent events, GET /v1/models, and vLLM's
 * POST /tokenize and /detokenize, on top of the engine and the checkpoint's tokenizer. Runs on
 * the loop thread. */
#ifndef EPD_API_OPENAI_H
#define EPD_API_OPENAI_H

#include "engine.h"
#include "http.h"
#include "metrics.h"

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
/* Forgets the engine (before it is destroyed): later requests get 503. */
void epd_api_detach_engine(epd_api_t *a);
/* After the engine is destroyed (every request has ended) and the server stopped. */
void epd_api_destroy(epd_api_t *a);

#endif /* EPD_API_OPENAI_H */
