/* Multi-process harness for libep's EP ops over the tcp wire: forks one process per rank on
 * loopback, gives each a tcp bootstrap, and collects how each ended (killing stragglers at a
 * deadline). A rank reports a failure through its exit status after printing what went wrong on
 * stderr; cmocka's asserts run in the parent only. */
#ifndef EP_MP_WORLD_H
#define EP_MP_WORLD_H

#include "ep.h"

#include <stdint.h>
#include <stdio.h>

/* Exit status the harness records for a rank killed by signal s. */
#define MP_SIGNALED(s) (128 + (s))
/* Status of a rank the harness killed because the world ran past its deadline. */
#define MP_HUNG 255

/* fn runs in the forked process of `rank`; bs is that rank's tcp bootstrap (rank 0 listens on
 * the world's port). Returns 0 on success. */
typedef int (*mp_rank_fn)(int rank, int nranks, const ep_bootstrap_t *bs, void *arg);

/* Picks a free loopback port (bound and released). */
int mp_free_port(void);
/* Forks nranks processes running fn; waits for all of them, SIGKILLing those still running
 * after limit_ms. status[r] gets rank r's exit code, MP_SIGNALED(sig) or MP_HUNG. Returns the
 * number of ranks whose status is not 0. */
int mp_run(int nranks, mp_rank_fn fn, void *arg, unsigned limit_ms, int *status);
/* The same, for a world where rank `reap` is expected to stop (SIGSTOP) for good: once every
 * other rank has ended, it is SIGKILLed and its status is MP_SIGNALED(SIGKILL). */
int mp_run_reap(int nranks, mp_rank_fn fn, void *arg, unsigned limit_ms, int reap, int *status);

/* The rank of the calling process (-1 in the parent), for messages. */
extern int mp_rank;

/* Milliseconds on the monotonic clock. */
uint64_t mp_now_ms(void);

/* ep_config_t for the cpu backend over the tcp wire on loopback (ephemeral ports). */
void mp_config(ep_config_t *cfg, int num_experts, int hidden, int num_topk, int ll_max_tokens,
               int ht_max_tokens, unsigned timeout_ms);

#endif /* EP_MP_WORLD_H */
