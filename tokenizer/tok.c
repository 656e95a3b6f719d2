/* The tokenizer object: loading from a checkpoint folder, teardown and the special-token
 * accessors. */
#include "tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void epd_tok_destroy(epd_tok_t *tok)
{
    if (!tok) return;
    if (tok->cache) {
        tok_cache_clear(tok);
        free(tok->cache);
        pthread_mutex_destroy(&tok->cache_mu);
    }
    for (size_t i = 0; i < tok->n_re; i++)
        pcre2_code_free(tok->re[i]);
    free(tok->eos);
    free(tok->bos_text);
    free(tok->added);
    tok_pairmap_fini(&tok->merges);
    tok_strmap_fini(&tok->vocab);
    free(tok->id_flags);
    free(tok->id_len);
    free(tok->id_off);
    tok_buf_fini(&tok->pool);
    free(tok);
}

int epd_tok_load_files(const char *tokenizer_json, const char *tokenizer_config_json,
                       const char *chat_template_jinja, const char *generation_config_json,
                       epd_tok_t **out, epd_err_t *err)
{
    *out = NULL;
    if (!tokenizer_json) return epd_err_set(err, -EINVAL, "no tokenizer.json path given");
    epd_tok_t *tok = calloc(1, sizeof(*tok));
    if (!tok) return epd_err_set(err, -ENOMEM, "out of memory");
    tok->bos = tok->pad = tok->cfg_eos = -1;
    int st = tok_load_tokenizer_json(tok, tokenizer_json, err);
    if (st) goto fail;
    if ((st = tok_load_configs(tok, tokenizer_config_json, chat_template_jinja,
                               generation_config_json, err)))
        goto fail;
    tok->cache = calloc(TOK_CACHE_SLOTS, sizeof(*tok->cache));
    if (!tok->cache) {
        st = epd_err_set(err, -ENOMEM, "out of memory for the word cache");
        goto fail;
    }
    if (pthread_mutex_init(&tok->cache_mu, NULL) != 0) {
        free(tok->cache);
        tok->cache = NULL;
        st = epd_err_set(err, -ENOMEM, "cannot create the word cache lock");
        goto fail;
    }
    *out = tok;
    return 0;
fail:
    epd_tok_destroy(tok);
    return st;
}

int epd_tok_load_dir(const char *model_dir, epd_tok_t **out, epd_err_t *err)
{
    char paths[4][4096];
    static const char *const names[4] = {"tokenizer.json", "tokenizer_config.json",
                                         "chat_template.jinja", "generation_config.json"};
    const char *p[4];
    for (int i = 0; i < 4; i++) {
        int n = snprintf(paths[i], sizeof(paths[i]), "%s/%s", model_dir, names[i]);
        if (n < 0 || (size_t)n >= sizeof(paths[i]))
            return epd_err_set(err, -EINVAL, "%s: path too long", model_dir);
        /* the rest are optional; tokenizer.json's absence is reported by the loader */
        p[i] = (i == 0 || access(paths[i], F_OK) == 0) ? paths[i] : NULL;
    }
    return epd_tok_load_files(p[0], p[1], p[2], p[3], out, err);
}

size_t epd_tok_vocab_size(const epd_tok_t *tok)
{
    return tok->n_ids;
}

int32_t epd_tok_token_id(const epd_tok_t *tok, const char *content)
{
    size_t len = strlen(content);
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].len == len && memcmp(tok->pool.p + tok->added[i].off, content, len) == 0)
            return tok->added[i].id;
    /* a model token is named by its byte-level spelling, as in the vocab of tokenizer.json */
    uint8_t buf[256];
    size_t n = 0;
    const uint8_t *p = (const uint8_t *)content;
    if (tok_utf8_validate(p, len) != len) return -1;
    while (*p) {
        uint32_t cp;
        p += tok_utf8_decode(p, &cp);
        int b = tok_cp_to_byte(cp);
        if (b < 0 || n == sizeof(buf)) return -1;
        buf[n++] = (uint8_t)b;
    }
    return tok_strmap_get(&tok->vocab, &tok->pool, buf, n);
}

bool epd_tok_is_special(const epd_tok_t *tok, int32_t id)
{
    return id >= 0 && (size_t)id < tok->n_ids && (tok->id_flags[id] & TOK_ID_SPECIAL);
}

const int32_t *epd_tok_eos_ids(const epd_tok_t *tok, size_t *n)
{
    *n = tok->n_eos;
    return tok->eos;
}

int32_t epd_tok_bos_id(const epd_tok_t *tok)
{
    return tok->bos;
}

int32_t epd_tok_pad_id(const epd_tok_t *tok)
{
    return tok->pad;
}

epd_tok_chat_kind_t epd_tok_chat_kind(const epd_tok_t *tok)
{
    return tok->chat;
}

const char *epd_tok_chat_kind_name(epd_tok_chat_kind_t kind)
{
    switch (kind) {
    case EPD_TOK_CHAT_QWEN3:
        return "qwen3";
    case EPD_TOK_CHAT_DEEPSEEK_V3:
        return "deepseek_v3";
    case EPD_TOK_CHAT_NONE:
        break;
    }
    return "none";
}
