/* The model against transformers (oracle/expected.json, made by make_oracle.py): greedy tokens
 * equal, logits within LOGIT_TOL, with 1, 2 and 4 ranks as threads of this process over libep's
 * shm wire, with an explicit (scattered) expert placement, and with 2 and 4 ranks as forked
 * processes over libep's tcp wire.
 *
 * LL only (prompts in chunks of CHUNK): the EP split must change nothing, every run's logits
 * are bit-identical to the 1-rank run. HT for prefill (prompts in one step of up to PREFILL
 * tokens, through libep's HT path whenever a rank's batch exceeds CHUNK): the same checks
 * against transformers with 1, 2 and 4 ranks, threads or processes (processes bit-identical to
 * threads of the same rank count; across rank counts HT rounds different partial sums, see
 * model/moe.c); every step through HT, decode included; and staggered arrivals, where one rank
 * prefills a long prompt while the others only decode or have nothing, so that all must take HT
 * together (each rank counts its own paths, and the model's counts must match the plan).
 *
 * Tolerance. transformers computes in fp32 throughout; our MoE blocks send activations to the
 * experts as bf16 and get the weighted sum back as bf16 (libep's LL contract), a relative
 * rounding of ~2^-9 at each MoE input and output. Measured on this checkpoint (logits spread
 * over about +-4): max |logit - reference| = 0.0117 over all 4 x 16 rows of 384 logits, the same
 * for every rank count. HT rounds each rank's partial sum of its experts (instead of each expert
 * output) to bf16 and the sum of the partials once more: the same order of error, measured
 * 0.0117 / 0.0103 / 0.0106 with HT prefill on 1 / 2 / 4 ranks, 0.0085 with every step through
 * HT, 0.0120 with staggered prompts. The bound LOGIT_TOL is about 2.5 times the largest. Checked by
 * mutation: the k_norm weights swapped for q_norm's, a RoPE sign flipped, each token sent to a
 * neighbouring expert, top-k weights not renormalised, the attention scale 1/hd, and scaling the
 * dense MLP's output by 1.01 or the attention output by 1.003 each break the bound (by 0.03 to
 * 0.4). */
#include "oracle_run.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#define LOGIT_TOL 0.03f
#define CHUNK 8 /* LL tokens per rank and step: prompts of 11 and 19 take 2 and 3 chunks */
#define PREFILL                                                                                    \
    96 /* HT tokens per rank and step: all four prompts fit one step (37 tokens of                 \
        * the Qwen3-MoE oracle, 88 of the DeepSeek ones) */

static oracle_t g_oracle;
static const char *g_dir = EPD_ORACLE_DIR; /* argv[1] when given: another oracle checkpoint */
static const oracle_opts_t LL_ONLY = {.chunk = CHUNK};
static const oracle_opts_t HT_PREFILL = {.chunk = CHUNK, .prefill = PREFILL};

/* Per rank: steps on each path, HT steps with only decode tokens and with none. */
typedef struct paths {
    int ll[4], ht[4], decode_only[4], idle[4];
} paths_t;

/* Runs the workload on R threads; *out gets every case's tokens and logits, *paths (if given)
 * each rank's path counts. */
static void run_ranks(int R, const oracle_opts_t *opts, const epd_model_placement_t *placement,
                      oracle_result_t *out, paths_t *paths)
{
    oracle_result_t *res = calloc(ORACLE_MAX_RANKS, sizeof(*res));
    int rc[ORACLE_MAX_RANKS] = {0};
    epd_err_t err[ORACLE_MAX_RANKS];
    memset(err, 0, sizeof(err));
    const oracle_t *o = &g_oracle;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < o->num_cases; c++)
            res[r].logits[c] = out->logits[c];
    assert_int_equal(oracle_run_threads(g_dir, o, R, placement, opts, res, rc, err), 0);
    for (int r = 0; r < R; r++)
        if (rc[r]) fail_msg("R=%d rank %d: %s", R, r, err[r].msg);
    for (int c = 0; c < o->num_cases; c++)
        memcpy(out->tokens[c], res[c % R].tokens[c], sizeof(out->tokens[c]));
    out->mem = res[0].mem;
    for (int r = 0; paths && r < R; r++) {
        paths->ll[r] = res[r].steps_ll;
        paths->ht[r] = res[r].steps_ht;
        paths->decode_only[r] = res[r].ht_decode_only;
        paths->idle[r] = res[r].ht_idle;
    }
    free(res);
}

static oracle_result_t *alloc_result(void)
{
    oracle_result_t *r = calloc(1, sizeof(*r));
    for (int c = 0; c < g_oracle.num_cases; c++)
        r->logits[c] = calloc((size_t)g_oracle.vocab * g_oracle.new_tokens, sizeof(float));
    return r;
}

static void free_result(oracle_result_t *r)
{
    for (int c = 0; c < g_oracle.num_cases; c++)
        free(r->logits[c]);
    free(r);
}

/* Tokens equal to transformers', logits within LOGIT_TOL; returns the largest difference. */
static float check_against_reference(const oracle_result_t *res, const char *what)
{
    const oracle_t *o = &g_oracle;
    float worst = 0;
    for (int c = 0; c < o->num_cases; c++) {
        const oracle_case_t *oc = &o->cases[c];
        for (int s = 0; s < o->new_tokens; s++) {
            if (res->tokens[c][s] != oc->tokens[s])
                fail_msg("%s: case %d token %d is %d, transformers chose %d", what, c, s,
                         res->tokens[c][s], oc->tokens[s]);
            for (int v = 0; v < o->vocab; v++) {
                size_t i = (size_t)s * o->vocab + v;
                float d = fabsf(res->logits[c][i] - oc->logits[i]);
                if (!(d <= LOGIT_TOL))
                    fail_msg("%s: case %d step %d logit %d is %.6f, transformers %.6f", what, c, s,
                             v, (double)res->logits[c][i], (double)oc->logits[i]);
                worst = d > worst ? d : worst;
            }
        }
    }
    if (getenv("EPD_TEST_VERBOSE"))
        printf("  %s: max |logit - transformers| = %.6f\n", what, (double)worst);
    return worst;
}

static void check_identical(const oracle_result_t *a, const oracle_result_t *b, const char *what)
{
    const oracle_t *o = &g_oracle;
    for (int c = 0; c < o->num_cases; c++) {
        assert_memory_equal(a->tokens[c], b->tokens[c], sizeof(int32_t) * o->new_tokens);
        if (memcmp(a->logits[c], b->logits[c], sizeof(float) * o->vocab * o->new_tokens) != 0)
            fail_msg("%s: logits of case %d differ from the 1-rank run", what, c);
    }
}

static oracle_result_t *g_one_rank;

static void test_one_rank(void **state)
{
    (void)state;
    g_one_rank = alloc_result();
    paths_t p;
    run_ranks(1, &LL_ONLY, NULL, g_one_rank, &p);
    assert_int_equal(p.ht[0], 0);
    check_against_reference(g_one_rank, "1 rank");
    assert_int_equal(g_one_rank->mem.local_experts, 16);
}

static void test_ranks(int R, const epd_model_placement_t *placement, const char *what)
{
    assert_non_null(g_one_rank);
    oracle_result_t *res = alloc_result();
    paths_t p;
    run_ranks(R, &LL_ONLY, placement, res, &p);
    for (int r = 0; r < R; r++)
        assert_int_equal(p.ht[r], 0);
    check_against_reference(res, what);
    check_identical(g_one_rank, res, what);
    /* each rank holds E / R experts: the expert bytes shrink with R */
    assert_int_equal(res->mem.local_experts, 16 / R);
    assert_int_equal(res->mem.expert_bytes * R, g_one_rank->mem.expert_bytes);
    assert_int_equal(res->mem.replicated_bytes, g_one_rank->mem.replicated_bytes);
    free_result(res);
}

static void test_two_ranks(void **state)
{
    (void)state;
    test_ranks(2, NULL, "2 ranks");
}

static void test_four_ranks(void **state)
{
    (void)state;
    test_ranks(4, NULL, "4 ranks");
}

static void test_explicit_placement(void **state)
{
    (void)state;
    int map[16];
    for (int e = 0; e < 16; e++)
        map[e] = (e * 7) % 4; /* a scattered, balanced map: 4 experts on each of 4 ranks */
    epd_model_placement_t p;
    epd_err_t err;
    assert_int_equal(epd_model_placement_explicit(16, 4, map, 16, &p, &err), 0);
    test_ranks(4, &p, "4 ranks, explicit placement");
    epd_model_placement_fini(&p);
}

/* ---- ranks as processes over tcp ----------------------------------------------------------- */

#define TCP_LIMIT_MS 60000

/* Shared with the children: each rank writes the tokens and logits of its cases, its status and
 * its error message. */
typedef struct shared {
    int rc[4];
    char msg[4][EPD_ERR_MSG_MAX];
    epd_model_mem_t mem[4];
    paths_t paths;
    int32_t tokens[ORACLE_MAX_CASES][ORACLE_MAX_NEW];
    float logits[]; /* [cases][new_tokens][vocab] */
} shared_t;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

static int tcp_rank(shared_t *sh, int rank, int R, int port, const oracle_opts_t *opts)
{
    const oracle_t *o = &g_oracle;
    oracle_result_t res;
    memset(&res, 0, sizeof(res));
    for (int c = 0; c < o->num_cases; c++)
        res.logits[c] = sh->logits + (size_t)c * o->new_tokens * o->vocab;
    ep_tcp_bootstrap_t *b = NULL;
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, R, 20000, &b);
    if (st != EP_OK) {
        snprintf(sh->msg[rank], EPD_ERR_MSG_MAX, "ep_tcp_bootstrap_create: %s (%s)",
                 ep_strerror(st), ep_tcp_bootstrap_last_error());
        return 1;
    }
    ep_bootstrap_t bs;
    ep_tcp_bootstrap_get(b, &bs);
    epd_err_t err = {0};
    int rc = oracle_run_rank(g_dir, o, &bs, EP_TRANSPORT_TCP, NULL, opts, &res, &err);
    ep_tcp_bootstrap_destroy(b);
    if (rc) {
        snprintf(sh->msg[rank], EPD_ERR_MSG_MAX, "%s", err.msg);
        return 1;
    }
    for (int c = rank; c < o->num_cases; c += R)
        memcpy(sh->tokens[c], res.tokens[c], sizeof(sh->tokens[c]));
    sh->mem[rank] = res.mem;
    sh->paths.ll[rank] = res.steps_ll;
    sh->paths.ht[rank] = res.steps_ht;
    sh->paths.decode_only[rank] = res.ht_decode_only;
    sh->paths.idle[rank] = res.ht_idle;
    return 0;
}

/* Runs the workload on R forked processes over tcp and checks it against transformers and,
 * bit for bit, against `same` (a run of the same rank count and options in threads). */
static void test_tcp(int R, const oracle_opts_t *opts, const oracle_result_t *same,
                     const char *label, paths_t *paths)
{
    const oracle_t *o = &g_oracle;
    size_t nlog = (size_t)o->num_cases * o->new_tokens * o->vocab;
    size_t bytes = sizeof(shared_t) + sizeof(float) * nlog;
    shared_t *sh = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    memset(sh, 0, sizeof(*sh));
    int port = free_port();
    assert_true(port > 0);
    pid_t pid[4];
    fflush(NULL);
    for (int r = 0; r < R; r++) {
        pid[r] = fork();
        assert_true(pid[r] >= 0);
        if (pid[r] == 0) _exit(tcp_rank(sh, r, R, port, opts));
    }
    /* every child is reaped; one still running at the limit is killed (a hang is a failure) */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int left = R, status[4], hung = 0;
    for (int r = 0; r < R; r++)
        status[r] = -1;
    while (left > 0) {
        for (int r = 0; r < R; r++) {
            if (status[r] != -1) continue;
            int ws;
            pid_t w = waitpid(pid[r], &ws, WNOHANG);
            if (w == pid[r]) {
                status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
                left--;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
        if (left > 0 && ms > TCP_LIMIT_MS && !hung) {
            hung = 1;
            for (int r = 0; r < R; r++)
                if (status[r] == -1) kill(pid[r], SIGKILL);
        }
        if (left > 0) usleep(2000);
    }
    for (int r = 0; r < R; r++)
        if (status[r] != 0)
            fail_msg("tcp R=%d rank %d exited with %d%s: %s", R, r, status[r],
                     hung ? " (killed after the time limit)" : "", sh->msg[r]);
    oracle_result_t *res = alloc_result();
    for (int c = 0; c < o->num_cases; c++) {
        memcpy(res->tokens[c], sh->tokens[c], sizeof(res->tokens[c]));
        memcpy(res->logits[c], sh->logits + (size_t)c * o->new_tokens * o->vocab,
               sizeof(float) * o->new_tokens * o->vocab);
    }
    res->mem = sh->mem[0];
    if (paths) *paths = sh->paths;
    munmap(sh, bytes);
    char what[96];
    snprintf(what, sizeof(what), "%d processes over tcp%s", R, label);
    check_against_reference(res, what);
    check_identical(same, res, what);
    assert_int_equal(res->mem.local_experts, 16 / R);
    free_result(res);
}

static void test_tcp_two_processes(void **state)
{
    (void)state;
    assert_non_null(g_one_rank);
    paths_t p;
    test_tcp(2, &LL_ONLY, g_one_rank, "", &p);
    assert_int_equal(p.ht[0] + p.ht[1], 0);
}

static void test_tcp_four_processes(void **state)
{
    (void)state;
    assert_non_null(g_one_rank);
    test_tcp(4, &LL_ONLY, g_one_rank, "", NULL);
}

/* ---- HT for prefill ------------------------------------------------------------------------ */

static oracle_result_t *g_ht[5]; /* HT_PREFILL runs in threads, by rank count */

/* Every rank took the same path in every step (each counts its own). */
static void check_agreement(const paths_t *p, int R, const char *what)
{
    for (int r = 1; r < R; r++)
        if (p->ll[r] != p->ll[0] || p->ht[r] != p->ht[0])
            fail_msg("%s: rank %d took LL %d and HT %d times, rank 0 %d and %d", what, r, p->ll[r],
                     p->ht[r], p->ll[0], p->ht[0]);
}

static void test_ht(int R)
{
    char what[64];
    snprintf(what, sizeof(what), "%d rank(s), HT prefill", R);
    g_ht[R] = alloc_result();
    paths_t p;
    run_ranks(R, &HT_PREFILL, NULL, g_ht[R], &p);
    check_agreement(&p, R, what);
    /* the prompts go in the first step, through HT (a rank has up to PREFILL tokens); the decode
     * steps (one token per sequence, at most 4 per rank) through LL */
    assert_int_equal(p.ht[0], 1);
    assert_true(p.ll[0] >= g_oracle.new_tokens - 1);
    check_against_reference(g_ht[R], what);
}

static void test_ht_one_rank(void **state)
{
    (void)state;
    test_ht(1);
}

static void test_ht_two_ranks(void **state)
{
    (void)state;
    test_ht(2);
}

static void test_ht_four_ranks(void **state)
{
    (void)state;
    test_ht(4);
}

static void test_ht_tcp(int R)
{
    assert_non_null(g_ht[R]);
    paths_t p;
    test_tcp(R, &HT_PREFILL, g_ht[R], ", HT prefill", &p);
    check_agreement(&p, R, "tcp, HT prefill");
    assert_int_equal(p.ht[0], 1);
}

static void test_ht_tcp_two_processes(void **state)
{
    (void)state;
    test_ht_tcp(2);
}

static void test_ht_tcp_four_processes(void **state)
{
    (void)state;
    test_ht_tcp(4);
}

/* ht_min_tokens 1: every step with a token anywhere goes through HT, decode included. */
static void test_ht_every_step(void **state)
{
    (void)state;
    const oracle_opts_t opts = {.chunk = CHUNK, .prefill = PREFILL, .ht_min = 1};
    oracle_result_t *res = alloc_result();
    paths_t p;
    run_ranks(2, &opts, NULL, res, &p);
    check_agreement(&p, 2, "2 ranks, HT every step");
    assert_int_equal(p.ll[0], 0);
    assert_int_equal(p.ht[0], g_oracle.new_tokens);
    check_against_reference(res, "2 ranks, HT every step");
    free_result(res);
}

/* Staggered arrivals (case c joins at step 3c, case c on rank c % R): a rank prefills a prompt
 * of 11 or 19 tokens while the others decode (or, with 4 ranks, one has nothing yet); the short
 * prompts (6 and 1 tokens) go through LL. */
static void check_mixed(const paths_t *p, int R, const char *what)
{
    check_agreement(p, R, what);
    int decode_only = 0, idle = 0;
    for (int r = 0; r < R; r++) {
        decode_only += p->decode_only[r];
        idle += p->idle[r];
    }
    if (p->ht[0] != 2 || p->ll[0] < 2 || decode_only < R - 1 || (R == 4 && idle < 1))
        fail_msg("%s: HT %d and LL %d steps, %d HT steps with only decode tokens on a rank, %d "
                 "with none: not the mixed steps planned",
                 what, p->ht[0], p->ll[0], decode_only, idle);
}

static const oracle_opts_t MIXED = {.chunk = CHUNK, .prefill = PREFILL, .stagger = 3};

static void test_ht_mixed(int R)
{
    char what[64];
    snprintf(what, sizeof(what), "%d ranks, staggered prompts", R);
    oracle_result_t *res = alloc_result();
    paths_t p;
    run_ranks(R, &MIXED, NULL, res, &p);
    check_mixed(&p, R, what);
    check_against_reference(res, what);
    if (R == 2) {
        paths_t q;
        test_tcp(2, &MIXED, res, ", staggered prompts", &q);
        check_mixed(&q, 2, "2 processes over tcp, staggered prompts");
    }
    free_result(res);
}

static void test_ht_mixed_two_ranks(void **state)
{
    (void)state;
    test_ht_mixed(2);
}

static void test_ht_mixed_four_ranks(void **state)
{
    (void)state;
    test_ht_mixed(4);
}

/* ---- the paged KV cache ------------------------------------------------------------------- */

/* Blocks of one position each: every position in its own block, scattered over the pool. */
static void test_kv_block_size_one(void **state)
{
    (void)state;
    assert_non_null(g_one_rank);
    const oracle_opts_t opts = {.chunk = CHUNK, .kv_block_size = 1};
    oracle_result_t *res = alloc_result();
    run_ranks(2, &opts, NULL, res, NULL);
    check_against_reference(res, "2 ranks, KV blocks of 1 position");
    check_identical(g_one_rank, res, "2 ranks, KV blocks of 1 position");
    assert_int_equal(res->mem.kv_block_size, 1);
    free_result(res);
}

/* Blocks of 16 in a pool of TINY_POOL blocks (or, for longer cases, what the longest needs plus
 * two for the case running beside it), less than the cases need together: staggered cases take
 * the blocks that ended ones gave back (the run checks the pool is whole at the end). */
#define TINY_POOL 5
static void test_kv_tiny_pool(void **state)
{
    (void)state;
    assert_non_null(g_one_rank);
    const oracle_t *o = &g_oracle;
    int need = 0, pool = TINY_POOL; /* blocks of 16 the cases hold at their longest, together */
    for (int c = 0; c < o->num_cases; c++) {
        int n = (o->cases[c].prompt_len + o->new_tokens - 1 + 15) / 16;
        need += n;
        pool = n + 2 > pool ? n + 2 : pool;
    }
    assert_true(need > pool);
    const oracle_opts_t opts = {
        .chunk = CHUNK, .stagger = 10, .kv_block_size = 16, .kv_blocks = pool};
    oracle_result_t *res = alloc_result();
    run_ranks(1, &opts, NULL, res, NULL);
    check_against_reference(res, "1 rank, a tiny pool of KV blocks of 16");
    check_identical(g_one_rank, res, "1 rank, a tiny pool of KV blocks of 16");
    assert_int_equal(res->mem.kv_blocks_total, pool);
    assert_int_equal(res->mem.kv_block_size, 16);
    free_result(res);
}

static int setup(void **state)
{
    (void)state;
    epd_err_t err;
    if (oracle_load(g_dir, &g_oracle, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_one_rank) free_result(g_one_rank);
    for (int r = 0; r < 5; r++)
        if (g_ht[r]) free_result(g_ht[r]);
    oracle_free(&g_oracle);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1) g_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_rank),
        cmocka_unit_test(test_two_ranks),
        cmocka_unit_test(test_four_ranks),
        cmocka_unit_test(test_explicit_placement),
        cmocka_unit_test(test_tcp_two_processes),
        cmocka_unit_test(test_tcp_four_processes),
        cmocka_unit_test(test_ht_one_rank),
        cmocka_unit_test(test_ht_two_ranks),
        cmocka_unit_test(test_ht_four_ranks),
        cmocka_unit_test(test_ht_tcp_two_processes),
        cmocka_unit_test(test_ht_tcp_four_processes),
        cmocka_unit_test(test_ht_every_step),
        cmocka_unit_test(test_ht_mixed_two_ranks),
        cmocka_unit_test(test_ht_mixed_four_ranks),
        cmocka_unit_test(test_kv_block_size_one),
        cmocka_unit_test(test_kv_tiny_pool),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
