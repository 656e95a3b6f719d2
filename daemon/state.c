/* The readiness registry and the node's lifecycle phase (see state.h). */
#include "state.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct component {
    char name[32];
    int ok;
    char reason[EPD_STATE_REASON_MAX];
} component_t;

struct epd_state {
    pthread_mutex_t lock;
    epd_phase_t phase;
    int drained; /* operator's drain, see state.h */
    component_t comps[EPD_STATE_MAX_COMPONENTS];
    int ncomps;
};

epd_state_t *epd_state_create(void)
{
    epd_state_t *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->phase = EPD_PHASE_STARTING;
    return s;
}

void epd_state_destroy(epd_state_t *s)
{
    if (!s) return;
    pthread_mutex_destroy(&s->lock);
    free(s);
}

int epd_state_register(epd_state_t *s, const char *name)
{
    if (!name || !*name || strlen(name) >= sizeof(s->comps[0].name)) return -EINVAL;
    int id;
    pthread_mutex_lock(&s->lock);
    for (id = 0; id < s->ncomps; id++)
        if (strcmp(s->comps[id].name, name) == 0) {
            id = -EEXIST;
            goto out;
        }
    if (s->ncomps == EPD_STATE_MAX_COMPONENTS) {
        id = -ENOSPC;
        goto out;
    }
    id = s->ncomps++;
    snprintf(s->comps[id].name, sizeof(s->comps[id].name), "%s", name);
    s->comps[id].ok = 0;
    snprintf(s->comps[id].reason, sizeof(s->comps[id].reason), "starting");
out:
    pthread_mutex_unlock(&s->lock);
    return id;
}

void epd_state_set(epd_state_t *s, int id, int ok, const char *reason_fmt, ...)
{
    char reason[EPD_STATE_REASON_MAX] = "";
    if (reason_fmt) {
        va_list ap;
        va_start(ap, reason_fmt);
        vsnprintf(reason, sizeof(reason), reason_fmt, ap);
        va_end(ap);
    }
    pthread_mutex_lock(&s->lock);
    if (id >= 0 && id < s->ncomps) {
        s->comps[id].ok = ok ? 1 : 0;
        memcpy(s->comps[id].reason, reason, sizeof(reason));
    }
    pthread_mutex_unlock(&s->lock);
}

void epd_state_set_phase(epd_state_t *s, epd_phase_t phase)
{
    pthread_mutex_lock(&s->lock);
    s->phase = phase;
    pthread_mutex_unlock(&s->lock);
}

epd_phase_t epd_state_phase(epd_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    epd_phase_t p = s->phase;
    pthread_mutex_unlock(&s->lock);
    return p;
}

void epd_state_set_drained(epd_state_t *s, int drained)
{
    pthread_mutex_lock(&s->lock);
    s->drained = drained ? 1 : 0;
    pthread_mutex_unlock(&s->lock);
}

int epd_state_drained(epd_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    int d = s->drained;
    pthread_mutex_unlock(&s->lock);
    return d;
}

static int ready_locked(const epd_state_t *s)
{
    if (s->phase != EPD_PHASE_RUNNING || s->drained) return 0;
    for (int i = 0; i < s->ncomps; i++)
        if (!s->comps[i].ok) return 0;
    return 1;
}

int epd_state_ready(epd_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    int r = ready_locked(s);
    pthread_mutex_unlock(&s->lock);
    return r;
}

static const char *name_locked(const epd_state_t *s)
{
    switch (s->phase) {
    case EPD_PHASE_STARTING:
        return "starting";
    case EPD_PHASE_RUNNING:
        if (s->drained) return "draining";
        return ready_locked(s) ? "ready" : "starting";
    case EPD_PHASE_DRAINING:
        return "draining";
    case EPD_PHASE_STOPPING:
        return "stopping";
    }
    return "unknown";
}

const char *epd_state_name(epd_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    const char *n = name_locked(s);
    pthread_mutex_unlock(&s->lock);
    return n;
}

cJSON *epd_state_to_cjson(epd_state_t *s)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    pthread_mutex_lock(&s->lock);
    int ready = ready_locked(s);
    cJSON_AddBoolToObject(o, "ready", ready);
    cJSON_AddStringToObject(o, "state", name_locked(s));
    cJSON *reasons = cJSON_AddArrayToObject(o, "reasons");
    cJSON *comps = cJSON_AddArrayToObject(o, "components");
    if (s->phase == EPD_PHASE_STARTING && reasons)
        cJSON_AddItemToArray(reasons, cJSON_CreateString("node: starting"));
    if ((s->phase == EPD_PHASE_DRAINING || s->phase == EPD_PHASE_STOPPING) && reasons)
        cJSON_AddItemToArray(reasons, cJSON_CreateString("node: shutting down"));
    if (s->phase == EPD_PHASE_RUNNING && s->drained && reasons)
        cJSON_AddItemToArray(reasons, cJSON_CreateString(EPD_STATE_DRAIN_REASON));
    for (int i = 0; i < s->ncomps; i++) {
        const component_t *c = &s->comps[i];
        if (!c->ok && reasons) {
            char line[sizeof(c->name) + EPD_STATE_REASON_MAX + 4];
            snprintf(line, sizeof(line), "%s: %s", c->name, c->reason);
            cJSON_AddItemToArray(reasons, cJSON_CreateString(line));
        }
        cJSON *co = cJSON_CreateObject();
        if (co) {
            cJSON_AddStringToObject(co, "name", c->name);
            cJSON_AddBoolToObject(co, "ok", c->ok);
            cJSON_AddStringToObject(co, "reason", c->reason);
            cJSON_AddItemToArray(comps, co);
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (!reasons || !comps) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}
