/* The readiness registry: components (cluster, engine, data plane) register once and report
 * ok / not ok with a reason; the node is ready when every component is ok and it is running.
 * Thread-safe: components report from their own threads, the loop reads. */
#ifndef EPD_STATE_H
#define EPD_STATE_H

struct cJSON;

typedef struct epd_state epd_state_t;

typedef enum epd_phase {
    EPD_PHASE_STARTING, /* not yet listening */
    EPD_PHASE_RUNNING,  /* serving; "ready", "starting" (components) or "draining" (drained) */
    EPD_PHASE_DRAINING, /* stop requested: finishing in-flight requests */
    EPD_PHASE_STOPPING, /* tearing down */
} epd_phase_t;

#define EPD_STATE_MAX_COMPONENTS 32
#define EPD_STATE_REASON_MAX 256

epd_state_t *epd_state_create(void);
void epd_state_destroy(epd_state_t *s);
/* Returns the component's id (>= 0), or -EEXIST / -ENOSPC / -EINVAL. A new component is
 * not ok with reason "starting". */
int epd_state_register(epd_state_t *s, const char *name);
void epd_state_set(epd_state_t *s, int id, int ok, const char *reason_fmt, ...)
    __attribute__((format(printf, 4, 5)));
void epd_state_set_phase(epd_state_t *s, epd_phase_t phase);
epd_phase_t epd_state_phase(epd_state_t *s);
/* An operator's drain (POST /v1/admin/drain; undone by /v1/admin/undrain): the node stays
 * up, finishes its in-flight requests and takes no new work; not ready, state "draining",
 * reason DRAIN_REASON. Independent of the stop phases. */
#define EPD_STATE_DRAIN_REASON                                                                     \
    "node: draining (POST /v1/admin/drain; POST /v1/admin/undrain or `epctl undrain` resumes)"
void epd_state_set_drained(epd_state_t *s, int drained);
int epd_state_drained(epd_state_t *s);
/* 1 when running, not drained and every component is ok. */
int epd_state_ready(epd_state_t *s);
/* "starting" | "ready" | "draining" | "stopping" */
const char *epd_state_name(epd_state_t *s);
/* {"ready":bool,"state":"...","reasons":["component: reason",...],
 *  "components":[{"name":..,"ok":..,"reason":..}]}; NULL if out of memory. */
struct cJSON *epd_state_to_cjson(epd_state_t *s);

#endif /* EPD_STATE_H */
