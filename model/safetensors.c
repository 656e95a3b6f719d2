/* safetensors reader: mmap, full header validation (lengths, dtypes, shapes, offsets, overlap,
 * coverage), sharded checkpoints through model.safetensors.index.json, fp32 conversion. */
#include "safetensors.h"
#include "epd_json.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct epd_st_file {
    char *path;
    int fd;
    void *map;
    size_t map_len;
    uint64_t data_start; /* 8 + header length */
    uint64_t data_len;
    epd_st_tensor_t *tensors; /* sorted by name */
    int count;
};

/* Index files are small (one line per tensor); this bounds what we read into memory. */
#define EPD_ST_MAX_INDEX_BYTES (64u * 1024u * 1024u)
/* Integers in JSON headers are doubles in cJSON: exact up to 2^53. */
#define EPD_ST_MAX_JSON_INT 9007199254740992.0

const char *epd_st_dtype_name(epd_st_dtype_t d)
{
    switch (d) {
    case EPD_ST_BF16:
        return "BF16";
    case EPD_ST_F16:
        return "F16";
    case EPD_ST_F32:
        return "F32";
    case EPD_ST_F8_E4M3:
        return "F8_E4M3";
    }
    return "?";
}

size_t epd_st_dtype_size(epd_st_dtype_t d)
{
    return d == EPD_ST_F32 ? 4 : d == EPD_ST_F8_E4M3 ? 1 : 2;
}

static int parse_dtype(const char *s, epd_st_dtype_t *out)
{
    static const char *const other[] = {"BOOL", "U8",      "I8",      "I16", "U16",     "I32",
                                        "U32",  "I64",     "U64",     "F64", "F8_E5M2", "F8_E8M0",
                                        "F4",   "F6_E2M3", "F6_E3M2", "C64"};
    if (!strcmp(s, "BF16"))
        *out = EPD_ST_BF16;
    else if (!strcmp(s, "F16"))
        *out = EPD_ST_F16;
    else if (!strcmp(s, "F32"))
        *out = EPD_ST_F32;
    else if (!strcmp(s, "F8_E4M3"))
        *out = EPD_ST_F8_E4M3;
    else {
        for (size_t i = 0; i < sizeof(other) / sizeof(other[0]); i++)
            if (!strcmp(s, other[i]))
                return 1; /* a real safetensors dtype this reader does not convert */
        return -1;
    }
    return 0;
}

static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0) || d >= EPD_ST_MAX_JSON_INT || d != (double)(uint64_t)d) return -1;
    *out = (uint64_t)d;
    return 0;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp(((const epd_st_tensor_t *)a)->name, ((const epd_st_tensor_t *)b)->name);
}

static int cmp_tensor_off(const void *a, const void *b)
{
    const epd_st_tensor_t *x = *(const epd_st_tensor_t *const *)a;
    const epd_st_tensor_t *y = *(const epd_st_tensor_t *const *)b;
    if (x->file_offset != y->file_offset) return x->file_offset < y->file_offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* One header entry -> t (name already set). */
static int parse_entry(epd_st_file_t *f, const cJSON *e, epd_st_tensor_t *t, epd_err_t *err)
{
    const char *p = f->path, *n = t->name;
    if (!cJSON_IsObject(e))
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': header entry is not a JSON object", p,
                           n);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': missing or non-string \"dtype\"", p, n);
    int r = parse_dtype(dt->valuestring, &t->dtype);
    if (r > 0)
        return epd_err_set(
            err, -ENOTSUP,
            "%s: tensor '%s': dtype %s is not supported (BF16, F16, F32 and F8_E4M3 are)", p, n,
            dt->valuestring);
    if (r < 0)
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': unknown dtype \"%.32s\"", p, n,
                           dt->valuestring);
    if (!cJSON_IsArray(sh))
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': missing or non-array \"shape\"", p, n);
    int nd = cJSON_GetArraySize(sh);
    if (nd > EPD_ST_MAX_DIMS)
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': %d dimensions (at most %d)", p, n, nd,
                           EPD_ST_MAX_DIMS);
    t->ndim = nd;
    uint64_t numel = 1;
    int overflow = 0;
    for (int i = 0; i < nd; i++) {
        uint64_t d;
        if (json_uint(cJSON_GetArrayItem(sh, i), &d) != 0)
            return epd_err_set(err, -EINVAL,
                               "%s: tensor '%s': shape[%d] is not a non-negative integer", p, n, i);
        t->shape[i] = (int64_t)d;
        overflow |= __builtin_mul_overflow(numel, d, &numel);
    }
    if (!cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2)
        return epd_err_set(err, -EINVAL,
                           "%s: tensor '%s': \"data_offsets\" must be an array of two integers", p,
                           n);
    uint64_t b, en;
    if (json_uint(cJSON_GetArrayItem(of, 0), &b) || json_uint(cJSON_GetArrayItem(of, 1), &en))
        return epd_err_set(err, -EINVAL,
                           "%s: tensor '%s': data_offsets are not non-negative integers", p, n);
    if (b > en)
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': data_offsets [%llu, %llu] begin > end",
                           p, n, (unsigned long long)b, (unsigned long long)en);
    if (en > f->data_len)
        return epd_err_set(err, -EINVAL,
                           "%s: tensor '%s': data_offsets [%llu, %llu] end beyond the data section "
                           "(%llu bytes; file byte offset %llu beyond file size %zu)",
                           p, n, (unsigned long long)b, (unsigned long long)en,
                           (unsigned long long)f->data_len,
                           (unsigned long long)(f->data_start + en), f->map_len);
    uint64_t es = epd_st_dtype_size(t->dtype), need = 0;
    overflow |= __builtin_mul_overflow(numel, es, &need);
    if (overflow)
        return epd_err_set(err, -EINVAL, "%s: tensor '%s': shape x dtype %s size overflows 64 bits",
                           p, n, epd_st_dtype_name(t->dtype));
    if (need != en - b)
        return epd_err_set(err, -EINVAL,
                           "%s: tensor '%s': %llu bytes at data_offsets [%llu, %llu] but shape and "
                           "dtype %s need %llu",
                           p, n, (unsigned long long)(en - b), (unsigned long long)b,
                           (unsigned long long)en, epd_st_dtype_name(t->dtype),
                           (unsigned long long)need);
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)(en - b);
    t->file_offset = f->data_start + b;
    t->data = (const char *)f->map + t->file_offset;
    t->file = f;
    return 0;
}

static int check_layout(epd_st_file_t *f, epd_err_t *err)
{
    if (f->count == 0) {
        if (f->data_len != 0)
            return epd_err_set(err, -EINVAL,
                               "%s: no tensors but a data section of %llu bytes (at file byte "
                               "offset %llu)",
                               f->path, (unsigned long long)f->data_len,
                               (unsigned long long)f->data_start);
        return 0;
    }
    epd_st_tensor_t **by_off = malloc(sizeof(*by_off) * (size_t)f->count);
    if (!by_off) return epd_err_set(err, -ENOMEM, "%s: out of memory", f->path);
    for (int i = 0; i < f->count; i++)
        by_off[i] = &f->tensors[i];
    qsort(by_off, (size_t)f->count, sizeof(*by_off), cmp_tensor_off);
    int rc = 0;
    uint64_t pos = f->data_start;
    for (int i = 0; i < f->count && rc == 0; i++) {
        const epd_st_tensor_t *t = by_off[i];
        if (t->file_offset < pos) {
            rc =
                epd_err_set(err, -EINVAL,
                            "%s: tensor '%s' (file bytes %llu..%llu) overlaps tensor '%s' (ends at "
                            "file byte %llu)",
                            f->path, t->name, (unsigned long long)t->file_offset,
                            (unsigned long long)(t->file_offset + t->nbytes), by_off[i - 1]->name,
                            (unsigned long long)pos);
        } else if (t->file_offset > pos) {
            rc = epd_err_set(err, -EINVAL,
                             "%s: %llu bytes at file byte offset %llu belong to no tensor (before "
                             "tensor '%s')",
                             f->path, (unsigned long long)(t->file_offset - pos),
                             (unsigned long long)pos, t->name);
        }
        pos = t->file_offset + t->nbytes;
    }
    if (rc == 0 && pos != f->data_start + f->data_len)
        rc = epd_err_set(err, -EINVAL,
                         "%s: %llu trailing bytes at file byte offset %llu belong to no tensor",
                         f->path, (unsigned long long)(f->data_start + f->data_len - pos),
                         (unsigned long long)pos);
    free(by_off);
    return rc;
}

static int parse_header(epd_st_file_t *f, const char *hdr, size_t hlen, epd_err_t *err)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, hlen, &end, 0);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = (at && at >= hdr && at <= hdr + hlen) ? (size_t)(at - hdr) : 0;
        return epd_err_set(err, -EINVAL,
                           "%s: header is not valid JSON (near header byte %zu, file byte %zu)",
                           f->path, off, off + 8);
    }
    int rc = 0;
    for (const char *q = end; q && q < hdr + hlen; q++) {
        /* the format allows the header to be padded with spaces */
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r' && *q != '\0') {
            rc = epd_err_set(err, -EINVAL,
                             "%s: junk after the header's JSON object at file byte %zu", f->path,
                             (size_t)(q - hdr) + 8);
            goto out;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = epd_err_set(err, -EINVAL, "%s: header is not a JSON object", f->path);
        goto out;
    }
    char dpath[256];
    const cJSON *dup = epd_json_find_duplicate(root, dpath, sizeof(dpath));
    if (dup && dup->string && !strcmp(dpath, dup->string)) {
        rc = epd_err_set(err, -EINVAL, "%s: tensor '%s' appears twice in the header", f->path,
                         dup->string);
        goto out;
    }
    if (dup) {
        rc = epd_err_set(err, -EINVAL, "%s: header: %s: duplicate key", f->path, dpath);
        goto out;
    }
    int n = 0;
    for (const cJSON *e = root->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0) n++;
    f->tensors = calloc(n ? (size_t)n : 1, sizeof(*f->tensors));
    if (!f->tensors) {
        rc = epd_err_set(err, -ENOMEM, "%s: out of memory for %d tensors", f->path, n);
        goto out;
    }
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) {
            if (!cJSON_IsObject(e) && !cJSON_IsNull(e)) {
                rc = epd_err_set(err, -EINVAL, "%s: __metadata__ is not a JSON object", f->path);
                goto out;
            }
            for (const cJSON *m = e->child; m; m = m->next)
                if (!cJSON_IsString(m)) {
                    rc = epd_err_set(err, -EINVAL,
                                     "%s: __metadata__.%s is not a string (the format allows "
                                     "string values only)",
                                     f->path, m->string);
                    goto out;
                }
            continue;
        }
        epd_st_tensor_t *t = &f->tensors[f->count];
        t->name = strdup(e->string);
        if (!t->name) {
            rc = epd_err_set(err, -ENOMEM, "%s: out of memory", f->path);
            goto out;
        }
        f->count++;
        if ((rc = parse_entry(f, e, t, err)) != 0) goto out;
    }
    qsort(f->tensors, (size_t)f->count, sizeof(*f->tensors), cmp_tensor_name);
    for (int i = 1; i < f->count; i++)
        if (!strcmp(f->tensors[i].name, f->tensors[i - 1].name)) {
            rc = epd_err_set(err, -EINVAL, "%s: tensor '%s' appears twice in the header", f->path,
                             f->tensors[i].name);
            goto out;
        }
    rc = check_layout(f, err);
out:
    cJSON_Delete(root);
    return rc;
}

int epd_st_file_open(const char *path, epd_st_file_t **out, epd_err_t *err)
{
    int rc;
    *out = NULL;
    epd_st_file_t *f = calloc(1, sizeof(*f));
    if (!f) return epd_err_set(err, -ENOMEM, "%s: out of memory", path);
    f->fd = -1;
    f->map = MAP_FAILED;
    if (!(f->path = strdup(path))) {
        rc = epd_err_set(err, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        rc = epd_err_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) != 0) {
        rc = epd_err_set(err, -errno, "%s: fstat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = epd_err_set(err, -EINVAL, "%s: not a regular file", path);
        goto fail;
    }
    f->map_len = (size_t)st.st_size;
    if (f->map_len < 8) {
        rc = epd_err_set(err, -EINVAL,
                         "%s: truncated: %zu bytes, shorter than the 8-byte header length", path,
                         f->map_len);
        goto fail;
    }
    f->map = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, f->fd, 0);
    if (f->map == MAP_FAILED) {
        rc = epd_err_set(err, -errno, "%s: mmap of %zu bytes: %s", path, f->map_len,
                         strerror(errno));
        goto fail;
    }
    const unsigned char *b = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | b[i];
    if (hlen > EPD_ST_MAX_HEADER_BYTES) {
        rc = epd_err_set(err, -EINVAL, "%s: header length %llu exceeds the limit of %u bytes", path,
                         (unsigned long long)hlen, EPD_ST_MAX_HEADER_BYTES);
        goto fail;
    }
    if (hlen > f->map_len - 8) {
        rc = epd_err_set(err, -EINVAL,
                         "%s: truncated: header length %llu runs past the end of the file "
                         "(%zu bytes)",
                         path, (unsigned long long)hlen, f->map_len);
        goto fail;
    }
    if (hlen < 2) {
        rc = epd_err_set(err, -EINVAL, "%s: header length %llu is too short for a JSON object",
                         path, (unsigned long long)hlen);
        goto fail;
    }
    f->data_start = 8 + hlen;
    f->data_len = f->map_len - f->data_start;
    if ((rc = parse_header(f, (const char *)b + 8, (size_t)hlen, err)) != 0) goto fail;
    *out = f;
    return 0;
fail:
    epd_st_file_close(f);
    return rc;
}

void epd_st_file_close(epd_st_file_t *f)
{
    if (!f) return;
    for (int i = 0; i < f->count; i++)
        free((char *)f->tensors[i].name);
    free(f->tensors);
    if (f->map != MAP_FAILED) munmap(f->map, f->map_len);
    if (f->fd >= 0) close(f->fd);
    free(f->path);
    free(f);
}

const char *epd_st_file_path(const epd_st_file_t *f)
{
    return f->path;
}

int epd_st_file_count(const epd_st_file_t *f)
{
    return f->count;
}

const epd_st_tensor_t *epd_st_file_tensor(const epd_st_file_t *f, int i)
{
    return (i >= 0 && i < f->count) ? &f->tensors[i] : NULL;
}

const epd_st_tensor_t *epd_st_file_find(const epd_st_file_t *f, const char *name)
{
    epd_st_tensor_t key = {.name = name};
    return bsearch(&key, f->tensors, (size_t)f->count, sizeof(key), cmp_tensor_name);
}

/* ---- fp32 conversion ---------------------------------------------------------------------- */

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

float epd_e4m3_to_f32(uint8_t q)
{
    uint32_t e = (q >> 3) & 0xf, m = q & 7, bits;
    if (e == 0xf && m == 7) {
        bits = 0x7fc00000u; /* e4m3fn has no infinities: S.1111.111 is its only NaN */
    } else if (e == 0) {
        float v = (float)m * 0x1p-9f; /* subnormal: m/8 * 2^-6, exact */
        memcpy(&bits, &v, 4);
    } else {
        bits = (e + 127 - 7) << 23 | m << 20;
    }
    bits |= (uint32_t)(q & 0x80) << 24;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

float epd_st_elem_f32(const epd_st_tensor_t *t, size_t i)
{
    const unsigned char *s = t->data;
    switch (t->dtype) {
    case EPD_ST_BF16: {
        uint32_t bits = ((uint32_t)s[2 * i] | (uint32_t)s[2 * i + 1] << 8) << 16;
        float v;
        memcpy(&v, &bits, 4);
        return v;
    }
    case EPD_ST_F16:
        return f16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
    case EPD_ST_F8_E4M3:
        return epd_e4m3_to_f32(s[i]);
    case EPD_ST_F32:
        break;
    }
    float v;
    memcpy(&v, s + 4 * i, 4);
    return v;
}

void epd_st_dequant_fp8_rows(const epd_st_tensor_t *w, const epd_st_tensor_t *scale, int bn, int bk,
                             int64_t r0, int64_t nr, float *dst)
{
    const size_t cols = (size_t)w->shape[1], sc = (size_t)scale->shape[1];
    const uint8_t *q = w->data;
    for (int64_t r = r0; r < r0 + nr; r++) {
        const size_t srow = (size_t)(r / bn) * sc;
        float *o = dst + (size_t)(r - r0) * cols;
        for (size_t c0 = 0; c0 < cols; c0 += (size_t)bk) {
            const float s = epd_st_elem_f32(scale, srow + c0 / (size_t)bk);
            const size_t c1 = c0 + (size_t)bk < cols ? c0 + (size_t)bk : cols;
            for (size_t c = c0; c < c1; c++)
                o[c] = epd_e4m3_to_f32(q[(size_t)r * cols + c]) * s;
        }
    }
}

void epd_st_to_f32(const epd_st_tensor_t *t, float *dst)
{
    const unsigned char *s = t->data;
    size_t n = (size_t)t->numel;
    switch (t->dtype) {
    case EPD_ST_F32:
        memcpy(dst, s, n * 4);
        break;
    case EPD_ST_BF16:
        for (size_t i = 0; i < n; i++) {
            uint32_t bits = ((uint32_t)s[2 * i] | (uint32_t)s[2 * i + 1] << 8) << 16;
            memcpy(&dst[i], &bits, 4);
        }
        break;
    case EPD_ST_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = f16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
        break;
    case EPD_ST_F8_E4M3:
        for (size_t i = 0; i < n; i++)
            dst[i] = epd_e4m3_to_f32(s[i]);
        break;
    }
}

/* ---- checkpoint directories --------------------------------------------------------------- */

typedef struct ckpt_entry {
    const char *name;
    const epd_st_tensor_t *t;
} ckpt_entry_t;

struct epd_st_ckpt {
    char *dir;
    epd_st_file_t **files;
    int num_files;
    ckpt_entry_t *entries; /* sorted by name */
    int num_entries;
};

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const ckpt_entry_t *)a)->name, ((const ckpt_entry_t *)b)->name);
}

static char *join_path(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b + 1);
    }
    return p;
}

static int read_small_file(const char *path, size_t limit, char **out, size_t *len, epd_err_t *err)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return epd_err_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
    int rc = 0;
    char *buf = NULL;
    if (fseek(fp, 0, SEEK_END) != 0) {
        rc = epd_err_set(err, -EIO, "%s: cannot seek", path);
        goto out;
    }
    long sz = ftell(fp);
    if (sz < 0 || (unsigned long)sz > limit) {
        rc = epd_err_set(err, -EINVAL, "%s: size %ld outside 0..%zu bytes", path, sz, limit);
        goto out;
    }
    rewind(fp);
    buf = malloc((size_t)sz + 1);
    if (!buf) {
        rc = epd_err_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    if (fread(buf, 1, (size_t)sz, fp) != (size_t)sz) {
        rc = epd_err_set(err, -EIO, "%s: short read", path);
        goto out;
    }
    buf[sz] = '\0';
    *out = buf;
    *len = (size_t)sz;
    buf = NULL;
out:
    free(buf);
    fclose(fp);
    return rc;
}

int epd_read_text_file(const char *path, size_t limit, char **out, size_t *len, epd_err_t *err)
{
    return read_small_file(path, limit, out, len, err);
}

static int add_file(epd_st_ckpt_t *c, const char *dir, const char *name, epd_st_file_t **out,
                    epd_err_t *err)
{
    for (int i = 0; i < c->num_files; i++) {
        const char *p = epd_st_file_path(c->files[i]);
        const char *base = strrchr(p, '/');
        if (!strcmp(base ? base + 1 : p, name)) {
            *out = c->files[i];
            return 0;
        }
    }
    char *path = join_path(dir, name);
    if (!path) return epd_err_set(err, -ENOMEM, "out of memory");
    epd_st_file_t **nf = realloc(c->files, sizeof(*nf) * (size_t)(c->num_files + 1));
    if (!nf) {
        free(path);
        return epd_err_set(err, -ENOMEM, "out of memory");
    }
    c->files = nf;
    int rc = epd_st_file_open(path, &c->files[c->num_files], err);
    free(path);
    if (rc) return rc;
    *out = c->files[c->num_files++];
    return 0;
}

static int open_index(epd_st_ckpt_t *c, const char *dir, const char *ipath, epd_err_t *err)
{
    char *text = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    int rc = read_small_file(ipath, EPD_ST_MAX_INDEX_BYTES, &text, &len, err);
    if (rc) return rc;
    root = cJSON_ParseWithLength(text, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        rc = epd_err_set(err, -EINVAL, "%s: not valid JSON (near byte %ld)", ipath,
                         at ? (long)(at - text) : -1L);
        goto out;
    }
    char dpath[256];
    if (epd_json_find_duplicate(root, dpath, sizeof(dpath))) {
        rc = epd_err_set(err, -EINVAL, "%s: %s: duplicate key", ipath, dpath);
        goto out;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        rc = epd_err_set(err, -EINVAL, "%s: weight_map: missing or not a JSON object", ipath);
        goto out;
    }
    int n = cJSON_GetArraySize(wm);
    c->entries = calloc(n ? (size_t)n : 1, sizeof(*c->entries));
    if (!c->entries) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (const cJSON *e = wm->child; e; e = e->next) {
        if (!cJSON_IsString(e) || !e->valuestring[0]) {
            rc = epd_err_set(err, -EINVAL, "%s: weight_map.%s: not a file name", ipath, e->string);
            goto out;
        }
        const char *fn = e->valuestring;
        if (strchr(fn, '/') || !strcmp(fn, ".") || !strcmp(fn, "..")) {
            rc = epd_err_set(err, -EINVAL,
                             "%s: weight_map.%s: \"%s\" is not a plain file name in the "
                             "checkpoint directory",
                             ipath, e->string, fn);
            goto out;
        }
        epd_st_file_t *f;
        if ((rc = add_file(c, dir, fn, &f, err)) != 0) goto out;
        const epd_st_tensor_t *t = epd_st_file_find(f, e->string);
        if (!t) {
            rc = epd_err_set(err, -EINVAL, "%s: weight_map.%s names %s, which has no such tensor",
                             ipath, e->string, epd_st_file_path(f));
            goto out;
        }
        c->entries[c->num_entries].name = t->name;
        c->entries[c->num_entries].t = t;
        c->num_entries++;
    }
    qsort(c->entries, (size_t)c->num_entries, sizeof(*c->entries), cmp_entry);
    for (int i = 1; i < c->num_entries; i++)
        if (!strcmp(c->entries[i].name, c->entries[i - 1].name)) {
            rc = epd_err_set(err, -EINVAL, "%s: weight_map lists tensor '%s' twice", ipath,
                             c->entries[i].name);
            goto out;
        }
out:
    cJSON_Delete(root);
    free(text);
    return rc;
}

int epd_st_ckpt_open(const char *dir, epd_st_ckpt_t **out, epd_err_t *err)
{
    int rc;
    *out = NULL;
    epd_st_ckpt_t *c = calloc(1, sizeof(*c));
    char *ipath = join_path(dir, "model.safetensors.index.json");
    if (!c || !ipath || !(c->dir = strdup(dir))) {
        rc = epd_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if (access(ipath, F_OK) == 0) {
        if ((rc = open_index(c, dir, ipath, err)) != 0) goto fail;
    } else {
        epd_st_file_t *f;
        if ((rc = add_file(c, dir, "model.safetensors", &f, err)) != 0) goto fail;
        c->entries = calloc(f->count ? (size_t)f->count : 1, sizeof(*c->entries));
        if (!c->entries) {
            rc = epd_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        for (int i = 0; i < f->count; i++) {
            c->entries[i].name = f->tensors[i].name;
            c->entries[i].t = &f->tensors[i];
        }
        c->num_entries = f->count; /* already sorted by name */
    }
    free(ipath);
    *out = c;
    return 0;
fail:
    free(ipath);
    epd_st_ckpt_close(c);
    return rc;
}

void epd_st_ckpt_close(epd_st_ckpt_t *c)
{
    if (!c) return;
    for (int i = 0; i < c->num_files; i++)
        epd_st_file_close(c->files[i]);
    free(c->files);
    free(c->entries);
    free(c->dir);
    free(c);
}

const epd_st_tensor_t *epd_st_ckpt_find(const epd_st_ckpt_t *c, const char *name)
{
    ckpt_entry_t key = {.name = name};
    const ckpt_entry_t *e =
        bsearch(&key, c->entries, (size_t)c->num_entries, sizeof(key), cmp_entry);
    return e ? e->t : NULL;
}

int epd_st_ckpt_num_files(const epd_st_ckpt_t *c)
{
    return c->num_files;
}

const char *epd_st_ckpt_dir(const epd_st_ckpt_t *c)
{
    return c->dir;
}

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

int epd_st_ckpt_load_f32(const epd_st_ckpt_t *c, const char *name, int ndim, const int64_t *shape,
                         float *dst, epd_err_t *err)
{
    const epd_st_tensor_t *t = epd_st_ckpt_find(c, name);
    if (!t) return epd_err_set(err, -ENOENT, "%s: checkpoint has no tensor '%s'", c->dir, name);
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[128], got[128];
        fmt_shape(want, sizeof(want), ndim, shape);
        fmt_shape(got, sizeof(got), t->ndim, t->shape);
        return epd_err_set(err, -EINVAL, "%s: tensor '%s' has shape %s, the config implies %s",
                           epd_st_file_path(t->file), name, got, want);
    }
    if (dst) epd_st_to_f32(t, dst);
    return 0;
}
