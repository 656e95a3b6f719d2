/* Forked worlds for the multi-process tests (tests/transport_mp, tests/transport_tcp, tests/rdma):
 * one process per rank on loopback, sharing a free port; waits for every rank and collects how each
 * ended, SIGKILLing stragglers at a deadline. world_run hands each rank the port (the tcp tests
 * build their own bootstrap and wire on it); world_run_ep hands it a connected tcp bootstrap
 * (rank 0 listens on the port). A rank reports a failure by printing what went wrong on stderr
 * and returning nonzero (exit status 1), which CHECK (check.h) does; cmocka's asserts run in the
 * parent only. */
#ifndef EP_TEST_FORK_WORLD_H
#define EP_TEST_FORK_WORLD_H

#include "check.h"
#include "ep.h"

#include <stdint.h>
#include <stdio.h>

/* Exit status the harness records for a rank killed by signal s. */
#define WORLD_SIGNALED(s) (128 + (s))
/* Status of a rank the harness killed because the world ran past its deadline. */
#define WORLD_HUNG 255

/* The rank of the calling process (-1 in the parent), for messages. */
extern int world_rank;

/* Milliseconds on the monotonic clock. */
uint64_t world_now_ms(void);
/* Picks a free loopback port (bound and released: good enough for tests on one host). */
int world_free_port(void);

/* fn runs in the forked process of `rank`; port is the world's loopback port. Returns 0 on
 * success. */
typedef int (*world_fn)(int rank, int nranks, int port, void *arg);
/* Forks nranks processes running fn; waits for all of them, SIGKILLing those still running
 * after limit_ms. status[r] gets rank r's exit code, WORLD_SIGNALED(sig) or WORLD_HUNG. Returns
 * the number of ranks whose status is not 0. */
int world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status);
/* world_run for a world whose ranks must all succeed: prints the status of each rank that did
 * not and returns their number (0: every rank succeeded). */
int world_run_all(int nranks, world_fn fn, void *arg, unsigned limit_ms);
/* The same, for a world where rank `reap` is expected to stop (SIGSTOP) for good: once every
 * other rank has ended, it is SIGKILLed and its status is WORLD_SIGNALED(SIGKILL). */
int world_run_reap(int nranks, world_fn fn, void *arg, unsigned limit_ms, int reap, int *status);

/* How long a rank of world_run_ep waits for the others in the tcp bootstrap (ms; 15000 unless a
 * test sets it before the run, as the rdma tests in an emulated VM do). */
extern unsigned world_bootstrap_ms;

/* fn runs in the forked process of `rank`; bs is that rank's tcp bootstrap. */
typedef int (*world_ep_fn)(int rank, int nranks, const ep_bootstrap_t *bs, void *arg);
/* world_run / world_run_reap for ranks that get a connected tcp bootstrap. */
int world_run_ep(int nranks, world_ep_fn fn, void *arg, unsigned limit_ms, int *status);
int world_run_ep_reap(int nranks, world_ep_fn fn, void *arg, unsigned limit_ms, int reap,
                      int *status);

/* ep_config_t for the cpu backend over the tcp wire on loopback (ephemeral ports). */
void world_ep_config(ep_config_t *cfg, int num_experts, int hidden, int num_topk, int ll_max_tokens,
                     int ht_max_tokens, unsigned timeout_ms);

#endif /* EP_TEST_FORK_WORLD_H */
