/* Helpers of the tcp transport tests, which run their ranks in a forked world
 * (tests/transport/fork_world.h): a CHECK that fails the rank, and the tests' deterministic
 * source of sizes, offsets and bytes. */
#ifndef TCP_TEST_H
#define TCP_TEST_H

#include "fork_world.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", world_rank, __FILE__, __LINE__,  \
                    #cond);                                                                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

/* splitmix64: the tests' deterministic source of sizes, offsets and bytes. */
static inline uint64_t world_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline void world_fill(uint64_t *s, uint8_t *dst, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = world_rand(s);
        for (size_t j = 0; j < 8 && i + j < len; j++)
            dst[i + j] = (uint8_t)(v >> (8 * j));
    }
}

#endif /* TCP_TEST_H */
