/* Helpers of the reference tests (tok_reference_test.c, tok_deepseek_test.c): hex texts, JSON
 * files, id arrays and a UTF-8 check written apart from the tokenizer's own. Include after
 * <cmocka.h>. */
#ifndef TOK_TEST_UTIL_H
#define TOK_TEST_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

typedef struct bytes {
    uint8_t *p;
    size_t n;
} bytes_t;

static inline bytes_t unhex(const char *h)
{
    size_t n = strlen(h) / 2;
    bytes_t b = {malloc(n + 1), n};
    assert_non_null(b.p);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        assert_int_equal(sscanf(h + 2 * i, "%2x", &v), 1);
        b.p[i] = (uint8_t)v;
    }
    b.p[n] = 0;
    return b;
}

static inline char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = 0;
    fclose(f);
    return s;
}

static inline cJSON *load_json(const char *path)
{
    char *s = read_file(path);
    if (!s) {
        fprintf(stderr, "cannot read %s\n", path);
        return NULL;
    }
    cJSON *j = cJSON_Parse(s);
    free(s);
    if (!j) fprintf(stderr, "%s: not JSON\n", path);
    return j;
}

static inline void print_ids(const char *what, const int32_t *ids, size_t n)
{
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 40; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

static inline size_t json_ids(const cJSON *arr, int32_t **out)
{
    size_t n = (size_t)cJSON_GetArraySize(arr);
    int32_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    assert_non_null(ids);
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) ids[i++] = (int32_t)v->valuedouble;
    *out = ids;
    return n;
}

static inline bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof(*a)) == 0);
}

/* A UTF-8 check written here, separate from the tokenizer's own. */
static inline bool valid_utf8(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t c = p[i], cp, need;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            need = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            need = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            need = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (uint32_t k = 1; k <= need; k++) {
            if (i + k >= n || (p[i + k] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (p[i + k] & 0x3F);
        }
        static const uint32_t min[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min[need] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += need + 1;
    }
    return true;
}

#endif /* TOK_TEST_UTIL_H */
