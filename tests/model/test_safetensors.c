/* safetensors reader: a valid file read back value by value, a table of corrupt files (each
 * with the message it must produce), sharded checkpoints through the index. */
#include "safetensors.h"
#include "test_util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

/* file = u64le(header length) | header | data */
static int write_st(const char *dir, const char *name, const char *header, const void *data,
                    size_t data_len, int64_t hlen_override)
{
    size_t hl = strlen(header);
    uint64_t h = hlen_override >= 0 ? (uint64_t)hlen_override : hl;
    size_t n = 8 + hl + data_len;
    unsigned char *buf = malloc(n);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(h >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (data_len) memcpy(buf + 8 + hl, data, data_len);
    int rc = write_file(dir, name, buf, n);
    free(buf);
    return rc;
}

static void put_f32(unsigned char *p, float v)
{
    memcpy(p, &v, 4); /* the test host is little-endian, as the format */
}

static void put_u16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

/* a: F32 [2][3] at 0..24, b: BF16 [4] at 24..32, c: F16 [5] at 32..42 */
static const char VALID_HEADER[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
    "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"c\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[32,42]}}   ";

static void valid_data(unsigned char *d)
{
    for (int i = 0; i < 6; i++)
        put_f32(d + 4 * i, (float)i - 2.5f);
    /* bf16: 1.0, -2.5, 0.15625, -0.0 */
    put_u16(d + 24, 0x3f80);
    put_u16(d + 26, 0xc020);
    put_u16(d + 28, 0x3e20);
    put_u16(d + 30, 0x8000);
    /* f16: 1.0, -2.0, 65504 (largest), 2^-24 (smallest subnormal), +inf */
    put_u16(d + 32, 0x3c00);
    put_u16(d + 34, 0xc000);
    put_u16(d + 36, 0x7bff);
    put_u16(d + 38, 0x0001);
    put_u16(d + 40, 0x7c00);
}

static void test_valid_file(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    assert_non_null(dir);
    unsigned char data[42];
    valid_data(data);
    assert_int_equal(write_st(dir, "model.safetensors", VALID_HEADER, data, sizeof(data), -1), 0);
    epd_st_file_t *f = NULL;
    epd_err_t err;
    int rc = epd_st_file_open(path_in(dir, "model.safetensors"), &f, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(epd_st_file_count(f), 3);
    const epd_st_tensor_t *a = epd_st_file_find(f, "a"), *b = epd_st_file_find(f, "b"),
                          *c = epd_st_file_find(f, "c");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_null(epd_st_file_find(f, "__metadata__"));
    assert_null(epd_st_file_find(f, "d"));
    assert_int_equal(a->dtype, EPD_ST_F32);
    assert_int_equal(a->ndim, 2);
    assert_int_equal(a->shape[0], 2);
    assert_int_equal(a->shape[1], 3);
    assert_int_equal(a->numel, 6);
    size_t hl = strlen(VALID_HEADER);
    assert_int_equal(a->file_offset, 8 + hl);
    assert_int_equal(b->file_offset, 8 + hl + 24);
    float out[6];
    epd_st_to_f32(a, out);
    for (int i = 0; i < 6; i++)
        assert_true(out[i] == (float)i - 2.5f);
    epd_st_to_f32(b, out);
    assert_true(out[0] == 1.0f && out[1] == -2.5f && out[2] == 0.15625f);
    assert_true(out[3] == 0.0f && signbit(out[3]));
    epd_st_to_f32(c, out);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 65504.0f);
    assert_true(out[3] == ldexpf(1.0f, -24));
    assert_true(isinf(out[4]) && out[4] > 0);
    epd_st_file_close(f);

    /* the directory form without an index is the same file */
    epd_st_ckpt_t *ck = NULL;
    rc = epd_st_ckpt_open(dir, &ck, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(epd_st_ckpt_num_files(ck), 1);
    int64_t shape[2] = {2, 3};
    assert_int_equal(epd_st_ckpt_load_f32(ck, "a", 2, shape, out, &err), 0);
    assert_true(out[5] == 2.5f);
    int64_t wrong[2] = {3, 2};
    assert_int_equal(epd_st_ckpt_load_f32(ck, "a", 2, wrong, out, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "tensor 'a' has shape [2, 3], the config implies [3, 2]"));
    assert_int_equal(epd_st_ckpt_load_f32(ck, "zz", 1, shape, out, &err), -ENOENT);
    assert_non_null(strstr(err.msg, "'zz'"));
    epd_st_ckpt_close(ck);
    rm_tree(dir);
    free(dir);
}

typedef struct bad_case {
    const char *what;
    const char *header; /* NULL: raw bytes below */
    size_t data_len;    /* bytes of zero data after the header */
    int64_t hlen;       /* header length field (-1: the header's length) */
    const char *raw;    /* whole file when header is NULL */
    size_t raw_len;
    int status;
    const char *expect[3]; /* substrings of the message */
} bad_case_t;

#define T1 "\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

static const bad_case_t BAD[] = {
    {"file shorter than the length field",
     NULL,
     0,
     -1,
     "\x10\x00\x00",
     3,
     -EINVAL,
     {"truncated", "3 bytes"}},
    {"header length beyond the file",
     "{" T1 "}",
     8,
     4096,
     NULL,
     0,
     -EINVAL,
     {"header length 4096 runs past the end of the file"}},
    {"header length over the limit",
     "{" T1 "}",
     8,
     (int64_t)1 << 40,
     NULL,
     0,
     -EINVAL,
     {"exceeds the limit"}},
    {"bad JSON",
     "{\"t\":{\"dtype\":\"F32\",,}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"header is not valid JSON", "near header byte"}},
    {"header not an object", "[1,2,3]", 0, -1, NULL, 0, -EINVAL, {"header is not a JSON object"}},
    {"junk after the JSON", "{" T1 "}xx", 8, -1, NULL, 0, -EINVAL, {"junk after the header"}},
    {"truncated data",
     "{" T1 "}",
     5,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "end beyond the data section", "file byte offset"}},
    {"offsets out of range",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "data_offsets [8, 16] end beyond the data section"}},
    {"begin after end",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "begin > end"}},
    {"overlapping tensors",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"u\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
     12,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 'u'", "overlaps tensor 't'"}},
    {"hole between tensors",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"u\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
     12,
     -1,
     NULL,
     0,
     -EINVAL,
     {"4 bytes at file byte offset", "belong to no tensor", "'u'"}},
    {"trailing bytes", "{" T1 "}", 12, -1, NULL, 0, -EINVAL, {"4 trailing bytes"}},
    {"shape/size mismatch",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "8 bytes", "need 12"}},
    {"bf16 size mismatch",
     "{\"t\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "BF16 need 12"}},
    {"shape product overflows",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "overflows 64 bits"}},
    {"unknown dtype",
     "{\"t\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "unknown dtype \"Q7\""}},
    {"unsupported dtype",
     "{\"t\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -ENOTSUP,
     {"tensor 't'", "dtype I64 is not supported"}},
    {"negative dimension",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "shape[0]"}},
    {"fractional offset",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.5]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "data_offsets are not non-negative integers"}},
    {"missing data_offsets",
     "{\"t\":{\"dtype\":\"F32\",\"shape\":[2]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "\"data_offsets\""}},
    {"missing shape",
     "{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"tensor 't'", "\"shape\""}},
    {"entry not an object", "{\"t\":7}", 0, -1, NULL, 0, -EINVAL, {"tensor 't'", "not a JSON"}},
    {"duplicate tensor", "{" T1 "," T1 "}", 8, -1, NULL, 0, -EINVAL, {"tensor 't' appears twice"}},
    {"duplicate key in an entry",
     "{\"t\":{\"dtype\":\"F32\",\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[0,8]}}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"header: t.dtype: duplicate key"}},
    {"metadata value not a string",
     "{\"__metadata__\":{\"n\":3}," T1 "}",
     8,
     -1,
     NULL,
     0,
     -EINVAL,
     {"__metadata__.n is not a string"}},
};

static void test_corrupt_files(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    assert_non_null(dir);
    unsigned char zeros[64] = {0};
    for (size_t i = 0; i < sizeof(BAD) / sizeof(BAD[0]); i++) {
        const bad_case_t *c = &BAD[i];
        if (c->header)
            assert_int_equal(
                write_st(dir, "model.safetensors", c->header, zeros, c->data_len, c->hlen), 0);
        else
            assert_int_equal(write_file(dir, "model.safetensors", c->raw, c->raw_len), 0);
        epd_st_file_t *f = (epd_st_file_t *)0x1;
        epd_err_t err = {0};
        int rc = epd_st_file_open(path_in(dir, "model.safetensors"), &f, &err);
        if (rc != c->status)
            fail_msg("case '%s': status %d, expected %d (%s)", c->what, rc, c->status, err.msg);
        assert_null(f);
        if (getenv("EPD_TEST_VERBOSE")) printf("  %-36s %s\n", c->what, err.msg);
        if (!strstr(err.msg, "model.safetensors"))
            fail_msg("case '%s': message does not name the file: %s", c->what, err.msg);
        for (int j = 0; j < 3 && c->expect[j]; j++)
            if (!strstr(err.msg, c->expect[j]))
                fail_msg("case '%s': message lacks \"%s\": %s", c->what, c->expect[j], err.msg);
    }
    rm_tree(dir);
    free(dir);
}

static void test_missing_file(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    epd_st_ckpt_t *ck = NULL;
    epd_err_t err;
    assert_int_equal(epd_st_ckpt_open(dir, &ck, &err), -ENOENT);
    assert_null(ck);
    assert_non_null(strstr(err.msg, "model.safetensors: cannot open"));
    rm_tree(dir);
    free(dir);
}

static void test_sharded(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    unsigned char d1[8], d2[4];
    put_f32(d1, 1.5f);
    put_f32(d1 + 4, -3.0f);
    put_u16(d2, 0x4040);     /* bf16 3.0 */
    put_u16(d2 + 2, 0xbf00); /* bf16 -0.5 */
    assert_int_equal(
        write_st(dir, "model-00001-of-00002.safetensors",
                 "{\"x.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", d1, 8,
                 -1),
        0);
    assert_int_equal(write_st(dir, "model-00002-of-00002.safetensors",
                              "{\"y.weight\":{\"dtype\":\"BF16\",\"shape\":[1,2],"
                              "\"data_offsets\":[0,4]}}",
                              d2, 4, -1),
                     0);
    const char *index = "{\"metadata\":{\"total_size\":12},\"weight_map\":{"
                        "\"x.weight\":\"model-00001-of-00002.safetensors\","
                        "\"y.weight\":\"model-00002-of-00002.safetensors\"}}";
    assert_int_equal(write_file(dir, "model.safetensors.index.json", index, strlen(index)), 0);
    epd_st_ckpt_t *ck = NULL;
    epd_err_t err;
    int rc = epd_st_ckpt_open(dir, &ck, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(epd_st_ckpt_num_files(ck), 2);
    float v[2];
    int64_t s1[1] = {2}, s2[2] = {1, 2};
    assert_int_equal(epd_st_ckpt_load_f32(ck, "x.weight", 1, s1, v, &err), 0);
    assert_true(v[0] == 1.5f && v[1] == -3.0f);
    assert_int_equal(epd_st_ckpt_load_f32(ck, "y.weight", 2, s2, v, &err), 0);
    assert_true(v[0] == 3.0f && v[1] == -0.5f);
    epd_st_ckpt_close(ck);

    /* index errors */
    static const struct {
        const char *index;
        int status;
        const char *expect;
    } bad[] = {
        {"{\"weight_map\":{\"x.weight\":\"model-00002-of-00002.safetensors\"}}", -EINVAL,
         "weight_map.x.weight names"},
        {"{\"weight_map\":{\"x.weight\":\"../model-00001-of-00002.safetensors\"}}", -EINVAL,
         "is not a plain file name"},
        {"{\"weight_map\":{\"x.weight\":\"absent.safetensors\"}}", -ENOENT,
         "absent.safetensors: cannot open"},
        {"{\"weight_map\":[1]}", -EINVAL, "weight_map: missing or not a JSON object"},
        {"{\"weight_map\":{\"x.weight\":", -EINVAL, "not valid JSON"},
        {"{\"weight_map\":{\"x.weight\":3}}", -EINVAL, "weight_map.x.weight: not a file name"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(
            write_file(dir, "model.safetensors.index.json", bad[i].index, strlen(bad[i].index)), 0);
        ck = (epd_st_ckpt_t *)0x1;
        rc = epd_st_ckpt_open(dir, &ck, &err);
        if (rc != bad[i].status || !strstr(err.msg, bad[i].expect))
            fail_msg("index %zu: status %d (expected %d), message: %s", i, rc, bad[i].status,
                     err.msg);
        assert_null(ck);
    }
    rm_tree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_file),
        cmocka_unit_test(test_corrupt_files),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_sharded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
