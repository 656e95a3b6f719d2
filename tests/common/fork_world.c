/* Forked multi-process worlds on loopback for libep's multi-process tests (see fork_world.h). */
#include "fork_world.h"
#include "epd_clock.h"
#include "free_port.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int world_rank = -1;

/* Below every world's limit of the tcp suites. */
unsigned world_bootstrap_ms = 15000u;

uint64_t world_now_ms(void)
{
    return (uint64_t)epd_now_ms();
}

int world_free_port(void)
{
    return test_free_port();
}

int world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status)
{
    return world_run_reap(nranks, fn, arg, limit_ms, -1, status);
}

int world_run_all(int nranks, world_fn fn, void *arg, unsigned limit_ms)
{
    int status[EP_MAX_RANKS];
    int failed = world_run(nranks, fn, arg, limit_ms, status);
    for (int r = 0; r < nranks; r++)
        if (status[r]) fprintf(stderr, "world: rank %d ended with status %d\n", r, status[r]);
    return failed;
}

int world_run_reap(int nranks, world_fn fn, void *arg, unsigned limit_ms, int reap, int *status)
{
    pid_t pids[EP_MAX_RANKS];
    pid_t parent = getpid();
    int port = world_free_port(), failed = 0;
    if (port < 0) {
        fprintf(stderr, "world: no free loopback port\n");
        for (int r = 0; r < nranks; r++)
            status[r] = WORLD_HUNG;
        return nranks;
    }
    fflush(stdout);
    fflush(stderr);
    for (int r = 0; r < nranks; r++) {
        status[r] = WORLD_HUNG;
        pids[r] = fork();
        if (pids[r] == 0) {
            /* A rank never outlives the test that forked it. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(WORLD_HUNG);
            world_rank = r;
            int rc = fn(r, nranks, port, arg);
            fflush(stdout);
            fflush(stderr);
            _exit(rc ? 1 : 0);
        }
        if (pids[r] < 0) fprintf(stderr, "world: fork for rank %d failed\n", r);
    }
    uint64_t until = world_now_ms() + limit_ms;
    int left = 0;
    for (int r = 0; r < nranks; r++)
        left += pids[r] > 0;
    while (left) {
        for (int r = 0; r < nranks; r++) {
            if (pids[r] <= 0) continue;
            int ws;
            if (waitpid(pids[r], &ws, WNOHANG) == pids[r]) {
                status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : WORLD_SIGNALED(WTERMSIG(ws));
                pids[r] = 0;
                left--;
            }
        }
        if (left == 1 && reap >= 0 && reap < nranks && pids[reap] > 0) {
            kill(pids[reap], SIGKILL);
            waitpid(pids[reap], NULL, 0);
            status[reap] = WORLD_SIGNALED(SIGKILL);
            pids[reap] = 0;
            left--;
        }
        if (left && world_now_ms() > until) {
            for (int r = 0; r < nranks; r++) {
                if (pids[r] <= 0) continue;
                fprintf(stderr, "world: rank %d still running after %u ms: killed\n", r, limit_ms);
                kill(pids[r], SIGKILL);
                waitpid(pids[r], NULL, 0);
                status[r] = WORLD_HUNG;
                pids[r] = 0;
                left--;
            }
        }
        if (left) usleep(2000);
    }
    for (int r = 0; r < nranks; r++)
        failed += status[r] != 0;
    return failed;
}

/* ---- ranks with a tcp bootstrap ------------------------------------------------------------ */

struct ep_rank {
    world_ep_fn fn;
    void *arg;
};

static int ep_rank_main(int rank, int nranks, int port, void *p)
{
    const struct ep_rank *e = p;
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st =
        ep_tcp_bootstrap_create("127.0.0.1", port, rank, nranks, world_bootstrap_ms, &b);
    if (st != EP_OK) {
        fprintf(stderr, "rank %d: tcp bootstrap on port %d: %s: %s\n", rank, port, ep_strerror(st),
                ep_tcp_bootstrap_last_error());
        return 1;
    }
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    int rc = e->fn(rank, nranks, &bs, e->arg);
    ep_tcp_bootstrap_destroy(b);
    return rc;
}

int world_run_ep(int nranks, world_ep_fn fn, void *arg, unsigned limit_ms, int *status)
{
    return world_run_ep_reap(nranks, fn, arg, limit_ms, -1, status);
}

int world_run_ep_reap(int nranks, world_ep_fn fn, void *arg, unsigned limit_ms, int reap,
                      int *status)
{
    struct ep_rank e = {fn, arg}; /* each forked rank has its own copy */
    return world_run_reap(nranks, ep_rank_main, &e, limit_ms, reap, status);
}

void world_ep_config(ep_config_t *cfg, int num_experts, int hidden, int num_topk, int ll_max_tokens,
                     int ht_max_tokens, unsigned timeout_ms)
{
    ep_config_init(cfg);
    cfg->backend = EP_BACKEND_CPU;
    cfg->transport = EP_TRANSPORT_TCP;
    cfg->num_experts = num_experts;
    cfg->hidden = hidden;
    cfg->num_topk = num_topk;
    cfg->ll_max_tokens = ll_max_tokens;
    cfg->ht_max_tokens = ht_max_tokens;
    cfg->timeout_ms = timeout_ms;
    cfg->tcp_host = "127.0.0.1";
    cfg->tcp_port = 0;
}
