/* Forked multi-process worlds on loopback for the tcp transport tests. */
#include "world.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

int world_rank = -1;

int world_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

void world_run(int nranks, world_fn fn, void *arg, unsigned limit_ms, int *status)
{
    pid_t pids[64];
    int port = world_free_port();
    fflush(stdout);
    fflush(stderr);
    for (int r = 0; r < nranks; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            world_rank = r;
            int rc = fn(r, nranks, port, arg);
            fflush(stderr);
            _exit(rc & 0x7f);
        }
        status[r] = WORLD_HUNG;
    }
    uint64_t until = world_now_ms() + limit_ms;
    int left = nranks;
    while (left) {
        for (int r = 0; r < nranks; r++) {
            if (pids[r] <= 0) continue;
            int ws;
            pid_t p = waitpid(pids[r], &ws, WNOHANG);
            if (p == pids[r]) {
                status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : WORLD_SIGNALED(WTERMSIG(ws));
                pids[r] = 0;
                left--;
            }
        }
        if (left && world_now_ms() > until) {
            for (int r = 0; r < nranks; r++) {
                if (pids[r] > 0) {
                    fprintf(stderr, "world: rank %d still running after %u ms: killed\n", r,
                            limit_ms);
                    kill(pids[r], SIGKILL);
                    waitpid(pids[r], NULL, 0);
                    status[r] = WORLD_HUNG;
                    pids[r] = 0;
                    left--;
                }
            }
        }
        if (left) usleep(5000);
    }
}
