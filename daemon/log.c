/* The log module: formats one line per call and writes it to stderr (or a chosen fd) with a
 * single write(2), so lines from several threads never interleave; and the rate limiter. */
#include "log.h"
#include "epd_clock.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A line longer than this is cut; a log line is for a human, not a data dump. */
#define EPD_LOG_LINE_MAX 4096

static _Atomic int g_level = EPD_LOG_INFO;
static _Atomic int g_fd = 2;
static _Atomic int g_journal = 0;
static char g_prog[32] = "epd";
static pthread_mutex_t g_write_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *level_name(epd_log_level_t l)
{
    switch (l) {
#define LEVEL_LINE_NAME(name, prio, cfg, line)                                                     \
    case EPD_LOG_##name:                                                                           \
        return line;
        EPD_LOG_LEVEL_MAP(LEVEL_LINE_NAME)
#undef LEVEL_LINE_NAME
    }
    return "?";
}

int epd_log_level_parse(const char *name)
{
    if (!name) return -1;
#define LEVEL_PARSE(lname, prio, cfg, line)                                                        \
    if (strcmp(name, cfg) == 0) return EPD_LOG_##lname;
    EPD_LOG_LEVEL_MAP(LEVEL_PARSE)
#undef LEVEL_PARSE
    return -1;
}

/* systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; it only applies if our
 * stderr is still that stream (not redirected by a wrapper). */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    if (!js || !*js) return 0;
    unsigned long long dev = 0, ino = 0;
    if (sscanf(js, "%llu:%llu", &dev, &ino) != 2) return 0;
    struct stat st;
    if (fstat(2, &st) != 0) return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void epd_log_init(const char *progname)
{
    if (progname) {
        const char *base = strrchr(progname, '/');
        snprintf(g_prog, sizeof(g_prog), "%s", base ? base + 1 : progname);
    }
    atomic_store(&g_journal, stderr_is_journal());
}

void epd_log_set_level(epd_log_level_t level)
{
    atomic_store(&g_level, (int)level);
}

epd_log_level_t epd_log_get_level(void)
{
    return (epd_log_level_t)atomic_load(&g_level);
}

void epd_log_set_fd(int fd)
{
    atomic_store(&g_fd, fd);
}

void epd_log_set_journal(int on)
{
    atomic_store(&g_journal, on ? 1 : 0);
}

size_t epd_log_format(char *buf, size_t cap, int journal, int64_t now_ns, epd_log_level_t level,
                      const char *subsys, const char *fmt, va_list ap)
{
    if (cap < 8) return 0;
    size_t n = 0;
    int w;
    if (!subsys || !*subsys) subsys = "-";
    if (journal) {
        /* journald keeps its own time stamps; the <N> prefix is the syslog priority. */
        w = snprintf(buf, cap, "<%d>%s: ", (int)level, subsys);
    } else {
        time_t secs = (time_t)(now_ns / 1000000000);
        int ms = (int)((now_ns % 1000000000) / 1000000);
        struct tm tm;
        gmtime_r(&secs, &tm);
        w = snprintf(buf, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %-5s %s: ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms,
                     level_name(level), subsys);
    }
    /* body_cap leaves one byte for the '\n' after the NUL-terminated text. */
    size_t body_cap = cap - 1;
    if (w < 0) w = 0;
    n = (size_t)w < body_cap - 1 ? (size_t)w : body_cap - 1;
    w = vsnprintf(buf + n, body_cap - n, fmt, ap);
    if (w < 0) w = 0;
    if ((size_t)w >= body_cap - n) {
        n = body_cap - 1;
        memcpy(buf + n - 3, "...", 3);
    } else {
        n += (size_t)w;
    }
    /* A message must not forge further log lines: newlines become spaces. */
    for (size_t i = 0; i < n; i++)
        if (buf[i] == '\n' || buf[i] == '\r') buf[i] = ' ';
    buf[n++] = '\n';
    buf[n] = '\0';
    return n;
}

void epd_logv(epd_log_level_t level, const char *subsys, const char *fmt, va_list ap)
{
    if ((int)level > atomic_load(&g_level)) return;
    char line[EPD_LOG_LINE_MAX];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    size_t n =
        epd_log_format(line, sizeof(line), atomic_load(&g_journal), now, level, subsys, fmt, ap);
    int fd = atomic_load(&g_fd);
    pthread_mutex_lock(&g_write_lock);
    size_t off = 0;
    while (off < n) {
        ssize_t r = write(fd, line + off, n - off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break; /* nowhere to report a failing log stream */
        off += (size_t)r;
    }
    pthread_mutex_unlock(&g_write_lock);
}

void epd_log(epd_log_level_t level, const char *subsys, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    epd_logv(level, subsys, fmt, ap);
    va_end(ap);
}

int epd_ratelimit_check(epd_ratelimit_t *rl, int64_t now_ns, uint64_t *suppressed)
{
    int ok;
    pthread_mutex_lock(&rl->lock);
    int64_t interval = (int64_t)rl->interval_ms * 1000000;
    if (rl->window_start_ns == 0 || now_ns - rl->window_start_ns >= interval ||
        now_ns < rl->window_start_ns) {
        rl->window_start_ns = now_ns;
        rl->emitted = 0;
    }
    if (rl->emitted < rl->burst) {
        rl->emitted++;
        if (suppressed) *suppressed = rl->suppressed;
        rl->suppressed = 0;
        ok = 1;
    } else {
        rl->suppressed++;
        ok = 0;
    }
    pthread_mutex_unlock(&rl->lock);
    return ok;
}

void epd_log_ratelimited(epd_ratelimit_t *rl, epd_log_level_t level, const char *subsys,
                         const char *fmt, ...)
{
    if ((int)level > atomic_load(&g_level)) return;
    uint64_t dropped = 0;
    if (!epd_ratelimit_check(rl, epd_now_ns(), &dropped)) return;
    char msg[EPD_LOG_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (dropped)
        epd_log(level, subsys, "%s (%llu similar messages suppressed)", msg,
                (unsigned long long)dropped);
    else
        epd_log(level, subsys, "%s", msg);
}
