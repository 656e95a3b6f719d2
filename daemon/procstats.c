/* Standard process metrics (see procstats.h). */
#include "procstats.h"
#include "epd_clock.h"

#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int epd_procstats_init(epd_procstats_t *ps, epd_metrics_t *m, const char *version,
                       const char *commit, const char *backend)
{
    char v[64], c[64], b[32], lab[256];
    if (epd_metrics_escape_label(version, v, sizeof(v)) < 0 ||
        epd_metrics_escape_label(commit, c, sizeof(c)) < 0 ||
        epd_metrics_escape_label(backend, b, sizeof(b)) < 0)
        return -EINVAL;
    snprintf(lab, sizeof(lab), "version=\"%s\",commit=\"%s\",backend=\"%s\"", v, c, b);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ps->m = m;
    ps->start_wall = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    ps->start_mono_ns = (unsigned long long)epd_now_ns();
    epd_metric_t *info =
        epd_metrics_gauge(m, "epd_build_info", "Build of this epd (always 1).", lab);
    epd_metric_t *start =
        epd_metrics_gauge(m, "epd_process_start_time_seconds",
                          "Start time of the process since the Unix epoch.", NULL);
    ps->uptime =
        epd_metrics_gauge(m, "epd_uptime_seconds", "Seconds since the process started.", NULL);
    ps->rss = epd_metrics_gauge(m, "epd_process_resident_memory_bytes",
                                "Resident memory size in bytes.", NULL);
    ps->vsize = epd_metrics_gauge(m, "epd_process_virtual_memory_bytes",
                                  "Virtual memory size in bytes.", NULL);
    if (!info || !start || !ps->uptime || !ps->rss || !ps->vsize) return -ENOMEM;
    epd_metric_set(info, 1);
    epd_metric_set(start, ps->start_wall);
    epd_procstats_update(ps);
    return 0;
}

double epd_procstats_uptime(const epd_procstats_t *ps)
{
    return (double)((unsigned long long)epd_now_ns() - ps->start_mono_ns) / 1e9;
}

void epd_procstats_update(epd_procstats_t *ps)
{
    epd_metric_set(ps->uptime, epd_procstats_uptime(ps));
    /* statm: size resident shared text lib data dt, in pages */
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return;
    unsigned long long size = 0, resident = 0;
    if (fscanf(f, "%llu %llu", &size, &resident) == 2) {
        double page = (double)sysconf(_SC_PAGESIZE);
        epd_metric_set(ps->vsize, (double)size * page);
        epd_metric_set(ps->rss, (double)resident * page);
    }
    fclose(f);
}
