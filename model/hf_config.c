/* config.json reader for model_type qwen3_moe, deepseek_v2 and deepseek_v3: required fields,
 * transformers' defaults for the optional ones, range checks, YaRN, and refusal of features this
 * model code does not implement (naming the key). */
#include "hf_config.h"
#include "safetensors.h"
#include "epd_json.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EPD_HF_MAX_CONFIG_BYTES (4u * 1024u * 1024u)
/* libep carries at most this many experts per token (EP_MAX_TOPK in ep.h). */
#define EPD_HF_MAX_TOPK 16

static const cJSON *field(const cJSON *root, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(root, name);
}

/* Integer field in [lo, hi]. Missing: *out = def if !required, else an error. */
static int get_int(const cJSON *root, const char *origin, const char *name, int required, int def,
                   long lo, long hi, int *out, epd_err_t *err)
{
    const cJSON *v = field(root, name);
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return epd_err_set(err, -EINVAL, "%s: %s: required field is missing", origin, name);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return epd_err_set(err, -EINVAL, "%s: %s: expected an integer", origin, name);
    if (v->valuedouble < (double)lo || v->valuedouble > (double)hi)
        return epd_err_set(err, -EINVAL, "%s: %s: %.17g is outside %ld..%ld", origin, name,
                           v->valuedouble, lo, hi);
    *out = (int)v->valuedouble;
    return 0;
}

static int get_double(const cJSON *root, const char *origin, const char *name, double def,
                      double lo, double hi, double *out, epd_err_t *err)
{
    const cJSON *v = field(root, name);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v))
        return epd_err_set(err, -EINVAL, "%s: %s: expected a number", origin, name);
    if (!(v->valuedouble > lo && v->valuedouble <= hi))
        return epd_err_set(err, -EINVAL, "%s: %s: %.17g is outside (%g, %g]", origin, name,
                           v->valuedouble, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *root, const char *origin, const char *name, int def, int *out,
                    epd_err_t *err)
{
    const cJSON *v = field(root, name);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return epd_err_set(err, -EINVAL, "%s: %s: expected true or false", origin, name);
    *out = cJSON_IsTrue(v) ? 1 : 0;
    return 0;
}

/* Features of the Qwen3-MoE family that this implementation does not have: refused, so that a
 * checkpoint never silently computes something else. */
static int check_unsupported(const cJSON *root, const char *origin, epd_err_t *err)
{
    int rc, b;
    if ((rc = get_bool(root, origin, "attention_bias", 0, &b, err)) != 0) return rc;
    if (b) return epd_err_set(err, -ENOTSUP, "%s: attention_bias: true is not supported", origin);
    if ((rc = get_bool(root, origin, "use_sliding_window", 0, &b, err)) != 0) return rc;
    if (b)
        return epd_err_set(err, -ENOTSUP, "%s: use_sliding_window: true is not supported", origin);
    const cJSON *act = field(root, "hidden_act");
    if (act && !cJSON_IsNull(act) && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return epd_err_set(err, -ENOTSUP, "%s: hidden_act: only \"silu\" is supported", origin);
    return 0;
}

static int get_string(const cJSON *root, const char *origin, const char *name, const char *def,
                      const char **out, epd_err_t *err)
{
    const cJSON *v = field(root, name);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsString(v))
        return epd_err_set(err, -EINVAL, "%s: %s: expected a string", origin, name);
    *out = v->valuestring;
    return 0;
}

/* Qwen3-MoE: GQA with q/k norms, softmax top-k routing, mlp_only_layers / decoder_sparse_step. */
static int parse_qwen3(const cJSON *root, const char *origin, epd_hf_config_t *cfg, epd_err_t *err)
{
    int rc;
    if ((rc = get_int(root, origin, "num_key_value_heads", 0, cfg->num_attention_heads, 1, 4096,
                      &cfg->num_key_value_heads, err)) ||
        (rc = get_int(root, origin, "head_dim", 0, cfg->hidden_size / cfg->num_attention_heads, 2,
                      4096, &cfg->head_dim, err)) ||
        (rc = get_int(root, origin, "decoder_sparse_step", 0, 1, 1, EPD_HF_MAX_LAYERS,
                      &cfg->decoder_sparse_step, err)) ||
        (rc = get_bool(root, origin, "norm_topk_prob", 0, &cfg->norm_topk_prob, err)))
        return rc;
    /* the expert count: "num_experts" in published Qwen3-MoE configs, "num_local_experts" in
     * what transformers 5 writes */
    const char *ne = field(root, "num_experts") ? "num_experts" : "num_local_experts";
    if (!field(root, ne))
        return epd_err_set(err, -EINVAL, "%s: num_experts: required field is missing", origin);
    if ((rc = get_int(root, origin, ne, 1, 0, 1, 1 << 20, &cfg->num_experts, err))) return rc;
    if (cfg->num_attention_heads % cfg->num_key_value_heads != 0)
        return epd_err_set(err, -EINVAL,
                           "%s: num_key_value_heads: %d does not divide num_attention_heads (%d)",
                           origin, cfg->num_key_value_heads, cfg->num_attention_heads);
    if (cfg->head_dim < 2 || cfg->head_dim % 2 != 0)
        return epd_err_set(err, -EINVAL,
                           "%s: head_dim: %d is not a positive even number (RoPE rotates pairs)",
                           origin, cfg->head_dim);
    const cJSON *mol = field(root, "mlp_only_layers");
    if (mol && !cJSON_IsNull(mol)) {
        if (!cJSON_IsArray(mol))
            return epd_err_set(err, -EINVAL,
                               "%s: mlp_only_layers: expected an array of layer indices", origin);
        int i = 0;
        for (const cJSON *v = mol->child; v; v = v->next, i++) {
            if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
                v->valuedouble < 0 || v->valuedouble >= cfg->num_hidden_layers)
                return epd_err_set(err, -EINVAL,
                                   "%s: mlp_only_layers[%d]: expected a layer index in 0..%d",
                                   origin, i, cfg->num_hidden_layers - 1);
            cfg->mlp_only[(int)v->valuedouble] = 1;
        }
    }
    cfg->router = EPD_ROUTER_SOFTMAX;
    cfg->attn_scale = 1.0 / sqrt((double)cfg->head_dim);
    return 0;
}

/* transformers' YaRN mscale: 0.1 * m * ln(scale) + 1 above a scale of 1. */
static double yarn_mscale(double scale, double m)
{
    return scale <= 1.0 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

/* rope_theta and the scaling: rope_scaling (hub configs, with rope_theta at the top level) or
 * rope_parameters (transformers 5, rope_theta inside). Plain RoPE everywhere; YaRN where
 * allow_yarn (DeepSeek). */
static int parse_rope(const cJSON *root, const char *origin, int allow_yarn, epd_hf_config_t *cfg,
                      epd_err_t *err)
{
    int rc;
    const char *key = NULL;
    const cJSON *rs = NULL;
    static const char *const rope_keys[] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = field(root, rope_keys[i]);
        if (!v || cJSON_IsNull(v)) continue;
        if (!cJSON_IsObject(v))
            return epd_err_set(err, -EINVAL, "%s: %s: expected an object or null", origin,
                               rope_keys[i]);
        if (!rs) {
            rs = v;
            key = rope_keys[i];
        }
    }
    /* rope_theta: top level (published configs) or rope_parameters.rope_theta (transformers 5) */
    if (!field(root, "rope_theta") && rs && field(rs, "rope_theta")) {
        if ((rc = get_double(rs, origin, "rope_theta", 10000.0, 0.0, 1e30, &cfg->rope_theta, err)))
            return rc;
    } else if ((rc = get_double(root, origin, "rope_theta", 10000.0, 0.0, 1e30, &cfg->rope_theta,
                                err))) {
        return rc;
    }
    if (!rs) return 0;
    const cJSON *ty = field(rs, "rope_type");
    if (!ty) ty = field(rs, "type");
    const char *type = ty && cJSON_IsString(ty) ? ty->valuestring : (ty ? NULL : "default");
    if (type && !strcmp(type, "default")) return 0;
    if (!type || strcmp(type, "yarn") || !allow_yarn)
        return epd_err_set(err, -ENOTSUP, "%s: %s.rope_type: only \"default\"%s is supported",
                           origin, key, allow_yarn ? " or \"yarn\"" : "");
    epd_rope_yarn_t *y = &cfg->yarn;
    char where[64];
    snprintf(where, sizeof(where), "%s: %s", origin, key);
    y->on = 1;
    if ((rc = get_int(rs, where, "original_max_position_embeddings", 1, 0, 1, 1L << 30,
                      &y->original_max_position_embeddings, err)) ||
        (rc = get_double(rs, where, "factor",
                         (double)cfg->max_position_embeddings / y->original_max_position_embeddings,
                         0.0, 1e6, &y->factor, err)) ||
        (rc = get_double(rs, where, "beta_fast", 32.0, 0.0, 1e6, &y->beta_fast, err)) ||
        (rc = get_double(rs, where, "beta_slow", 1.0, 0.0, 1e6, &y->beta_slow, err)) ||
        (rc = get_double(rs, where, "attention_factor", -1.0, 0.0, 1e6, &y->attention_factor,
                         err)) ||
        (rc = get_bool(rs, where, "truncate", 1, &y->truncate, err)))
        return rc;
    /* the mscales may be 0 (meaning absent), so they are read without get_double's (0, hi] */
    static const char *const ms[2] = {"mscale", "mscale_all_dim"};
    double *msv[2] = {&y->mscale, &y->mscale_all_dim};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = field(rs, ms[i]);
        *msv[i] = 0.0;
        if (!v || cJSON_IsNull(v)) continue;
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e6)
            return epd_err_set(err, -EINVAL, "%s.%s: expected a number in 0..1e6", where, ms[i]);
        *msv[i] = v->valuedouble;
    }
    if (!field(rs, "attention_factor") || cJSON_IsNull(field(rs, "attention_factor")))
        y->attention_factor =
            y->mscale != 0 && y->mscale_all_dim != 0
                ? yarn_mscale(y->factor, y->mscale) / yarn_mscale(y->factor, y->mscale_all_dim)
                : yarn_mscale(y->factor, 1.0);
    return 0;
}

/* quantization_config: absent or null (not quantized), or quant_method "fp8" with e4m3 weights
 * in blocks of weight_block_size, dynamic activation scales and optional modules_to_not_convert.
 * Any other method or key is refused, naming it. */
static int parse_fp8(const cJSON *root, const char *origin, epd_hf_fp8_t *q, epd_err_t *err)
{
    const cJSON *qc = field(root, "quantization_config");
    if (!qc || cJSON_IsNull(qc)) return 0;
    char where[96];
    snprintf(where, sizeof(where), "%s: quantization_config", origin);
    if (!cJSON_IsObject(qc)) return epd_err_set(err, -EINVAL, "%s: expected an object", where);
    const char *method, *fmt, *act;
    int rc;
    if ((rc = get_string(qc, where, "quant_method", NULL, &method, err))) return rc;
    if (!method)
        return epd_err_set(err, -EINVAL, "%s.quant_method: required field is missing", where);
    if (strcmp(method, "fp8"))
        return epd_err_set(
            err, -ENOTSUP,
            "%s.quant_method: \"%.64s\" is not supported (supported: \"fp8\", or the "
            "bf16 checkpoint)",
            where, method);
    if ((rc = get_string(qc, where, "fmt", "e4m3", &fmt, err)) ||
        (rc = get_string(qc, where, "activation_scheme", "dynamic", &act, err)))
        return rc;
    if (strcmp(fmt, "e4m3"))
        return epd_err_set(err, -ENOTSUP,
                           "%s.fmt: \"%.64s\" is not supported (supported: \"e4m3\")", where, fmt);
    if (strcmp(act, "dynamic"))
        return epd_err_set(err, -ENOTSUP,
                           "%s.activation_scheme: \"%.64s\" is not supported (supported: "
                           "\"dynamic\")",
                           where, act);
    const cJSON *bs = field(qc, "weight_block_size");
    if (!bs || cJSON_IsNull(bs))
        return epd_err_set(err, -ENOTSUP,
                           "%s.weight_block_size: required (per-tensor fp8 scales are not "
                           "supported)",
                           where);
    int blk[2] = {0, 0};
    if (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2)
        return epd_err_set(err, -EINVAL, "%s.weight_block_size: expected [block_n, block_k]",
                           where);
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetArrayItem(bs, i);
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 ||
            v->valuedouble > (double)(1 << 24))
            return epd_err_set(err, -EINVAL,
                               "%s.weight_block_size[%d]: expected a positive integer", where, i);
        blk[i] = (int)v->valuedouble;
    }
    q->block_n = blk[0];
    q->block_k = blk[1];
    const cJSON *sk = field(qc, "modules_to_not_convert");
    if (sk && !cJSON_IsNull(sk)) {
        if (!cJSON_IsArray(sk))
            return epd_err_set(err, -EINVAL,
                               "%s.modules_to_not_convert: expected an array of module names",
                               where);
        size_t used = 0;
        int i = 0;
        for (const cJSON *v = sk->child; v; v = v->next, i++) {
            if (!cJSON_IsString(v) || !v->valuestring[0])
                return epd_err_set(err, -EINVAL,
                                   "%s.modules_to_not_convert[%d]: expected a module name", where,
                                   i);
            const char *p = v->valuestring;
            for (const char *c = p; *c; c++)
                if (!(*c == '.' || *c == '_' || *c == '-' || *c == '*' ||
                      (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') ||
                      (*c >= 'A' && *c <= 'Z')))
                    return epd_err_set(err, -ENOTSUP,
                                       "%s.modules_to_not_convert[%d]: \"%.64s\": only module "
                                       "names with \"*\" wildcards are supported",
                                       where, i, p);
            size_t n = strlen(p) + 1;
            if (used + n > sizeof(q->skip))
                return epd_err_set(err, -ENOTSUP,
                                   "%s.modules_to_not_convert: more than %zu bytes of names", where,
                                   sizeof(q->skip));
            memcpy(q->skip + used, p, n);
            used += n;
            q->n_skip++;
        }
    }
    static const char *const known[] = {"quant_method", "fmt", "activation_scheme",
                                        "weight_block_size", "modules_to_not_convert"};
    for (const cJSON *v = qc->child; v; v = v->next) {
        size_t k = 0;
        while (k < sizeof(known) / sizeof(known[0]) && strcmp(v->string, known[k]))
            k++;
        if (k == sizeof(known) / sizeof(known[0]))
            return epd_err_set(err, -ENOTSUP, "%s.%.64s: not supported", where, v->string);
    }
    q->on = 1;
    return 0;
}

/* Glob match of p against s, "*" matching any run of characters. */
static int glob_match(const char *p, const char *s)
{
    const char *star = NULL, *resume = NULL;
    while (*s) {
        if (*p == '*') {
            star = p++;
            resume = s;
        } else if (*p == *s) {
            p++;
            s++;
        } else if (star) {
            p = star + 1;
            s = ++resume;
        } else {
            return 0;
        }
    }
    while (*p == '*')
        p++;
    return !*p;
}

/* Whether pattern p names module m or a module above it, anchored at a dot or m's start:
 * m = [path "."] p ["." rest]. */
static int names_module(const char *p, const char *m)
{
    char sub[320];
    if ((size_t)snprintf(sub, sizeof(sub), "%s.*", p) >= sizeof(sub)) sub[0] = 0;
    for (const char *at = m; at; at = strchr(at, '.') ? strchr(at, '.') + 1 : NULL)
        if (glob_match(p, at) || (sub[0] && glob_match(sub, at))) return 1;
    return 0;
}

int epd_hf_fp8_skipped(const epd_hf_config_t *cfg, const char *module)
{
    const char *p = cfg->fp8.skip;
    for (int i = 0; i < cfg->fp8.n_skip; i++, p += strlen(p) + 1)
        if (names_module(p, module)) return 1;
    return 0;
}

/* One of the strings in `ok` (NULL-terminated), or an error that lists them. */
static int check_choice(const char *origin, const char *name, const char *v, const char *const *ok,
                        epd_err_t *err)
{
    char list[160] = "";
    for (int i = 0; ok[i]; i++) {
        if (!strcmp(v, ok[i])) return 0;
        size_t n = strlen(list);
        snprintf(list + n, sizeof(list) - n, "%s\"%s\"", i ? ", " : "", ok[i]);
    }
    return epd_err_set(err, -ENOTSUP, "%s: %s: \"%.64s\" is not supported (supported: %s)", origin,
                       name, v, list);
}

/* DeepSeek-V2 / V3: MLA, the dense-then-MoE layer layout, shared experts and routing, with
 * transformers' DeepseekV2Config / DeepseekV3Config defaults for absent keys. */
static int parse_deepseek(const cJSON *root, const char *origin, epd_hf_config_t *cfg,
                          epd_err_t *err)
{
    int rc, v3 = cfg->arch == EPD_ARCH_DEEPSEEK_V3, b;
    const long big = 1L << 24;
    const char *ne = field(root, "n_routed_experts") ? "n_routed_experts" : "num_local_experts";
    if ((rc = get_int(root, origin, ne, 1, 0, 1, 1 << 20, &cfg->num_experts, err)) ||
        (rc = get_int(root, origin, "kv_lora_rank", 1, 0, 1, big, &cfg->kv_lora_rank, err)) ||
        (rc = get_int(root, origin, "qk_nope_head_dim", 1, 0, 1, 4096, &cfg->qk_nope_head_dim,
                      err)) ||
        (rc = get_int(root, origin, "qk_rope_head_dim", 1, 0, 2, 4096, &cfg->qk_rope_head_dim,
                      err)) ||
        (rc = get_int(root, origin, "v_head_dim", 1, 0, 1, 4096, &cfg->v_head_dim, err)) ||
        (rc = get_int(root, origin, "first_k_dense_replace", 0, v3 ? 3 : 0, 0, EPD_HF_MAX_LAYERS,
                      &cfg->first_k_dense_replace, err)) ||
        (rc = get_int(root, origin, "n_shared_experts", 0, v3 ? 1 : 2, 0, 1024,
                      &cfg->n_shared_experts, err)) ||
        (rc = get_int(root, origin, "num_nextn_predict_layers", 0, 0, 0, EPD_HF_MAX_LAYERS,
                      &cfg->num_nextn_predict_layers, err)) ||
        (rc = get_double(root, origin, "routed_scaling_factor", v3 ? 2.5 : 1.0, 0.0, 1e6,
                         &cfg->routed_scaling_factor, err)) ||
        (rc = get_bool(root, origin, "norm_topk_prob", v3, &cfg->norm_topk_prob, err)) ||
        (rc = get_bool(root, origin, "rope_interleave", 1, &cfg->rope_interleave, err)))
        return rc;
    /* q_lora_rank: absent means transformers' default (1536), null means no LoRA (V2-Lite) */
    const cJSON *ql = field(root, "q_lora_rank");
    cfg->q_lora_rank = 1536;
    if (ql && cJSON_IsNull(ql))
        cfg->q_lora_rank = 0;
    else if ((rc = get_int(root, origin, "q_lora_rank", 0, 1536, 1, big, &cfg->q_lora_rank, err)))
        return rc;
    if (cfg->qk_rope_head_dim % 2)
        return epd_err_set(err, -EINVAL,
                           "%s: qk_rope_head_dim: %d is not even (RoPE rotates pairs)", origin,
                           cfg->qk_rope_head_dim);
    /* MLA: every query head has its own keys and values; the RoPE part is qk_rope_head_dim */
    cfg->head_dim = cfg->qk_rope_head_dim;
    cfg->num_key_value_heads = cfg->num_attention_heads;
    if (!v3) cfg->rope_interleave = 1; /* V2 rotates adjacent pairs as complex numbers */
    int moe_freq;
    if ((rc = get_int(root, origin, "moe_layer_freq", 0, 1, 1, EPD_HF_MAX_LAYERS, &moe_freq, err)))
        return rc;
    if (moe_freq != 1)
        return epd_err_set(err, -ENOTSUP,
                           "%s: moe_layer_freq: %d is not supported (every layer from "
                           "first_k_dense_replace on is MoE: 1)",
                           origin, moe_freq);
    if (cfg->first_k_dense_replace > cfg->num_hidden_layers)
        cfg->first_k_dense_replace = cfg->num_hidden_layers;
    for (int l = 0; l < cfg->first_k_dense_replace; l++)
        cfg->mlp_only[l] = 1;
    cfg->decoder_sparse_step = 1;

    /* routing */
    const char *scoring, *method;
    static const char *const v3_scoring[] = {"sigmoid", NULL}, *const v2_scoring[] = {"softmax",
                                                                                      NULL};
    static const char *const v3_methods[] = {"noaux_tc", NULL};
    static const char *const v2_methods[] = {"greedy", "group_limited_greedy", NULL};
    if ((rc =
             get_string(root, origin, "scoring_func", v3 ? "sigmoid" : "softmax", &scoring, err)) ||
        (rc = check_choice(origin, "scoring_func", scoring, v3 ? v3_scoring : v2_scoring, err)) ||
        (rc = get_string(root, origin, "topk_method", v3 ? "noaux_tc" : "greedy", &method, err)) ||
        (rc = check_choice(origin, "topk_method", method, v3 ? v3_methods : v2_methods, err)))
        return rc;
    int grouped = v3 || !strcmp(method, "group_limited_greedy");
    cfg->router = v3        ? EPD_ROUTER_SIGMOID_GROUP
                  : grouped ? EPD_ROUTER_SOFTMAX_GROUP
                            : EPD_ROUTER_SOFTMAX;
    cfg->router_bias = v3;
    if (grouped) {
        if ((rc = get_int(root, origin, "n_group", v3 ? 0 : 1, v3 ? 8 : 0, 1, 1 << 20,
                          &cfg->n_group, err)) ||
            (rc = get_int(root, origin, "topk_group", v3 ? 0 : 1, v3 ? 4 : 0, 1, 1 << 20,
                          &cfg->topk_group, err)))
            return rc;
        if (cfg->num_experts % cfg->n_group || cfg->topk_group > cfg->n_group)
            return epd_err_set(err, -EINVAL,
                               "%s: n_group %d, topk_group %d: the groups must divide "
                               "n_routed_experts (%d) and topk_group be at most n_group",
                               origin, cfg->n_group, cfg->topk_group, cfg->num_experts);
        if (cfg->num_experts_per_tok > cfg->topk_group * (cfg->num_experts / cfg->n_group))
            return epd_err_set(err, -EINVAL,
                               "%s: num_experts_per_tok: %d exceeds the %d experts of the "
                               "topk_group (%d) groups kept",
                               origin, cfg->num_experts_per_tok,
                               cfg->topk_group * (cfg->num_experts / cfg->n_group),
                               cfg->topk_group);
    }
    if ((rc = get_bool(root, origin, "mlp_bias", 0, &b, err))) return rc;
    if (b) return epd_err_set(err, -ENOTSUP, "%s: mlp_bias: true is not supported", origin);

    /* the softmax scale, with YaRN's mscale^2 where mscale_all_dim is set (transformers'
     * DeepseekV3Attention; DeepSeek's own V2 code does the same) */
    cfg->attn_scale = 1.0 / sqrt((double)(cfg->qk_nope_head_dim + cfg->qk_rope_head_dim));
    if (cfg->yarn.on && cfg->yarn.mscale_all_dim != 0) {
        double m = yarn_mscale(cfg->yarn.factor, cfg->yarn.mscale_all_dim);
        cfg->attn_scale *= m * m;
    }
    return 0;
}

int epd_hf_config_parse(const char *json, size_t len, const char *origin, epd_hf_config_t *cfg,
                        epd_err_t *err)
{
    int rc = 0;
    memset(cfg, 0, sizeof(*cfg));
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        return epd_err_set(err, -EINVAL, "%s: not valid JSON (near byte %ld)", origin,
                           (at && at >= json && at <= json + len) ? (long)(at - json) : -1L);
    }
    if (!cJSON_IsObject(root)) {
        rc = epd_err_set(err, -EINVAL, "%s: not a JSON object", origin);
        goto out;
    }
    char dpath[256];
    if (epd_json_find_duplicate(root, dpath, sizeof(dpath))) {
        rc = epd_err_set(err, -EINVAL, "%s: %s: appears twice", origin, dpath);
        goto out;
    }
    const cJSON *mt = field(root, "model_type");
    if (!mt) {
        rc = epd_err_set(err, -EINVAL, "%s: model_type: required field is missing", origin);
        goto out;
    }
    static const struct {
        const char *name;
        epd_arch_t arch;
    } archs[] = {{"qwen3_moe", EPD_ARCH_QWEN3_MOE},
                 {"deepseek_v2", EPD_ARCH_DEEPSEEK_V2},
                 {"deepseek_v3", EPD_ARCH_DEEPSEEK_V3}};
    int known = 0;
    for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]) && cJSON_IsString(mt); i++)
        if (!strcmp(mt->valuestring, archs[i].name)) {
            cfg->arch = archs[i].arch;
            known = 1;
        }
    if (!known) {
        rc = epd_err_set(err, -ENOTSUP,
                         "%s: model_type: \"%.64s\" is not supported (supported: "
                         "\"qwen3_moe\", \"deepseek_v2\", \"deepseek_v3\")",
                         origin, cJSON_IsString(mt) ? mt->valuestring : "(not a string)");
        goto out;
    }
    snprintf(cfg->model_type, sizeof(cfg->model_type), "%s", mt->valuestring);
    int mla = cfg->arch != EPD_ARCH_QWEN3_MOE;
    const long big = 1L << 24;
    cfg->routed_scaling_factor = 1.0;
    if ((rc = get_int(root, origin, "hidden_size", 1, 0, 1, big, &cfg->hidden_size, err)) ||
        (rc = get_int(root, origin, "num_hidden_layers", 1, 0, 1, EPD_HF_MAX_LAYERS,
                      &cfg->num_hidden_layers, err)) ||
        (rc = get_int(root, origin, "num_attention_heads", 1, 0, 1, 4096, &cfg->num_attention_heads,
                      err)) ||
        (rc = get_int(root, origin, "vocab_size", 1, 0, 1, big, &cfg->vocab_size, err)) ||
        (rc = get_int(root, origin, "moe_intermediate_size", 1, 0, 1, big,
                      &cfg->moe_intermediate_size, err)) ||
        (rc = get_int(root, origin, "num_experts_per_tok", 1, 0, 1, EPD_HF_MAX_TOPK,
                      &cfg->num_experts_per_tok, err)) ||
        (rc = get_int(root, origin, "max_position_embeddings", 0, mla ? 2048 : 32768, 1, 1L << 30,
                      &cfg->max_position_embeddings, err)) ||
        (rc = get_double(root, origin, "rms_norm_eps", 1e-6, 0.0, 1.0, &cfg->rms_norm_eps, err)) ||
        (rc = get_bool(root, origin, "tie_word_embeddings", 0, &cfg->tie_word_embeddings, err)) ||
        (rc = check_unsupported(root, origin, err)) ||
        (rc = parse_rope(root, origin, mla, cfg, err)))
        goto out;
    if ((rc = parse_fp8(root, origin, &cfg->fp8, err))) goto out;
    const cJSON *eos = field(root, "eos_token_id");
    if (cJSON_IsNumber(eos)) {
        cfg->eos_token_ids[cfg->num_eos++] = (int)eos->valuedouble;
    } else if (cJSON_IsArray(eos)) {
        for (const cJSON *v = eos->child; v && cfg->num_eos < EPD_HF_MAX_EOS; v = v->next)
            if (cJSON_IsNumber(v)) cfg->eos_token_ids[cfg->num_eos++] = (int)v->valuedouble;
    }
    if (mla) {
        if ((rc = parse_deepseek(root, origin, cfg, err))) goto out;
    } else if ((rc = parse_qwen3(root, origin, cfg, err))) {
        goto out;
    }
    if (cfg->num_experts_per_tok > cfg->num_experts) {
        rc = epd_err_set(err, -EINVAL, "%s: num_experts_per_tok: %d exceeds num_experts (%d)",
                         origin, cfg->num_experts_per_tok, cfg->num_experts);
        goto out;
    }
    int dense = 0;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        dense += !epd_hf_layer_is_moe(cfg, l);
    if ((rc = get_int(root, origin, "intermediate_size", dense > 0, 0, 1, big,
                      &cfg->intermediate_size, err)))
        goto out;
out:
    cJSON_Delete(root);
    return rc;
}

int epd_hf_config_load(const char *path, epd_hf_config_t *cfg, epd_err_t *err)
{
    char *text = NULL;
    size_t len = 0;
    int rc = epd_read_text_file(path, EPD_HF_MAX_CONFIG_BYTES, &text, &len, err);
    if (rc == 0) rc = epd_hf_config_parse(text, len, path, cfg, err);
    free(text);
    return rc;
}

int epd_hf_is_mla(const epd_hf_config_t *cfg)
{
    return cfg->arch == EPD_ARCH_DEEPSEEK_V2 || cfg->arch == EPD_ARCH_DEEPSEEK_V3;
}

int epd_hf_layer_is_moe(const epd_hf_config_t *cfg, int layer)
{
    return !cfg->mlp_only[layer] && cfg->num_experts > 0 &&
           (layer + 1) % cfg->decoder_sparse_step == 0;
}
