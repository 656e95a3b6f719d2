/* config.json reader for model_type qwen3_moe: required fields, Hugging Face defaults for the
 * optional ones, range checks, and refusal of features this model code does not implement. */
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
    /* rope_scaling (legacy) / rope_parameters (transformers 5): plain RoPE only */
    static const char *const rope_keys[] = {"rope_scaling", "rope_parameters"};
    for (int i = 0; i < 2; i++) {
        const cJSON *rs = field(root, rope_keys[i]);
        if (!rs || cJSON_IsNull(rs)) continue;
        if (!cJSON_IsObject(rs))
            return epd_err_set(err, -EINVAL, "%s: %s: expected an object or null", origin,
                               rope_keys[i]);
        const cJSON *ty = field(rs, "rope_type");
        if (!ty) ty = field(rs, "type");
        if (ty && !(cJSON_IsString(ty) && !strcmp(ty->valuestring, "default")))
            return epd_err_set(err, -ENOTSUP, "%s: %s.rope_type: only \"default\" is supported",
                               origin, rope_keys[i]);
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
    if (!cJSON_IsString(mt) || strcmp(mt->valuestring, "qwen3_moe") != 0) {
        rc = epd_err_set(err, -ENOTSUP,
                         "%s: model_type: \"%.64s\" is not supported (supported: "
                         "\"qwen3_moe\")",
                         origin, cJSON_IsString(mt) ? mt->valuestring : "(not a string)");
        goto out;
    }
    snprintf(cfg->model_type, sizeof(cfg->model_type), "%s", mt->valuestring);
    const long big = 1L << 24;
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
        (rc = get_int(root, origin, "num_key_value_heads", 0, cfg->num_attention_heads, 1, 4096,
                      &cfg->num_key_value_heads, err)) ||
        (rc = get_int(root, origin, "head_dim", 0, cfg->hidden_size / cfg->num_attention_heads, 2,
                      4096, &cfg->head_dim, err)) ||
        (rc = get_int(root, origin, "decoder_sparse_step", 0, 1, 1, EPD_HF_MAX_LAYERS,
                      &cfg->decoder_sparse_step, err)) ||
        (rc = get_int(root, origin, "max_position_embeddings", 0, 32768, 1, 1L << 30,
                      &cfg->max_position_embeddings, err)) ||
        (rc = get_double(root, origin, "rms_norm_eps", 1e-6, 0.0, 1.0, &cfg->rms_norm_eps, err)) ||
        (rc = get_bool(root, origin, "norm_topk_prob", 0, &cfg->norm_topk_prob, err)) ||
        (rc = get_bool(root, origin, "tie_word_embeddings", 0, &cfg->tie_word_embeddings, err)) ||
        (rc = check_unsupported(root, origin, err)))
        goto out;
    /* the expert count: "num_experts" in published Qwen3-MoE configs, "num_local_experts" in
     * what transformers 5 writes */
    const char *ne = field(root, "num_experts") ? "num_experts" : "num_local_experts";
    if (!field(root, ne)) {
        rc = epd_err_set(err, -EINVAL, "%s: num_experts: required field is missing", origin);
        goto out;
    }
    if ((rc = get_int(root, origin, ne, 1, 0, 1, 1 << 20, &cfg->num_experts, err))) goto out;
    /* rope_theta: top level (published configs) or rope_parameters.rope_theta (transformers 5) */
    const cJSON *rp = field(root, "rope_parameters");
    if (!field(root, "rope_theta") && cJSON_IsObject(rp) && field(rp, "rope_theta")) {
        if ((rc = get_double(rp, origin, "rope_theta", 10000.0, 0.0, 1e30, &cfg->rope_theta, err)))
            goto out;
    } else if ((rc = get_double(root, origin, "rope_theta", 10000.0, 0.0, 1e30, &cfg->rope_theta,
                                err))) {
        goto out;
    }
    if (cfg->num_attention_heads % cfg->num_key_value_heads != 0) {
        rc = epd_err_set(err, -EINVAL,
                         "%s: num_key_value_heads: %d does not divide num_attention_heads (%d)",
                         origin, cfg->num_key_value_heads, cfg->num_attention_heads);
        goto out;
    }
    if (cfg->head_dim < 2 || cfg->head_dim % 2 != 0) {
        rc = epd_err_set(err, -EINVAL,
                         "%s: head_dim: %d is not a positive even number (RoPE rotates pairs)",
                         origin, cfg->head_dim);
        goto out;
    }
    if (cfg->num_experts_per_tok > cfg->num_experts) {
        rc = epd_err_set(err, -EINVAL, "%s: num_experts_per_tok: %d exceeds num_experts (%d)",
                         origin, cfg->num_experts_per_tok, cfg->num_experts);
        goto out;
    }
    const cJSON *mol = field(root, "mlp_only_layers");
    if (mol && !cJSON_IsNull(mol)) {
        if (!cJSON_IsArray(mol)) {
            rc = epd_err_set(err, -EINVAL,
                             "%s: mlp_only_layers: expected an array of layer indices", origin);
            goto out;
        }
        int i = 0;
        for (const cJSON *v = mol->child; v; v = v->next, i++) {
            if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
                v->valuedouble < 0 || v->valuedouble >= cfg->num_hidden_layers) {
                rc = epd_err_set(err, -EINVAL,
                                 "%s: mlp_only_layers[%d]: expected a layer index in 0..%d", origin,
                                 i, cfg->num_hidden_layers - 1);
                goto out;
            }
            cfg->mlp_only[(int)v->valuedouble] = 1;
        }
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

int epd_hf_layer_is_moe(const epd_hf_config_t *cfg, int layer)
{
    return !cfg->mlp_only[layer] && cfg->num_experts > 0 &&
           (layer + 1) % cfg->decoder_sparse_step == 0;
}
