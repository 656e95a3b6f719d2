/* Logging for epd and epctl: levels, a subsystem tag, journald-friendly lines.
 * Under systemd (JOURNAL_STREAM set) lines carry the "<N>" syslog priority prefix and no
 * timestamp; on a terminal they carry an ISO-8601 timestamp and the level name. */
#ifndef EPD_LOG_H
#define EPD_LOG_H

#include "epd_config.h"

void epd_log_init(const char *progname);
void epd_log_set_level(epd_log_level_t level);
epd_log_level_t epd_log_get_level(void);
void epd_log(epd_log_level_t level, const char *subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define EPD_ERROR(sub, ...) epd_log(EPD_LOG_ERROR, sub, __VA_ARGS__)
#define EPD_WARN(sub, ...) epd_log(EPD_LOG_WARN, sub, __VA_ARGS__)
#define EPD_INFO(sub, ...) epd_log(EPD_LOG_INFO, sub, __VA_ARGS__)
#define EPD_DEBUG(sub, ...) epd_log(EPD_LOG_DEBUG, sub, __VA_ARGS__)

#endif /* EPD_LOG_H */
