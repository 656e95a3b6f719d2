/* Failures across processes over the tcp wire: a rank SIGKILLed between steps makes the next op
 * of every other rank fail (EP_ERR_PEER or EP_ERR_TIMEOUT) naming it, within the configured
 * timeout, and later ops fail fast too; a rank that stops (SIGSTOP, its connections stay open)
 * makes the next op time out naming it; a rank whose config differs (hidden, or another setting
 * that must agree) makes ep_group_create fail on every rank with a message naming it. */
#include "harness.h"
#include "fork_world.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "rank %d: %s:%d: ", world_rank, __FILE__, __LINE__);                       \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        rc = 1;                                                                                    \
        goto out;                                                                                  \
    } while (0)

/* ---- a rank killed between steps ---------------------------------------------------------- */

enum next_op { NEXT_LL_DISPATCH, NEXT_LL_COMBINE, NEXT_HT_DISPATCH };

struct kill_case {
    int R, victim, steps; /* the victim dies after `steps` good LL steps */
    enum next_op next;
    unsigned timeout_ms;
    int stop; /* the victim stops (SIGSTOP) instead of dying: the others must time out */
};

#define E_PER_RANK 4
#define HIDDEN 256
#define TOPK 4
#define MAX_T 8
/* Slack over timeout_ms for a failing op on a loaded machine (scheduling, not waiting). */
#define SLACK_MS 1500

struct bufs {
    uint16_t x[MAX_T * HIDDEN], out[MAX_T * HIDDEN];
    int32_t idx[MAX_T * TOPK];
    float w[MAX_T * TOPK];
    uint16_t *y;
};

static void gen(int rank, int step, int R, struct bufs *b)
{
    rng_t r = {(uint64_t)rank * 1000003u + (uint64_t)step};
    for (int i = 0; i < MAX_T * HIDDEN; i++)
        b->x[i] = rand_bf16(&r, -3, 3);
    for (int t = 0; t < MAX_T; t++)
        for (int j = 0; j < TOPK; j++) {
            /* distinct experts: one per slot from disjoint ranges when possible */
            int E = R * E_PER_RANK;
            b->idx[t * TOPK + j] = (rng_int(&r, 0, E / TOPK - 1) * TOPK + j) % E;
            b->w[t * TOPK + j] = rng_float(&r);
        }
}

/* The message must name the victim as the peer, not merely as the speaker. */
static int names_peer(const char *msg, int me, int victim)
{
    char self[24], other[24];
    snprintf(self, sizeof self, "rank %d:", me);
    snprintf(other, sizeof other, "rank %d", victim);
    const char *p = strncmp(msg, self, strlen(self)) == 0 ? msg + strlen(self) : msg;
    for (const char *q = strstr(p, other); q; q = strstr(q + 1, other))
        if (q[strlen(other)] < '0' || q[strlen(other)] > '9') return 1;
    return 0;
}

static int kill_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    const struct kill_case *c = arg;
    int rc = 0, L = E_PER_RANK;
    ep_group_t *g = NULL;
    ep_ht_handle_t *hd = NULL;
    struct bufs *b = calloc(1, sizeof *b);
    ep_ht_dispatch_out_t ho = {.capacity = MAX_T * nranks};
    ho.recv_x = malloc((size_t)MAX_T * nranks * HIDDEN * 2);
    ho.recv_topk_idx = malloc(sizeof(int32_t) * MAX_T * nranks * TOPK);
    ho.recv_topk_weights = malloc(sizeof(float) * MAX_T * nranks * TOPK);
    ho.num_recv_per_expert = malloc(sizeof(int32_t) * L);
    if (!b || !(b->y = calloc((size_t)L * MAX_T * nranks * HIDDEN, 2)) || !ho.recv_x ||
        !ho.recv_topk_idx || !ho.recv_topk_weights || !ho.num_recv_per_expert)
        FAIL("out of memory");

    ep_config_t cfg;
    world_ep_config(&cfg, E_PER_RANK * nranks, HIDDEN, TOPK, MAX_T, MAX_T, c->timeout_ms);
    ep_status_t st = ep_group_create(&cfg, bs, &g);
    if (st) FAIL("ep_group_create: %s: %s", ep_strerror(st), ep_group_last_error(NULL));

    ep_ll_dispatch_out_t dout;
    ep_ll_handle_t *h = NULL;
    for (int step = 0; step < c->steps; step++) {
        gen(rank, step, nranks, b);
        ep_ll_dispatch_args_t da = {
            .x = b->x, .num_tokens = MAX_T, .topk_idx = b->idx, .topk_weights = b->w};
        if ((st = ep_ll_dispatch(g, &da, &dout, &h, NULL)))
            FAIL("step %d dispatch: %s: %s", step, ep_strerror(st), ep_group_last_error(g));
        ep_ll_combine_args_t ca = {
            .handle = h, .expert_y = b->y, .topk_idx = b->idx, .topk_weights = b->w, .out = b->out};
        if ((st = ep_ll_combine(g, &ca, NULL)))
            FAIL("step %d combine: %s: %s", step, ep_strerror(st), ep_group_last_error(g));
    }
    if (c->next == NEXT_LL_COMBINE) {
        /* The victim dies between a dispatch and its combine. */
        gen(rank, c->steps, nranks, b);
        ep_ll_dispatch_args_t da = {
            .x = b->x, .num_tokens = MAX_T, .topk_idx = b->idx, .topk_weights = b->w};
        if ((st = ep_ll_dispatch(g, &da, &dout, &h, NULL)))
            FAIL("last dispatch: %s: %s", ep_strerror(st), ep_group_last_error(g));
    }
    /* Every rank has finished its steps (so the victim's data of those steps has arrived)
     * before the victim dies. */
    int brc = bs->barrier(bs->ctx, 10000);
    if (brc) FAIL("barrier before the kill: %d: %s", brc, ep_tcp_bootstrap_last_error());
    if (rank == c->victim) raise(c->stop ? SIGSTOP : SIGKILL);

    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t t0 = world_now_ms();
        const char *what = "";
        if (c->next == NEXT_LL_DISPATCH || attempt == 1) {
            ep_ll_dispatch_args_t da = {
                .x = b->x, .num_tokens = MAX_T, .topk_idx = b->idx, .topk_weights = b->w};
            st = ep_ll_dispatch(g, &da, &dout, &h, NULL);
            what = "ep_ll_dispatch";
        } else if (c->next == NEXT_LL_COMBINE) {
            ep_ll_combine_args_t ca = {.handle = h,
                                       .expert_y = b->y,
                                       .topk_idx = b->idx,
                                       .topk_weights = b->w,
                                       .out = b->out};
            st = ep_ll_combine(g, &ca, NULL);
            what = "ep_ll_combine";
        } else {
            ep_ht_dispatch_args_t a = {
                .x = b->x, .num_tokens = MAX_T, .topk_idx = b->idx, .topk_weights = b->w};
            st = ep_ht_dispatch(g, &a, &ho, &hd);
            what = "ep_ht_dispatch";
        }
        uint64_t took = world_now_ms() - t0;
        const char *msg = ep_group_last_error(g);
        int peer = ep_group_failed_peer(g);
        if (attempt == 0)
            printf("rank %d: %s after rank %d %s: %s in %llu ms: %s\n", rank, what, c->victim,
                   c->stop ? "stopped" : "was killed", ep_strerror(st), (unsigned long long)took,
                   msg);
        if (c->stop && attempt == 0 && st != EP_ERR_TIMEOUT)
            FAIL("%s after rank %d stopped returned %d (%s), want EP_ERR_TIMEOUT", what, c->victim,
                 st, ep_strerror(st));
        if (c->stop && attempt == 0 && took + 5 < c->timeout_ms)
            FAIL("%s timed out after %llu ms, before the timeout of %u ms", what,
                 (unsigned long long)took, c->timeout_ms);
        if (st != EP_ERR_PEER && st != EP_ERR_TIMEOUT)
            FAIL("%s (attempt %d) after rank %d died returned %d (%s), want EP_ERR_PEER or "
                 "EP_ERR_TIMEOUT",
                 what, attempt, c->victim, st, ep_strerror(st));
        if (peer != c->victim)
            FAIL("%s (attempt %d): ep_group_failed_peer %d, want %d (%s)", what, attempt, peer,
                 c->victim, msg);
        if (!names_peer(msg, rank, c->victim))
            FAIL("%s (attempt %d): the message does not name rank %d: %s", what, attempt, c->victim,
                 msg);
        if (took > c->timeout_ms + SLACK_MS)
            FAIL("%s (attempt %d) took %llu ms, more than the timeout %u ms", what, attempt,
                 (unsigned long long)took, c->timeout_ms);
    }
out:
    ep_ht_handle_destroy(hd);
    ep_group_destroy(g);
    if (b) free(b->y);
    free(b);
    free(ho.recv_x);
    free(ho.recv_topk_idx);
    free(ho.recv_topk_weights);
    free(ho.num_recv_per_expert);
    return rc;
}

static void run_kill(const struct kill_case *c)
{
    int status[EP_MAX_RANKS];
    printf("%s case: R=%d victim=%d after %d steps, next op %d, timeout %u ms\n",
           c->stop ? "stop" : "kill", c->R, c->victim, c->steps, (int)c->next, c->timeout_ms);
    world_run_ep_reap(c->R, kill_rank, (void *)c, 20000, c->stop ? c->victim : -1, status);
    for (int r = 0; r < c->R; r++) {
        int want = r == c->victim ? WORLD_SIGNALED(SIGKILL) : 0;
        if (status[r] != want)
            fprintf(stderr, "rank %d ended with status %d, want %d\n", r, status[r], want);
        assert_int_equal(status[r], want);
    }
}

static void kill_last_of_two_before_dispatch(void **state)
{
    (void)state;
    struct kill_case c = {
        .R = 2, .victim = 1, .steps = 3, .next = NEXT_LL_DISPATCH, .timeout_ms = 3000};
    run_kill(&c);
}

static void kill_root_of_three_before_combine(void **state)
{
    (void)state;
    /* Rank 0 also hosts the bootstrap: the data plane must not depend on it. */
    struct kill_case c = {
        .R = 3, .victim = 0, .steps = 2, .next = NEXT_LL_COMBINE, .timeout_ms = 3000};
    run_kill(&c);
}

static void kill_middle_of_four_before_ht(void **state)
{
    (void)state;
    struct kill_case c = {
        .R = 4, .victim = 2, .steps = 4, .next = NEXT_HT_DISPATCH, .timeout_ms = 3000};
    run_kill(&c);
}

static void stop_last_of_three_before_dispatch(void **state)
{
    (void)state;
    struct kill_case c = {
        .R = 3, .victim = 2, .steps = 2, .next = NEXT_LL_DISPATCH, .timeout_ms = 1000, .stop = 1};
    run_kill(&c);
}

static void stop_root_of_two_before_ht(void **state)
{
    (void)state;
    struct kill_case c = {
        .R = 2, .victim = 0, .steps = 1, .next = NEXT_HT_DISPATCH, .timeout_ms = 1000, .stop = 1};
    run_kill(&c);
}

/* ---- a rank with a mismatched config ------------------------------------------------------- */

struct mismatch_case {
    int R, odd;          /* rank `odd` differs */
    const char *field;   /* "hidden", "num_topk", ... as named in the message */
    int base, other;     /* the field's value on the other ranks and on rank `odd` */
    unsigned timeout_ms; /* ep_group_create must fail within it */
};

static int mismatch_rank(int rank, int nranks, const ep_bootstrap_t *bs, void *arg)
{
    const struct mismatch_case *c = arg;
    int rc = 0, v = rank == c->odd ? c->other : c->base;
    ep_group_t *g = NULL;
    ep_config_t cfg;
    world_ep_config(&cfg, 4 * nranks, 256, 2, 8, 8, c->timeout_ms);
    if (!strcmp(c->field, "hidden"))
        cfg.hidden = v;
    else if (!strcmp(c->field, "num_topk"))
        cfg.num_topk = v;
    else if (!strcmp(c->field, "ll_max_tokens"))
        cfg.ll_max_tokens = v;
    else
        FAIL("unknown field %s", c->field);

    uint64_t t0 = world_now_ms();
    ep_status_t st = ep_group_create(&cfg, bs, &g);
    uint64_t took = world_now_ms() - t0;
    const char *msg = ep_group_last_error(NULL);
    int peer = ep_group_failed_peer(NULL);
    printf("rank %d: ep_group_create with %s %d: %s in %llu ms: %s\n", rank, c->field, v,
           ep_strerror(st), (unsigned long long)took, msg);
    if (st == EP_OK) FAIL("ep_group_create succeeded although %s differs", c->field);
    if (st != EP_ERR_INVALID) FAIL("ep_group_create returned %d (%s)", st, ep_strerror(st));
    char want[128];
    snprintf(want, sizeof want, "config.%s differs", c->field);
    if (!strstr(msg, want)) FAIL("the message does not say '%s': %s", want, msg);
    /* Every rank names the odd one with its value; the odd one names a rank with the common
     * value. */
    snprintf(want, sizeof want, "rank %d has %d", c->odd, c->other);
    if (!strstr(msg, want)) FAIL("the message does not say '%s': %s", want, msg);
    if (rank == c->odd) {
        if (peer < 0 || peer == c->odd || peer >= nranks)
            FAIL("ep_group_failed_peer %d on the odd rank", peer);
        snprintf(want, sizeof want, "rank %d has %d", peer, c->base);
        if (!strstr(msg, want)) FAIL("the message does not say '%s': %s", want, msg);
    } else if (peer != c->odd) {
        FAIL("ep_group_failed_peer %d, want %d", peer, c->odd);
    }
    if (took > c->timeout_ms + SLACK_MS)
        FAIL("ep_group_create took %llu ms, more than the timeout %u ms", (unsigned long long)took,
             c->timeout_ms);
out:
    ep_group_destroy(g);
    return rc;
}

static void run_mismatch(const struct mismatch_case *c)
{
    int status[EP_MAX_RANKS];
    printf("mismatch case: R=%d, rank %d has %s %d, the others %d\n", c->R, c->odd, c->field,
           c->other, c->base);
    assert_int_equal(world_run_ep(c->R, mismatch_rank, (void *)c, 20000, status), 0);
}

static void mismatched_hidden(void **state)
{
    (void)state;
    struct mismatch_case two = {2, 1, "hidden", 256, 384, 3000};
    run_mismatch(&two);
    struct mismatch_case four = {4, 2, "hidden", 256, 128, 3000};
    run_mismatch(&four);
}

static void mismatched_topk_and_ll_tokens(void **state)
{
    (void)state;
    struct mismatch_case topk = {3, 0, "num_topk", 2, 3, 3000};
    run_mismatch(&topk);
    struct mismatch_case ll = {3, 2, "ll_max_tokens", 8, 9, 3000};
    run_mismatch(&ll);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(kill_last_of_two_before_dispatch),
        cmocka_unit_test(kill_root_of_three_before_combine),
        cmocka_unit_test(kill_middle_of_four_before_ht),
        cmocka_unit_test(stop_last_of_three_before_dispatch),
        cmocka_unit_test(stop_root_of_two_before_ht),
        cmocka_unit_test(mismatched_hidden),
        cmocka_unit_test(mismatched_topk_and_ll_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
