/* Tests of the control-plane frame codec (control/ctl_frame.c): frames built by the codec match
 * bytes written out by hand here, the decoder works over any split of the stream, and every
 * rejection reason is produced by the input that should produce it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ctl_frame.h"

/* Hand-written reference encoding of TABLE_ACK{epoch = 0x0102030405060708}. */
static const uint8_t ack_ref[] = {
    0x45, 0x50, 0x44, 0x43,                         /* magic "EPDC" */
    0x01,                                           /* version */
    0x08,                                           /* type TABLE_ACK */
    0x00, 0x00,                                     /* flags */
    0x00, 0x00, 0x00, 0x0e,                         /* payload length 14 */
    0x00, 0x07, 0x00, 0x00, 0x00, 0x08,             /* tag 7 (EPOCH), len 8 */
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, /* value */
};

static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Writes a frame header + raw payload into out; returns the total size. */
static size_t raw_frame(uint8_t *out, uint8_t type, const uint8_t *payload, uint32_t len)
{
    put_be32(out, 0x45504443u);
    out[4] = 1;
    out[5] = type;
    put_be16(out + 6, 0);
    put_be32(out + 8, len);
    if (len) memcpy(out + 12, payload, len);
    return 12 + (size_t)len;
}

static size_t tlv(uint8_t *out, uint16_t tag, const void *v, uint32_t len)
{
    put_be16(out, tag);
    put_be32(out + 2, len);
    memcpy(out + 6, v, len);
    return 6 + (size_t)len;
}

static int decode_all(const uint8_t *bytes, size_t n, size_t step, epd_ctl_decoder_t *d,
                      epd_ctl_msg_t *msgs, int max)
{
    int got = 0;
    for (size_t off = 0; off < n; off += step) {
        size_t k = n - off < step ? n - off : step;
        if (epd_ctl_decoder_feed(d, bytes + off, k) < 0) return -1;
        int r;
        while ((r = epd_ctl_decoder_next(d, &msgs[got < max ? got : max - 1])) == 1)
            got++;
        if (r < 0) return -1;
    }
    return got;
}

static void test_build_matches_reference_bytes(void **state)
{
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_TABLE_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, 0x0102030405060708ull);
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    assert_int_equal(b.len, sizeof ack_ref);
    assert_memory_equal(b.p, ack_ref, sizeof ack_ref);
    epd_ctl_buf_fini(&b);
}

static void test_decode_byte_by_byte(void **state)
{
    /* Three frames back to back, fed one byte at a time and in one piece. */
    uint8_t stream[3 * sizeof ack_ref];
    for (int i = 0; i < 3; i++)
        memcpy(stream + i * sizeof ack_ref, ack_ref, sizeof ack_ref);
    size_t steps[] = {1, 5, sizeof stream};
    for (size_t s = 0; s < 3; s++) {
        epd_ctl_decoder_t d;
        epd_ctl_msg_t m[4];
        epd_ctl_decoder_init(&d, 0);
        assert_int_equal(decode_all(stream, sizeof stream, steps[s], &d, m, 4), 3);
        assert_int_equal(epd_ctl_decoder_finish(&d), 0);
        epd_ctl_decoder_fini(&d);
    }
    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    epd_ctl_decoder_init(&d, 0);
    assert_int_equal(epd_ctl_decoder_feed(&d, ack_ref, sizeof ack_ref), 0);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), 1);
    assert_int_equal(m.type, EPD_CTL_TABLE_ACK);
    assert_int_equal(m.len, 14);
    uint64_t e = 0;
    assert_int_equal(epd_ctl_get_u64(m.payload, m.len, EPD_CTL_T_EPOCH, &e), 0);
    assert_true(e == 0x0102030405060708ull);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), 0);
    epd_ctl_decoder_fini(&d);
}

static void test_roundtrip_nested_rank_table(void **state)
{
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_RANK_TABLE);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, 9);
    epd_ctl_put_u32(&b, EPD_CTL_T_COORD, 3);
    epd_ctl_put_u8(&b, EPD_CTL_T_COMPLETE, 1);
    epd_ctl_put_u32(&b, EPD_CTL_T_NRANKS, 4);
    for (uint32_t i = 0; i < 2; i++) {
        size_t mk = epd_ctl_nest_begin(&b, EPD_CTL_T_NODE);
        epd_ctl_put_u32(&b, EPD_CTL_T_NODE_ID, 3 + i);
        epd_ctl_put_str(&b, EPD_CTL_T_HOSTNAME, i ? "beta" : "alpha");
        epd_ctl_put_u32(&b, EPD_CTL_T_FIRST_RANK, 2 * i);
        epd_ctl_put_u32(&b, EPD_CTL_T_RANKS, 2);
        size_t g = epd_ctl_nest_begin(&b, EPD_CTL_T_GPU);
        epd_ctl_put_u32(&b, EPD_CTL_T_ORDINAL, 7);
        epd_ctl_put_str(&b, EPD_CTL_T_PCI, "0000:3b:00.0");
        epd_ctl_nest_end(&b, g);
        epd_ctl_nest_end(&b, mk);
    }
    assert_int_equal(epd_ctl_frame_end(&b), 0);

    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    epd_ctl_decoder_init(&d, 0);
    assert_int_equal(epd_ctl_decoder_feed(&d, b.p, b.len), 0);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), 1);
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *v;
    uint32_t vl;
    int nodes = 0;
    epd_ctl_iter_init(&it, m.payload, m.len);
    while (epd_ctl_iter_next(&it, &tag, &v, &vl)) {
        if (tag != EPD_CTL_T_NODE) continue;
        uint32_t id, first;
        char host[16];
        assert_int_equal(epd_ctl_get_u32(v, vl, EPD_CTL_T_NODE_ID, &id), 0);
        assert_int_equal(epd_ctl_get_u32(v, vl, EPD_CTL_T_FIRST_RANK, &first), 0);
        assert_int_equal(epd_ctl_get_str(v, vl, EPD_CTL_T_HOSTNAME, host, sizeof host), 0);
        assert_int_equal(id, 3 + nodes);
        assert_int_equal(first, 2 * nodes);
        assert_string_equal(host, nodes ? "beta" : "alpha");
        const uint8_t *gv;
        uint32_t gl;
        char pci[32];
        assert_int_equal(epd_ctl_get_bytes(v, vl, EPD_CTL_T_GPU, &gv, &gl), 0);
        assert_int_equal(epd_ctl_get_str(gv, gl, EPD_CTL_T_PCI, pci, sizeof pci), 0);
        assert_string_equal(pci, "0000:3b:00.0");
        nodes++;
    }
    assert_int_equal(nodes, 2);
    epd_ctl_decoder_fini(&d);
    epd_ctl_buf_fini(&b);
}

static void test_unknown_tag_is_skipped(void **state)
{
    uint8_t pay[64], fr[128];
    size_t n = 0;
    uint8_t e[8] = {0, 0, 0, 0, 0, 0, 0, 5};
    n += tlv(pay + n, 999, "future", 6);
    n += tlv(pay + n, EPD_CTL_T_EPOCH, e, 8);
    size_t fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    epd_ctl_decoder_init(&d, 0);
    assert_int_equal(epd_ctl_decoder_feed(&d, fr, fl), 0);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), 1);
    uint64_t ep;
    assert_int_equal(epd_ctl_get_u64(m.payload, m.len, EPD_CTL_T_EPOCH, &ep), 0);
    assert_int_equal(ep, 5);
    epd_ctl_decoder_fini(&d);
}

/* Feeds `bytes` and expects a rejection with `reason`, either from next() or from finish(). */
static void expect_reject(const uint8_t *bytes, size_t n, epd_ctl_reject_t reason, uint32_t max)
{
    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    epd_ctl_decoder_init(&d, max);
    int r = epd_ctl_decoder_feed(&d, bytes, n);
    while (r == 0 && (r = epd_ctl_decoder_next(&d, &m)) == 1)
        r = 0;
    if (r == 0) r = epd_ctl_decoder_finish(&d);
    assert_int_equal(r, -1);
    assert_int_equal(d.reason, reason);
    assert_true(strlen(d.detail) > 0);
    /* A failed decoder stays failed. */
    assert_int_equal(epd_ctl_decoder_next(&d, &m), -1);
    epd_ctl_decoder_fini(&d);
}

static void test_reject_bad_magic(void **state)
{
    uint8_t fr[sizeof ack_ref];
    memcpy(fr, ack_ref, sizeof fr);
    fr[2] = 'X';
    expect_reject(fr, sizeof fr, EPD_CTL_REJECT_BAD_MAGIC, 0);
    /* An HTTP request sent to the control port is rejected on its first byte. */
    expect_reject((const uint8_t *)"G", 1, EPD_CTL_REJECT_BAD_MAGIC, 0);
}

static void test_reject_bad_version(void **state)
{
    uint8_t fr[sizeof ack_ref];
    memcpy(fr, ack_ref, sizeof fr);
    fr[4] = 2;
    expect_reject(fr, sizeof fr, EPD_CTL_REJECT_BAD_VERSION, 0);
}

static void test_reject_bad_type(void **state)
{
    uint8_t fr[sizeof ack_ref];
    memcpy(fr, ack_ref, sizeof fr);
    fr[5] = 0;
    expect_reject(fr, sizeof fr, EPD_CTL_REJECT_BAD_TYPE, 0);
    fr[5] = EPD_CTL_TYPE_MAX + 1;
    expect_reject(fr, sizeof fr, EPD_CTL_REJECT_BAD_TYPE, 0);
}

static void test_reject_bad_flags(void **state)
{
    uint8_t fr[sizeof ack_ref];
    memcpy(fr, ack_ref, sizeof fr);
    fr[7] = 1;
    expect_reject(fr, sizeof fr, EPD_CTL_REJECT_BAD_FLAGS, 0);
}

static void test_reject_oversize(void **state)
{
    uint8_t hdr[12];
    raw_frame(hdr, EPD_CTL_BOOT_CONTRIB, NULL, 0);
    put_be32(hdr + 8, EPD_CTL_MAX_PAYLOAD + 1);
    /* Rejected from the header alone: nothing of the payload is buffered. */
    expect_reject(hdr, sizeof hdr, EPD_CTL_REJECT_OVERSIZE, 0);
    /* A decoder with a smaller limit rejects a frame the default limit accepts. */
    expect_reject(ack_ref, sizeof ack_ref, EPD_CTL_REJECT_OVERSIZE, 8);
}

static void test_reject_truncated(void **state)
{
    expect_reject(ack_ref, sizeof ack_ref - 1, EPD_CTL_REJECT_TRUNCATED, 0);
    expect_reject(ack_ref, 7, EPD_CTL_REJECT_TRUNCATED, 0);
}

static void test_reject_malformed(void **state)
{
    uint8_t pay[128], fr[256];
    size_t n, fl;
    uint8_t e8[8] = {0};
    uint8_t e4[4] = {0};

    /* TLV header cut short inside the payload. */
    n = tlv(pay, EPD_CTL_T_EPOCH, e8, 8);
    pay[n++] = 0;
    pay[n++] = 7;
    fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* TLV length runs past the payload. */
    n = tlv(pay, EPD_CTL_T_EPOCH, e8, 8);
    put_be32(pay + 2, 9);
    fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* Integer of the wrong width. */
    n = tlv(pay, EPD_CTL_T_EPOCH, e4, 4);
    fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* Required tag missing (empty COMMIT). */
    fl = raw_frame(fr, EPD_CTL_COMMIT, pay, 0);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* Singular tag repeated. */
    n = tlv(pay, EPD_CTL_T_EPOCH, e8, 8);
    n += tlv(pay + n, EPD_CTL_T_EPOCH, e8, 8);
    fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* String with an embedded NUL. */
    n = tlv(pay, EPD_CTL_T_REASON, "a\0b", 3);
    fl = raw_frame(fr, EPD_CTL_BYE, pay, (uint32_t)n);
    expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);

    /* A nonce longer than its field's maximum (the auth layer checks the exact size). */
    {
        uint8_t big[40] = {0};
        n = tlv(pay, EPD_CTL_T_NODE_ID, e4, 4);
        n += tlv(pay + n, EPD_CTL_T_NONCE, big, 40);
        n += tlv(pay + n, EPD_CTL_T_CLUSTER, "c", 1);
        fl = raw_frame(fr, EPD_CTL_AUTH_HELLO, pay, (uint32_t)n);
        expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);
    }

    /* Nested entry whose inner TLV overruns it. */
    {
        uint8_t inner[32], node[64];
        size_t in = tlv(inner, EPD_CTL_T_ORDINAL, e4, 4);
        put_be32(inner + 2, 20);
        size_t nn = tlv(node, EPD_CTL_T_GPU, inner, (uint32_t)in);
        n = 0;
        n += tlv(pay + n, EPD_CTL_T_NODE_ID, e4, 4);
        n += tlv(pay + n, EPD_CTL_T_HOSTNAME, "h", 1);
        n += tlv(pay + n, EPD_CTL_T_EPOCH, e8, 8);
        n += tlv(pay + n, EPD_CTL_T_RANKS, e4, 4);
        n += tlv(pay + n, EPD_CTL_T_BACKEND, "cpu", 3);
        n += tlv(pay + n, EPD_CTL_T_CAPS, e4, 4);
        n += tlv(pay + n, EPD_CTL_T_FINGERPRINT, "fp", 2);
        memcpy(pay + n, node, nn);
        n += nn;
        fl = raw_frame(fr, EPD_CTL_HELLO, pay, (uint32_t)n);
        expect_reject(fr, fl, EPD_CTL_REJECT_MALFORMED, 0);
    }
}

static void test_malformed_detail_names_offset(void **state)
{
    uint8_t pay[32], fr[64];
    uint8_t e8[8] = {0};
    size_t n = tlv(pay, EPD_CTL_T_EPOCH, e8, 8);
    put_be32(pay + 2, 100);
    size_t fl = raw_frame(fr, EPD_CTL_COMMIT, pay, (uint32_t)n);
    uint8_t stream[128];
    memcpy(stream, ack_ref, sizeof ack_ref);
    memcpy(stream + sizeof ack_ref, fr, fl);
    epd_ctl_decoder_t d;
    epd_ctl_msg_t m;
    epd_ctl_decoder_init(&d, 0);
    assert_int_equal(epd_ctl_decoder_feed(&d, stream, sizeof ack_ref + fl), 0);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), 1);
    assert_int_equal(epd_ctl_decoder_next(&d, &m), -1);
    assert_int_equal(d.reason, EPD_CTL_REJECT_MALFORMED);
    /* The bad TLV starts after the first frame (26 bytes) and the second header (12). */
    assert_non_null(strstr(d.detail, "byte 38:"));
    epd_ctl_decoder_fini(&d);
}

static void test_builder_refuses_oversize_payload(void **state)
{
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    size_t big = EPD_CTL_MAX_PAYLOAD;
    uint8_t *blob = calloc(1, big);
    assert_non_null(blob);
    epd_ctl_frame_begin(&b, EPD_CTL_BOOT_RESULT);
    epd_ctl_put_bytes(&b, EPD_CTL_T_DATA, blob, big); /* + TLV header: over the limit */
    assert_int_equal(epd_ctl_frame_end(&b), -1);
    assert_int_equal(b.len, 0);
    /* The buffer is usable afterwards. */
    epd_ctl_frame_begin(&b, EPD_CTL_TABLE_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, 0x0102030405060708ull);
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    assert_memory_equal(b.p, ack_ref, sizeof ack_ref);
    free(blob);
    epd_ctl_buf_fini(&b);
}

static void test_reject_names_are_distinct(void **state)
{
    for (int i = 0; i < EPD_CTL_REJECT_COUNT; i++)
        for (int j = i + 1; j < EPD_CTL_REJECT_COUNT; j++)
            assert_string_not_equal(epd_ctl_reject_name(i), epd_ctl_reject_name(j));
    assert_string_equal(epd_ctl_reject_name(EPD_CTL_REJECT_OVERSIZE), "oversize");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_matches_reference_bytes),
        cmocka_unit_test(test_decode_byte_by_byte),
        cmocka_unit_test(test_roundtrip_nested_rank_table),
        cmocka_unit_test(test_unknown_tag_is_skipped),
        cmocka_unit_test(test_reject_bad_magic),
        cmocka_unit_test(test_reject_bad_version),
        cmocka_unit_test(test_reject_bad_type),
        cmocka_unit_test(test_reject_bad_flags),
        cmocka_unit_test(test_reject_oversize),
        cmocka_unit_test(test_reject_truncated),
        cmocka_unit_test(test_reject_malformed),
        cmocka_unit_test(test_malformed_detail_names_offset),
        cmocka_unit_test(test_builder_refuses_oversize_payload),
        cmocka_unit_test(test_reject_names_are_distinct),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
