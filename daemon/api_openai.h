/* The OpenAI-style inference API of epd: POST /v1/completions (token-id prompts, JSON or
 * server-sent events) and GET /v1/models, on top of the engine. Runs on the loop thread. */
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
/* Forgets the engine (before it is destroyed): later requests get 503. */
void epd_api_detach_engine(epd_api_t *a);
/* After the engine is destroyed (every request has ended) and the server stopped. */
void epd_api_destroy(epd_api_t *a);

#endif /* EPD_API_OPENAI_H */
