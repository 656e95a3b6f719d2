/* tokenizer_config.json, chat_template.jinja and generation_config.json: eos/bos/pad tokens,
 * eos_token_id (int or list) and the chat template, resolved against the loaded vocabulary. */
#include "tok_internal.h"
#include "epd_json.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A special token named in tokenizer_config.json: a string, an AddedToken object with
 * "content", or null/absent (-1). */
static int token_field(const epd_tok_t *tok, const cJSON *root, const char *key, const char *path,
                       int32_t *id, const char **text, epd_err_t *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    *id = -1;
    if (text) *text = NULL;
    if (!v || cJSON_IsNull(v)) return 0;
    const char *content = NULL;
    if (cJSON_IsString(v)) {
        content = v->valuestring;
    } else if (cJSON_IsObject(v)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (!cJSON_IsString(c))
            return epd_err_set(err, -EINVAL, "%s: %s.content: expected a string, got %s", path, key,
                               epd_json_type_name(c));
        content = c->valuestring;
    } else {
        return epd_err_set(err, -EINVAL, "%s: %s: expected a string or an object, got %s", path,
                           key, epd_json_type_name(v));
    }
    *id = epd_tok_token_id(tok, content);
    if (text) *text = content;
    if (*id < 0)
        return epd_err_set(err, -EINVAL, "%s: %s: \"%.80s\" is not a token of tokenizer.json", path,
                           key, content);
    return 0;
}

/* add_bos_token / add_eos_token: a boolean (absent or null: false); true needs the token. */
static int add_token_flag(const cJSON *root, const char *key, int32_t id, const char *path,
                          bool *out, epd_err_t *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    *out = false;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v))
        return epd_err_set(err, -EINVAL, "%s: %s: expected a boolean, got %s", path, key,
                           epd_json_type_name(v));
    *out = cJSON_IsTrue(v);
    if (*out && id < 0)
        return epd_err_set(err, -EINVAL, "%s: %s: true, but %.3s_token names no token", path, key,
                           key + 4);
    return 0;
}

static int check_gen_id(const epd_tok_t *tok, const cJSON *v, const char *path, const char *jpath,
                        int32_t *id, epd_err_t *err)
{
    if (!cJSON_IsNumber(v))
        return epd_err_set(err, -EINVAL, "%s: %s: expected an integer, got %s", path, jpath,
                           epd_json_type_name(v));
    double d = v->valuedouble;
    if (d < 0 || d >= (double)tok->n_ids || d != (double)(int32_t)d ||
        !(tok->id_flags[(int32_t)d] & TOK_ID_PRESENT))
        return epd_err_set(err, -EINVAL,
                           "%s: %s: %g is not a token id of tokenizer.json (vocabulary size %zu)",
                           path, jpath, d, tok->n_ids);
    *id = (int32_t)d;
    return 0;
}

static int load_generation_config(epd_tok_t *tok, const char *path, bool *have_eos, epd_err_t *err)
{
    cJSON *root = NULL;
    int st = tok_parse_json_file(path, &root, err);
    if (st) return st;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    *have_eos = false;
    if (v && !cJSON_IsNull(v)) {
        size_t n = cJSON_IsArray(v) ? (size_t)cJSON_GetArraySize(v) : 1;
        tok->eos = calloc(n ? n : 1, sizeof(*tok->eos));
        if (!tok->eos) {
            st = epd_err_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        if (cJSON_IsArray(v)) {
            const cJSON *e;
            size_t i = 0;
            cJSON_ArrayForEach(e, v)
            {
                char jp[64];
                snprintf(jp, sizeof(jp), "eos_token_id[%zu]", i);
                if ((st = check_gen_id(tok, e, path, jp, &tok->eos[i], err))) goto out;
                i++;
            }
        } else if ((st = check_gen_id(tok, v, path, "eos_token_id", &tok->eos[0], err))) {
            goto out;
        }
        tok->n_eos = n;
        *have_eos = true;
    }
out:
    cJSON_Delete(root);
    return st;
}

/* tokenizer_config.json; with_template false when chat_template.jinja supersedes its
 * chat_template, which is then not even looked at (as transformers does). */
static int load_tokenizer_config(epd_tok_t *tok, const char *path, bool have_eos,
                                 bool with_template, epd_err_t *err)
{
    cJSON *root = NULL;
    int st = tok_parse_json_file(path, &root, err);
    int32_t eos;
    const char *bos_text;
    if (st) return st;
    if ((st = token_field(tok, root, "eos_token", path, &eos, NULL, err)) ||
        (st = token_field(tok, root, "bos_token", path, &tok->bos, &bos_text, err)) ||
        (st = token_field(tok, root, "pad_token", path, &tok->pad, NULL, err)) ||
        (st = add_token_flag(root, "add_bos_token", tok->bos, path, &tok->add_bos, err)) ||
        (st = add_token_flag(root, "add_eos_token", eos, path, &tok->add_eos, err)))
        goto out;
    tok->cfg_eos = eos;
    if (bos_text && !(tok->bos_text = strdup(bos_text))) {
        st = epd_err_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    if (!have_eos && eos >= 0) {
        tok->eos = malloc(sizeof(*tok->eos));
        if (!tok->eos) {
            st = epd_err_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        tok->eos[0] = eos;
        tok->n_eos = 1;
    }

    const cJSON *tmpl =
        with_template ? cJSON_GetObjectItemCaseSensitive(root, "chat_template") : NULL;
    const char *text = NULL;
    if (cJSON_IsString(tmpl)) {
        text = tmpl->valuestring;
    } else if (cJSON_IsArray(tmpl)) {
        /* [{"name": ..., "template": ...}]: the one named "default" is what applies */
        const cJSON *e;
        size_t i = 0;
        cJSON_ArrayForEach(e, tmpl)
        {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "template");
            if (!cJSON_IsString(name) || !cJSON_IsString(t)) {
                st =
                    epd_err_set(err, -EINVAL,
                                "%s: chat_template[%zu]: expected {\"name\": string, \"template\": "
                                "string}",
                                path, i);
                goto out;
            }
            if (strcmp(name->valuestring, "default") == 0) text = t->valuestring;
            i++;
        }
        if (!text) {
            st = epd_err_set(err, -ENOTSUP,
                             "%s: chat_template: a list of templates without one named \"default\"",
                             path);
            goto out;
        }
    } else if (tmpl && !cJSON_IsNull(tmpl)) {
        st = epd_err_set(err, -EINVAL, "%s: chat_template: expected a string or a list, got %s",
                         path, epd_json_type_name(tmpl));
        goto out;
    }
    if (text) {
        char where[4200];
        snprintf(where, sizeof(where), "%s: chat_template", path);
        st = tok_chat_detect(text, where, &tok->chat, err);
    }
out:
    cJSON_Delete(root);
    return st;
}

/* chat_template.jinja: the template's text as it is, no JSON around it. */
static int load_chat_template_file(epd_tok_t *tok, const char *path, epd_err_t *err)
{
    char *text = NULL;
    size_t len = 0;
    int st = tok_read_file(path, &text, &len, err);
    if (st) return st;
    if (strlen(text) != len)
        st = epd_err_set(err, -EINVAL, "%s: a NUL byte at offset %zu", path, strlen(text));
    else
        st = tok_chat_detect(text, path, &tok->chat, err);
    free(text);
    return st;
}

int tok_load_configs(epd_tok_t *tok, const char *tokenizer_config_path,
                     const char *chat_template_path, const char *generation_config_path,
                     epd_err_t *err)
{
    bool have_eos = false;
    int st;
    if (generation_config_path &&
        (st = load_generation_config(tok, generation_config_path, &have_eos, err)))
        return st;
    if (tokenizer_config_path && (st = load_tokenizer_config(tok, tokenizer_config_path, have_eos,
                                                             !chat_template_path, err)))
        return st;
    if (chat_template_path && (st = load_chat_template_file(tok, chat_template_path, err)))
        return st;
    return 0;
}
