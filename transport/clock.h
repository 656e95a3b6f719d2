/* The monotonic clock every wait of libep's host side measures its timeout on (internal). */
#ifndef EP_CLOCK_H
#define EP_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t ep_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* *ts = now + ms on CLOCK_MONOTONIC, for pthread_cond_timedwait on a condition variable set to
 * that clock. */
static inline void ep_deadline_after(struct timespec *ts, unsigned ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

#endif /* EP_CLOCK_H */
