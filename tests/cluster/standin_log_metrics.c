/* Stand-ins for daemon/log.c and daemon/metrics.c, used only by the cluster tests while the
 * daemon's own implementations are not in the build: log lines go to stderr, metrics are kept
 * in a list so tests can read counters back. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"

static epd_log_level_t g_level = EPD_LOG_INFO;

void epd_log_init(const char *progname)
{
    const char *e = getenv("EPD_TEST_LOG");
    if (e && *e == 'd') g_level = EPD_LOG_DEBUG;
}

void epd_log_set_level(epd_log_level_t level)
{
    g_level = level;
}

epd_log_level_t epd_log_get_level(void)
{
    return g_level;
}

void epd_log(epd_log_level_t level, const char *subsys, const char *fmt, ...)
{
    if (level > g_level) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[%d] %s: ", (int)level, subsys);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

struct epd_metric {
    struct epd_metric *next;
    char name[128];
    char labels[256];
    double value;
    double sum;
    long count;
};

struct epd_metrics {
    pthread_mutex_t mu;
    struct epd_metric *head;
};

epd_metrics_t *epd_metrics_create(void)
{
    epd_metrics_t *m = calloc(1, sizeof *m);
    if (m) pthread_mutex_init(&m->mu, NULL);
    return m;
}

void epd_metrics_destroy(epd_metrics_t *m)
{
    if (!m) return;
    while (m->head) {
        struct epd_metric *n = m->head->next;
        free(m->head);
        m->head = n;
    }
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static epd_metric_t *get(epd_metrics_t *m, const char *name, const char *labels)
{
    pthread_mutex_lock(&m->mu);
    epd_metric_t *s;
    for (s = m->head; s; s = s->next)
        if (!strcmp(s->name, name) && !strcmp(s->labels, labels ? labels : "")) break;
    if (!s && (s = calloc(1, sizeof *s))) {
        snprintf(s->name, sizeof s->name, "%s", name);
        snprintf(s->labels, sizeof s->labels, "%s", labels ? labels : "");
        s->next = m->head;
        m->head = s;
    }
    pthread_mutex_unlock(&m->mu);
    return s;
}

epd_metric_t *epd_metrics_counter(epd_metrics_t *m, const char *name, const char *help,
                                  const char *labels)
{
    return get(m, name, labels);
}

epd_metric_t *epd_metrics_gauge(epd_metrics_t *m, const char *name, const char *help,
                                const char *labels)
{
    return get(m, name, labels);
}

epd_metric_t *epd_metrics_histogram(epd_metrics_t *m, const char *name, const char *help,
                                    const char *labels, const double *bounds, int nbounds)
{
    return get(m, name, labels);
}

static pthread_mutex_t g_upd = PTHREAD_MUTEX_INITIALIZER;

void epd_metric_add(epd_metric_t *c, double v)
{
    pthread_mutex_lock(&g_upd);
    c->value += v;
    pthread_mutex_unlock(&g_upd);
}

void epd_metric_set(epd_metric_t *g, double v)
{
    pthread_mutex_lock(&g_upd);
    g->value = v;
    pthread_mutex_unlock(&g_upd);
}

void epd_metric_observe(epd_metric_t *h, double v)
{
    pthread_mutex_lock(&g_upd);
    h->sum += v;
    h->count++;
    pthread_mutex_unlock(&g_upd);
}

double epd_metric_value(const epd_metric_t *c)
{
    pthread_mutex_lock(&g_upd);
    double v = c->value;
    pthread_mutex_unlock(&g_upd);
    return v;
}

int epd_metrics_render(epd_metrics_t *m, char **out, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    if (!b) return -1;
    pthread_mutex_lock(&m->mu);
    for (epd_metric_t *s = m->head; s; s = s->next) {
        char line[512];
        int l = snprintf(line, sizeof line, "%s{%s} %g\n", s->name, s->labels,
                         s->count ? (double)s->count : s->value);
        if (n + (size_t)l + 1 > cap) {
            cap = (n + (size_t)l + 1) * 2;
            char *nb = realloc(b, cap);
            if (!nb) break;
            b = nb;
        }
        memcpy(b + n, line, (size_t)l);
        n += (size_t)l;
    }
    pthread_mutex_unlock(&m->mu);
    b[n] = 0;
    *out = b;
    *len = n;
    return 0;
}
