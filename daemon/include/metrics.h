/* The metrics registry: counters, gauges and histograms that subsystems register once and
 * update on their hot paths; rendered as Prometheus text exposition format 0.0.4 by /metrics.
 * Names follow Prometheus conventions (epd_ prefix, base units, _total for counters).
 * A family (name) may hold several series that differ by their label set. Updates are
 * thread-safe (engine threads update, the loop renders). */
#ifndef EPD_METRICS_H
#define EPD_METRICS_H

#include <stddef.h>

typedef struct epd_metrics epd_metrics_t;
typedef struct epd_metric epd_metric_t; /* one series */

epd_metrics_t *epd_metrics_create(void);
void epd_metrics_destroy(epd_metrics_t *m);

/* Returns the series of family `name` with the given labels (a Prometheus label body such as
 * `path="/healthz",code="200"`, or NULL/"" for none), creating it on first use. The same
 * name must always be used with the same type and help. NULL only on allocation failure. */
epd_metric_t *epd_metrics_counter(epd_metrics_t *m, const char *name, const char *help,
                                  const char *labels);
epd_metric_t *epd_metrics_gauge(epd_metrics_t *m, const char *name, const char *help,
                                const char *labels);
/* bounds: ascending upper bounds of the buckets (+Inf is implicit). */
epd_metric_t *epd_metrics_histogram(epd_metrics_t *m, const char *name, const char *help,
                                    const char *labels, const double *bounds, int nbounds);

void epd_metric_add(epd_metric_t *c, double v);     /* counters and gauges */
void epd_metric_set(epd_metric_t *g, double v);     /* gauges */
void epd_metric_observe(epd_metric_t *h, double v); /* histograms */
double epd_metric_value(const epd_metric_t *c);     /* counters and gauges (tests, status) */

/* Bounded memory: at most this many series (over all families; default
 * EPD_METRICS_DEFAULT_MAX_SERIES). A series asked for beyond the cap, with a malformed label
 * body, or under a name already used with another type, is not created: the caller gets a
 * shared sink series (updates land nowhere) and epd_metrics_dropped_series_total{reason}
 * counts it. */
#define EPD_METRICS_DEFAULT_MAX_SERIES 4096
void epd_metrics_set_max_series(epd_metrics_t *m, int max_series);

/* Escapes a label value for a label body (backslash, double quote and newline, as the text
 * format requires). Returns the length written, or -1 if it does not fit in cap. */
int epd_metrics_escape_label(const char *value, char *out, size_t cap);

/* Renders every family; *out is malloc'd, the caller frees it. 0 or -1 (no memory). */
int epd_metrics_render(epd_metrics_t *m, char **out, size_t *len);

#endif /* EPD_METRICS_H */
