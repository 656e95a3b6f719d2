/* The tensor table against the checkpoints themselves: every tensor of the oracle checkpoints
 * (Qwen3-MoE, DeepSeek-V3 and V2; and of the Qwen3-vocabulary one, tied embeddings, two shards)
 * is in the table with its shape and nothing else is (but DeepSeek-V3's multi-token-prediction
 * layer, which loading skips); and the memory estimate of each backend equals sums taken over the
 * checkpoint's own tensors, by name: cpu fp32 for everything, cuda bf16 except the norms and
 * the routers (fp32), a rank holding E/R experts of each MoE layer. */
#include "safetensors.h"
#include "tensors.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* fp32 in the cuda model: norm weights and routers, recognised by their checkpoint names */
static int cuda_keeps_fp32(const char *name)
{
    return ends_with(name, "norm.weight") || ends_with(name, "mlp.gate.weight") ||
           ends_with(name, "e_score_correction_bias");
}

/* the expert id in "...mlp.experts.<e>.<proj>.weight", or -1 */
static int expert_of(const char *name)
{
    const char *p = strstr(name, ".mlp.experts.");
    return p ? atoi(p + strlen(".mlp.experts.")) : -1;
}

static void check_dir(const char *dir)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    epd_hf_config_t cfg;
    epd_err_t err = {0};
    assert_int_equal(epd_hf_config_load(path, &cfg, &err), 0);
    epd_st_ckpt_t *ck = NULL;
    assert_int_equal(epd_st_ckpt_open(dir, &ck, &err), 0);
    epd_tensor_desc_t *t = NULL;
    int n = 0;
    assert_int_equal(epd_tensor_table(&cfg, &t, &n, &err), 0);

    /* every table entry exists with its shape */
    for (int i = 0; i < n; i++) {
        const epd_st_tensor_t *st = epd_st_ckpt_find(ck, t[i].name);
        if (!st) fail_msg("%s: '%s' is in the table, not in the checkpoint", dir, t[i].name);
        assert_int_equal(st->ndim, t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++)
            assert_int_equal(st->shape[d], t[i].shape[d]);
        assert_int_equal(epd_tensor_elems(&t[i]), (size_t)st->numel);
        assert_int_equal(epd_tensor_is_expert(&t[i]), expert_of(t[i].name) >= 0);
    }

    /* per rank count: sums over the checkpoint's tensors, by name */
    for (int r = 1; r <= 4; r *= 2) {
        if (cfg.num_experts % r) continue;
        const int L = cfg.num_experts / r;
        size_t cpu_rep = 0, cpu_exp = 0, cu_rep = 0, cu_exp = 0;
        for (int i = 0; i < n; i++) {
            const epd_st_tensor_t *st = epd_st_ckpt_find(ck, t[i].name);
            size_t el = (size_t)st->numel;
            int e = expert_of(st->name);
            if (e >= 0) {
                if (e < L) { /* rank 0's experts, contiguous placement */
                    cpu_exp += 4 * el;
                    cu_exp += 2 * el;
                }
            } else {
                cpu_rep += 4 * el;
                cu_rep += (cuda_keeps_fp32(st->name) ? 4 : 2) * el;
            }
        }
        epd_model_mem_t mc, mg;
        epd_model_mem_estimate(&cfg, r, EPD_MODEL_CPU, &mc);
        epd_model_mem_estimate(&cfg, r, EPD_MODEL_CUDA, &mg);
        assert_int_equal(mc.replicated_bytes, cpu_rep);
        assert_int_equal(mc.expert_bytes, cpu_exp);
        assert_int_equal(mg.replicated_bytes, cu_rep);
        assert_int_equal(mg.expert_bytes, cu_exp);
        assert_int_equal(mg.local_experts, L);
    }
    free(t);
    epd_st_ckpt_close(ck);
}

/* the layer of "model.layers.<l>.", or -1 */
static int layer_of(const char *name)
{
    return strncmp(name, "model.layers.", 13) == 0 ? atoi(name + 13) : -1;
}

/* the checkpoint's own tensor list, by reading its single file directly */
static void check_complete(const char *dir)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    epd_st_file_t *f = NULL;
    epd_err_t err = {0};
    assert_int_equal(epd_st_file_open(path, &f, &err), 0);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    epd_hf_config_t cfg;
    assert_int_equal(epd_hf_config_load(path, &cfg, &err), 0);
    epd_tensor_desc_t *t = NULL;
    int n = 0, skipped = 0;
    assert_int_equal(epd_tensor_table(&cfg, &t, &n, &err), 0);
    for (int i = 0; i < epd_st_file_count(f); i++) {
        const char *name = epd_st_file_tensor(f, i)->name;
        if (layer_of(name) >= cfg.num_hidden_layers) { /* an MTP layer */
            assert_true(cfg.num_nextn_predict_layers > 0);
            skipped++;
            continue;
        }
        int found = 0;
        for (int j = 0; j < n && !found; j++)
            found = strcmp(t[j].name, name) == 0;
        if (!found) fail_msg("%s: '%s' is in the checkpoint, not in the table", dir, name);
    }
    assert_int_equal(epd_st_file_count(f) - skipped, n);
    assert_int_equal(skipped > 0, cfg.num_nextn_predict_layers > 0);
    free(t);
    epd_st_file_close(f);
}

static void test_oracle_table_is_complete(void **state)
{
    (void)state;
    check_complete(EPD_ORACLE_DIR);
    check_complete(EPD_ORACLE_DIR "_dsv3");
    check_complete(EPD_ORACLE_DIR "_dsv2");
}

static void test_oracle(void **state)
{
    (void)state;
    check_dir(EPD_ORACLE_DIR);
    check_dir(EPD_ORACLE_DIR "_dsv3");
    check_dir(EPD_ORACLE_DIR "_dsv2");
}

static void test_qwen3vocab(void **state)
{
    (void)state;
    check_dir(EPD_QWEN3VOCAB_DIR);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oracle_table_is_complete),
        cmocka_unit_test(test_oracle),
        cmocka_unit_test(test_qwen3vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
