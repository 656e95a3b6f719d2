/* Log module: the two line formats, sanitising, truncation, level filtering, rate limiting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"

static size_t fmt(char *buf, size_t cap, int journal, int64_t t, epd_log_level_t l, const char *sub,
                  const char *f, ...) __attribute__((format(printf, 7, 8)));
static size_t fmt(char *buf, size_t cap, int journal, int64_t t, epd_log_level_t l, const char *sub,
                  const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    size_t n = epd_log_format(buf, cap, journal, t, l, sub, f, ap);
    va_end(ap);
    return n;
}

static void test_formats(void **state)
{
    char buf[256];
    size_t n = fmt(buf, sizeof(buf), 1, 0, EPD_LOG_WARN, "cluster", "peer %d late", 7);
    assert_string_equal(buf, "<4>cluster: peer 7 late\n");
    assert_int_equal(n, strlen(buf));
    /* 2026-11-23T11:01:30.123Z = 1795431690 s since the epoch */
    n = fmt(buf, sizeof(buf), 0, 1795431690123456789LL, EPD_LOG_ERROR, "http", "x=%s", "y");
    assert_string_equal(buf, "2026-11-23T11:01:30.123Z ERROR http: x=y\n");
    fmt(buf, sizeof(buf), 1, 0, EPD_LOG_DEBUG, NULL, "a\nb\rc");
    assert_string_equal(buf, "<7>-: a b c\n"); /* no forged lines */
}

static void test_truncation(void **state)
{
    char buf[32];
    char big[100];
    memset(big, 'x', sizeof(big) - 1);
    big[99] = '\0';
    size_t n = fmt(buf, sizeof(buf), 1, 0, EPD_LOG_INFO, "s", "%s", big);
    assert_int_equal(n, strlen(buf));
    assert_true(n <= sizeof(buf) - 1);
    assert_int_equal(buf[n - 1], '\n');
    assert_memory_equal(buf + n - 4, "...\n", 4);
    assert_memory_equal(buf, "<6>s: xxx", 9);
}

static char *read_pipe(int fd)
{
    static char out[8192];
    ssize_t r = read(fd, out, sizeof(out) - 1);
    out[r > 0 ? r : 0] = '\0';
    return out;
}

static void test_levels_and_ratelimit(void **state)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    epd_log_set_fd(p[1]);
    epd_log_set_journal(1);
    epd_log_set_level(EPD_LOG_WARN);
    EPD_INFO("t", "hidden");
    EPD_DEBUG("t", "hidden");
    EPD_WARN("t", "shown %d", 1);
    EPD_ERROR("t", "shown %d", 2);
    assert_string_equal(read_pipe(p[0]), "<4>t: shown 1\n<3>t: shown 2\n");
    assert_int_equal(epd_log_level_parse("debug"), EPD_LOG_DEBUG);
    assert_int_equal(epd_log_level_parse("loud"), -1);

    /* check with explicit time: burst 3 per 1000 ms */
    epd_ratelimit_t rl = EPD_RATELIMIT_INIT(3, 1000);
    uint64_t sup = 99;
    int64_t t0 = 5000000000LL;
    int ok = 0;
    for (int i = 0; i < 5; i++)
        ok += epd_ratelimit_check(&rl, t0 + i, &sup);
    assert_int_equal(ok, 3);
    assert_int_equal(epd_ratelimit_check(&rl, t0 + 999999999LL, &sup), 0);
    assert_int_equal(epd_ratelimit_check(&rl, t0 + 1000000000LL, &sup), 1);
    assert_int_equal(sup, 3);

    /* through the logger: 2 lines, then the next window reports the dropped ones */
    static epd_ratelimit_t rl2 = EPD_RATELIMIT_INIT(2, 50);
    for (int i = 0; i < 6; i++)
        epd_log_ratelimited(&rl2, EPD_LOG_ERROR, "t", "bad frame %d", i);
    assert_string_equal(read_pipe(p[0]), "<3>t: bad frame 0\n<3>t: bad frame 1\n");
    usleep(80 * 1000);
    epd_log_ratelimited(&rl2, EPD_LOG_ERROR, "t", "bad frame %d", 6);
    assert_string_equal(read_pipe(p[0]), "<3>t: bad frame 6 (4 similar messages suppressed)\n");
    epd_log_set_fd(2);
    close(p[0]);
    close(p[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_formats),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_levels_and_ratelimit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
