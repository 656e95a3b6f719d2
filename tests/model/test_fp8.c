/* FP8 block-quantized checkpoints (fp8/, made by make_fp8_oracle.py from the oracles' weights):
 * the e4m3 decoding of all 256 codes and the block dequantisation of ragged tensors (NaN codes,
 * subnormal and overflowing products, BF16 scales, row ranges) against the script's own
 * dequantisation, bit for bit; the config and the tensor table of the Qwen3-MoE fixture (which
 * weights are fp8, which stay bf16, the scales' shapes, the memory each backend counts); the
 * checks that tie a checkpoint to its config; and the cpu model on each FP8 checkpoint
 * (Qwen3-MoE, DeepSeek-V3) against the same weights dequantised by the script into an F32/BF16
 * checkpoint: tokens and logits bit-identical, on 1 and 2 ranks, LL and HT. */
#include "oracle_run.h"
#include "safetensors.h"
#include "tensors.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#define DIR EPD_FP8_DIR

static int same_bits(float a, float b)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return memcmp(&a, &b, sizeof a) == 0;
}

static epd_st_file_t *open_unit(void)
{
    epd_st_file_t *f = NULL;
    epd_err_t err = {0};
    if (epd_st_file_open(DIR "/unit.safetensors", &f, &err)) fail_msg("%s", err.msg);
    return f;
}

static const epd_st_tensor_t *need(const epd_st_file_t *f, const char *name)
{
    const epd_st_tensor_t *t = epd_st_file_find(f, name);
    if (!t) fail_msg("unit.safetensors has no '%s'", name);
    return t;
}

static void test_codes(void **state)
{
    (void)state;
    epd_st_file_t *f = open_unit();
    const epd_st_tensor_t *ref = need(f, "codes.ref");
    float want[256];
    epd_st_to_f32(ref, want);
    for (int q = 0; q < 256; q++)
        if (!same_bits(epd_e4m3_to_f32((uint8_t)q), want[q]))
            fail_msg("e4m3 code 0x%02x decodes to %a, the script's value is %a", q,
                     (double)epd_e4m3_to_f32((uint8_t)q), (double)want[q]);
    assert_true(isnan(epd_e4m3_to_f32(0x7f)) && isnan(epd_e4m3_to_f32(0xff)));
    assert_true(epd_e4m3_to_f32(0x7e) == 448.0f && epd_e4m3_to_f32(0x01) == 0x1p-9f);
    assert_true(signbit(epd_e4m3_to_f32(0x80)) && epd_e4m3_to_f32(0x80) == 0.0f);
    epd_st_file_close(f);
}

/* Dequantisation of name.weight (blocks bn x bk) equals name.ref, whole and in row ranges that
 * start inside a block. */
static void check_dequant(const char *name, int bn, int bk, epd_st_dtype_t scale_dtype)
{
    epd_st_file_t *f = open_unit();
    char n[64];
    snprintf(n, sizeof(n), "%s.weight", name);
    const epd_st_tensor_t *w = need(f, n);
    snprintf(n, sizeof(n), "%s.weight_scale_inv", name);
    const epd_st_tensor_t *s = need(f, n);
    snprintf(n, sizeof(n), "%s.ref", name);
    const epd_st_tensor_t *r = need(f, n);
    assert_int_equal(w->dtype, EPD_ST_F8_E4M3);
    assert_int_equal(s->dtype, scale_dtype);
    assert_int_equal(s->shape[0], (w->shape[0] + bn - 1) / bn);
    assert_int_equal(s->shape[1], (w->shape[1] + bk - 1) / bk);
    /* the ragged edges are what this checks */
    assert_true(w->shape[0] % bn != 0 && w->shape[1] % bk != 0);
    const int64_t rows = w->shape[0], cols = w->shape[1];
    float *want = malloc(sizeof(float) * (size_t)(rows * cols));
    float *got = malloc(sizeof(float) * (size_t)(rows * cols));
    epd_st_to_f32(r, want);
    const int64_t ranges[][2] = {{0, rows}, {1, rows - 1}, {rows - 1, 1}, {bn - 1, 2}};
    int nan = 0, sub = 0, inf = 0;
    for (size_t k = 0; k < sizeof(ranges) / sizeof(ranges[0]); k++) {
        const int64_t r0 = ranges[k][0], nr = ranges[k][1];
        if (r0 + nr > rows) continue;
        memset(got, 0x5a, sizeof(float) * (size_t)(nr * cols));
        epd_st_dequant_fp8_rows(w, s, bn, bk, r0, nr, got);
        for (int64_t i = 0; i < nr * cols; i++) {
            const float a = got[i], b = want[r0 * cols + i];
            if (!same_bits(a, b))
                fail_msg("%s: rows %lld+%lld: element [%lld][%lld] is %a, the script's %a", name,
                         (long long)r0, (long long)nr, (long long)(r0 + i / cols),
                         (long long)(i % cols), (double)a, (double)b);
            if (k == 0) {
                nan += isnan(a);
                inf += isinf(a);
                sub += a != 0 && fpclassify(a) == FP_SUBNORMAL;
            }
        }
    }
    if (!strcmp(name, "edge")) /* the special cases are really there */
        assert_true(nan >= 2 && sub >= 1 && inf >= 1);
    free(want);
    free(got);
    epd_st_file_close(f);
}

static void test_dequant_edge(void **state)
{
    (void)state;
    check_dequant("edge", 2, 3, EPD_ST_F32);
}

static void test_dequant_big(void **state)
{
    (void)state;
    check_dequant("big", 16, 16, EPD_ST_F32);
}

static void test_dequant_bf16_scales(void **state)
{
    (void)state;
    check_dequant("bfs", 4, 16, EPD_ST_BF16);
}

static const epd_tensor_desc_t *find_desc(const epd_tensor_desc_t *t, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(t[i].name, name)) return &t[i];
    fail_msg("the table has no '%s'", name);
    return NULL;
}

static void test_table(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err = {0};
    if (epd_hf_config_load(DIR "/qwen3/config.json", &c, &err)) fail_msg("%s", err.msg);
    assert_true(c.fp8.on);
    assert_int_equal(c.fp8.block_n, 40);
    assert_int_equal(c.fp8.block_k, 64);
    assert_int_equal(c.fp8.n_skip, 4);
    epd_tensor_desc_t *t;
    int n;
    if (epd_tensor_table(&c, &t, &n, &err)) fail_msg("%s", err.msg);
    const epd_tensor_desc_t *q = find_desc(t, n, "model.layers.0.self_attn.q_proj.weight");
    assert_true(q->fp8);
    assert_int_equal(q->scale_shape[0], 4); /* 128 / 40 rounded up */
    assert_int_equal(q->scale_shape[1], 2); /* 128 / 64 */
    const epd_tensor_desc_t *e = find_desc(t, n, "model.layers.2.mlp.experts.7.down_proj.weight");
    assert_true(e->fp8 && epd_tensor_cuda_fp8(e));
    assert_int_equal(e->scale_shape[0], 4); /* [128][96]: 128 / 40, 96 / 64 */
    assert_int_equal(e->scale_shape[1], 2);
    /* cuda: 1 byte per fp8 expert weight and 4 per scale; other fp8 weights bf16 on the GPU */
    assert_int_equal(epd_tensor_bytes(e, EPD_MODEL_CUDA), 128 * 96 + 4 * 2 * 4);
    assert_int_equal(epd_tensor_bytes(e, EPD_MODEL_CPU), 128 * 96 * 4);
    assert_int_equal(epd_tensor_bytes(q, EPD_MODEL_CUDA), 128 * 128 * 2);
    assert_false(find_desc(t, n, "model.layers.1.mlp.down_proj.weight")->fp8); /* listed */
    assert_true(find_desc(t, n, "model.layers.1.mlp.up_proj.weight")->fp8);
    assert_false(find_desc(t, n, "model.layers.0.mlp.gate.weight")->fp8);
    assert_false(find_desc(t, n, "model.embed_tokens.weight")->fp8);
    assert_false(find_desc(t, n, "lm_head.weight")->fp8);
    assert_false(find_desc(t, n, "model.layers.0.input_layernorm.weight")->fp8);
    char sn[192];
    epd_tensor_scale_name(e, sn, sizeof(sn));
    assert_string_equal(sn, "model.layers.2.mlp.experts.7.down_proj.weight_scale_inv");
    /* the memory a cuda rank needs: fp8 experts are about half their bf16 bytes */
    epd_model_mem_t m8, m16;
    epd_model_mem_estimate(&c, 1, EPD_MODEL_CUDA, &m8);
    c.fp8.on = 0;
    epd_model_mem_estimate(&c, 1, EPD_MODEL_CUDA, &m16);
    assert_true(m8.expert_bytes * 2 > m16.expert_bytes &&
                m8.expert_bytes * 2 < m16.expert_bytes * 1.01);
    assert_int_equal(m8.replicated_bytes, m16.replicated_bytes);
    free(t);
}

/* Every tensor of `cfg_dir`'s table looked up in `ck_dir`'s checkpoint: the first error. */
static int check_pairing(const char *cfg_dir, const char *ck_dir, epd_err_t *err)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/config.json", cfg_dir);
    epd_hf_config_t c;
    if (epd_hf_config_load(p, &c, err)) fail_msg("%s", err->msg);
    epd_tensor_desc_t *t;
    int n, rc = 0;
    if (epd_tensor_table(&c, &t, &n, err)) fail_msg("%s", err->msg);
    epd_st_ckpt_t *ck;
    if (epd_st_ckpt_open(ck_dir, &ck, err)) fail_msg("%s", err->msg);
    for (int i = 0; i < n && !rc; i++)
        rc = epd_tensor_load_f32(ck, &t[i], NULL, err);
    epd_st_ckpt_close(ck);
    free(t);
    return rc;
}

static void test_pairing_errors(void **state)
{
    (void)state;
    epd_err_t err = {0};
    assert_int_equal(check_pairing(DIR "/qwen3", DIR "/qwen3", &err), 0);
    assert_int_equal(check_pairing(DIR "/dsv3", DIR "/dsv3", &err), 0);
    /* an fp8 config over the dequantised weights, and the other way round */
    assert_int_equal(check_pairing(DIR "/qwen3", DIR "/qwen3_ref", &err), -EINVAL);
    assert_non_null(strstr(err.msg, "qwen3_ref/model.safetensors: tensor "
                                    "'model.layers.0.self_attn.q_proj.weight' is F32, but "
                                    "config.json's quantization_config (fp8) makes it F8_E4M3"));
    assert_int_equal(check_pairing(DIR "/qwen3_ref", DIR "/qwen3", &err), -EINVAL);
    assert_non_null(strstr(err.msg, "qwen3/model.safetensors: tensor "
                                    "'model.layers.0.self_attn.q_proj.weight' is F8_E4M3, but "
                                    "config.json's quantization_config does not quantize it"));
    /* other block sizes imply other scale shapes */
    epd_hf_config_t c;
    if (epd_hf_config_load(DIR "/qwen3/config.json", &c, &err)) fail_msg("%s", err.msg);
    c.fp8.block_n = 20;
    epd_tensor_desc_t *t;
    int n;
    if (epd_tensor_table(&c, &t, &n, &err)) fail_msg("%s", err.msg);
    epd_st_ckpt_t *ck;
    if (epd_st_ckpt_open(DIR "/qwen3", &ck, &err)) fail_msg("%s", err.msg);
    const epd_tensor_desc_t *q = find_desc(t, n, "model.layers.0.self_attn.q_proj.weight");
    assert_int_equal(epd_tensor_load_f32(ck, q, NULL, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "qwen3/model.safetensors: tensor "
                                    "'model.layers.0.self_attn.q_proj.weight_scale_inv' has shape "
                                    "[4, 2], the config implies [7, 2]"));
    epd_st_ckpt_close(ck);
    free(t);
}

/* ---- the model: FP8 checkpoint against the script's dequantisation ------------------------ */

#define NEW 6
static const int PROMPT_LEN[] = {5, 12, 21};

static void make_oracle(oracle_t *o, int vocab)
{
    memset(o, 0, sizeof(*o));
    o->num_cases = (int)(sizeof(PROMPT_LEN) / sizeof(PROMPT_LEN[0]));
    o->new_tokens = NEW;
    o->vocab = vocab;
    for (int c = 0; c < o->num_cases; c++) {
        o->cases[c].prompt_len = PROMPT_LEN[c];
        for (int i = 0; i < PROMPT_LEN[c]; i++)
            o->cases[c].prompt[i] = (int32_t)(2 + (i * 37 + c * 101 + 11) % (vocab - 2));
    }
}

typedef struct run {
    int32_t tokens[ORACLE_MAX_CASES][ORACLE_MAX_NEW];
    float *logits[ORACLE_MAX_CASES];
    epd_model_mem_t mem;
} run_t;

static void run(const char *dir, const oracle_t *o, int R, const oracle_opts_t *opts, run_t *out)
{
    oracle_result_t *res = calloc(ORACLE_MAX_RANKS, sizeof(*res));
    int rc[ORACLE_MAX_RANKS] = {0};
    epd_err_t err[ORACLE_MAX_RANKS];
    memset(err, 0, sizeof(err));
    for (int c = 0; c < o->num_cases; c++) {
        out->logits[c] = calloc((size_t)o->vocab * NEW, sizeof(float));
        for (int r = 0; r < R; r++)
            res[r].logits[c] = out->logits[c];
    }
    assert_int_equal(oracle_run_threads(dir, o, R, NULL, opts, res, rc, err), 0);
    for (int r = 0; r < R; r++)
        if (rc[r]) fail_msg("%s, %d ranks: rank %d: %s", dir, R, r, err[r].msg);
    for (int c = 0; c < o->num_cases; c++)
        memcpy(out->tokens[c], res[c % R].tokens[c], sizeof(out->tokens[c]));
    out->mem = res[0].mem;
    free(res);
}

static void free_run(const oracle_t *o, run_t *r)
{
    for (int c = 0; c < o->num_cases; c++)
        free(r->logits[c]);
}

static void check_model(const char *name, int vocab)
{
    char fp8[512], ref[512];
    snprintf(fp8, sizeof(fp8), "%s/%s", DIR, name);
    snprintf(ref, sizeof(ref), "%s/%s_ref", DIR, name);
    oracle_t o;
    make_oracle(&o, vocab);
    const oracle_opts_t ll = {.chunk = 8}, ht = {.chunk = 8, .prefill = 32};
    const struct {
        int R;
        const oracle_opts_t *opts;
        const char *what;
    } runs[] = {{1, &ll, "1 rank, LL"}, {2, &ll, "2 ranks, LL"}, {2, &ht, "2 ranks, HT prefill"}};
    for (size_t k = 0; k < sizeof(runs) / sizeof(runs[0]); k++) {
        run_t a = {0}, b = {0};
        run(fp8, &o, runs[k].R, runs[k].opts, &a);
        run(ref, &o, runs[k].R, runs[k].opts, &b);
        for (int c = 0; c < o.num_cases; c++) {
            if (memcmp(a.tokens[c], b.tokens[c], sizeof(int32_t) * NEW))
                fail_msg("%s, %s: case %d: greedy tokens differ from the dequantised checkpoint's",
                         name, runs[k].what, c);
            for (int i = 0; i < vocab * NEW; i++)
                if (!same_bits(a.logits[c][i], b.logits[c][i]))
                    fail_msg("%s, %s: case %d step %d logit %d: %a, the dequantised checkpoint's "
                             "%a",
                             name, runs[k].what, c, i / vocab, i % vocab, (double)a.logits[c][i],
                             (double)b.logits[c][i]);
        }
        /* the cpu model holds fp32 either way */
        assert_int_equal(a.mem.expert_bytes, b.mem.expert_bytes);
        assert_int_equal(a.mem.replicated_bytes, b.mem.replicated_bytes);
        free_run(&o, &a);
        free_run(&o, &b);
    }
}

static void test_model_qwen3(void **state)
{
    (void)state;
    check_model("qwen3", 384);
}

static void test_model_dsv3(void **state)
{
    (void)state;
    check_model("dsv3", 384);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_codes),       cmocka_unit_test(test_dequant_edge),
        cmocka_unit_test(test_dequant_big), cmocka_unit_test(test_dequant_bf16_scales),
        cmocka_unit_test(test_table),       cmocka_unit_test(test_pairing_errors),
        cmocka_unit_test(test_model_qwen3), cmocka_unit_test(test_model_dsv3),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
