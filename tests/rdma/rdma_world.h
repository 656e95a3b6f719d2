/* Test harness for the rdma tests: forks one process per rank (each meets the others over the
 * tcp bootstrap on loopback), collects how each ended, and skips when no verbs device exists.
 * A rank reports a failure by printing it and returning nonzero. */
#ifndef RDMA_WORLD_H
#define RDMA_WORLD_H

#include "ep.h"

#include <stdint.h>
#include <stdio.h>

#define WORLD_SKIP 77
#define WORLD_HUNG 255
#define WORLD_SIGNALED(s) (128 + (s))

typedef int (*world_fn)(int rank, int nranks, const ep_bootstrap_t *bs, void *arg);

extern int world_rank;

/* Number of verbs devices with an active port (0: the test should skip). */
int world_rdma_ports(void);
/* Forks nranks ranks running fn with a connected tcp bootstrap; kills those still running
 * after limit_ms; status[r] = exit code, WORLD_SIGNALED(sig) or WORLD_HUNG. */
void world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status);
uint64_t world_now_ms(void);

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

#endif /* RDMA_WORLD_H */
