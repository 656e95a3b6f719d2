/* Loading tokenizer.json: the BPE vocabulary and merges, added tokens, normalizer, pre-tokenizer
 * regex and decoder, each checked against what we implement; errors name the file and JSON path.
 */
#include "tok_internal.h"
#include "epd_json.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MAX_ID (1 << 24) /* far above any real vocabulary; bounds the id tables */

typedef struct jctx {
    const char *file;
    epd_err_t *err;
} jctx_t;

/* A short printable rendering of a JSON string value for messages. */
static void quote(char *dst, size_t n, const char *s)
{
    size_t o = 0, i = 0;
    size_t max = n > 8 ? n - 6 : 0;
    if (o + 1 < n) dst[o++] = '"';
    for (; s[i] && o < max && i < 60; i++) {
        unsigned char c = (unsigned char)s[i];
        dst[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (s[i] && o + 3 < n) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    if (o + 1 < n) dst[o++] = '"';
    dst[o < n ? o : n - 1] = 0;
}

static int jerr(jctx_t *c, int st, const char *jpath, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int jerr(jctx_t *c, int st, const char *jpath, const char *fmt, ...)
{
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return epd_err_set(c->err, st, "%s: %s: %s", c->file, jpath, msg);
}

int tok_read_file(const char *path, char **out, size_t *len, epd_err_t *err)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    if (!f) {
        int e = errno;
        return epd_err_set(err, -e, "%s: cannot open: %s", path, strerror(e));
    }
    if (fseek(f, 0, SEEK_END) != 0) goto fail_io;
    long sz = ftell(f);
    if (sz < 0 || fseek(f, 0, SEEK_SET) != 0) goto fail_io;
    buf = malloc((size_t)sz + 1);
    if (!buf) {
        fclose(f);
        return epd_err_set(err, -ENOMEM, "%s: cannot allocate %ld bytes", path, sz);
    }
    if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) goto fail_io;
    fclose(f);
    buf[sz] = 0;
    *out = buf;
    *len = (size_t)sz;
    return 0;
fail_io:;
    int e = errno;
    free(buf);
    fclose(f);
    return epd_err_set(err, -EIO, "%s: read failed: %s", path, e ? strerror(e) : "short read");
}

int tok_parse_json_file(const char *path, cJSON **root, epd_err_t *err)
{
    char *text = NULL;
    size_t len = 0;
    int st = tok_read_file(path, &text, &len, err);
    if (st) return st;
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!*root) {
        size_t off = end ? (size_t)(end - text) : 0;
        if (!end && cJSON_GetErrorPtr()) off = (size_t)(cJSON_GetErrorPtr() - text);
        size_t line = 1;
        for (size_t i = 0; i < off && i < len; i++)
            line += text[i] == '\n';
        free(text);
        return epd_err_set(err, -EINVAL, "%s: not valid JSON: syntax error at byte %zu (line %zu)",
                           path, off, line);
    }
    free(text);
    if (!cJSON_IsObject(*root)) {
        cJSON_Delete(*root);
        *root = NULL;
        return epd_err_set(err, -EINVAL, "%s: the top level must be a JSON object", path);
    }
    /* cJSON keeps both members of a repeated key, and lookups would see only the first */
    char dpath[256];
    if (epd_json_find_duplicate(*root, dpath, sizeof(dpath))) {
        cJSON_Delete(*root);
        *root = NULL;
        return epd_err_set(err, -EINVAL,
                           "%s: %s: duplicate key (a key may appear once in an object)", path,
                           dpath);
    }
    return 0;
}

/* The value of an optional boolean field: absent or null gives dflt. */
static int get_bool(jctx_t *c, const cJSON *obj, const char *key, const char *path, bool dflt,
                    bool *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    char p[256];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return jerr(c, -EINVAL, p, "expected a boolean, got %s", epd_json_type_name(v));
    *out = cJSON_IsTrue(v);
    return 0;
}

/* A required string field; *out borrows from the JSON tree. */
static int get_str(jctx_t *c, const cJSON *obj, const char *key, const char *path, const char **out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    char p[256];
    snprintf(p, sizeof(p), "%s%s%s", path, *path ? "." : "", key);
    if (!cJSON_IsString(v))
        return jerr(c, -EINVAL, p, "expected a string, got %s", epd_json_type_name(v));
    *out = v->valuestring;
    return 0;
}

/* Fields that must be absent, null or equal to a harmless value for us to be exact. */
static int require_empty_str(jctx_t *c, const cJSON *obj, const char *key, const char *path)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && !v->valuestring[0])) return 0;
    char p[256], q[96];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    if (!cJSON_IsString(v))
        return jerr(c, -EINVAL, p, "expected a string, got %s", epd_json_type_name(v));
    quote(q, sizeof(q), v->valuestring);
    return jerr(c, -ENOTSUP, p, "unsupported %s (supported: \"\" or null)", q);
}

static int require_false(jctx_t *c, const cJSON *obj, const char *key, const char *path)
{
    bool b;
    int st = get_bool(c, obj, key, path, false, &b);
    if (st) return st;
    if (b) {
        char p[256];
        snprintf(p, sizeof(p), "%s.%s", path, key);
        return jerr(c, -ENOTSUP, p, "unsupported true (supported: false)");
    }
    return 0;
}

static int check_type(jctx_t *c, const cJSON *obj, const char *path, const char *supported_list,
                      const char *const *supported, const char **type_out)
{
    char p[256], q[96];
    if (!cJSON_IsObject(obj))
        return jerr(c, -EINVAL, path, "expected an object, got %s", epd_json_type_name(obj));
    snprintf(p, sizeof(p), "%s.type", path);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    if (!cJSON_IsString(t))
        return jerr(c, -EINVAL, p, "expected a string, got %s", epd_json_type_name(t));
    for (size_t i = 0; supported[i]; i++) {
        if (strcmp(t->valuestring, supported[i]) == 0) {
            *type_out = supported[i];
            return 0;
        }
    }
    quote(q, sizeof(q), t->valuestring);
    return jerr(c, -ENOTSUP, p, "unsupported %s (supported: %s)", q, supported_list);
}

/* Converts a byte-level token string (one alphabet character per byte) to its bytes. Returns
 * false if a character is outside the alphabet. */
static bool bytelevel_to_bytes(const char *s, tok_buf_t *out)
{
    const uint8_t *p = (const uint8_t *)s;
    out->len = 0;
    while (*p) {
        uint32_t cp;
        p += tok_utf8_decode(p, &cp);
        int b = tok_cp_to_byte(cp);
        if (b < 0) return false;
        uint8_t byte = (uint8_t)b;
        if (tok_buf_append(out, &byte, 1) < 0) return false;
    }
    return true;
}

/* Sets the bytes id decodes to: the byte-level decoding of s when every character is in the
 * alphabet, else s's own UTF-8 (what the ByteLevel decoder does for such tokens). */
static int set_id_bytes(epd_tok_t *tok, int32_t id, const char *s, tok_buf_t *tmp)
{
    const uint8_t *src = (const uint8_t *)s;
    size_t n = strlen(s);
    if (bytelevel_to_bytes(s, tmp)) {
        src = tmp->p;
        n = tmp->len;
    }
    if (tok->pool.len > UINT32_MAX - n) return -1;
    tok->id_off[id] = (uint32_t)tok->pool.len;
    tok->id_len[id] = (uint32_t)n;
    return tok_buf_append(&tok->pool, src, n);
}

static int nomem(jctx_t *c, const char *what)
{
    return epd_err_set(c->err, -ENOMEM, "%s: out of memory while loading %s", c->file, what);
}

static int check_id(jctx_t *c, const cJSON *v, const char *path, int32_t *id)
{
    if (!cJSON_IsNumber(v))
        return jerr(c, -EINVAL, path, "expected an integer id, got %s", epd_json_type_name(v));
    double d = v->valuedouble;
    if (d < 0 || d >= TOK_MAX_ID || d != (double)(int32_t)d)
        return jerr(c, -EINVAL, path, "id %g is not an integer in [0, %d)", d, TOK_MAX_ID);
    *id = (int32_t)d;
    return 0;
}

static int load_model(jctx_t *c, epd_tok_t *tok, const cJSON *model, const cJSON *added,
                      tok_buf_t *tmp)
{
    static const char *const types[] = {"BPE", NULL};
    const char *type;
    int st = check_type(c, model, "model", "\"BPE\"", types, &type);
    if (st) return st;
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout))
        return jerr(c, -ENOTSUP, "model.dropout", "unsupported %s (supported: null)",
                    epd_json_type_name(dropout));
    if ((st = require_empty_str(c, model, "continuing_subword_prefix", "model")) ||
        (st = require_empty_str(c, model, "end_of_word_suffix", "model")) ||
        (st = require_false(c, model, "byte_fallback", "model")) ||
        (st = get_bool(c, model, "ignore_merges", "model", false, &tok->ignore_merges)))
        return st;
    /* unk_token and fuse_unk never take effect: every byte has a token (checked below). */

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab))
        return jerr(c, -EINVAL, "model.vocab", "expected an object, got %s",
                    epd_json_type_name(vocab));
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsArray(merges))
        return jerr(c, -EINVAL, "model.merges", "expected an array, got %s",
                    epd_json_type_name(merges));
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
        return jerr(c, -EINVAL, "added_tokens", "expected an array, got %s",
                    epd_json_type_name(added));

    /* The id space covers the vocabulary and the added tokens. */
    int32_t max_id = -1;
    size_t n_vocab = 0;
    char p[320], q[96];
    const cJSON *v;
    cJSON_ArrayForEach(v, vocab)
    {
        int32_t id;
        quote(q, sizeof(q), v->string);
        snprintf(p, sizeof(p), "model.vocab[%s]", q);
        if ((st = check_id(c, v, p, &id))) return st;
        if (id > max_id) max_id = id;
        n_vocab++;
    }
    size_t ai = 0;
    cJSON_ArrayForEach(v, added)
    {
        int32_t id;
        snprintf(p, sizeof(p), "added_tokens[%zu].id", ai);
        if (!cJSON_IsObject(v)) {
            snprintf(p, sizeof(p), "added_tokens[%zu]", ai);
            return jerr(c, -EINVAL, p, "expected an object, got %s", epd_json_type_name(v));
        }
        if ((st = check_id(c, cJSON_GetObjectItemCaseSensitive(v, "id"), p, &id))) return st;
        if (id > max_id) max_id = id;
        ai++;
    }
    if (max_id < 0) return jerr(c, -EINVAL, "model.vocab", "the vocabulary is empty");
    tok->n_ids = (size_t)max_id + 1;
    tok->id_off = calloc(tok->n_ids, sizeof(*tok->id_off));
    tok->id_len = calloc(tok->n_ids, sizeof(*tok->id_len));
    tok->id_flags = calloc(tok->n_ids, 1);
    if (!tok->id_off || !tok->id_len || !tok->id_flags) return nomem(c, "the id table");
    if (tok_strmap_init(&tok->vocab, n_vocab) < 0) return nomem(c, "model.vocab");

    cJSON_ArrayForEach(v, vocab)
    {
        int32_t id = (int32_t)v->valuedouble;
        if (tok->id_flags[id] & TOK_ID_PRESENT) {
            const uint8_t *other = tok->pool.p + tok->id_off[id];
            char q2[96], tmpname[128];
            snprintf(tmpname, sizeof(tmpname), "%.*s",
                     (int)(tok->id_len[id] < 100 ? tok->id_len[id] : 100), (const char *)other);
            quote(q, sizeof(q), v->string);
            quote(q2, sizeof(q2), tmpname);
            snprintf(p, sizeof(p), "model.vocab[%s]", q);
            return jerr(c, -EINVAL, p, "id %d is used twice (also by the token decoding to %s)", id,
                        q2);
        }
        tok->id_flags[id] |= TOK_ID_PRESENT;
        bool in_alphabet = bytelevel_to_bytes(v->string, tmp);
        if (set_id_bytes(tok, id, v->string, tmp) < 0) return nomem(c, "model.vocab");
        /* Only tokens spelled in the byte-level alphabet can come out of BPE. */
        if (in_alphabet &&
            tok_strmap_put(&tok->vocab, &tok->pool, tok->id_off[id], tok->id_len[id], id) < 0)
            return nomem(c, "model.vocab");
    }
    for (int b = 0; b < 256; b++) {
        uint8_t byte = (uint8_t)b;
        tok->byte_id[b] = tok_strmap_get(&tok->vocab, &tok->pool, &byte, 1);
        if (tok->byte_id[b] < 0) {
            uint8_t u[4];
            size_t un = tok_utf8_encode(tok_byte_to_cp[b], u);
            return jerr(c, -ENOTSUP, "model.vocab",
                        "no token for byte 0x%02x (\"%.*s\"): not a byte-level BPE vocabulary", b,
                        (int)un, (const char *)u);
        }
    }

    size_t n_merges = (size_t)cJSON_GetArraySize(merges);
    if (tok_pairmap_init(&tok->merges, n_merges) < 0) return nomem(c, "model.merges");
    tok_buf_t lb = {0};
    size_t mi = 0;
    st = 0;
    cJSON_ArrayForEach(v, merges)
    {
        const char *parts[2] = {NULL, NULL};
        char *split = NULL;
        snprintf(p, sizeof(p), "model.merges[%zu]", mi);
        if (cJSON_IsString(v)) {
            /* "a b": byte-level tokens never contain a space (it is spelled U+0120) */
            const char *sp = strchr(v->valuestring, ' ');
            if (!sp || strchr(sp + 1, ' ') || sp == v->valuestring || !sp[1]) {
                quote(q, sizeof(q), v->valuestring);
                st = jerr(c, -EINVAL, p, "%s is not two tokens separated by one space", q);
                break;
            }
            split = strdup(v->valuestring);
            if (!split) {
                st = nomem(c, "model.merges");
                break;
            }
            split[sp - v->valuestring] = 0;
            parts[0] = split;
            parts[1] = split + (sp - v->valuestring) + 1;
        } else if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(v, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(v, 1))) {
            parts[0] = cJSON_GetArrayItem(v, 0)->valuestring;
            parts[1] = cJSON_GetArrayItem(v, 1)->valuestring;
        } else {
            st = jerr(c, -EINVAL, p, "expected \"a b\" or [\"a\", \"b\"], got %s",
                      epd_json_type_name(v));
            break;
        }
        int32_t ids[2];
        lb.len = 0;
        for (int k = 0; k < 2 && !st; k++) {
            quote(q, sizeof(q), parts[k]);
            ids[k] = -1;
            if (bytelevel_to_bytes(parts[k], tmp))
                ids[k] = tok_strmap_get(&tok->vocab, &tok->pool, tmp->p, tmp->len);
            if (ids[k] < 0)
                st = jerr(c, -EINVAL, p, "token %s is not in model.vocab", q);
            else if (tok_buf_append(&lb, tmp->p, tmp->len) < 0)
                st = nomem(c, "model.merges");
        }
        if (!st) {
            int32_t merged = tok_strmap_get(&tok->vocab, &tok->pool, lb.p, lb.len);
            if (merged < 0) {
                char joined[256];
                snprintf(joined, sizeof(joined), "%s%s", parts[0], parts[1]);
                quote(q, sizeof(q), joined);
                st = jerr(c, -EINVAL, p, "the merged token %s is not in model.vocab", q);
            } else {
                tok_pairmap_put(&tok->merges, ids[0], ids[1], (uint32_t)mi, merged);
            }
        }
        free(split);
        if (st) break;
        mi++;
    }
    tok_buf_fini(&lb);
    return st;
}

static int added_cmp(const void *a, const void *b)
{
    const tok_added_t *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id; /* stable for equal lengths */
}

static int load_added(jctx_t *c, epd_tok_t *tok, const cJSON *added, tok_buf_t *tmp)
{
    if (!added || cJSON_IsNull(added)) return 0;
    size_t n = (size_t)cJSON_GetArraySize(added);
    tok->added = calloc(n ? n : 1, sizeof(*tok->added));
    if (!tok->added) return nomem(c, "added_tokens");
    const cJSON *v;
    size_t i = 0;
    char path[64], q[96];
    int st;
    cJSON_ArrayForEach(v, added)
    {
        snprintf(path, sizeof(path), "added_tokens[%zu]", i);
        const char *content;
        bool special, normalized, flag;
        if ((st = get_str(c, v, "content", path, &content))) return st;
        if (!content[0]) {
            snprintf(path, sizeof(path), "added_tokens[%zu].content", i);
            return jerr(c, -EINVAL, path, "an added token cannot be empty");
        }
        static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
        for (size_t k = 0; k < 3; k++) {
            if ((st = get_bool(c, v, unsupported[k], path, false, &flag))) return st;
            if (flag) {
                char p2[96];
                snprintf(p2, sizeof(p2), "%s.%s", path, unsupported[k]);
                quote(q, sizeof(q), content);
                return jerr(c, -ENOTSUP, p2, "unsupported true for %s (supported: false)", q);
            }
        }
        if ((st = get_bool(c, v, "special", path, false, &special))) return st;
        /* transformers' default: normalized unless special */
        if ((st = get_bool(c, v, "normalized", path, !special, &normalized))) return st;
        int32_t id = (int32_t)cJSON_GetObjectItemCaseSensitive(v, "id")->valuedouble;
        size_t len = strlen(content);
        if (tok->pool.len > UINT32_MAX - len) return nomem(c, "added_tokens");
        tok->added[i] = (tok_added_t){.off = (uint32_t)tok->pool.len,
                                      .len = (uint32_t)len,
                                      .id = id,
                                      .special = special,
                                      .normalized = normalized};
        if (tok_buf_append(&tok->pool, content, len) < 0) return nomem(c, "added_tokens");
        /* An added token decodes through the ByteLevel decoder like any other token. */
        if (set_id_bytes(tok, id, content, tmp) < 0) return nomem(c, "added_tokens");
        tok->id_flags[id] = TOK_ID_PRESENT | TOK_ID_ADDED | (special ? TOK_ID_SPECIAL : 0);
        tok->added_first[(uint8_t)content[0]] |= normalized ? 2 : 1;
        i++;
    }
    tok->n_added = i;
    qsort(tok->added, tok->n_added, sizeof(*tok->added), added_cmp);
    return 0;
}

static int load_normalizer(jctx_t *c, epd_tok_t *tok, const cJSON *norm, const char *path)
{
    static const char *const types[] = {"NFC", "Sequence", NULL};
    if (!norm || cJSON_IsNull(norm)) return 0;
    const char *type;
    int st = check_type(c, norm, path, "\"NFC\", \"Sequence\" of those, or null", types, &type);
    if (st) return st;
    if (strcmp(type, "NFC") == 0) {
        tok->nfc = true;
        return 0;
    }
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(norm, "normalizers");
    char p[256];
    snprintf(p, sizeof(p), "%s.normalizers", path);
    if (!cJSON_IsArray(list))
        return jerr(c, -EINVAL, p, "expected an array, got %s", epd_json_type_name(list));
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, list)
    {
        snprintf(p, sizeof(p), "%s.normalizers[%zu]", path, i++);
        if ((st = load_normalizer(c, tok, v, p))) return st;
    }
    return 0;
}

/* One Split pre-tokenizer (a Regex pattern, Isolated, not inverted), compiled into
 * tok->re[tok->n_re++]. */
static int load_split(jctx_t *c, epd_tok_t *tok, const cJSON *split, const char *p)
{
    char p2[160], q[96];
    const char *behavior;
    int st;
    if ((st = get_str(c, split, "behavior", p, &behavior))) return st;
    if (strcmp(behavior, "Isolated") != 0) {
        snprintf(p2, sizeof(p2), "%s.behavior", p);
        quote(q, sizeof(q), behavior);
        return jerr(c, -ENOTSUP, p2, "unsupported %s (supported: \"Isolated\")", q);
    }
    if ((st = require_false(c, split, "invert", p))) return st;
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(split, "pattern");
    snprintf(p2, sizeof(p2), "%s.pattern", p);
    if (!cJSON_IsObject(pat))
        return jerr(c, -EINVAL, p2, "expected an object, got %s", epd_json_type_name(pat));
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    if (!rx) return jerr(c, -ENOTSUP, p2, "unsupported pattern kind (supported: {\"Regex\": ...})");
    snprintf(p2, sizeof(p2), "%s.pattern.Regex", p);
    if (!cJSON_IsString(rx))
        return jerr(c, -EINVAL, p2, "expected a string, got %s", epd_json_type_name(rx));
    int errcode;
    PCRE2_SIZE erroff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)rx->valuestring, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP, &errcode, &erroff, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(errcode, msg, sizeof(msg));
        return jerr(c, -EINVAL, p2, "PCRE2 cannot compile it at offset %zu: %s", (size_t)erroff,
                    (const char *)msg);
    }
    /* JIT is an accelerator only: without it pcre2_match interprets the same pattern. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    tok->re[tok->n_re++] = re;
    return 0;
}

/* The pre-tokenizer: Splits (each regex, Isolated), applied in order, then ByteLevel without its
 * own regex and without a prefix space; alone, or as a Sequence [Split..., ByteLevel]. */
static int load_pretokenizer(jctx_t *c, epd_tok_t *tok, const cJSON *pre)
{
    static const char *const types[] = {"Sequence", "Split", "ByteLevel", NULL};
    static const char *const item_types[] = {"Split", "ByteLevel", NULL};
    const char *type;
    int st;
    if (!pre || cJSON_IsNull(pre))
        return jerr(c, -ENOTSUP, "pre_tokenizer",
                    "unsupported null (a byte-level BPE needs a ByteLevel pre-tokenizer)");
    if ((st = check_type(c, pre, "pre_tokenizer", "\"Sequence\", \"Split\", \"ByteLevel\"", types,
                         &type)))
        return st;
    const cJSON *list = NULL;
    size_t n = 1;
    bool seq = strcmp(type, "Sequence") == 0;
    if (seq) {
        list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        if (!cJSON_IsArray(list))
            return jerr(c, -EINVAL, "pre_tokenizer.pretokenizers", "expected an array, got %s",
                        epd_json_type_name(list));
        n = (size_t)cJSON_GetArraySize(list);
        if (n < 1 || n > TOK_MAX_SPLITS + 1)
            return jerr(c, -ENOTSUP, "pre_tokenizer.pretokenizers",
                        "unsupported sequence of %zu (supported: up to %d Splits, then ByteLevel)",
                        n, TOK_MAX_SPLITS);
    }
    bool have_bytelevel = false;
    for (size_t i = 0; i < n; i++) {
        const cJSON *item = seq ? cJSON_GetArrayItem(list, (int)i) : pre;
        char p[128], p2[160];
        snprintf(p, sizeof(p), seq ? "pre_tokenizer.pretokenizers[%zu]" : "pre_tokenizer", i);
        const char *t;
        if ((st = check_type(c, item, p, "\"Split\", \"ByteLevel\"", item_types, &t))) return st;
        if (strcmp(t, "Split") == 0) {
            if (i == n - 1)
                return jerr(c, -ENOTSUP, p,
                            "unsupported position of Split (supported: Splits, then ByteLevel)");
            if ((st = load_split(c, tok, item, p))) return st;
            continue;
        }
        bool flag;
        if (i != n - 1)
            return jerr(c, -ENOTSUP, p, "unsupported position of ByteLevel (it must come last)");
        if ((st = get_bool(c, item, "add_prefix_space", p, true, &flag))) return st;
        if (flag) {
            snprintf(p2, sizeof(p2), "%s.add_prefix_space", p);
            return jerr(c, -ENOTSUP, p2, "unsupported true (supported: false)");
        }
        if ((st = get_bool(c, item, "use_regex", p, true, &flag))) return st;
        if (flag) {
            snprintf(p2, sizeof(p2), "%s.use_regex", p);
            return jerr(c, -ENOTSUP, p2,
                        "unsupported true (supported: false, with the regex in a Split before)");
        }
        have_bytelevel = true;
    }
    if (!have_bytelevel) return jerr(c, -ENOTSUP, "pre_tokenizer", "no ByteLevel pre-tokenizer");
    return 0;
}

static int load_bytelevel_only(jctx_t *c, const cJSON *root, const char *key, bool allow_null)
{
    static const char *const types[] = {"ByteLevel", NULL};
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if ((!v || cJSON_IsNull(v)) && allow_null) return 0;
    if (!v || cJSON_IsNull(v))
        return jerr(c, -ENOTSUP, key, "unsupported null (supported: ByteLevel)");
    const char *type;
    return check_type(c, v, key, allow_null ? "\"ByteLevel\" or null" : "\"ByteLevel\"", types,
                      &type);
}

int tok_load_tokenizer_json(epd_tok_t *tok, const char *path, epd_err_t *err)
{
    jctx_t c = {.file = path, .err = err};
    cJSON *root = NULL;
    tok_buf_t tmp = {0};
    int st = tok_parse_json_file(c.file, &root, c.err);
    if (st) return st;
    static const char *const nulls[] = {"truncation", "padding"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, nulls[i]);
        if (v && !cJSON_IsNull(v)) {
            st = jerr(&c, -ENOTSUP, nulls[i], "unsupported %s (supported: null)",
                      epd_json_type_name(v));
            goto fail;
        }
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if ((st = load_model(&c, tok, model, added, &tmp))) goto fail;
    if ((st = load_added(&c, tok, added, &tmp))) goto fail;
    if ((st = load_normalizer(&c, tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"),
                              "normalizer")))
        goto fail;
    if (tok->nfc && (st = tok_nfc_init(tok, err))) goto fail;
    if ((st = load_pretokenizer(&c, tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"))))
        goto fail;
    /* The ByteLevel post-processor only adjusts offsets, which we do not report. */
    if ((st = load_bytelevel_only(&c, root, "post_processor", true))) goto fail;
    if ((st = load_bytelevel_only(&c, root, "decoder", false))) goto fail;
    cJSON_Delete(root);
    tok_buf_fini(&tmp);
    return 0;
fail:
    cJSON_Delete(root);
    tok_buf_fini(&tmp);
    return st;
}
