/* Test helper for the epd end-to-end test.
 *   epd_test_notify listen PATH SECONDS  binds a unix datagram socket at PATH (what systemd
 *       passes as NOTIFY_SOCKET) and prints every message it receives, one "key=value" per
 *       line, flushing after each; exits after SECONDS or on SIGTERM.
 *   epd_test_notify freeport             prints a TCP port on 127.0.0.1 that was free a
 *       moment ago (the kernel's choice for port 0). */
#include "free_port.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    stop = 1;
}

static int freeport(void)
{
    int port = test_free_port();
    if (port < 0) {
        perror("freeport");
        return 1;
    }
    printf("%d\n", port);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "freeport") == 0) return freeport();
    if (argc != 4 || strcmp(argv[1], "listen") != 0) {
        fprintf(stderr, "usage: %s listen PATH SECONDS | freeport\n", argv[0]);
        return 2;
    }
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(argv[2]) >= sizeof(a.sun_path)) {
        fprintf(stderr, "path too long: %s\n", argv[2]);
        return 2;
    }
    strcpy(a.sun_path, argv[2]);
    int secs = atoi(argv[3]);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    unlink(argv[2]);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        fprintf(stderr, "bind %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    time_t end = time(NULL) + secs;
    char buf[4096];
    while (!stop && time(NULL) < end) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 200) <= 0) continue;
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        if (n <= 0) continue;
        buf[n] = '\0';
        fputs(buf, stdout);
        if (buf[n - 1] != '\n') fputc('\n', stdout);
        fflush(stdout);
    }
    close(fd);
    unlink(argv[2]);
    return 0;
}
