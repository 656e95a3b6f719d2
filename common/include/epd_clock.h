/* The monotonic clock that libep, the daemon and epctl measure timeouts, rates and deadlines on
 * (header-only: libep takes it without linking anything of common/). Condition variables waited
 * on with epd_deadline_after must be set to CLOCK_MONOTONIC (pthread_condattr_setclock). */
#ifndef EPD_CLOCK_H
#define EPD_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t epd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline long long epd_now_ms(void)
{
    return (long long)(epd_now_ns() / 1000000);
}

static inline double epd_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* *ts = now + ms, for pthread_cond_timedwait. */
static inline void epd_deadline_after(struct timespec *ts, unsigned ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

#endif /* EPD_CLOCK_H */
