/* The process's standard metrics: build info, start time, uptime, memory (/proc/self/statm). */
#ifndef EPD_PROCSTATS_H
#define EPD_PROCSTATS_H

#include "metrics.h"

typedef struct epd_procstats {
    epd_metrics_t *m;
    epd_metric_t *uptime, *rss, *vsize;
    double start_wall; /* seconds since the epoch */
    unsigned long long start_mono_ns;
} epd_procstats_t;

/* Registers epd_build_info{version,commit,backend} = 1, epd_process_start_time_seconds and
 * the gauges that epd_procstats_update refreshes. 0, or -ENOMEM. */
int epd_procstats_init(epd_procstats_t *ps, epd_metrics_t *m, const char *version,
                       const char *commit, const char *backend);
/* Refreshes uptime and memory; call before rendering. */
void epd_procstats_update(epd_procstats_t *ps);
double epd_procstats_uptime(const epd_procstats_t *ps);

#endif /* EPD_PROCSTATS_H */
