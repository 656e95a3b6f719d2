/* config.json reader: the oracle checkpoint's config (as transformers 5 writes it), a published
 * Qwen3-MoE style config with defaults, and a table of bad configs with their messages. */
#include "hf_config.h"
#include "test_util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

static void test_oracle_config(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err;
    int rc = epd_hf_config_load(EPD_ORACLE_DIR "/config.json", &c, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_string_equal(c.model_type, "qwen3_moe");
    assert_int_equal(c.hidden_size, 128);
    assert_int_equal(c.intermediate_size, 256);
    assert_int_equal(c.moe_intermediate_size, 96);
    assert_int_equal(c.num_hidden_layers, 3);
    assert_int_equal(c.num_attention_heads, 4);
    assert_int_equal(c.num_key_value_heads, 2);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.vocab_size, 384);
    assert_int_equal(c.num_experts, 16); /* written as num_local_experts by transformers 5 */
    assert_int_equal(c.num_experts_per_tok, 4);
    assert_true(c.norm_topk_prob);
    assert_false(c.tie_word_embeddings);
    assert_int_equal(c.decoder_sparse_step, 1);
    assert_int_equal(c.max_position_embeddings, 512);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_true(c.rope_theta == 1e6);
    assert_true(epd_hf_layer_is_moe(&c, 0));
    assert_false(epd_hf_layer_is_moe(&c, 1)); /* mlp_only_layers [1] */
    assert_true(epd_hf_layer_is_moe(&c, 2));
}

/* The shape of a published Qwen3-MoE config.json (num_experts, top-level rope_theta). */
static const char PUBLISHED[] =
    "{\"architectures\":[\"Qwen3MoeForCausalLM\"],\"attention_bias\":false,"
    "\"attention_dropout\":0.0,\"bos_token_id\":151643,\"decoder_sparse_step\":2,"
    "\"eos_token_id\":151645,\"head_dim\":128,\"hidden_act\":\"silu\",\"hidden_size\":2048,"
    "\"initializer_range\":0.02,\"intermediate_size\":6144,\"max_position_embeddings\":40960,"
    "\"max_window_layers\":48,\"mlp_only_layers\":[],\"model_type\":\"qwen3_moe\","
    "\"moe_intermediate_size\":768,\"norm_topk_prob\":true,\"num_attention_heads\":32,"
    "\"num_experts\":128,\"num_experts_per_tok\":8,\"num_hidden_layers\":48,"
    "\"num_key_value_heads\":4,\"output_router_logits\":false,\"rms_norm_eps\":1e-06,"
    "\"rope_scaling\":null,\"rope_theta\":1000000.0,\"router_aux_loss_coef\":0.001,"
    "\"sliding_window\":null,\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"transformers_version\":\"4.51.0\",\"use_cache\":true,\"use_sliding_window\":false,"
    "\"vocab_size\":151936}";

static void test_published_config(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err;
    int rc = epd_hf_config_parse(PUBLISHED, strlen(PUBLISHED), "config.json", &c, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(c.num_experts, 128);
    assert_int_equal(c.num_experts_per_tok, 8);
    assert_int_equal(c.head_dim, 128);
    assert_true(c.rope_theta == 1e6);
    /* decoder_sparse_step 2: layers 1, 3, ... are MoE, the others dense */
    assert_false(epd_hf_layer_is_moe(&c, 0));
    assert_true(epd_hf_layer_is_moe(&c, 1));
    assert_false(epd_hf_layer_is_moe(&c, 46));
    assert_true(epd_hf_layer_is_moe(&c, 47));
}

static void test_defaults(void **state)
{
    (void)state;
    const char *j = "{\"model_type\":\"qwen3_moe\",\"hidden_size\":64,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"vocab_size\":100,\"moe_intermediate_size\":32,"
                    "\"num_experts\":8,\"num_experts_per_tok\":2}";
    epd_hf_config_t c;
    epd_err_t err;
    int rc = epd_hf_config_parse(j, strlen(j), "config.json", &c, &err);
    if (rc) fail_msg("%s", err.msg);
    /* transformers' defaults for the fields left out */
    assert_int_equal(c.num_key_value_heads, 4);
    assert_int_equal(c.head_dim, 16);
    assert_int_equal(c.decoder_sparse_step, 1);
    assert_false(c.norm_topk_prob);
    assert_false(c.tie_word_embeddings);
    assert_true(c.rope_theta == 10000.0);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_int_equal(c.max_position_embeddings, 32768);
}

/* A valid minimal config as key/value pairs; each bad case drops or replaces one key. */
static const char *const BASE[][2] = {
    {"model_type", "\"qwen3_moe\""}, {"hidden_size", "64"}, {"num_hidden_layers", "2"},
    {"num_attention_heads", "4"},    {"vocab_size", "100"}, {"moe_intermediate_size", "32"},
    {"num_experts_per_tok", "2"},    {"num_experts", "8"},
};

static const struct {
    const char *key;   /* the key to change */
    const char *value; /* its new JSON value; NULL: drop the key */
    int status;
    const char *expect;
} BAD[] = {
    {"model_type", NULL, -EINVAL, "config.json: model_type: required field is missing"},
    {"model_type", "\"llama\"", -ENOTSUP, "model_type: \"llama\" is not supported"},
    {"model_type", "7", -ENOTSUP, "model_type: \"(not a string)\""},
    {"num_experts", NULL, -EINVAL, "num_experts: required field is missing"},
    {"num_hidden_layers", NULL, -EINVAL, "num_hidden_layers: required field is missing"},
    {"hidden_size", "\"64\"", -EINVAL, "hidden_size: expected an integer"},
    {"vocab_size", "-5", -EINVAL, "vocab_size: -5 is outside 1.."},
    {"num_experts_per_tok", "2.5", -EINVAL, "num_experts_per_tok: expected an integer"},
    {"num_experts", "1", -EINVAL, "num_experts_per_tok: 2 exceeds num_experts (1)"},
    {"num_key_value_heads", "3", -EINVAL,
     "num_key_value_heads: 3 does not divide num_attention_heads (4)"},
    {"head_dim", "15", -EINVAL, "head_dim: 15 is not a positive even number"},
    {"rms_norm_eps", "0", -EINVAL, "rms_norm_eps: 0 is outside"},
    {"norm_topk_prob", "1", -EINVAL, "norm_topk_prob: expected true or false"},
    {"mlp_only_layers", "[2]", -EINVAL, "mlp_only_layers[0]: expected a layer index in 0..1"},
    {"mlp_only_layers", "7", -EINVAL, "mlp_only_layers: expected an array"},
    {"mlp_only_layers", "[0]", -EINVAL, "intermediate_size: required field is missing"},
    {"decoder_sparse_step", "0", -EINVAL, "decoder_sparse_step: 0 is outside 1.."},
    {"attention_bias", "true", -ENOTSUP, "attention_bias: true is not supported"},
    {"use_sliding_window", "true", -ENOTSUP, "use_sliding_window: true is not supported"},
    {"hidden_act", "\"gelu\"", -ENOTSUP, "hidden_act: only \"silu\""},
    {"rope_scaling", "{\"rope_type\":\"yarn\",\"factor\":4}", -ENOTSUP,
     "rope_scaling.rope_type: only \"default\""},
    {"rope_parameters", "{\"rope_type\":\"linear\",\"rope_theta\":5}", -ENOTSUP,
     "rope_parameters.rope_type: only \"default\""},
    {"num_experts_per_tok", "17", -EINVAL, "num_experts_per_tok: 17 is outside 1..16"},
    {"hidden_size", "64, \"hidden_size\": 32", -EINVAL, "hidden_size: appears twice"},
    {"rope_scaling", "{\"rope_type\":\"default\",\"rope_type\":\"yarn\"}", -EINVAL,
     "rope_scaling.rope_type: appears twice"},
    {"hidden_size", "}", -EINVAL, "not valid JSON (near byte"},
    {"quantization_config", "5", -EINVAL, "config.json: quantization_config: expected an object"},
    {"quantization_config", "{\"quant_method\":\"awq\",\"bits\":4}", -ENOTSUP,
     "quantization_config.quant_method: \"awq\" is not supported"},
    {"quantization_config", "{\"weight_block_size\":[128,128]}", -EINVAL,
     "quantization_config.quant_method: required field is missing"},
    {"quantization_config",
     "{\"quant_method\":\"fp8\",\"fmt\":\"e5m2\",\"weight_block_size\":[1,1]}", -ENOTSUP,
     "quantization_config.fmt: \"e5m2\" is not supported"},
    {"quantization_config",
     "{\"quant_method\":\"fp8\",\"activation_scheme\":\"static\",\"weight_block_size\":[1,1]}",
     -ENOTSUP, "quantization_config.activation_scheme: \"static\" is not supported"},
    {"quantization_config", "{\"quant_method\":\"fp8\"}", -ENOTSUP,
     "quantization_config.weight_block_size: required (per-tensor fp8 scales are not supported)"},
    {"quantization_config", "{\"quant_method\":\"fp8\",\"weight_block_size\":[128]}", -EINVAL,
     "quantization_config.weight_block_size: expected [block_n, block_k]"},
    {"quantization_config", "{\"quant_method\":\"fp8\",\"weight_block_size\":[128,0]}", -EINVAL,
     "quantization_config.weight_block_size[1]: expected a positive integer"},
    {"quantization_config",
     "{\"quant_method\":\"fp8\",\"weight_block_size\":[8,8],\"modules_to_not_convert\":\"lm_"
     "head\"}",
     -EINVAL, "quantization_config.modules_to_not_convert: expected an array"},
    {"quantization_config",
     "{\"quant_method\":\"fp8\",\"weight_block_size\":[8,8],\"modules_to_not_convert\":[\"a|b\"]}",
     -ENOTSUP, "quantization_config.modules_to_not_convert[0]: \"a|b\": only module names"},
    {"quantization_config",
     "{\"quant_method\":\"fp8\",\"weight_block_size\":[8,8],\"kv_cache_scheme\":{}}", -ENOTSUP,
     "quantization_config.kv_cache_scheme: not supported"},
};

static char *build(const char *key, const char *value)
{
    static char buf[2048];
    size_t o = 0;
    int n = 0;
    o += (size_t)snprintf(buf + o, sizeof(buf) - o, "{");
    for (size_t i = 0; i < sizeof(BASE) / sizeof(BASE[0]); i++) {
        if (!strcmp(BASE[i][0], key)) continue;
        o += (size_t)snprintf(buf + o, sizeof(buf) - o, "%s\"%s\":%s", n++ ? "," : "", BASE[i][0],
                              BASE[i][1]);
    }
    if (value)
        o += (size_t)snprintf(buf + o, sizeof(buf) - o, "%s\"%s\":%s", n ? "," : "", key, value);
    snprintf(buf + o, sizeof(buf) - o, "}");
    return buf;
}

/* base (a flat JSON object) with the keys that extra sets removed, then extra added: a config
 * that differs from base in those keys (duplicate keys would be refused). */
static const char *build_from(const char *base, const char *extra)
{
    static char buf[4096];
    /* drop keys of base that extra sets again (a duplicate key is an error) */
    char keys[16][48];
    int nk = 0;
    for (const char *p = extra; (p = strchr(p, '"')) && nk < 16;) {
        const char *e = strchr(p + 1, '"');
        if (!e) break;
        if (e[1] == ':' && (p == extra || p[-1] == ',' || p[-1] == '{')) {
            snprintf(keys[nk], sizeof(keys[nk]), "%.*s", (int)(e - p + 1), p);
            nk++;
        }
        p = e + 1;
    }
    size_t o = 0;
    const char *p = base;
    while (*p && o < sizeof(buf) - 1) {
        int skip = 0;
        for (int k = 0; k < nk && p > base && (p[-1] == '{' || p[-1] == ','); k++)
            if (!strncmp(p, keys[k], strlen(keys[k]))) skip = 1;
        if (!skip) {
            buf[o++] = *p++;
            continue;
        }
        /* skip "key":value up to the next top-level comma (values here hold no commas except
         * inside objects, which are skipped whole) */
        int depth = 0;
        while (*p && (depth > 0 || (*p != ',' && *p != '}'))) {
            if (*p == '{') depth++;
            if (*p == '}') depth--;
            p++;
        }
        if (*p == ',')
            p++;
        else if (o > 0 && buf[o - 1] == ',')
            o--;
    }
    buf[o] = 0;
    if (o > 0 && buf[o - 1] == '}') o--;
    snprintf(buf + o, sizeof(buf) - o, ",%s}", extra);
    return buf;
}

static void test_bad_configs(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err = {0};
    const char *ok = build("", NULL);
    if (epd_hf_config_parse(ok, strlen(ok), "config.json", &c, &err))
        fail_msg("the base config is refused: %s", err.msg);
    for (size_t i = 0; i < sizeof(BAD) / sizeof(BAD[0]); i++) {
        const char *j = build(BAD[i].key, BAD[i].value);
        err.msg[0] = 0;
        int rc = epd_hf_config_parse(j, strlen(j), "config.json", &c, &err);
        if (getenv("EPD_TEST_VERBOSE")) printf("  %s\n", err.msg);
        if (rc != BAD[i].status || !strstr(err.msg, BAD[i].expect))
            fail_msg("case %zu (%s): status %d (expected %d), message \"%s\" lacks \"%s\"", i, j,
                     rc, BAD[i].status, err.msg, BAD[i].expect);
    }
    const char *arr = "[1]";
    assert_int_equal(epd_hf_config_parse(arr, 3, "config.json", &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "config.json: not a JSON object"));
}

/* DeepSeek: the oracle configs (V3 in the hub's key forms, V2 in transformers 5's) and the
 * published DeepSeek-V2-Lite and DeepSeek-V3 configs; the YaRN softmax factor is computed here
 * from its definition, 0.1 * mscale_all_dim * ln(factor) + 1, squared. */
#define DSV3_ORACLE EPD_ORACLE_DIR "_dsv3/config.json"
#define DSV2_ORACLE EPD_ORACLE_DIR "_dsv2/config.json"
static void test_deepseek_configs(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err;
    if (epd_hf_config_load(DSV3_ORACLE, &c, &err)) fail_msg("%s", err.msg);
    assert_int_equal(c.arch, EPD_ARCH_DEEPSEEK_V3);
    assert_true(epd_hf_is_mla(&c));
    assert_int_equal(c.q_lora_rank, 64);
    assert_int_equal(c.kv_lora_rank, 48);
    assert_int_equal(c.qk_nope_head_dim, 32);
    assert_int_equal(c.head_dim, 16); /* the rope part */
    assert_int_equal(c.v_head_dim, 24);
    assert_int_equal(c.num_experts, 16);
    assert_int_equal(c.n_shared_experts, 1);
    assert_int_equal(c.router, EPD_ROUTER_SIGMOID_GROUP);
    assert_true(c.router_bias);
    assert_int_equal(c.n_group, 4);
    assert_int_equal(c.topk_group, 2);
    assert_true(c.routed_scaling_factor == 2.5);
    assert_int_equal(c.num_nextn_predict_layers, 1);
    assert_false(epd_hf_layer_is_moe(&c, 0)); /* first_k_dense_replace 1 */
    assert_true(epd_hf_layer_is_moe(&c, 1));
    assert_true(c.yarn.on && c.yarn.factor == 4.0 && c.yarn.original_max_position_embeddings == 64);
    assert_true(c.yarn.attention_factor == 1.0); /* mscale == mscale_all_dim */
    double m = 0.1 * 1.0 * log(4.0) + 1.0;
    assert_true(fabs(c.attn_scale - m * m / sqrt(48.0)) < 1e-12);
    assert_true(c.rope_interleave);

    if (epd_hf_config_load(DSV2_ORACLE, &c, &err)) fail_msg("%s", err.msg);
    assert_int_equal(c.arch, EPD_ARCH_DEEPSEEK_V2);
    assert_int_equal(c.q_lora_rank, 0); /* null */
    assert_int_equal(c.router, EPD_ROUTER_SOFTMAX_GROUP);
    assert_false(c.router_bias);
    assert_false(c.norm_topk_prob);
    assert_true(c.routed_scaling_factor == 1.5);
    assert_int_equal(c.n_shared_experts, 2);
    assert_true(c.rope_theta == 10000.0); /* inside rope_parameters */
    m = 0.1 * 0.707 * log(4.0) + 1.0;
    assert_true(fabs(c.attn_scale - m * m / sqrt(48.0)) < 1e-12);

    /* published DeepSeek-V2-Lite (hub form: rope_theta + rope_scaling of "type" yarn) */
    static const char v2lite[] =
        "{\"model_type\":\"deepseek_v2\",\"vocab_size\":102400,\"hidden_size\":2048,"
        "\"intermediate_size\":10944,\"moe_intermediate_size\":1408,\"num_hidden_layers\":27,"
        "\"num_attention_heads\":16,\"num_key_value_heads\":16,\"n_shared_experts\":2,"
        "\"n_routed_experts\":64,\"routed_scaling_factor\":1.0,\"kv_lora_rank\":512,"
        "\"q_lora_rank\":null,\"qk_rope_head_dim\":64,\"v_head_dim\":128,"
        "\"qk_nope_head_dim\":128,\"topk_method\":\"greedy\",\"n_group\":1,\"topk_group\":1,"
        "\"num_experts_per_tok\":6,\"moe_layer_freq\":1,\"first_k_dense_replace\":1,"
        "\"norm_topk_prob\":false,\"scoring_func\":\"softmax\",\"aux_loss_alpha\":0.001,"
        "\"seq_aux\":true,\"hidden_act\":\"silu\",\"max_position_embeddings\":163840,"
        "\"initializer_range\":0.02,\"rms_norm_eps\":1e-06,\"use_cache\":true,"
        "\"bos_token_id\":100000,\"eos_token_id\":100001,\"tie_word_embeddings\":false,"
        "\"rope_theta\":10000,\"rope_scaling\":{\"beta_fast\":32,\"beta_slow\":1,"
        "\"factor\":40,\"mscale\":0.707,\"mscale_all_dim\":0.707,"
        "\"original_max_position_embeddings\":4096,\"type\":\"yarn\"},"
        "\"attention_bias\":false,\"attention_dropout\":0.0}";
    if (epd_hf_config_parse(v2lite, strlen(v2lite), "v2-lite", &c, &err)) fail_msg("%s", err.msg);
    assert_int_equal(c.router, EPD_ROUTER_SOFTMAX);
    assert_int_equal(c.num_eos, 1);
    assert_int_equal(c.eos_token_ids[0], 100001);
    assert_int_equal(c.num_experts, 64);
    assert_int_equal(c.num_experts_per_tok, 6);
    assert_int_equal(c.intermediate_size, 10944);
    assert_int_equal(c.q_lora_rank, 0);
    assert_true(c.yarn.factor == 40.0 && c.yarn.attention_factor == 1.0);
    m = 0.1 * 0.707 * log(40.0) + 1.0;
    assert_true(fabs(c.attn_scale - m * m / sqrt(192.0)) < 1e-12);
    /* DeepSeek-V3's own keys on top: sigmoid, noaux_tc, 8 groups, a quantization_config */
    const char *v3 = build_from(v2lite, "\"model_type\":\"deepseek_v3\",\"scoring_func\":"
                                        "\"sigmoid\",\"topk_method\":\"noaux_tc\",\"n_group\":8,"
                                        "\"topk_group\":4,\"num_nextn_predict_layers\":1");
    if (epd_hf_config_parse(v3, strlen(v3), "v3", &c, &err)) fail_msg("%s", err.msg);
    assert_int_equal(c.router, EPD_ROUTER_SIGMOID_GROUP);
    assert_int_equal(c.n_group, 8);
    assert_int_equal(c.topk_group, 4);

    static const struct {
        const char *extra, *expect;
        int status;
    } bad[] = {
        {"\"scoring_func\":\"softmax\",\"model_type\":\"deepseek_v3\"", "scoring_func", -ENOTSUP},
        {"\"topk_method\":\"noaux_tc\"", "topk_method: \"noaux_tc\" is not supported", -ENOTSUP},
        {"\"moe_layer_freq\":2", "moe_layer_freq", -ENOTSUP},
        {"\"quantization_config\":{\"quant_method\":\"fp8\"}", "quantization_config", -ENOTSUP},
        {"\"topk_method\":\"group_limited_greedy\",\"n_group\":3", "n_group", -EINVAL},
        {"\"qk_rope_head_dim\":63", "qk_rope_head_dim: 63 is not even", -EINVAL},
        {"\"rope_scaling\":{\"type\":\"linear\",\"factor\":2}", "rope_type", -ENOTSUP},
        {"\"kv_lora_rank\":0", "kv_lora_rank", -EINVAL},
        {"\"mlp_bias\":true", "mlp_bias", -ENOTSUP},
        {"\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4,\"original_max_position_embeddings\":"
         "64,\"attention_factor\":0}",
         "attention_factor", -EINVAL},
        {"\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4}", "original_max_position_embeddings",
         -EINVAL},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *j = build_from(v2lite, bad[i].extra);
        err.msg[0] = 0;
        int rc = epd_hf_config_parse(j, strlen(j), "config.json", &c, &err);
        if (rc != bad[i].status || !strstr(err.msg, bad[i].expect))
            fail_msg("deepseek case %zu (%s): status %d (expected %d), message \"%s\" lacks \"%s\"",
                     i, bad[i].extra, rc, bad[i].status, err.msg, bad[i].expect);
    }
    /* YaRN stays DeepSeek's: a Qwen3-MoE config with it is refused */
    const char *q = build("rope_scaling", "{\"rope_type\":\"yarn\",\"factor\":4}");
    assert_int_equal(epd_hf_config_parse(q, strlen(q), "config.json", &c, &err), -ENOTSUP);
    assert_non_null(strstr(err.msg, "only \"default\" is supported"));
}

/* DeepSeek-V3's quantization_config, and a Qwen3 -FP8 style one with modules_to_not_convert. */
static void test_fp8_config(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err = {0};
    char j[2048];
    const char *base = build("", NULL);
    snprintf(j, sizeof(j),
             "%.*s,\"quantization_config\":{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\","
             "\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}}",
             (int)strlen(base) - 1, base);
    if (epd_hf_config_parse(j, strlen(j), "config.json", &c, &err)) fail_msg("%s", err.msg);
    assert_true(c.fp8.on);
    assert_int_equal(c.fp8.block_n, 128);
    assert_int_equal(c.fp8.block_k, 128);
    assert_int_equal(c.fp8.n_skip, 0);
    assert_false(epd_hf_fp8_skipped(&c, "lm_head"));
    snprintf(j, sizeof(j),
             "%.*s,\"quantization_config\":{\"quant_method\":\"fp8\",\"weight_block_size\":[64,"
             "32],\"modules_to_not_convert\":[\"lm_head\",\"model.layers.0.mlp.gate\","
             "\"model.layers.*.self_attn.o_proj\",\"model.layers.1\",\"shared_experts\"]}}",
             (int)strlen(base) - 1, base);
    if (epd_hf_config_parse(j, strlen(j), "config.json", &c, &err)) fail_msg("%s", err.msg);
    assert_int_equal(c.fp8.block_n, 64);
    assert_int_equal(c.fp8.block_k, 32);
    assert_int_equal(c.fp8.n_skip, 5);
    static const struct {
        const char *module;
        int skipped;
    } M[] = {
        {"lm_head", 1},
        {"model.layers.0.mlp.gate", 1},
        {"model.layers.0.mlp.gate_proj", 0}, /* not a module under mlp.gate */
        {"model.layers.2.mlp.gate", 0},
        {"model.layers.7.self_attn.o_proj", 1}, /* the wildcard */
        {"model.layers.7.self_attn.q_proj", 0},
        {"model.layers.1.self_attn.q_proj", 1}, /* everything under model.layers.1 */
        {"model.layers.1", 1},
        {"model.layers.12.self_attn.q_proj", 0},          /* bounded at the dot */
        {"model.layers.3.mlp.shared_experts.up_proj", 1}, /* a bare name anywhere in the path */
        {"model.layers.3.mlp.my_shared_experts.up_proj", 0},
    };
    for (size_t i = 0; i < sizeof(M) / sizeof(M[0]); i++)
        if (epd_hf_fp8_skipped(&c, M[i].module) != M[i].skipped)
            fail_msg("%s: skipped %d, expected %d", M[i].module, !M[i].skipped, M[i].skipped);
    /* null: not quantized */
    snprintf(j, sizeof(j), "%.*s,\"quantization_config\":null}", (int)strlen(base) - 1, base);
    if (epd_hf_config_parse(j, strlen(j), "config.json", &c, &err)) fail_msg("%s", err.msg);
    assert_false(c.fp8.on);
}

static void test_missing_file(void **state)
{
    (void)state;
    epd_hf_config_t c;
    epd_err_t err;
    assert_int_equal(epd_hf_config_load("/nonexistent/config.json", &c, &err), -ENOENT);
    assert_non_null(strstr(err.msg, "/nonexistent/config.json: cannot open"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oracle_config), cmocka_unit_test(test_published_config),
        cmocka_unit_test(test_defaults),      cmocka_unit_test(test_bad_configs),
        cmocka_unit_test(test_missing_file),  cmocka_unit_test(test_deepseek_configs),
        cmocka_unit_test(test_fp8_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
