/* From a validated config back out: the effective config as JSON, the cluster fingerprint
 * (SHA-256 over the cluster-wide settings' canonical JSON) and the diff naming a setting. */
#include <stdbool.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "config_table.h"

#define DIFF_VALUE_MAX 64 /* longest value shown in a diff line before it is cut */

/* Fingerprint input format; bump when the canonical form changes so that old and new nodes
 * refuse each other rather than silently disagree. */
static const char fingerprint_tag[] = "epd-config-fingerprint-v1\n";

/* Adds `value` to `root` at the dotted `path`, creating the sections on the way. */
static int put_path(cJSON *root, const char *path, cJSON *value)
{
    char name[128];
    cJSON *obj = root;
    const char *p = path;
    for (;;) {
        size_t k = strcspn(p, ".");
        if (k >= sizeof(name)) goto fail;
        memcpy(name, p, k);
        name[k] = '\0';
        if (p[k] == '\0') break;
        cJSON *sub = cJSON_GetObjectItemCaseSensitive(obj, name);
        if (!sub) {
            sub = cJSON_AddObjectToObject(obj, name);
            if (!sub) goto fail;
        }
        obj = sub;
        p += k + 1;
    }
    if (!cJSON_AddItemToObject(obj, name, value)) goto fail;
    return 0;
fail:
    cJSON_Delete(value);
    return -1;
}

cJSON *epd_cfg_emit(const epd_cfg_setting_t *s, const void *base)
{
    const char *p = (const char *)base + s->offset;
    switch (s->type) {
    case EPD_CFG_INT:
        return cJSON_CreateNumber(*(const int *)p);
    case EPD_CFG_SIZE:
        return cJSON_CreateNumber((double)*(const size_t *)p);
    case EPD_CFG_STRING:
        return cJSON_CreateString(p);
    case EPD_CFG_BOOL:
        return cJSON_CreateBool(*(const int *)p);
    case EPD_CFG_NUMBER:
        return cJSON_CreateNumber(*(const double *)p);
    case EPD_CFG_ENUM: {
        const char *n = epd_cfg_enum_name(s, *(const int *)p);
        return cJSON_CreateString(n ? n : "?");
    }
    case EPD_CFG_INT_LIST: {
        int n = *(const int *)((const char *)base + s->count_offset);
        return cJSON_CreateIntArray((const int *)p, n);
    }
    case EPD_CFG_OBJ_LIST: {
        int n = *(const int *)((const char *)base + s->count_offset);
        cJSON *arr = cJSON_CreateArray();
        for (int i = 0; arr && i < n; i++) {
            const char *elem = p + (size_t)i * s->elem_size;
            cJSON *obj = cJSON_CreateObject();
            if (!obj || !cJSON_AddItemToArray(arr, obj)) {
                cJSON_Delete(obj);
                goto fail;
            }
            for (int f = 0; f < s->num_fields; f++) {
                cJSON *v = epd_cfg_emit(&s->fields[f], elem);
                if (!v || put_path(obj, s->fields[f].path, v) != 0) goto fail;
            }
        }
        return arr;
    fail:
        cJSON_Delete(arr);
        return NULL;
    }
    }
    return NULL;
}

cJSON *epd_config_to_cjson(const epd_config_t *cfg)
{
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    for (int i = 0; i < epd_cfg_num_settings; i++) {
        cJSON *v = epd_cfg_emit(&epd_cfg_settings[i], cfg);
        if (!v || put_path(root, epd_cfg_settings[i].path, v) != 0) goto fail;
    }
    return root;
fail:
    cJSON_Delete(root);
    return NULL;
}

char *epd_config_dump_json(const epd_config_t *cfg)
{
    cJSON *root = epd_config_to_cjson(cfg);
    char *text = root ? cJSON_Print(root) : NULL;
    char *out = text ? strdup(text) : NULL;
    cJSON_free(text);
    cJSON_Delete(root);
    return out;
}

int epd_config_fingerprint(const epd_config_t *cfg, uint8_t digest[EPD_CFG_FINGERPRINT_LEN])
{
    int rc = -EIO;
    unsigned int dlen = 0;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) goto fail;
    if (EVP_DigestUpdate(md, fingerprint_tag, sizeof(fingerprint_tag) - 1) != 1) goto fail;
    /* "path=<compact JSON>\n" per cluster-wide setting, in table order */
    for (int i = 0; i < epd_cfg_num_settings; i++) {
        const epd_cfg_setting_t *s = &epd_cfg_settings[i];
        if (!(s->flags & EPD_CFG_F_CLUSTER)) continue;
        cJSON *v = epd_cfg_emit(s, cfg);
        char *text = v ? cJSON_PrintUnformatted(v) : NULL;
        cJSON_Delete(v);
        if (!text) goto fail;
        int ok = EVP_DigestUpdate(md, s->path, strlen(s->path)) == 1 &&
                 EVP_DigestUpdate(md, "=", 1) == 1 &&
                 EVP_DigestUpdate(md, text, strlen(text)) == 1 && EVP_DigestUpdate(md, "\n", 1);
        cJSON_free(text);
        if (!ok) goto fail;
    }
    if (EVP_DigestFinal_ex(md, digest, &dlen) != 1 || dlen != EPD_CFG_FINGERPRINT_LEN) goto fail;
    rc = 0;
fail:
    EVP_MD_CTX_free(md);
    return rc;
}

int epd_config_fingerprint_hex(const epd_config_t *cfg, char hex[2 * EPD_CFG_FINGERPRINT_LEN + 1])
{
    static const char digits[] = "0123456789abcdef";
    uint8_t d[EPD_CFG_FINGERPRINT_LEN];
    int rc = epd_config_fingerprint(cfg, d);
    if (rc != 0) return rc;
    for (int i = 0; i < EPD_CFG_FINGERPRINT_LEN; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[2 * EPD_CFG_FINGERPRINT_LEN] = '\0';
    return 0;
}

static void show_value(const cJSON *v, char *out, size_t cap)
{
    char *text = cJSON_PrintUnformatted(v);
    if (!text) {
        snprintf(out, cap, "?");
        return;
    }
    if (strlen(text) > DIFF_VALUE_MAX)
        snprintf(out, cap, "%.*s...", DIFF_VALUE_MAX, text);
    else
        snprintf(out, cap, "%s", text);
    cJSON_free(text);
}

/* Writes the first difference between two values of the same setting, descending into
 * arrays and objects so that the line names the element (cluster.peers[1].port). */
static void describe(const char *path, const cJSON *a, const cJSON *b, char *buf, size_t len)
{
    if (cJSON_IsArray(a) && cJSON_IsArray(b)) {
        int na = cJSON_GetArraySize(a), nb = cJSON_GetArraySize(b);
        if (na != nb) {
            snprintf(buf, len, "%s: %d entries vs %d", path, na, nb);
            return;
        }
        int i = 0;
        for (const cJSON *x = a->child, *y = b->child; x && y; x = x->next, y = y->next, i++) {
            if (!cJSON_Compare(x, y, 1)) {
                char sub[256];
                snprintf(sub, sizeof(sub), "%s[%d]", path, i);
                describe(sub, x, y, buf, len);
                return;
            }
        }
    } else if (cJSON_IsObject(a) && cJSON_IsObject(b)) {
        for (const cJSON *x = a->child; x; x = x->next) {
            const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, x->string);
            if (y && !cJSON_Compare(x, y, 1)) {
                char sub[256];
                snprintf(sub, sizeof(sub), "%s.%s", path, x->string);
                describe(sub, x, y, buf, len);
                return;
            }
        }
    }
    char va[DIFF_VALUE_MAX + 8], vb[DIFF_VALUE_MAX + 8];
    show_value(a, va, sizeof(va));
    show_value(b, vb, sizeof(vb));
    snprintf(buf, len, "%s: %s vs %s", path, va, vb);
}

static int diff(const epd_config_t *a, const epd_config_t *b, bool cluster_only, char *buf,
                size_t len)
{
    if (buf && len) buf[0] = '\0';
    for (int i = 0; i < epd_cfg_num_settings; i++) {
        const epd_cfg_setting_t *s = &epd_cfg_settings[i];
        if (cluster_only && !(s->flags & EPD_CFG_F_CLUSTER)) continue;
        cJSON *va = epd_cfg_emit(s, a), *vb = epd_cfg_emit(s, b);
        int rc = 0;
        if (!va || !vb)
            rc = -ENOMEM;
        else if (!cJSON_Compare(va, vb, 1)) {
            rc = 1;
            if (buf && len) describe(s->path, va, vb, buf, len);
        }
        cJSON_Delete(va);
        cJSON_Delete(vb);
        if (rc != 0) return rc;
    }
    return 0;
}

int epd_config_diff(const epd_config_t *a, const epd_config_t *b, char *buf, size_t len)
{
    return diff(a, b, true, buf, len);
}

int epd_config_diff_all(const epd_config_t *a, const epd_config_t *b, char *buf, size_t len)
{
    return diff(a, b, false, buf, len);
}
