/* Forked ranks over the tcp bootstrap for the rdma tests (see rdma_world.h). */
#include "rdma_world.h"

#include <infiniband/verbs.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int world_rank = -1;

uint64_t world_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int world_rdma_ports(void)
{
    int n = 0, ports = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    for (int d = 0; list && d < n; d++) {
        struct ibv_context *c = ibv_open_device(list[d]);
        struct ibv_device_attr da;
        if (!c) continue;
        if (!ibv_query_device(c, &da))
            for (int p = 1; p <= da.phys_port_cnt; p++) {
                struct ibv_port_attr pa;
                if (!ibv_query_port(c, (uint8_t)p, &pa) && pa.state == IBV_PORT_ACTIVE) ports++;
            }
        ibv_close_device(c);
    }
    if (list) ibv_free_device_list(list);
    return ports;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0) return 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        close(fd);
        return 0;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int rank_main(int rank, int nranks, int port, world_fn fn, void *arg)
{
    ep_tcp_bootstrap_t *tb = NULL;
    world_rank = rank;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, nranks, 20000, &tb);
    if (st) {
        fprintf(stderr, "rank %d: tcp bootstrap on port %d: %s (%s)\n", rank, port, ep_strerror(st),
                ep_tcp_bootstrap_last_error());
        return 1;
    }
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(tb, &bs);
    int rc = fn(rank, nranks, &bs, arg);
    ep_tcp_bootstrap_destroy(tb);
    return rc;
}

void world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status)
{
    pid_t pid[EP_MAX_RANKS];
    int port = free_port();
    fflush(NULL);
    for (int r = 0; r < nranks; r++) {
        pid[r] = fork();
        if (pid[r] == 0) _exit(rank_main(r, nranks, port, fn, arg) & 0xff);
        status[r] = pid[r] < 0 ? WORLD_HUNG : -1;
    }
    uint64_t deadline = world_now_ms() + limit_ms;
    int left = nranks;
    while (left > 0) {
        for (int r = 0; r < nranks; r++) {
            if (status[r] != -1) continue;
            int ws;
            pid_t p = waitpid(pid[r], &ws, WNOHANG);
            if (p == pid[r]) {
                status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : WORLD_SIGNALED(WTERMSIG(ws));
                left--;
            }
        }
        if (left && world_now_ms() > deadline) {
            for (int r = 0; r < nranks; r++)
                if (status[r] == -1) {
                    kill(pid[r], SIGKILL);
                    waitpid(pid[r], NULL, 0);
                    status[r] = WORLD_HUNG;
                    left--;
                }
        }
        if (left) {
            struct timespec ts = {0, 5000000};
            nanosleep(&ts, NULL);
        }
    }
}
