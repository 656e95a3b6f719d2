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

#endif /* EP_CLOCK_H */
