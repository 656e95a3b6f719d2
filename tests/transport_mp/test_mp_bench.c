/* Smoke test of ep-bench's multi-process mode: two ep-bench processes (--rank/--nranks/
 * --bootstrap, tcp wire) on loopback with a small shape must exit 0 within a deadline and print
 * their result tables. No timing is checked. argv[1] is the ep-bench executable. */
#include "fork_world.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#define NRANKS 2
#define LIMIT_MS 60000u

static const char *bench_path;

struct run {
    int status[NRANKS];
    char *out[NRANKS]; /* each rank's stdout */
};

static char *slurp(FILE *f)
{
    size_t cap = 4096, len = 0;
    char *s = malloc(cap);
    if (!s) return NULL;
    rewind(f);
    size_t n;
    while ((n = fread(s + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) {
            char *t = realloc(s, cap *= 2);
            if (!t) break;
            s = t;
        }
    }
    s[len] = 0;
    return s;
}

struct bench_arg {
    const char *const *extra;
    FILE *outs[NRANKS];
};

/* Rank `rank`'s process of the world: ep-bench with its stdout in outs[rank]. */
static int exec_bench(int rank, int nranks, int port, void *arg)
{
    const struct bench_arg *b = arg;
    char bootstrap[64], r[16], n[16];
    snprintf(bootstrap, sizeof bootstrap, "127.0.0.1:%d", port);
    snprintf(r, sizeof r, "%d", rank);
    snprintf(n, sizeof n, "%d", nranks);
    const char *argv[64] = {bench_path, "--rank",      r,    "--nranks", n, "--bootstrap",
                            bootstrap,  "--transport", "tcp"};
    int a = 9;
    for (int i = 0; b->extra[i] && a < 63; i++)
        argv[a++] = b->extra[i];
    argv[a] = NULL;
    dup2(fileno(b->outs[rank]), STDOUT_FILENO);
    execv(bench_path, (char *const *)argv);
    fprintf(stderr, "exec %s failed\n", bench_path);
    _exit(127);
}

/* Runs NRANKS ep-bench processes with the given extra arguments (NULL-terminated). */
static void run_bench(const char *const *extra, struct run *res)
{
    struct bench_arg b = {.extra = extra};
    for (int r = 0; r < NRANKS; r++) {
        b.outs[r] = tmpfile();
        assert_non_null(b.outs[r]);
    }
    world_run(NRANKS, exec_bench, &b, LIMIT_MS, res->status);
    for (int r = 0; r < NRANKS; r++) {
        res->out[r] = slurp(b.outs[r]);
        fclose(b.outs[r]);
        printf("---- ep-bench rank %d (status %d)\n%s", r, res->status[r],
               res->out[r] ? res->out[r] : "");
    }
}

static void free_run(struct run *res)
{
    for (int r = 0; r < NRANKS; r++)
        free(res->out[r]);
}

static void expect(const struct run *res, const char *const *lines)
{
    for (int r = 0; r < NRANKS; r++) {
        assert_int_equal(res->status[r], 0);
        assert_non_null(res->out[r]);
        for (int i = 0; lines[i]; i++) {
            if (!strstr(res->out[r], lines[i]))
                fprintf(stderr, "rank %d's output lacks '%s'\n", r, lines[i]);
            assert_non_null(strstr(res->out[r], lines[i]));
        }
    }
}

static void ll_and_ht_fp8(void **state)
{
    (void)state;
    static const char *const args[] = {"--tokens", "8",      "--hidden", "256",     "--experts",
                                       "16",       "--topk", "4",        "--iters", "2",
                                       "--warmup", "1",      NULL};
    static const char *const lines[] = {
        "== LL: ranks 2, tokens/rank 8, hidden 256, top-4, experts 16, fp8, backend cpu, "
        "transport tcp, 2 iterations",
        "== HT: ranks 2, tokens/rank 8, hidden 256, top-4, experts 16, fp8, backend cpu, "
        "transport tcp, 2 iterations",
        "op                        median us       p10 us       p90 us  GB/s (median)",
        "\nLL dispatch ",
        "\nLL combine ",
        "\nLL dispatch+combine ",
        "\nHT layout ",
        "\nHT dispatch ",
        "\nHT dispatch cached ",
        "\nHT combine ",
        NULL};
    struct run res;
    run_bench(args, &res);
    expect(&res, lines);
    free_run(&res);
}

static void ll_bf16_hook(void **state)
{
    (void)state;
    static const char *const args[] = {"--mode",   "ll",  "--bf16",    "--hook", "--tokens", "4",
                                       "--hidden", "128", "--experts", "8",      "--topk",   "2",
                                       "--iters",  "2",   "--warmup",  "0",      NULL};
    static const char *const lines[] = {
        "== LL: ranks 2, tokens/rank 4, hidden 128, top-2, experts 8, bf16, hook, backend cpu, "
        "transport tcp, 2 iterations",
        "\nLL dispatch send ",
        "\nLL dispatch recv ",
        "\nLL combine send ",
        "\nLL combine recv ",
        NULL};
    struct run res;
    run_bench(args, &res);
    expect(&res, lines);
    for (int r = 0; r < NRANKS; r++)
        assert_null(strstr(res.out[r], "== HT"));
    free_run(&res);
}

/* --tokens 0: every op runs with no tokens (the group's bound stays 1). */
static void zero_tokens(void **state)
{
    (void)state;
    static const char *const args[] = {"--tokens", "0",      "--hidden", "128",     "--experts",
                                       "4",        "--topk", "1",        "--iters", "2",
                                       "--warmup", "0",      NULL};
    static const char *const lines[] = {"== LL: ranks 2, tokens/rank 0",
                                        "\nLL dispatch ",
                                        "\nLL combine ",
                                        "== HT: ranks 2, tokens/rank 0",
                                        "\nHT dispatch ",
                                        "\nHT combine ",
                                        NULL};
    struct run res;
    run_bench(args, &res);
    expect(&res, lines);
    free_run(&res);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PATH-TO-EP-BENCH\n", argv[0]);
        return 2;
    }
    bench_path = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ll_and_ht_fp8),
        cmocka_unit_test(ll_bf16_hook),
        cmocka_unit_test(zero_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
