/* The paged KV cache's block pool and sequences through the public interface (model.h), on the
 * oracle checkpoint with the cpu backend and one rank: the lowest free block ids go out first,
 * a batch that does not fit fails as a whole (-ENOSPC) without taking a block, truncation gives
 * back whole blocks, destroying a sequence gives back all of its blocks, and blocks_for is the
 * ceiling of len / block size. */
#include "model.h"

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#define BLOCK 4
#define POOL 6

static const epd_sample_params_t GREEDY = {.top_p = 1};

typedef struct fixture {
    ep_inproc_world_t *world;
    ep_group_t *group;
    epd_model_t *m;
} fixture_t;

static int setup(void **state)
{
    static fixture_t f;
    memset(&f, 0, sizeof(f));
    ep_bootstrap_t bs;
    if (ep_inproc_world_create(1, &f.world) != EP_OK) return -1;
    ep_inproc_bootstrap(f.world, 0, &bs);
    ep_config_t c;
    ep_config_init(&c);
    c.num_experts = 16;
    c.hidden = 128;
    c.num_topk = 4;
    c.ll_max_tokens = 16;
    if (ep_group_create(&c, &bs, &f.group) != EP_OK) return -1;
    epd_model_opts_t o = {.dir = EPD_ORACLE_DIR,
                          .group = f.group,
                          .max_seq_len = 64,
                          .kv_block_size = BLOCK,
                          .kv_blocks = POOL};
    epd_err_t err;
    if (epd_model_load(&o, &f.m, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    epd_model_destroy(f->m);
    ep_group_destroy(f->group);
    ep_inproc_world_destroy(f->world);
    return 0;
}

/* Appends n tokens to s (one item). */
static int feed(epd_model_t *m, epd_seq_t *s, int n, epd_err_t *err)
{
    int32_t toks[16];
    for (int i = 0; i < n; i++)
        toks[i] = 5 + i;
    epd_batch_item_t it = {
        .seq = s, .tokens = toks, .num_tokens = n, .want_logits = 1, .sample = GREEDY};
    int32_t next;
    return epd_model_forward(m, &it, 1, &next, NULL, err);
}

static void test_blocks_for(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(epd_model_kv_block_size(f->m), BLOCK);
    assert_int_equal(epd_model_kv_blocks_total(f->m), POOL);
    assert_int_equal(epd_model_kv_blocks_free(f->m), POOL);
    static const int lens[][2] = {{0, 0}, {1, 1}, {3, 1}, {4, 1}, {5, 2}, {8, 2}, {9, 3}};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
        assert_int_equal(epd_model_kv_blocks_for(f->m, lens[i][0]), lens[i][1]);
    epd_model_mem_t mem;
    epd_model_mem(f->m, &mem);
    /* 3 layers, K and V, BLOCK positions of 2 kv heads of 32 fp32 */
    assert_int_equal(mem.kv_block_bytes, 3 * 2 * BLOCK * 2 * 32 * 4);
    assert_int_equal(mem.kv_blocks_total, POOL);
    assert_int_equal(mem.kv_block_size, BLOCK);
}

/* Grows, truncates and destroys sequences, watching the free count; the block ids themselves
 * are seen through the attention: a sequence's result must not change with its blocks' ids. */
static void test_take_and_give_back(void **state)
{
    fixture_t *f = *state;
    epd_err_t err;
    epd_seq_t *a, *b, *c;
    assert_int_equal(epd_seq_create(f->m, &a, &err), 0);
    assert_int_equal(epd_seq_create(f->m, &b, &err), 0);
    assert_int_equal(epd_seq_create(f->m, &c, &err), 0);
    assert_int_equal(epd_seq_blocks(a), 0);
    assert_int_equal(epd_seq_bytes(a), 0);

    assert_int_equal(feed(f->m, a, 5, &err), 0); /* 2 blocks */
    assert_int_equal(epd_seq_blocks(a), 2);
    assert_int_equal(epd_model_kv_blocks_free(f->m), POOL - 2);
    assert_int_equal(feed(f->m, a, 3, &err), 0); /* 8 positions: still 2 */
    assert_int_equal(epd_seq_blocks(a), 2);
    assert_int_equal(feed(f->m, b, 9, &err), 0); /* 3 blocks */
    assert_int_equal(epd_model_kv_blocks_free(f->m), POOL - 5);

    /* 2 blocks wanted, 1 free: refused whole, nothing taken, the length unchanged */
    assert_int_equal(feed(f->m, c, 5, &err), -ENOSPC);
    assert_non_null(strstr(err.msg, "KV cache: the batch needs 2 more blocks, 1 free of 6"));
    assert_int_equal(epd_seq_len(c), 0);
    assert_int_equal(epd_seq_blocks(c), 0);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 1);

    /* all or nothing over the batch: a fits (no new block), c does not */
    int32_t t1[1] = {7}, t5[5] = {1, 2, 3, 4, 5};
    epd_batch_item_t two[2] = {
        {.seq = a, .tokens = t1, .num_tokens = 1},
        {.seq = c, .tokens = t5, .num_tokens = 5},
    };
    assert_int_equal(epd_model_forward(f->m, two, 2, NULL, NULL, &err), -ENOSPC);
    assert_int_equal(epd_seq_len(a), 8);
    assert_int_equal(epd_seq_blocks(a), 2);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 1);

    /* truncation: whole blocks past the new length go back, a partial one stays */
    epd_seq_truncate(b, 5);
    assert_int_equal(epd_seq_len(b), 5);
    assert_int_equal(epd_seq_blocks(b), 2);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 2);
    epd_seq_truncate(b, 4);
    assert_int_equal(epd_seq_blocks(b), 1);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 3);
    epd_seq_truncate(b, 0);
    assert_int_equal(epd_seq_blocks(b), 0);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 4);

    /* now c fits */
    assert_int_equal(feed(f->m, c, 5, &err), 0);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 2);

    epd_seq_destroy(a);
    assert_int_equal(epd_model_kv_blocks_free(f->m), 4);
    epd_seq_destroy(c);
    epd_seq_destroy(b);
    assert_int_equal(epd_model_kv_blocks_free(f->m), POOL);
}

/* The lowest free ids first, seen through the KV memory the cpu model allocates: storage for
 * blocks 0..cap-1, cap growing 4, 8, 16, ... as higher ids come into use. In a pool of 64 the
 * first blocks handed out are low (storage for 4 blocks, not 64), and blocks given back are
 * handed out again before higher ones. The result does not depend on which blocks a sequence
 * got. */
static void test_lowest_first_and_position_independent(void **state)
{
    fixture_t *f = *state;
    epd_err_t err;
    epd_model_t *m;
    epd_model_opts_t o = {.dir = EPD_ORACLE_DIR,
                          .group = f->group,
                          .max_seq_len = 64,
                          .kv_block_size = BLOCK,
                          .kv_blocks = 64};
    assert_int_equal(epd_model_load(&o, &m, &err), 0);
    epd_model_mem_t mem;
    epd_seq_t *x, *y, *z, *w;
    assert_int_equal(epd_seq_create(m, &x, &err), 0);
    assert_int_equal(epd_seq_create(m, &y, &err), 0);
    assert_int_equal(epd_seq_create(m, &z, &err), 0);
    assert_int_equal(epd_seq_create(m, &w, &err), 0);
    int32_t toks[6] = {11, 22, 33, 44, 55, 66};
    epd_batch_item_t it = {
        .seq = x, .tokens = toks, .num_tokens = 6, .want_logits = 1, .sample = GREEDY};
    float ref[384], got[384];
    int32_t next;
    assert_int_equal(epd_model_forward(m, &it, 1, &next, ref, &err), 0); /* x: 0, 1 */
    epd_model_mem(m, &mem);
    assert_int_equal(mem.kv_bytes, 4 * mem.kv_block_bytes);
    assert_int_equal(feed(m, y, 8, &err), 0); /* y: 2, 3 */
    epd_model_mem(m, &mem);
    assert_int_equal(mem.kv_bytes, 4 * mem.kv_block_bytes);
    epd_seq_destroy(x);                       /* 0, 1 free again */
    assert_int_equal(feed(m, z, 8, &err), 0); /* z: 0, 1 again, not 4, 5 */
    epd_model_mem(m, &mem);
    assert_int_equal(mem.kv_bytes, 4 * mem.kv_block_bytes);
    assert_int_equal(mem.kv_blocks_free, 60);
    /* w gets 4, 5: storage grows to 8 blocks; the same tokens give the same logits */
    it.seq = w;
    assert_int_equal(epd_model_forward(m, &it, 1, &next, got, &err), 0);
    assert_memory_equal(ref, got, sizeof(ref));
    epd_model_mem(m, &mem);
    assert_int_equal(mem.kv_bytes, 8 * mem.kv_block_bytes);
    epd_seq_destroy(y);
    epd_seq_destroy(z);
    epd_seq_destroy(w);
    assert_int_equal(epd_model_kv_blocks_free(m), 64);
    epd_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocks_for),
        cmocka_unit_test(test_take_and_give_back),
        cmocka_unit_test(test_lowest_first_and_position_independent),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
