/* Logging for epd and epctl: levels, a subsystem tag, journald-friendly lines.
 * Under systemd (JOURNAL_STREAM set) lines carry the "<N>" syslog priority prefix and no
 * timestamp; on a terminal they carry an ISO-8601 timestamp and the level name. */
#ifndef EPD_LOG_H
#define EPD_LOG_H

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "epd_config.h"

void epd_log_init(const char *progname);
void epd_log_set_level(epd_log_level_t level);
epd_log_level_t epd_log_get_level(void);
void epd_log(epd_log_level_t level, const char *subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void epd_logv(epd_log_level_t level, const char *subsys, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

#define EPD_ERROR(sub, ...) epd_log(EPD_LOG_ERROR, sub, __VA_ARGS__)
#define EPD_WARN(sub, ...) epd_log(EPD_LOG_WARN, sub, __VA_ARGS__)
#define EPD_INFO(sub, ...) epd_log(EPD_LOG_INFO, sub, __VA_ARGS__)
#define EPD_DEBUG(sub, ...) epd_log(EPD_LOG_DEBUG, sub, __VA_ARGS__)

/* Where lines go (default: stderr) and whether they use the journald form (default: detected
 * by epd_log_init from JOURNAL_STREAM matching stderr). For tests and for epctl. */
void epd_log_set_fd(int fd);
void epd_log_set_journal(int on);

/* Formats one line (with its trailing newline) into buf as epd_log would write it; `now_ns` is
 * the CLOCK_REALTIME time stamp used in the terminal form. Returns the length written
 * (truncated lines end in "...\n"). */
size_t epd_log_format(char *buf, size_t cap, int journal, int64_t now_ns, epd_log_level_t level,
                      const char *subsys, const char *fmt, va_list ap)
    __attribute__((format(printf, 7, 0)));

/* "error" | "warn" | "info" | "debug" -> level; -1 if unknown. */
int epd_log_level_parse(const char *name);

/* Rate limit for noisy messages (a rejected frame per packet, a failing peer): at most `burst`
 * lines per `interval_ms`; the first line after a suppressed stretch says how many were
 * dropped. One limiter per message site:
 *   static epd_ratelimit_t rl = EPD_RATELIMIT_INIT(5, 1000);
 *   epd_log_ratelimited(&rl, EPD_LOG_WARN, "cluster", "bad frame from %s", peer); */
typedef struct epd_ratelimit {
    pthread_mutex_t lock;
    int burst;
    int interval_ms;
    int64_t window_start_ns; /* CLOCK_MONOTONIC */
    int emitted;             /* lines in the current window */
    uint64_t suppressed;     /* lines dropped since the last emitted one */
} epd_ratelimit_t;
#define EPD_RATELIMIT_INIT(burst_, interval_ms_)                                                   \
    {                                                                                              \
        PTHREAD_MUTEX_INITIALIZER, (burst_), (interval_ms_), 0, 0, 0                               \
    }

/* Returns 1 if the caller may log now (and *suppressed receives how many lines were dropped
 * before this one), 0 if this line must be dropped. `now_ns` is CLOCK_MONOTONIC. */
int epd_ratelimit_check(epd_ratelimit_t *rl, int64_t now_ns, uint64_t *suppressed);
void epd_log_ratelimited(epd_ratelimit_t *rl, epd_log_level_t level, const char *subsys,
                         const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif /* EPD_LOG_H */
