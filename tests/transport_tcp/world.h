/* Test harness for the tcp transport tests: runs one function per rank in forked processes on
 * loopback and collects how each ended. A rank reports a failure by returning non-zero after
 * printing what went wrong (cmocka's asserts only work in the parent process). */
#ifndef TCP_WORLD_H
#define TCP_WORLD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

typedef int (*world_fn)(int rank, int nranks, int port, void *arg);

/* Exit status of a rank killed by signal s. */
#define WORLD_SIGNALED(s) (128 + (s))
/* Status of a rank the harness had to kill because the world ran past its time limit. */
#define WORLD_HUNG 255

/* Picks a free loopback port (bound and released: good enough for tests on one host). */
int world_free_port(void);
/* Forks nranks processes running fn(rank, nranks, port, arg); waits for all of them, killing
 * those still running after limit_ms. status[r] receives each rank's exit code,
 * WORLD_SIGNALED(sig) or WORLD_HUNG. */
void world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status);

/* The rank of the calling process, for messages. */
extern int world_rank;

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

static inline uint64_t world_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

#endif /* TCP_WORLD_H */
