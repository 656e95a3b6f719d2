/* The model's refusals: checkpoints that do not match their config (a missing expert tensor, a
 * wrong shape), a group that does not match the model, and bad forward calls; a rank with a bad
 * batch still joins the step so that its peers finish theirs instead of timing out. */
#include "model.h"
#include "safetensors.h"
#include "test_util.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

static char *read_all(const char *path, size_t *len)
{
    char *t = NULL;
    epd_err_t err;
    if (epd_read_text_file(path, 64u << 20, &t, len, &err)) fail_msg("%s", err.msg);
    return t;
}

/* A checkpoint directory holding the oracle's weights and a config.json edited by replacing
 * `from` with `to` (NULL: unchanged). */
static char *ckpt_with_config(const char *from, const char *to)
{
    char *dir = make_tmpdir();
    assert_non_null(dir);
    size_t len, wlen;
    char *cfg = read_all(EPD_ORACLE_DIR "/config.json", &len);
    char *w = read_all(EPD_ORACLE_DIR "/model.safetensors", &wlen);
    if (from) {
        char *at = strstr(cfg, from);
        assert_non_null(at);
        char *n = malloc(len + strlen(to) + 1);
        size_t pre = (size_t)(at - cfg);
        memcpy(n, cfg, pre);
        strcpy(n + pre, to);
        strcat(n, at + strlen(from));
        free(cfg);
        cfg = n;
        len = strlen(n);
    }
    assert_int_equal(write_file(dir, "config.json", cfg, len), 0);
    assert_int_equal(write_file(dir, "model.safetensors", w, wlen), 0);
    free(cfg);
    free(w);
    return dir;
}

/* greedy sampling (a zeroed epd_sample_params_t has top_p 0, which is refused) */
static const epd_sample_params_t GREEDY = {.top_p = 1};

static ep_inproc_world_t *g_world; /* of the current one-rank group */

static ep_group_t *one_rank_group_ht(int topk, int max_tokens, int ht_tokens)
{
    ep_inproc_world_t *w;
    assert_int_equal(ep_inproc_world_create(1, &w), EP_OK);
    g_world = w;
    ep_bootstrap_t bs;
    ep_inproc_bootstrap(w, 0, &bs);
    ep_config_t c;
    ep_config_init(&c);
    c.num_experts = 16;
    c.hidden = 128;
    c.num_topk = topk;
    c.ll_max_tokens = max_tokens;
    c.ht_max_tokens = ht_tokens;
    ep_group_t *g = NULL;
    assert_int_equal(ep_group_create(&c, &bs, &g), EP_OK);
    return g;
}

static ep_group_t *one_rank_group(int topk, int max_tokens)
{
    return one_rank_group_ht(topk, max_tokens, 0);
}

static void one_rank_group_destroy(ep_group_t *g)
{
    ep_group_destroy(g);
    ep_inproc_world_destroy(g_world);
    g_world = NULL;
}

static void expect_load_error(const char *dir, ep_group_t *g, int status, const char *expect)
{
    epd_model_opts_t o = {.dir = dir, .group = g};
    epd_model_t *m = (epd_model_t *)0x1;
    epd_err_t err = {0};
    int rc = epd_model_load(&o, &m, &err);
    if (getenv("EPD_TEST_VERBOSE")) printf("  %s\n", err.msg);
    if (rc != status || !strstr(err.msg, expect))
        fail_msg("status %d (expected %d): \"%s\" lacks \"%s\"", rc, status, err.msg, expect);
    assert_null(m);
}

static void test_checkpoint_mismatch(void **state)
{
    (void)state;
    ep_group_t *g = one_rank_group(4, 8);
    /* the experts are 96 wide in the checkpoint */
    char *dir = ckpt_with_config("\"moe_intermediate_size\": 96", "\"moe_intermediate_size\": 64");
    expect_load_error(dir, g, -EINVAL,
                      "tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape [96, 128], "
                      "the config implies [64, 128]");
    rm_tree(dir);
    free(dir);
    /* the embedding's rows are the vocabulary */
    dir = ckpt_with_config("\"vocab_size\": 384", "\"vocab_size\": 400");
    expect_load_error(dir, g, -EINVAL, "tensor 'model.embed_tokens.weight' has shape [384, 128]");
    rm_tree(dir);
    free(dir);
    dir = ckpt_with_config("\"model_type\": \"qwen3_moe\"", "\"model_type\": \"mixtral\"");
    expect_load_error(dir, g, -ENOTSUP, "config.json: model_type: \"mixtral\" is not supported");
    rm_tree(dir);
    free(dir);

    /* a shard index that leaves one expert tensor out */
    dir = ckpt_with_config(NULL, NULL);
    epd_st_file_t *f;
    epd_err_t err;
    assert_int_equal(epd_st_file_open(EPD_ORACLE_DIR "/model.safetensors", &f, &err), 0);
    size_t cap = 1 << 16, o = 0;
    char *idx = malloc(cap);
    o += (size_t)snprintf(idx + o, cap - o, "{\"weight_map\":{");
    for (int i = 0, n = 0; i < epd_st_file_count(f); i++) {
        const char *name = epd_st_file_tensor(f, i)->name;
        if (!strcmp(name, "model.layers.2.mlp.experts.13.up_proj.weight")) continue;
        o += (size_t)snprintf(idx + o, cap - o, "%s\"%s\":\"model.safetensors\"", n++ ? "," : "",
                              name);
    }
    o += (size_t)snprintf(idx + o, cap - o, "}}");
    epd_st_file_close(f);
    assert_int_equal(write_file(dir, "model.safetensors.index.json", idx, o), 0);
    free(idx);
    expect_load_error(dir, g, -ENOENT,
                      "checkpoint has no tensor 'model.layers.2.mlp.experts.13.up_proj.weight'");
    rm_tree(dir);
    free(dir);
    one_rank_group_destroy(g);

    /* a group for top-2 cannot carry this top-4 model */
    g = one_rank_group(2, 8);
    expect_load_error(EPD_ORACLE_DIR, g, -EINVAL,
                      "EP group (experts 16, hidden 128, top-k 2) does not match the model");
    one_rank_group_destroy(g);
}

static void test_bad_forward_one_rank(void **state)
{
    (void)state;
    ep_group_t *g = one_rank_group(4, 8);
    epd_model_opts_t o = {.dir = EPD_ORACLE_DIR, .group = g, .max_seq_len = 12};
    epd_model_t *m;
    epd_err_t err;
    assert_int_equal(epd_model_load(&o, &m, &err), 0);
    epd_seq_t *s;
    assert_int_equal(epd_seq_create(m, &s, &err), 0);
    int32_t toks[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    float logits[384];

    epd_batch_item_t big = {
        .seq = s, .tokens = toks, .num_tokens = 9, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward(m, &big, 1, NULL, logits, &err), -E2BIG);
    assert_non_null(strstr(err.msg, "more than 8 tokens in one call on rank 0"));
    assert_int_equal(epd_seq_len(s), 0);

    int32_t bad[2] = {5, 384};
    epd_batch_item_t oov = {
        .seq = s, .tokens = bad, .num_tokens = 2, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward(m, &oov, 1, NULL, logits, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "item 0 token 1: id 384 outside the vocabulary (0..383)"));
    assert_int_equal(epd_seq_len(s), 0);

    epd_batch_item_t twice[2] = {{.seq = s, .tokens = toks, .num_tokens = 1},
                                 {.seq = s, .tokens = toks, .num_tokens = 1}};
    assert_int_equal(epd_model_forward(m, twice, 2, NULL, logits, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "items 0 and 1 share a sequence"));

    /* the KV cache bound: 8 + 4 fit in 12, 1 more does not */
    epd_batch_item_t a = {.seq = s, .tokens = toks, .num_tokens = 8};
    assert_int_equal(epd_model_forward(m, &a, 1, NULL, NULL, &err), 0);
    epd_batch_item_t b = {
        .seq = s, .tokens = toks, .num_tokens = 4, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward(m, &b, 1, NULL, logits, &err), 0);
    assert_int_equal(epd_seq_len(s), 12);
    epd_batch_item_t c = {
        .seq = s, .tokens = toks, .num_tokens = 1, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward(m, &c, 1, NULL, logits, &err), -ERANGE);
    assert_non_null(strstr(err.msg, "sequence of 13 tokens exceeds max_seq_len 12"));
    /* truncating frees positions: recomputing the last token gives the same logits */
    float again[384];
    epd_seq_truncate(s, 11);
    epd_batch_item_t d = {
        .seq = s, .tokens = toks + 3, .num_tokens = 1, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward(m, &d, 1, NULL, again, &err), 0);
    assert_memory_equal(logits, again, sizeof(logits));
    /* zero items is a valid step (a rank without work) */
    assert_int_equal(epd_model_forward(m, NULL, 0, NULL, NULL, &err), 0);
    epd_seq_destroy(s);
    epd_model_destroy(m);
    one_rank_group_destroy(g);
}

/* A failed EP exchange is its own status, EPD_EEXCHANGE (the engine re-forms the group on it
 * and on nothing else), on both paths: here the group was aborted before the step. */
static void test_exchange_failure_status(void **state)
{
    (void)state;
    for (int ht = 0; ht <= 1; ht++) {
        ep_group_t *g = one_rank_group_ht(4, 8, ht ? 32 : 0);
        epd_model_opts_t o = {.dir = EPD_ORACLE_DIR, .group = g};
        epd_model_t *m;
        epd_err_t err;
        assert_int_equal(epd_model_load(&o, &m, &err), 0);
        epd_seq_t *s;
        assert_int_equal(epd_seq_create(m, &s, &err), 0);
        int32_t toks[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
        int n = ht ? 16 : 4;
        epd_batch_item_t it = {
            .seq = s, .tokens = toks, .num_tokens = n, .want_logits = 1, .sample = GREEDY};
        int32_t next;
        ep_group_abort(g, -1);
        int rc = epd_model_forward_step(m, &it, 1, n, &next, NULL, &err);
        if (rc != EPD_EEXCHANGE || !strstr(err.msg, ht ? "ep_ht_dispatch" : "ep_ll_dispatch"))
            fail_msg("%s: status %d (expected EPD_EEXCHANGE %d): \"%s\"", ht ? "HT" : "LL", rc,
                     EPD_EEXCHANGE, err.msg);
        assert_string_equal(epd_status_str(rc), epd_status_str(EPD_EEXCHANGE));
        assert_int_equal(epd_seq_len(s), 0);
        epd_seq_destroy(s);
        epd_model_destroy(m);
        one_rank_group_destroy(g);
    }
}

/* The step's path and its bounds: HT above the LL bound, the step's agreed size enforced, a bad
 * ht_min_tokens or an HT bound below the LL one refused at load. */
static void test_step_paths(void **state)
{
    (void)state;
    ep_group_t *g = one_rank_group_ht(4, 8, 6);
    expect_load_error(EPD_ORACLE_DIR, g, -EINVAL, "ht_max_tokens 6 is below its ll_max_tokens 8");
    one_rank_group_destroy(g);
    g = one_rank_group_ht(4, 8, 16);
    epd_model_opts_t o = {
        .dir = EPD_ORACLE_DIR, .group = g, .max_seq_len = 64, .ht_min_tokens = 10};
    epd_model_t *m = NULL;
    epd_err_t err;
    assert_int_equal(epd_model_load(&o, &m, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "ht_min_tokens 10 is not in 1..9"));
    o.ht_min_tokens = 0;
    assert_int_equal(epd_model_load(&o, &m, &err), 0);
    assert_int_equal(epd_model_max_batch_tokens(m), 8);
    assert_int_equal(epd_model_max_prefill_tokens(m), 16);
    assert_int_equal(epd_model_step_path(m, 8), EPD_MOE_LL);
    assert_int_equal(epd_model_step_path(m, 9), EPD_MOE_HT);
    epd_seq_t *s;
    assert_int_equal(epd_seq_create(m, &s, &err), 0);
    int32_t toks[17] = {0};
    for (int i = 0; i < 17; i++)
        toks[i] = 3 * i + 1;
    float logits[384];
    /* more tokens than the step's agreed largest batch */
    epd_batch_item_t it = {
        .seq = s, .tokens = toks, .num_tokens = 12, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward_step(m, &it, 1, 11, NULL, logits, &err), -E2BIG);
    assert_non_null(strstr(err.msg, "more than 11 tokens in one call on rank 0 (item 0; HT step"));
    /* more than the HT bound */
    it.num_tokens = 17;
    assert_int_equal(epd_model_forward_step(m, &it, 1, 17, NULL, logits, &err), -E2BIG);
    assert_non_null(strstr(err.msg, "more than 16 tokens"));
    /* the LL-only form keeps the LL bound */
    it.num_tokens = 12;
    assert_int_equal(epd_model_forward(m, &it, 1, NULL, logits, &err), -E2BIG);
    assert_int_equal(epd_seq_len(s), 0);
    uint64_t counts[2];
    epd_model_path_counts(m, counts); /* a refused batch still joined its step's path */
    assert_int_equal(counts[EPD_MOE_LL], 1);
    assert_int_equal(counts[EPD_MOE_HT], 2);
    /* 12 tokens through HT, then the same 12 by LL in chunks of 8 + 4: the same greedy token,
     * logits within the bf16 rounding of the exchange */
    assert_int_equal(epd_model_forward_step(m, &it, 1, 12, NULL, logits, &err), 0);
    epd_seq_t *s2;
    assert_int_equal(epd_seq_create(m, &s2, &err), 0);
    float ll[384];
    epd_batch_item_t a = {.seq = s2, .tokens = toks, .num_tokens = 8};
    epd_batch_item_t b = {
        .seq = s2, .tokens = toks + 8, .num_tokens = 4, .want_logits = 1, .sample = GREEDY};
    assert_int_equal(epd_model_forward_step(m, &a, 1, 8, NULL, NULL, &err), 0);
    assert_int_equal(epd_model_forward_step(m, &b, 1, 4, NULL, ll, &err), 0);
    epd_model_path_counts(m, counts);
    assert_int_equal(counts[EPD_MOE_LL], 3);
    assert_int_equal(counts[EPD_MOE_HT], 3);
    int am = 0, bm = 0;
    for (int v = 0; v < 384; v++) {
        if (logits[v] > logits[am]) am = v;
        if (ll[v] > ll[bm]) bm = v;
        assert_true(fabsf(logits[v] - ll[v]) < 0.03f);
    }
    assert_int_equal(am, bm);
    epd_seq_destroy(s);
    epd_seq_destroy(s2);
    epd_model_destroy(m);
    one_rank_group_destroy(g);
}

/* Two ranks; rank 0's batch is bad. Both return (no timeout), rank 1 with its logits. */
typedef struct two {
    ep_inproc_world_t *w;
    int rc[2];
    epd_err_t err[2];
    float logits[2][384];
    int len_after[2];
} two_t;

typedef struct two_arg {
    two_t *t;
    int rank;
} two_arg_t;

static void *two_rank(void *p)
{
    two_arg_t *a = p;
    two_t *t = a->t;
    ep_bootstrap_t bs;
    ep_inproc_bootstrap(t->w, a->rank, &bs);
    ep_config_t c;
    ep_config_init(&c);
    c.num_experts = 16;
    c.hidden = 128;
    c.num_topk = 4;
    c.ll_max_tokens = 8;
    c.timeout_ms = 20000;
    ep_group_t *g = NULL;
    epd_model_t *m = NULL;
    epd_seq_t *s = NULL;
    t->rc[a->rank] = -1;
    if (ep_group_create(&c, &bs, &g) != EP_OK) return NULL;
    epd_model_opts_t o = {.dir = EPD_ORACLE_DIR, .group = g};
    if (epd_model_load(&o, &m, &t->err[a->rank]) || epd_seq_create(m, &s, &t->err[a->rank]))
        goto out;
    int32_t good[3] = {7, 8, 9}, bad[3] = {7, -1, 9};
    epd_batch_item_t it = {.seq = s,
                           .tokens = a->rank == 0 ? bad : good,
                           .num_tokens = 3,
                           .want_logits = 1,
                           .sample = GREEDY};
    t->rc[a->rank] = epd_model_forward(m, &it, 1, NULL, t->logits[a->rank], &t->err[a->rank]);
    t->len_after[a->rank] = epd_seq_len(s);
    /* the next step works on both ranks: the failed one left the group in lockstep */
    it.tokens = good;
    int rc = epd_model_forward(m, &it, 1, NULL, t->logits[a->rank], &t->err[a->rank]);
    if (rc) t->rc[a->rank] = rc;
out:
    epd_seq_destroy(s);
    epd_model_destroy(m);
    ep_group_destroy(g);
    return NULL;
}

static void test_bad_rank_joins_step(void **state)
{
    (void)state;
    two_t *t = calloc(1, sizeof(*t));
    assert_int_equal(ep_inproc_world_create(2, &t->w), EP_OK);
    pthread_t th[2];
    two_arg_t args[2] = {{t, 0}, {t, 1}};
    for (int r = 0; r < 2; r++)
        assert_int_equal(pthread_create(&th[r], NULL, two_rank, &args[r]), 0);
    for (int r = 0; r < 2; r++)
        pthread_join(th[r], NULL);
    if (t->rc[0] != -EINVAL || !strstr(t->err[0].msg, "item 0 token 1: id -1"))
        fail_msg("rank 0: %d %s", t->rc[0], t->err[0].msg);
    if (t->rc[1] != 0) fail_msg("rank 1: %d %s", t->rc[1], t->err[1].msg);
    assert_int_equal(t->len_after[0], 0);
    assert_int_equal(t->len_after[1], 3);
    ep_inproc_world_destroy(t->w);
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checkpoint_mismatch),
        cmocka_unit_test(test_bad_forward_one_rank),
        cmocka_unit_test(test_step_paths),
        cmocka_unit_test(test_bad_rank_joins_step),
        cmocka_unit_test(test_exchange_failure_status),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
