/* Duplicate keys (a walk of the parsed tree), string lengths past U+0000 (a second pass over
 * the text that cJSON accepted, in step with its tree) and strings with NUL written as
 * \u0000. */
#include "epd_json.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- duplicate keys ----------------------------------------------------------------------- */

/* Objects with more members than this get a hash set of their keys (a tokenizer's vocab has
 * 150k); smaller ones compare each key with the earlier ones. */
#define LINEAR_MAX 16
/* Bytes of one key shown in a path. */
#define KEY_SHOW_MAX 200

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

/* path[0..used) + ".key" or "[i]"; returns the new length (truncated paths stay terminated). */
static size_t path_push(char *path, size_t cap, size_t used, const cJSON *item, int index)
{
    if (!path || cap == 0) return 0;
    int n;
    if (index >= 0)
        n = snprintf(path + used, cap - used, "[%d]", index);
    else
        n = snprintf(path + used, cap - used, "%s%.*s", used ? "." : "", KEY_SHOW_MAX,
                     item->string ? item->string : "");
    if (n < 0) return used;
    return used + (size_t)n < cap ? used + (size_t)n : cap - 1;
}

static const cJSON *dup_in(const cJSON *v, char *path, size_t cap, size_t used);

static const cJSON *dup_in_object(const cJSON *obj, char *path, size_t cap, size_t used)
{
    size_t n = 0;
    for (const cJSON *m = obj->child; m; m = m->next)
        n++;
    const cJSON **set = NULL;
    size_t mask = 0;
    if (n > LINEAR_MAX) {
        size_t sz = 1;
        while (sz < 2 * n)
            sz <<= 1;
        set = calloc(sz, sizeof(*set));
        mask = sz - 1; /* without memory: the quadratic scan below */
    }
    const cJSON *found = NULL;
    for (const cJSON *m = obj->child; m && !found; m = m->next) {
        const char *k = m->string ? m->string : "";
        int repeated = 0;
        if (set) {
            size_t i = (size_t)fnv1a(k) & mask;
            for (; set[i]; i = (i + 1) & mask)
                if (!strcmp(set[i]->string ? set[i]->string : "", k)) {
                    repeated = 1;
                    break;
                }
            if (!repeated) set[i] = m;
        } else {
            for (const cJSON *e = obj->child; e != m && !repeated; e = e->next)
                repeated = !strcmp(e->string ? e->string : "", k);
        }
        size_t u = path_push(path, cap, used, m, -1);
        if (repeated)
            found = m;
        else
            found = dup_in(m, path, cap, u);
        if (!found && path) path[used] = '\0';
    }
    free(set);
    return found;
}

static const cJSON *dup_in(const cJSON *v, char *path, size_t cap, size_t used)
{
    if (cJSON_IsObject(v)) return dup_in_object(v, path, cap, used);
    if (!cJSON_IsArray(v)) return NULL;
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        size_t u = path_push(path, cap, used, e, i);
        const cJSON *found = dup_in(e, path, cap, u);
        if (found) return found;
        if (path) path[used] = '\0';
    }
    return NULL;
}

const cJSON *epd_json_find_duplicate(const cJSON *root, char *path, size_t path_len)
{
    if (path && path_len) path[0] = '\0';
    return dup_in(root, path_len ? path : NULL, path_len, 0);
}

/* ---- string lengths ----------------------------------------------------------------------- */

/* The text cJSON accepted, read again in step with the tree it built: cJSON's grammar (any byte
 * <= 0x20 is white space, a leading UTF-8 BOM, raw bytes inside strings) is followed, so a text
 * that parsed always matches; a mismatch leaves the remaining lengths unrecorded. */
typedef struct cur {
    const unsigned char *p, *end;
} cur_t;

static void skip_ws(cur_t *c)
{
    while (c->p < c->end && *c->p <= 0x20)
        c->p++;
}

static int hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9')
            v |= h - '0';
        else if (h >= 'a' && h <= 'f')
            v |= h - 'a' + 10;
        else if (h >= 'A' && h <= 'F')
            v |= h - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* The decoded byte length of the string token at c->p, which it consumes. */
static int string_len(cur_t *c, size_t *len)
{
    if (c->p >= c->end || *c->p != '"') return -1;
    size_t n = 0;
    for (c->p++; c->p < c->end && *c->p != '"'; n++) {
        if (*c->p != '\\') {
            c->p++;
            continue;
        }
        if (c->end - c->p < 2) return -1;
        if (c->p[1] != 'u') {
            c->p += 2;
            continue;
        }
        unsigned cp, lo;
        if (c->end - c->p < 6 || hex4(c->p + 2, &cp)) return -1;
        c->p += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair: one 4-byte character */
            if (c->end - c->p < 6 || c->p[0] != '\\' || c->p[1] != 'u' || hex4(c->p + 2, &lo))
                return -1;
            c->p += 6;
            n += 3;
        } else {
            n += cp < 0x80 ? 0 : cp < 0x800 ? 1 : 2;
        }
    }
    if (c->p >= c->end) return -1;
    c->p++;
    *len = n;
    return 0;
}

static int measure(cur_t *c, cJSON *item)
{
    skip_ws(c);
    if (c->p >= c->end) return -1;
    if (cJSON_IsString(item)) {
        size_t n;
        if (string_len(c, &n)) return -1;
        item->valueint = n > INT_MAX ? INT_MAX : (int)n;
        return 0;
    }
    if (cJSON_IsObject(item) || cJSON_IsArray(item)) {
        int obj = cJSON_IsObject(item);
        if (*c->p != (obj ? '{' : '[')) return -1;
        c->p++;
        for (cJSON *m = item->child; m; m = m->next) {
            if (m != item->child) {
                skip_ws(c);
                if (c->p >= c->end || *c->p != ',') return -1;
                c->p++;
            }
            if (obj) {
                size_t kl;
                skip_ws(c);
                if (string_len(c, &kl)) return -1;
                skip_ws(c);
                if (c->p >= c->end || *c->p != ':') return -1;
                c->p++;
            }
            if (measure(c, m)) return -1;
        }
        skip_ws(c);
        if (c->p >= c->end || *c->p != (obj ? '}' : ']')) return -1;
        c->p++;
        return 0;
    }
    /* numbers and literals hold no strings: skip their characters */
    while (c->p < c->end && (strchr("0123456789+-.eE", *c->p) || (*c->p >= 'a' && *c->p <= 'z')))
        c->p++;
    return 0;
}

cJSON *epd_json_parse(const char *text, size_t len, const char **end)
{
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, end, 0);
    if (!root) return NULL;
    cur_t c = {(const unsigned char *)text, (const unsigned char *)text + len};
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) c.p += 3;
    (void)measure(&c, root);
    return root;
}

size_t epd_json_strlen(const cJSON *s)
{
    if (!cJSON_IsString(s) || !s->valuestring) return 0;
    size_t n = strlen(s->valuestring);
    return s->valueint > 0 && (size_t)s->valueint > n ? (size_t)s->valueint : n;
}

/* ---- writing ------------------------------------------------------------------------------ */

cJSON *epd_json_string_n(const char *s, size_t n)
{
    if (!memchr(s, '\0', n)) {
        char *t = malloc(n + 1);
        if (!t) return NULL;
        memcpy(t, s, n);
        t[n] = '\0';
        cJSON *item = cJSON_CreateString(t);
        free(t);
        return item;
    }
    /* as cJSON escapes: '"', '\\', and bytes below 0x20 (\b \f \n \r \t or \u00XX) */
    if (n > (SIZE_MAX - 3) / 6) return NULL;
    char *lit = malloc(6 * n + 3), *o = lit;
    if (!lit) return NULL;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        const char *esc = NULL;
        switch (ch) {
        case '"':
            esc = "\\\"";
            break;
        case '\\':
            esc = "\\\\";
            break;
        case '\b':
            esc = "\\b";
            break;
        case '\f':
            esc = "\\f";
            break;
        case '\n':
            esc = "\\n";
            break;
        case '\r':
            esc = "\\r";
            break;
        case '\t':
            esc = "\\t";
            break;
        default:
            break;
        }
        if (esc) {
            memcpy(o, esc, 2);
            o += 2;
        } else if (ch < 0x20) {
            o += sprintf(o, "\\u%04x", ch);
        } else {
            *o++ = (char)ch;
        }
    }
    *o++ = '"';
    *o = '\0';
    cJSON *item = cJSON_CreateRaw(lit);
    free(lit);
    return item;
}

const char *epd_json_type_name(const cJSON *v)
{
    if (!v) return "missing";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    return "an object";
}
