/* Loading a config: file checks, JSON parsing (cJSON), the table-driven walk that applies and
 * validates every setting, the defaults and the entry points; every error is collected (never
 * only the first), each naming the origin and the JSON path. The cross-setting rules and the
 * file-system checks are in config_rules.c. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "config_int.h"

#define SHOW_MAX 40     /* longest string shown in "got ..." before it is cut */
#define KEY_SHOW_MAX 64 /* longest key shown in a path */
#define SUGGEST_MAX 64  /* keys longer than this get no "did you mean" */
#define NEAR_BYTES 12   /* bytes shown on each side of a JSON syntax error */

/* snprintf for paths and messages built from bounded pieces: a cut is acceptable (the text
 * only names things), so it goes through vsnprintf, which -Wformat-truncation leaves alone. */
int cfg_bprintf(char *out, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    return n;
}

/* ---- errors ---- */

static int total_errors(const ctx_t *c)
{
    return c->errs->count + c->errs->dropped;
}

static bool errors_full(const ctx_t *c)
{
    return c->errs->count >= EPD_CFG_MAX_ERRORS;
}

static void push_msg(ctx_t *c, char *msg)
{
    epd_config_errors_t *e = c->errs;
    if (!msg || e->count >= EPD_CFG_MAX_ERRORS) goto drop;
    if (e->count == e->cap) {
        int cap = e->cap ? 2 * e->cap : 8;
        char **m = realloc(e->msgs, (size_t)cap * sizeof(*m));
        if (!m) goto drop;
        e->msgs = m;
        e->cap = cap;
    }
    e->msgs[e->count++] = msg;
    return;
drop:
    free(msg);
    e->dropped++;
}

static char *vformat(const char *fmt, va_list ap)
{
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    if (n < 0) return NULL;
    char *s = malloc((size_t)n + 1);
    if (s) vsnprintf(s, (size_t)n + 1, fmt, ap);
    return s;
}

static char *format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

/* The load's status is that of its first error: what set_status recorded just before it, else
 * -EINVAL (the config itself is wrong). */
static void set_status(ctx_t *c, int status)
{
    if (!c->errs->status) c->errs->status = status;
}

/* "ORIGIN: PATH: message", or "ORIGIN: message" without a path. */
void cfg_report(ctx_t *c, const char *path, const char *fmt, ...)
{
    set_status(c, -EINVAL);
    if (errors_full(c)) {
        c->errs->dropped++;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    char *body = vformat(fmt, ap);
    va_end(ap);
    char *msg = NULL;
    if (body)
        msg =
            path ? format("%s: %s: %s", c->origin, path, body) : format("%s: %s", c->origin, body);
    free(body);
    push_msg(c, msg);
}

/* ---- rendering values for messages ---- */

/* Appends s[0..len) to out (size cap) as a C-like escaped string body, cut at `max` bytes. */
static void escape(char *out, size_t cap, const char *s, size_t len, size_t max)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 5 < cap; i++) {
        if (i == max) {
            cfg_bprintf(out + o, cap - o, "...");
            return;
        }
        unsigned char ch = (unsigned char)s[i];
        int w;
        if (ch == '"' || ch == '\\')
            w = cfg_bprintf(out + o, cap - o, "\\%c", ch);
        else if (ch == '\n')
            w = cfg_bprintf(out + o, cap - o, "\\n");
        else if (ch == '\t')
            w = cfg_bprintf(out + o, cap - o, "\\t");
        else if (ch < 0x20 || ch == 0x7f)
            w = cfg_bprintf(out + o, cap - o, "\\x%02x", ch);
        else
            w = cfg_bprintf(out + o, cap - o, "%c", ch);
        if (w < 0) break;
        o += (size_t)w;
    }
    if (o < cap) out[o] = '\0';
}

/* A JSON value as a message shows it: "x" (quoted, escaped, cut), 12, true, an object. */
static const char *show(const cJSON *v, char *buf, size_t cap)
{
    if (cJSON_IsString(v)) {
        char tmp[4 * SHOW_MAX + 8];
        escape(tmp, sizeof(tmp), v->valuestring, strlen(v->valuestring), SHOW_MAX);
        cfg_bprintf(buf, cap, "\"%s\"", tmp);
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 1e15)
            cfg_bprintf(buf, cap, "%.0f", d);
        else
            cfg_bprintf(buf, cap, "%.15g", d);
    } else if (cJSON_IsTrue(v)) {
        cfg_bprintf(buf, cap, "true");
    } else if (cJSON_IsFalse(v)) {
        cfg_bprintf(buf, cap, "false");
    } else if (cJSON_IsNull(v)) {
        cfg_bprintf(buf, cap, "null");
    } else if (cJSON_IsArray(v)) {
        cfg_bprintf(buf, cap, "an array");
    } else if (cJSON_IsObject(v)) {
        cfg_bprintf(buf, cap, "an object");
    } else {
        cfg_bprintf(buf, cap, "an invalid value");
    }
    return buf;
}

#define SHOW(v) show((v), (char[4 * SHOW_MAX + 16]){0}, 4 * SHOW_MAX + 16)

/* ---- key suggestions ---- */

/* Optimal string alignment distance (Levenshtein plus adjacent transposition). */
static size_t osa_distance(const char *a, const char *b)
{
    size_t n = strlen(a), m = strlen(b);
    size_t d[SUGGEST_MAX + 1][SUGGEST_MAX + 1];
    if (n > SUGGEST_MAX || m > SUGGEST_MAX) return (size_t)-1;
    for (size_t i = 0; i <= n; i++)
        d[i][0] = i;
    for (size_t j = 0; j <= m; j++)
        d[0][j] = j;
    for (size_t i = 1; i <= n; i++)
        for (size_t j = 1; j <= m; j++) {
            size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            size_t v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v) v = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    return d[n][m];
}

/* The child key name of `path` below `rel` (copied into out), false if path is not below. */
static bool child_name(const char *path, const char *rel, char *out, size_t cap)
{
    size_t rl = strlen(rel);
    if (strncmp(path, rel, rl) != 0) return false;
    const char *p = path + rl;
    size_t k = strcspn(p, ".");
    if (k == 0 || k >= cap) return false;
    memcpy(out, p, k);
    out[k] = '\0';
    return true;
}

/* The known key at this level closest to `key`, if it is close enough to be a likely typo. */
static bool suggest(const epd_cfg_setting_t *tab, int n, const char *rel, const char *key,
                    char *out, size_t cap)
{
    size_t best = (size_t)-1;
    for (int i = 0; i < n; i++) {
        char name[SUGGEST_MAX + 1];
        if (!child_name(tab[i].path, rel, name, sizeof(name))) continue;
        size_t d = osa_distance(key, name);
        if (strcasecmp(key, name) == 0) d = 1;
        size_t longer = strlen(key) > strlen(name) ? strlen(key) : strlen(name);
        if (d <= 2 && d * 4 <= longer && d < best) {
            best = d;
            cfg_bprintf(out, cap, "%s", name);
        }
    }
    return best != (size_t)-1;
}

/* ---- setters, one per type ---- */

int cfg_setting_index(const epd_cfg_setting_t *s)
{
    if (s >= epd_cfg_settings && s < epd_cfg_settings + epd_cfg_num_settings)
        return (int)(s - epd_cfg_settings);
    return -1;
}

static bool integral_in(const cJSON *v, long long min, long long max)
{
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    return d == floor(d) && d >= (double)min && d <= (double)max;
}

static void set_int(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                    void *base)
{
    if (!integral_in(v, s->min, s->max)) {
        cfg_report(c, path, "expected an integer %lld..%lld, got %s", s->min, s->max, SHOW(v));
        return;
    }
    if (s->type == EPD_CFG_SIZE)
        *(size_t *)((char *)base + s->offset) = (size_t)v->valuedouble;
    else
        *(int *)((char *)base + s->offset) = (int)v->valuedouble;
}

static void set_bool(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                     void *base)
{
    if (!cJSON_IsBool(v)) {
        cfg_report(c, path, "expected true or false, got %s", SHOW(v));
        return;
    }
    *(int *)((char *)base + s->offset) = cJSON_IsTrue(v);
}

static void set_number(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                       void *base)
{
    int open = (s->flags & EPD_CFG_F_OPEN_MIN) != 0;
    double x = cJSON_IsNumber(v) ? v->valuedouble : 0;
    if (!cJSON_IsNumber(v) || !(open ? x > s->fmin : x >= s->fmin) || !(x <= s->fmax)) {
        cfg_report(c, path, "expected a number in %s%g, %g], got %s", open ? "(" : "[", s->fmin,
                   s->fmax, SHOW(v));
        return;
    }
    *(double *)((char *)base + s->offset) = x;
}

static bool char_ok(epd_cfg_charset_t cs, unsigned char ch)
{
    switch (cs) {
    case EPD_CFG_CHARS_NAME:
        return isalnum(ch) || ch == '.' || ch == '_' || ch == '-';
    case EPD_CFG_CHARS_HOST:
        return isalnum(ch) || ch == '.' || ch == '_' || ch == '-' || ch == ':' || ch == '%';
    case EPD_CFG_CHARS_TEXT:
    case EPD_CFG_CHARS_PATH:
        return ch >= 0x20 && ch != 0x7f;
    }
    return false;
}

static const char *charset_doc(epd_cfg_charset_t cs)
{
    switch (cs) {
    case EPD_CFG_CHARS_NAME:
        return "letters, digits, '.', '_', '-'";
    case EPD_CFG_CHARS_HOST:
        return "a host name or an IP literal: letters, digits, '.', '_', '-', ':', '%'";
    default:
        return "no control characters";
    }
}

static void set_string(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                       void *base)
{
    if (!cJSON_IsString(v)) {
        cfg_report(c, path, "expected a string, got %s", SHOW(v));
        return;
    }
    const char *str = v->valuestring;
    size_t len = strlen(str);
    if (len < (size_t)s->min) {
        cfg_report(c, path, "must not be empty");
        return;
    }
    if (len > (size_t)s->max) {
        cfg_report(c, path, "string too long: %zu bytes, at most %lld", len, s->max);
        return;
    }
    for (size_t i = 0; i < len; i++) {
        if (!char_ok(s->charset, (unsigned char)str[i])) {
            char ch[8];
            escape(ch, sizeof(ch), str + i, 1, 1);
            cfg_report(c, path, "invalid character '%s' at offset %zu of %s (allowed: %s)", ch, i,
                       SHOW(v), charset_doc(s->charset));
            return;
        }
    }
    if (s->charset == EPD_CFG_CHARS_PATH && len > 0 && str[0] != '/') {
        cfg_report(c, path, "expected an absolute path (the daemon runs from /), got %s", SHOW(v));
        return;
    }
    char *dst = (char *)base + s->offset;
    memset(dst, 0, s->cap);
    memcpy(dst, str, len);
}

static void enum_list(const epd_cfg_setting_t *s, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (int i = 0; i < s->num_names && o < cap; i++) {
        int w = cfg_bprintf(out + o, cap - o, "%s\"%s\"", i ? ", " : "", s->names[i]);
        if (w < 0) break;
        o += (size_t)w;
    }
}

static void set_enum(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                     void *base)
{
    char allowed[256];
    enum_list(s, allowed, sizeof(allowed));
    if (cJSON_IsString(v)) {
        for (int i = 0; i < s->num_names; i++) {
            if (strcmp(v->valuestring, s->names[i]) == 0) {
                *(int *)((char *)base + s->offset) = s->values[i];
                return;
            }
        }
        char near[SUGGEST_MAX + 1];
        for (int i = 0; i < s->num_names; i++) {
            size_t d = osa_distance(v->valuestring, s->names[i]);
            if (strcasecmp(v->valuestring, s->names[i]) == 0 ||
                (d <= 2 && d * 4 <= strlen(s->names[i]))) {
                cfg_bprintf(near, sizeof(near), "%s", s->names[i]);
                cfg_report(c, path, "expected one of %s, got %s; did you mean \"%s\"?", allowed,
                           SHOW(v), near);
                return;
            }
        }
    }
    cfg_report(c, path, "expected one of %s, got %s", allowed, SHOW(v));
}

/* The length of array v for list setting s, or -1 after reporting why not (not an array of
 * `what`, or more than s->cap entries). */
static int bounded_array(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                         const char *what)
{
    if (!cJSON_IsArray(v)) {
        cfg_report(c, path, "expected an array of %s, got %s", what, SHOW(v));
        return -1;
    }
    int n = 0;
    for (const cJSON *e = v->child; e; e = e->next)
        n++;
    if ((size_t)n > s->cap) {
        cfg_report(c, path, "too many entries: %d, at most %zu", n, s->cap);
        return -1;
    }
    return n;
}

static void set_int_list(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                         void *base)
{
    const int n = bounded_array(c, s, v, path, "integers");
    if (n < 0) return;
    int *arr = (int *)((char *)base + s->offset);
    int i = 0, errors = total_errors(c);
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        char ep[PATH_BUF];
        cfg_bprintf(ep, sizeof(ep), "%s[%d]", path, i);
        if (!integral_in(e, s->min, s->max)) {
            cfg_report(c, ep, "expected an integer %lld..%lld, got %s", s->min, s->max, SHOW(e));
            arr[i] = -1;
            continue;
        }
        arr[i] = (int)e->valuedouble;
        if (s->flags & EPD_CFG_F_DISTINCT) {
            for (int j = 0; j < i; j++) {
                if (arr[j] == arr[i]) {
                    cfg_report(c, ep, "duplicate value %d (also %s[%d])", arr[i], path, j);
                    break;
                }
            }
        }
    }
    if (total_errors(c) == errors) *(int *)((char *)base + s->count_offset) = n;
}

static void walk_object(ctx_t *c, const cJSON *obj, const epd_cfg_setting_t *tab, int n,
                        const char *rel, const char *disp, void *base);

static void set_obj_list(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                         void *base)
{
    const int n = bounded_array(c, s, v, path, "objects");
    if (n < 0) return;
    char *arr = (char *)base + s->offset;
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        char ep[PATH_BUF];
        int errors = total_errors(c);
        cfg_bprintf(ep, sizeof(ep), "%s[%d]", path, i);
        if (!cJSON_IsObject(e)) {
            cfg_report(c, ep, "expected an object, got %s", SHOW(e));
        } else {
            char prefix[PATH_BUF];
            cfg_bprintf(prefix, sizeof(prefix), "%s.", ep);
            walk_object(c, e, s->fields, s->num_fields, "", prefix, arr + (size_t)i * s->elem_size);
        }
        /* Only cluster.peers is an object list; its elements' health feeds the peer rules. */
        if (total_errors(c) != errors && c->peer_bad && i < EPD_CFG_MAX_PEERS) c->peer_bad[i] = 1;
    }
    *(int *)((char *)base + s->count_offset) = n;
}

static void apply(ctx_t *c, const epd_cfg_setting_t *s, const cJSON *v, const char *path,
                  void *base)
{
    switch (s->type) {
    case EPD_CFG_INT:
    case EPD_CFG_SIZE:
        set_int(c, s, v, path, base);
        break;
    case EPD_CFG_STRING:
        set_string(c, s, v, path, base);
        break;
    case EPD_CFG_ENUM:
        set_enum(c, s, v, path, base);
        break;
    case EPD_CFG_INT_LIST:
        set_int_list(c, s, v, path, base);
        break;
    case EPD_CFG_OBJ_LIST:
        set_obj_list(c, s, v, path, base);
        break;
    case EPD_CFG_BOOL:
        set_bool(c, s, v, path, base);
        break;
    case EPD_CFG_NUMBER:
        set_number(c, s, v, path, base);
        break;
    }
}

/* ---- the walk ---- */

static void mark_bad_below(ctx_t *c, const epd_cfg_setting_t *tab, int n, const char *rel)
{
    size_t rl = strlen(rel);
    for (int i = 0; i < n; i++) {
        int idx = cfg_setting_index(&tab[i]);
        if (idx >= 0 && strncmp(tab[i].path, rel, rl) == 0) c->bad[idx] = 1;
    }
}

/* Applies the members of `obj` to the settings of `tab` whose paths lie below `rel` (table
 * namespace, "" or "cluster.listen."); `disp` is the same prefix as messages show it. */
static void walk_object(ctx_t *c, const cJSON *obj, const epd_cfg_setting_t *tab, int n,
                        const char *rel, const char *disp, void *base)
{
    /* seen[i]: the child key whose first setting is tab[i] appeared already */
    unsigned char seen[EPD_CFG_MAX_SETTINGS] = {0};
    size_t rl = strlen(rel);

    for (const cJSON *m = obj->child; m; m = m->next) {
        const char *key = m->string ? m->string : "";
        size_t kl = strlen(key);
        char shown[4 * KEY_SHOW_MAX + 8], path[PATH_BUF];
        escape(shown, sizeof(shown), key, kl, KEY_SHOW_MAX);
        cfg_bprintf(path, sizeof(path), "%s%s", disp, shown);

        int child = -1;
        bool leaf = false;
        if (kl > 0 && !strchr(key, '.')) {
            for (int i = 0; i < n; i++) {
                const char *p = tab[i].path;
                if (strncmp(p, rel, rl) != 0 || strncmp(p + rl, key, kl) != 0) continue;
                char next = p[rl + kl];
                if (next == '\0' || next == '.') {
                    child = i;
                    leaf = next == '\0';
                    break;
                }
            }
        }
        if (child < 0) {
            char near[SUGGEST_MAX + 1];
            if (errors_full(c))
                cfg_report(c, path, "unknown key");
            else if (strchr(key, '.'))
                cfg_report(c, path,
                           "unknown key (nest sections as objects: {\"a\": {\"b\": ...}})");
            else if (suggest(tab, n, rel, key, near, sizeof(near)))
                cfg_report(c, path, "unknown key; did you mean '%s'?", near);
            else
                cfg_report(c, path, "unknown key");
            continue;
        }
        if (seen[child]) {
            cfg_report(c, path, "duplicate key");
            continue;
        }
        seen[child] = 1;

        if (leaf) {
            int idx = cfg_setting_index(&tab[child]);
            int errors = total_errors(c);
            apply(c, &tab[child], m, path, base);
            if (idx >= 0) {
                c->present[idx] = 1;
                if (total_errors(c) != errors) c->bad[idx] = 1;
            }
        } else {
            char sub_rel[PATH_BUF], sub_disp[PATH_BUF];
            cfg_bprintf(sub_rel, sizeof(sub_rel), "%s%s.", rel, key);
            cfg_bprintf(sub_disp, sizeof(sub_disp), "%s.", path);
            if (!cJSON_IsObject(m)) {
                cfg_report(c, path, "expected an object, got %s", SHOW(m));
                mark_bad_below(c, tab, n, sub_rel);
                continue;
            }
            walk_object(c, m, tab, n, sub_rel, sub_disp, base);
        }
    }

    for (int i = 0; i < n; i++) {
        const char *p = tab[i].path;
        if (!(tab[i].flags & EPD_CFG_F_REQUIRED) || strncmp(p, rel, rl) != 0 ||
            strchr(p + rl, '.') || seen[i])
            continue;
        char path[PATH_BUF];
        cfg_bprintf(path, sizeof(path), "%s%s", disp, p + rl);
        cfg_report(c, path, "missing (required)");
        int idx = cfg_setting_index(&tab[i]);
        if (idx >= 0) c->bad[idx] = 1;
    }
}

/* ---- defaults ---- */

static void set_default(const epd_cfg_setting_t *s, void *base)
{
    char *p = (char *)base + s->offset;
    switch (s->type) {
    case EPD_CFG_INT:
    case EPD_CFG_ENUM:
    case EPD_CFG_BOOL:
        *(int *)p = (int)s->def;
        break;
    case EPD_CFG_NUMBER:
        *(double *)p = s->fdef;
        break;
    case EPD_CFG_SIZE:
        *(size_t *)p = (size_t)s->def;
        break;
    case EPD_CFG_STRING:
        memset(p, 0, s->cap);
        if (s->flags & EPD_CFG_F_HOSTNAME) {
            char host[256] = {0};
            if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
                cfg_bprintf(host, sizeof(host), "localhost");
            /* keep only what node.name accepts, so that the default always validates */
            size_t o = 0;
            for (size_t i = 0; host[i] && o < s->cap - 1 && o < (size_t)s->max; i++)
                if (char_ok(s->charset, (unsigned char)host[i])) p[o++] = host[i];
            if (o == 0) cfg_bprintf(p, s->cap, "localhost");
        } else if (s->def_str) {
            cfg_bprintf(p, s->cap, "%s", s->def_str);
        }
        break;
    case EPD_CFG_INT_LIST:
    case EPD_CFG_OBJ_LIST:
        *(int *)((char *)base + s->count_offset) = 0;
        break;
    }
}

void epd_config_defaults(epd_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    for (int i = 0; i < epd_cfg_num_settings; i++)
        set_default(&epd_cfg_settings[i], cfg);
}

/* ---- entry points ---- */

static int ctx_init(ctx_t *c, const char *origin, unsigned flags, epd_config_errors_t *errs)
{
    memset(errs, 0, sizeof(*errs));
    memset(c, 0, sizeof(*c));
    c->origin = origin ? origin : "<config>";
    c->flags = flags;
    c->errs = errs;
    c->bad = calloc((size_t)epd_cfg_num_settings, 1);
    c->present = calloc((size_t)epd_cfg_num_settings, 1);
    c->peer_bad = calloc(EPD_CFG_MAX_PEERS, 1);
    if (!c->bad || !c->present || !c->peer_bad) {
        set_status(c, -ENOMEM);
        cfg_report(c, NULL, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

static int ctx_fini(ctx_t *c)
{
    free(c->bad);
    free(c->present);
    free(c->peer_bad);
    if (total_errors(c)) set_status(c, -EINVAL);
    return c->errs->status;
}

static void parse_text(ctx_t *c, const char *json, size_t len, epd_config_t *cfg)
{
    char *buf = NULL;
    cJSON *root = NULL;

    size_t ws = 0;
    while (ws < len && isspace((unsigned char)json[ws]))
        ws++;
    if (ws == len) {
        cfg_report(c, NULL, "file is empty (expected a JSON object)");
        goto out;
    }
    if (len > EPD_CFG_MAX_FILE_BYTES) {
        set_status(c, -EFBIG);
        cfg_report(c, NULL, "%zu bytes, larger than the limit of %u bytes", len,
                   EPD_CFG_MAX_FILE_BYTES);
        goto out;
    }
    const char *nul = memchr(json, '\0', len);
    /* cJSON reads NUL-terminated text: copy it so that the input needs no terminator */
    buf = malloc(len + 1);
    if (!buf) {
        set_status(c, -ENOMEM);
        cfg_report(c, NULL, "out of memory");
        goto out;
    }
    memcpy(buf, json, len);
    buf[len] = '\0';

    size_t err_at = len;
    if (!nul) {
        const char *end = NULL;
        root = cJSON_ParseWithLengthOpts(buf, len + 1, &end, 1);
        if (!root) err_at = end && end >= buf && end <= buf + len ? (size_t)(end - buf) : 0;
    } else {
        err_at = (size_t)(nul - json);
    }
    if (!root) {
        int line = 1, col = 1;
        for (size_t i = 0; i < err_at; i++) {
            if (buf[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
        /* cJSON's error offset can sit one byte past the culprit (a bad key is consumed
         * before it is refused), so the excerpt shows the line around it on both sides */
        size_t from = err_at, to = err_at;
        while (from > 0 && err_at - from < NEAR_BYTES && buf[from - 1] != '\n')
            from--;
        while (to < len && to - err_at < NEAR_BYTES && buf[to] != '\n')
            to++;
        char near[4 * 2 * NEAR_BYTES + 8];
        escape(near, sizeof(near), buf + from, to - from, 2 * NEAR_BYTES);
        char *msg;
        if (nul)
            msg = format("%s:%d:%d: NUL byte at byte %zu (a config is JSON text)", c->origin, line,
                         col, err_at);
        else if (err_at >= len)
            msg = format("%s:%d:%d: invalid JSON: unexpected end of input (byte %zu)", c->origin,
                         line, col, err_at);
        else
            msg = format("%s:%d:%d: invalid JSON at byte %zu, near \"%s\"", c->origin, line, col,
                         err_at, near);
        if (errors_full(c)) {
            free(msg);
            c->errs->dropped++;
        } else {
            push_msg(c, msg);
        }
        goto out;
    }
    if (!cJSON_IsObject(root)) {
        cfg_report(c, NULL, "expected a JSON object at the top level, got %s", SHOW(root));
        goto out;
    }

    walk_object(c, root, epd_cfg_settings, epd_cfg_num_settings, "", "", cfg);
    for (int i = 0; i < epd_cfg_num_rules; i++)
        epd_cfg_rules[i].check(c, cfg);
    if (!(c->flags & EPD_CONFIG_SKIP_FS_CHECKS)) cfg_check_files(c, cfg);
out:
    cJSON_Delete(root);
    free(buf);
}

int epd_config_parse_ex(const char *json, size_t len, const char *origin, unsigned flags,
                        epd_config_t *cfg, epd_config_errors_t *errs)
{
    ctx_t c;
    epd_config_defaults(cfg);
    if (ctx_init(&c, origin, flags, errs) == 0) {
        if (!json && len > 0)
            cfg_report(&c, NULL, "no text given");
        else
            parse_text(&c, json ? json : "", len, cfg);
    }
    return ctx_fini(&c);
}

int epd_config_parse(const char *json, size_t len, const char *origin, epd_config_t *cfg,
                     epd_config_errors_t *errs)
{
    return epd_config_parse_ex(json, len, origin, 0, cfg, errs);
}

int epd_config_load_ex(const char *path, unsigned flags, epd_config_t *cfg,
                       epd_config_errors_t *errs)
{
    ctx_t c;
    char *buf = NULL;
    int fd = -1;
    size_t len = 0;

    epd_config_defaults(cfg);
    if (ctx_init(&c, path, flags, errs) != 0) goto out;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_status(&c, -errno);
        cfg_report(&c, NULL, "cannot open: %s", strerror(-c.errs->status));
        goto out;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        set_status(&c, -errno);
        cfg_report(&c, NULL, "cannot stat: %s", strerror(-c.errs->status));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        cfg_report(&c, NULL, "not a regular file");
        goto out;
    }
    if (st.st_size > (off_t)EPD_CFG_MAX_FILE_BYTES) {
        set_status(&c, -EFBIG);
        cfg_report(&c, NULL, "%lld bytes, larger than the limit of %u bytes", (long long)st.st_size,
                   EPD_CFG_MAX_FILE_BYTES);
        goto out;
    }
    /* read up to one byte past the limit: the file may have grown since fstat */
    buf = malloc(EPD_CFG_MAX_FILE_BYTES + 1);
    if (!buf) {
        set_status(&c, -ENOMEM);
        cfg_report(&c, NULL, "out of memory");
        goto out;
    }
    while (len <= EPD_CFG_MAX_FILE_BYTES) {
        ssize_t r = read(fd, buf + len, EPD_CFG_MAX_FILE_BYTES + 1 - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            set_status(&c, -errno);
            cfg_report(&c, NULL, "cannot read: %s", strerror(-c.errs->status));
            goto out;
        }
        if (r == 0) break;
        len += (size_t)r;
    }
    parse_text(&c, buf, len, cfg);
out:
    if (fd >= 0) close(fd);
    free(buf);
    return ctx_fini(&c);
}

int epd_config_load(const char *path, epd_config_t *cfg, epd_config_errors_t *errs)
{
    return epd_config_load_ex(path, 0, cfg, errs);
}

void epd_config_errors_free(epd_config_errors_t *errs)
{
    if (!errs) return;
    for (int i = 0; i < errs->count; i++)
        free(errs->msgs[i]);
    free(errs->msgs);
    memset(errs, 0, sizeof(*errs));
}

void epd_config_errors_print(const epd_config_errors_t *errs, FILE *out)
{
    for (int i = 0; i < errs->count; i++)
        fprintf(out, "%s\n", errs->msgs[i]);
    if (errs->dropped > 0) fprintf(out, "... and %d more errors not shown\n", errs->dropped);
}
