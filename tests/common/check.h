/* The check macros of the test programs whose ranks run outside cmocka's asserts (forked
 * processes, threads, GPU streams): a failed check prints the rank, where it failed, what
 * failed and the test's message on stderr, then does what the test says a failure does
 * (return 1 from the rank, goto fail, count it). One printer for them all. */
#ifndef EPD_TEST_CHECK_H
#define EPD_TEST_CHECK_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Printed failures per test file at the most; the first ones say what went wrong. */
#define TEST_CHECK_PRINT_MAX 20

/* "rank R step S file:line: check failed: what: message" (rank, step < 0: left out). */
static inline void test_check_failed(int rank, int step, const char *file, int line_no,
                                     const char *what, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static inline void test_check_failed(int rank, int step, const char *file, int line_no,
                                     const char *what, const char *fmt, ...)
{
    static _Atomic int printed; /* threads as ranks share it */
    if (printed++ >= TEST_CHECK_PRINT_MAX) return;
    /* One write per failure, so that the lines of ranks running as threads do not interleave. */
    char line[1024];
    int n = 0;
    if (rank >= 0) n += snprintf(line, sizeof line, "rank %d ", rank);
    if (step >= 0) n += snprintf(line + n, sizeof line - (size_t)n, "step %d ", step);
    n += snprintf(line + n, sizeof line - (size_t)n, "%s:%d: check failed: %s: ", file, line_no,
                  what);
    if (n < (int)sizeof line - 1) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
    }
    fprintf(stderr, "%s\n", line);
}

/* cond must hold; else prints (rank, step may be -1) and runs on_fail (`return 1`,
 * `goto fail`, `failures++`). */
#define TEST_CHECK(rank, step, on_fail, cond, ...)                                                 \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            test_check_failed((rank), (step), __FILE__, __LINE__, #cond, __VA_ARGS__);             \
            on_fail;                                                                               \
        }                                                                                          \
    } while (0)

/* An ep_* call that must return `expected`, with the group's last error holding `needle` when
 * needle is not NULL; else prints and runs on_fail. */
#define TEST_CHECK_EP(rank, g, on_fail, expected, call, needle)                                    \
    do {                                                                                           \
        ep_status_t st_ = (call);                                                                  \
        const char *why_ = ep_group_last_error(g);                                                 \
        if (st_ != (expected) || ((needle) && !strstr(why_, (needle) ? (needle) : ""))) {          \
            test_check_failed((rank), -1, __FILE__, __LINE__, #call, "gave %d (%s), not %d", st_,  \
                              why_, (int)(expected));                                              \
            on_fail;                                                                               \
        }                                                                                          \
    } while (0)

/* In a rank function of a forked world (fork_world.h): the rank fails (returns 1). */
#define CHECK(cond, ...) TEST_CHECK(world_rank, -1, return 1, cond, __VA_ARGS__)

#endif /* EPD_TEST_CHECK_H */
