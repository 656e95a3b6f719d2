/* Control-plane frame codec: incremental decoding with per-type schema validation, and the
 * frame builder (format in ctl_frame.h). */
#include "ctl_frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- schema ---- */

enum { K_U8, K_U32, K_U64, K_BYTES, K_STR, K_NEST };
enum { F_REQ = 1, F_REP = 2 };

typedef struct field {
    uint16_t tag;
    uint8_t kind;
    uint8_t flags;
    uint32_t max; /* bytes/str: longest value; nest: index into nested schemas */
} field_t;

typedef struct schema {
    const field_t *f;
    int n;
} schema_t;

#define NONCE_LEN 32
#define MAC_LEN 32
#define STR_SHORT 255
#define BLOB_MAX (EPD_CTL_MAX_PAYLOAD / 2)

static const field_t gpu_fields[] = {
    {EPD_CTL_T_ORDINAL, K_U32, F_REQ, 0},
    {EPD_CTL_T_PCI, K_STR, 0, 63},
};
static const field_t node_fields[] = {
    {EPD_CTL_T_NODE_ID, K_U32, F_REQ, 0},
    {EPD_CTL_T_HOSTNAME, K_STR, F_REQ, STR_SHORT},
    {EPD_CTL_T_NAME, K_STR, 0, 63},
    {EPD_CTL_T_FIRST_RANK, K_U32, F_REQ, 0},
    {EPD_CTL_T_RANKS, K_U32, F_REQ, 0},
    {EPD_CTL_T_BACKEND, K_STR, 0, 31},
    {EPD_CTL_T_CAPS, K_U32, 0, 0},
    {EPD_CTL_T_GPU, K_NEST, F_REP, 0},
    {EPD_CTL_T_ENDPOINT, K_BYTES, 0, BLOB_MAX},
    {EPD_CTL_T_HTTP, K_STR, 0, STR_SHORT},
    {EPD_CTL_T_CTL_ADDR, K_STR, 0, STR_SHORT},
};
static const schema_t nested[] = {
    {gpu_fields, sizeof gpu_fields / sizeof gpu_fields[0]},
    {node_fields, sizeof node_fields / sizeof node_fields[0]},
};
#define NEST_GPU 0
#define NEST_NODE 1

static const field_t auth_hello[] = {
    {EPD_CTL_T_NODE_ID, K_U32, F_REQ, 0},
    {EPD_CTL_T_NONCE, K_BYTES, F_REQ, NONCE_LEN},
    {EPD_CTL_T_CLUSTER, K_STR, F_REQ, 63},
};
static const field_t auth_challenge[] = {
    {EPD_CTL_T_NODE_ID, K_U32, F_REQ, 0},
    {EPD_CTL_T_NONCE, K_BYTES, F_REQ, NONCE_LEN},
    {EPD_CTL_T_MAC, K_BYTES, F_REQ, MAC_LEN},
};
static const field_t auth_response[] = {{EPD_CTL_T_MAC, K_BYTES, F_REQ, MAC_LEN}};
static const field_t hello[] = {
    {EPD_CTL_T_NODE_ID, K_U32, F_REQ, 0},
    {EPD_CTL_T_HOSTNAME, K_STR, F_REQ, STR_SHORT},
    {EPD_CTL_T_NAME, K_STR, 0, 63},
    {EPD_CTL_T_EPOCH, K_U64, F_REQ, 0},
    {EPD_CTL_T_RANKS, K_U32, F_REQ, 0},
    {EPD_CTL_T_BACKEND, K_STR, F_REQ, 31},
    {EPD_CTL_T_CAPS, K_U32, F_REQ, 0},
    {EPD_CTL_T_FINGERPRINT, K_BYTES, F_REQ, 64},
    {EPD_CTL_T_SETTINGS, K_BYTES, 0, BLOB_MAX},
    {EPD_CTL_T_ENDPOINT, K_BYTES, 0, BLOB_MAX},
    {EPD_CTL_T_GPU, K_NEST, F_REP, NEST_GPU},
    {EPD_CTL_T_HTTP, K_STR, 0, STR_SHORT},
    {EPD_CTL_T_CTL_ADDR, K_STR, 0, STR_SHORT},
    {EPD_CTL_T_STATE, K_U8, 0, 0},
    {EPD_CTL_T_INCARNATION, K_U64, F_REQ, 0},
};
static const field_t refuse[] = {
    {EPD_CTL_T_REASON, K_STR, F_REQ, 1023},
    {EPD_CTL_T_SETTING, K_STR, 0, STR_SHORT},
};
static const field_t rank_table[] = {
    {EPD_CTL_T_EPOCH, K_U64, F_REQ, 0},         {EPD_CTL_T_COORD, K_U32, F_REQ, 0},
    {EPD_CTL_T_COMPLETE, K_U8, F_REQ, 0},       {EPD_CTL_T_NRANKS, K_U32, F_REQ, 0},
    {EPD_CTL_T_NODE, K_NEST, F_REP, NEST_NODE},
};
static const field_t epoch_only[] = {{EPD_CTL_T_EPOCH, K_U64, F_REQ, 0}};
static const field_t heartbeat[] = {
    {EPD_CTL_T_SEQ, K_U64, F_REQ, 0},   {EPD_CTL_T_TIME, K_U64, F_REQ, 0},
    {EPD_CTL_T_STATE, K_U8, F_REQ, 0},  {EPD_CTL_T_LOAD, K_U32, F_REQ, 0},
    {EPD_CTL_T_EPOCH, K_U64, F_REQ, 0},
};
static const field_t heartbeat_ack[] = {
    {EPD_CTL_T_SEQ, K_U64, F_REQ, 0},
    {EPD_CTL_T_TIME, K_U64, F_REQ, 0},
};
static const field_t boot_contrib[] = {
    {EPD_CTL_T_EPOCH, K_U64, F_REQ, 0},
    {EPD_CTL_T_SEQ, K_U64, F_REQ, 0},
    {EPD_CTL_T_LEN, K_U32, F_REQ, 0},
    {EPD_CTL_T_DATA, K_BYTES, F_REQ, EPD_CTL_MAX_PAYLOAD},
};
static const field_t boot_result[] = {
    {EPD_CTL_T_EPOCH, K_U64, F_REQ, 0},
    {EPD_CTL_T_SEQ, K_U64, F_REQ, 0},
    {EPD_CTL_T_STATUS, K_U32, F_REQ, 0},
    {EPD_CTL_T_LEN, K_U32, F_REQ, 0},
    {EPD_CTL_T_DATA, K_BYTES, F_REQ, EPD_CTL_MAX_PAYLOAD},
    {EPD_CTL_T_REASON, K_STR, 0, 1023},
};
static const field_t bye[] = {{EPD_CTL_T_REASON, K_STR, F_REQ, 1023}};

#define S(a)                                                                                       \
    {                                                                                              \
        a, sizeof a / sizeof a[0]                                                                  \
    }
static const schema_t schemas[EPD_CTL_TYPE_MAX + 1] = {
    [EPD_CTL_AUTH_HELLO] = S(auth_hello),
    [EPD_CTL_AUTH_CHALLENGE] = S(auth_challenge),
    [EPD_CTL_AUTH_RESPONSE] = S(auth_response),
    [EPD_CTL_AUTH_OK] = {NULL, 0},
    [EPD_CTL_HELLO] = S(hello),
    [EPD_CTL_REFUSE] = S(refuse),
    [EPD_CTL_RANK_TABLE] = S(rank_table),
    [EPD_CTL_TABLE_ACK] = S(epoch_only),
    [EPD_CTL_COMMIT] = S(epoch_only),
    [EPD_CTL_HEARTBEAT] = S(heartbeat),
    [EPD_CTL_HEARTBEAT_ACK] = S(heartbeat_ack),
    [EPD_CTL_BOOT_CONTRIB] = S(boot_contrib),
    [EPD_CTL_BOOT_RESULT] = S(boot_result),
    [EPD_CTL_BYE] = S(bye),
    [EPD_CTL_WAKE] = {NULL, 0},
};
#undef S

static const char *const reject_names[EPD_CTL_REJECT_COUNT] = {
#define REJECT_NAME(name, text) [EPD_CTL_REJECT_##name] = text,
    EPD_CTL_REJECT_MAP(REJECT_NAME)
#undef REJECT_NAME
};

static const char *const type_names[EPD_CTL_TYPE_MAX + 1] = {
#define TYPE_NAME(name, value) [EPD_CTL_##name] = #name,
    EPD_CTL_TYPE_MAP(TYPE_NAME)
#undef TYPE_NAME
};

const char *epd_ctl_reject_name(epd_ctl_reject_t r)
{
    if ((int)r < 0 || r >= EPD_CTL_REJECT_COUNT) return "unknown";
    return reject_names[r];
}

const char *epd_ctl_type_name(int type)
{
    if (type <= 0 || type > EPD_CTL_TYPE_MAX) return "UNKNOWN";
    return type_names[type];
}

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t rd64(const uint8_t *p)
{
    return ((uint64_t)rd32(p) << 32) | rd32(p + 4);
}

/* ---- validation ---- */

#define MAX_DEPTH 2
#define MAX_FIELDS 16

static int check_tlvs(const schema_t *s, const uint8_t *p, uint32_t len, uint64_t base, int depth,
                      char *detail, size_t dl)
{
    unsigned count[MAX_FIELDS] = {0};
    uint32_t off = 0;
    while (off < len) {
        if (len - off < EPD_CTL_TLV_HEADER_LEN) {
            snprintf(detail, dl, "byte %llu: %u bytes left, a TLV header needs %d",
                     (unsigned long long)(base + off), len - off, EPD_CTL_TLV_HEADER_LEN);
            return -1;
        }
        uint16_t tag = rd16(p + off);
        uint32_t vlen = rd32(p + off + 2);
        uint32_t voff = off + EPD_CTL_TLV_HEADER_LEN;
        if (vlen > len - voff) {
            snprintf(detail, dl, "byte %llu: tag %u length %u overruns the %u bytes left",
                     (unsigned long long)(base + off), tag, vlen, len - voff);
            return -1;
        }
        int fi = -1;
        for (int i = 0; i < s->n; i++)
            if (s->f[i].tag == tag) fi = i;
        if (fi >= 0) {
            const field_t *f = &s->f[fi];
            const uint8_t *v = p + voff;
            int bad = 0;
            switch (f->kind) {
            case K_U8:
                bad = vlen != 1;
                break;
            case K_U32:
                bad = vlen != 4;
                break;
            case K_U64:
                bad = vlen != 8;
                break;
            case K_BYTES:
                bad = vlen > f->max;
                break;
            case K_STR:
                bad = vlen > f->max || (vlen && memchr(v, 0, vlen) != NULL);
                break;
            case K_NEST:
                if (depth + 1 > MAX_DEPTH) {
                    snprintf(detail, dl, "byte %llu: tag %u nested too deep",
                             (unsigned long long)(base + off), tag);
                    return -1;
                }
                if (check_tlvs(&nested[f->max], v, vlen, base + voff, depth + 1, detail, dl) < 0)
                    return -1;
                break;
            }
            if (bad) {
                snprintf(detail, dl, "byte %llu: tag %u has a bad length %u or content",
                         (unsigned long long)(base + off), tag, vlen);
                return -1;
            }
            if (++count[fi] > 1 && !(f->flags & F_REP)) {
                snprintf(detail, dl, "byte %llu: tag %u repeated", (unsigned long long)(base + off),
                         tag);
                return -1;
            }
        }
        off = voff + vlen;
    }
    for (int i = 0; i < s->n; i++) {
        if ((s->f[i].flags & F_REQ) && !count[i]) {
            snprintf(detail, dl, "byte %llu: required tag %u missing", (unsigned long long)base,
                     s->f[i].tag);
            return -1;
        }
    }
    return 0;
}

int epd_ctl_payload_check(int type, const uint8_t *p, uint32_t len, uint64_t base_off, char *detail,
                          size_t detail_len)
{
    if (type <= 0 || type > EPD_CTL_TYPE_MAX) {
        snprintf(detail, detail_len, "unknown frame type %d", type);
        return -1;
    }
    return check_tlvs(&schemas[type], p, len, base_off, 0, detail, detail_len);
}

/* ---- decoder ---- */

void epd_ctl_decoder_init(epd_ctl_decoder_t *d, uint32_t max_payload)
{
    memset(d, 0, sizeof *d);
    d->max_payload =
        (max_payload == 0 || max_payload > EPD_CTL_MAX_PAYLOAD) ? EPD_CTL_MAX_PAYLOAD : max_payload;
}

void epd_ctl_decoder_fini(epd_ctl_decoder_t *d)
{
    free(d->buf);
    d->buf = NULL;
    d->len = d->cap = d->head = 0;
}

static int fail(epd_ctl_decoder_t *d, epd_ctl_reject_t r, const char *fmt, unsigned long long off,
                unsigned long long a)
{
    d->failed = 1;
    d->reason = r;
    snprintf(d->detail, sizeof d->detail, fmt, off, a);
    return -1;
}

int epd_ctl_decoder_feed(epd_ctl_decoder_t *d, const void *data, size_t n)
{
    if (d->failed) return -1;
    if (n == 0) return 0;
    if (d->head > 0 && d->head == d->len) {
        d->len = d->head = 0;
    } else if (d->head > 0 && d->head >= d->cap / 2) {
        memmove(d->buf, d->buf + d->head, d->len - d->head);
        d->len -= d->head;
        d->head = 0;
    }
    /* The caller drains frames after every feed, so more than one frame plus one read is a bug
     * or an attack; refuse it rather than buffer without bound. */
    if (d->len - d->head + n > (size_t)EPD_CTL_HEADER_LEN + d->max_payload + 2 * 65536) {
        d->failed = 1;
        d->reason = EPD_CTL_REJECT_OVERSIZE;
        snprintf(d->detail, sizeof d->detail, "byte %llu: %zu bytes buffered without a frame",
                 (unsigned long long)d->consumed, d->len - d->head + n);
        return -1;
    }
    if (d->len + n > d->cap) {
        size_t cap = d->cap ? d->cap : 4096;
        while (cap < d->len + n)
            cap *= 2;
        uint8_t *nb = realloc(d->buf, cap);
        if (!nb) {
            d->failed = 1;
            d->reason = EPD_CTL_REJECT_OVERSIZE;
            snprintf(d->detail, sizeof d->detail, "out of memory buffering %zu bytes", d->len + n);
            return -1;
        }
        d->buf = nb;
        d->cap = cap;
    }
    memcpy(d->buf + d->len, data, n);
    d->len += n;
    return 0;
}

int epd_ctl_decoder_next(epd_ctl_decoder_t *d, epd_ctl_msg_t *msg)
{
    if (d->failed) return -1;
    size_t avail = d->len - d->head;
    if (avail == 0) return 0;
    const uint8_t *h = d->buf + d->head;
    unsigned long long off = d->consumed;
    /* Reject garbage as soon as its first bytes arrive, before a whole header is buffered. */
    static const uint8_t magic[4] = {0x45, 0x50, 0x44, 0x43};
    size_t mcheck = avail < 4 ? avail : 4;
    if (memcmp(h, magic, mcheck) != 0)
        return fail(d, EPD_CTL_REJECT_BAD_MAGIC, "byte %llu: bad magic (first byte 0x%02llx)", off,
                    h[0]);
    if (avail >= 5 && h[4] != EPD_CTL_VERSION)
        return fail(d, EPD_CTL_REJECT_BAD_VERSION, "byte %llu: unsupported version %llu", off + 4,
                    h[4]);
    if (avail >= 6 && (h[5] == 0 || h[5] > EPD_CTL_TYPE_MAX))
        return fail(d, EPD_CTL_REJECT_BAD_TYPE, "byte %llu: unknown frame type %llu", off + 5,
                    h[5]);
    if (avail >= 8 && rd16(h + 6) != 0)
        return fail(d, EPD_CTL_REJECT_BAD_FLAGS, "byte %llu: unknown flags 0x%04llx", off + 6,
                    rd16(h + 6));
    if (avail < EPD_CTL_HEADER_LEN) return 0;
    uint32_t plen = rd32(h + 8);
    if (plen > d->max_payload)
        return fail(d, EPD_CTL_REJECT_OVERSIZE, "byte %llu: payload length %llu over the limit",
                    off + 8, plen);
    if (avail - EPD_CTL_HEADER_LEN < plen) return 0;
    const uint8_t *payload = h + EPD_CTL_HEADER_LEN;
    char why[120];
    if (epd_ctl_payload_check(h[5], payload, plen, off + EPD_CTL_HEADER_LEN, why, sizeof why) < 0) {
        d->failed = 1;
        d->reason = EPD_CTL_REJECT_MALFORMED;
        snprintf(d->detail, sizeof d->detail, "%s frame: %s", epd_ctl_type_name(h[5]), why);
        return -1;
    }
    msg->type = h[5];
    msg->flags = 0;
    msg->payload = payload;
    msg->len = plen;
    d->head += EPD_CTL_HEADER_LEN + (size_t)plen;
    d->consumed += EPD_CTL_HEADER_LEN + (uint64_t)plen;
    return 1;
}

int epd_ctl_decoder_finish(epd_ctl_decoder_t *d)
{
    if (d->failed) return -1;
    if (d->len > d->head)
        return fail(d, EPD_CTL_REJECT_TRUNCATED,
                    "byte %llu: stream ended inside a frame (%llu bytes of it received)",
                    d->consumed, d->len - d->head);
    return 0;
}

/* ---- reading ---- */

void epd_ctl_iter_init(epd_ctl_iter_t *it, const uint8_t *p, uint32_t len)
{
    it->p = p;
    it->len = len;
    it->off = 0;
}

int epd_ctl_iter_next(epd_ctl_iter_t *it, uint16_t *tag, const uint8_t **val, uint32_t *vlen)
{
    if (it->len - it->off < EPD_CTL_TLV_HEADER_LEN) return 0;
    uint32_t l = rd32(it->p + it->off + 2);
    if (l > it->len - it->off - EPD_CTL_TLV_HEADER_LEN) return 0;
    *tag = rd16(it->p + it->off);
    *val = it->p + it->off + EPD_CTL_TLV_HEADER_LEN;
    *vlen = l;
    it->off += EPD_CTL_TLV_HEADER_LEN + l;
    return 1;
}

int epd_ctl_get_bytes(const uint8_t *p, uint32_t len, uint16_t tag, const uint8_t **val,
                      uint32_t *vlen)
{
    epd_ctl_iter_t it;
    uint16_t t;
    epd_ctl_iter_init(&it, p, len);
    while (epd_ctl_iter_next(&it, &t, val, vlen))
        if (t == tag) return 0;
    return -1;
}

int epd_ctl_get_u8(const uint8_t *p, uint32_t len, uint16_t tag, uint8_t *out)
{
    const uint8_t *v;
    uint32_t n;
    if (epd_ctl_get_bytes(p, len, tag, &v, &n) < 0 || n != 1) return -1;
    *out = v[0];
    return 0;
}

int epd_ctl_get_u32(const uint8_t *p, uint32_t len, uint16_t tag, uint32_t *out)
{
    const uint8_t *v;
    uint32_t n;
    if (epd_ctl_get_bytes(p, len, tag, &v, &n) < 0 || n != 4) return -1;
    *out = rd32(v);
    return 0;
}

int epd_ctl_get_u64(const uint8_t *p, uint32_t len, uint16_t tag, uint64_t *out)
{
    const uint8_t *v;
    uint32_t n;
    if (epd_ctl_get_bytes(p, len, tag, &v, &n) < 0 || n != 8) return -1;
    *out = rd64(v);
    return 0;
}

int epd_ctl_get_str(const uint8_t *p, uint32_t len, uint16_t tag, char *out, size_t cap)
{
    const uint8_t *v;
    uint32_t n;
    if (cap == 0 || epd_ctl_get_bytes(p, len, tag, &v, &n) < 0 || n >= cap) return -1;
    memcpy(out, v, n);
    out[n] = 0;
    return 0;
}

/* ---- building ---- */

void epd_ctl_buf_init(epd_ctl_buf_t *b)
{
    memset(b, 0, sizeof *b);
}

void epd_ctl_buf_fini(epd_ctl_buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

void epd_ctl_buf_reset(epd_ctl_buf_t *b)
{
    b->len = 0;
    b->frame_start = 0;
    b->err = 0;
}

uint8_t *epd_ctl_buf_steal(epd_ctl_buf_t *b, size_t *len)
{
    uint8_t *p = b->p;
    *len = b->len;
    memset(b, 0, sizeof *b);
    return p;
}

static uint8_t *reserve(epd_ctl_buf_t *b, size_t n)
{
    if (b->err) return NULL;
    if (b->len - b->frame_start + n > (size_t)EPD_CTL_HEADER_LEN + EPD_CTL_MAX_PAYLOAD) {
        b->err = 1;
        return NULL;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (!np) {
            b->err = 1;
            return NULL;
        }
        b->p = np;
        b->cap = cap;
    }
    uint8_t *r = b->p + b->len;
    b->len += n;
    return r;
}

static void wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

void epd_ctl_frame_begin(epd_ctl_buf_t *b, int type)
{
    b->frame_start = b->len;
    b->err = 0;
    uint8_t *h = reserve(b, EPD_CTL_HEADER_LEN);
    if (!h) return;
    wr32(h, EPD_CTL_MAGIC);
    h[4] = EPD_CTL_VERSION;
    h[5] = (uint8_t)type;
    wr16(h + 6, 0);
    wr32(h + 8, 0);
}

int epd_ctl_frame_end(epd_ctl_buf_t *b)
{
    if (b->err) {
        b->len = b->frame_start;
        b->err = 0;
        return -1;
    }
    wr32(b->p + b->frame_start + 8, (uint32_t)(b->len - b->frame_start - EPD_CTL_HEADER_LEN));
    return 0;
}

static void put_tlv(epd_ctl_buf_t *b, uint16_t tag, const void *v, size_t n)
{
    if (n > UINT32_MAX) {
        b->err = 1;
        return;
    }
    uint8_t *p = reserve(b, EPD_CTL_TLV_HEADER_LEN + n);
    if (!p) return;
    wr16(p, tag);
    wr32(p + 2, (uint32_t)n);
    if (n) memcpy(p + EPD_CTL_TLV_HEADER_LEN, v, n);
}

void epd_ctl_put_u8(epd_ctl_buf_t *b, uint16_t tag, uint8_t v)
{
    put_tlv(b, tag, &v, 1);
}

void epd_ctl_put_u32(epd_ctl_buf_t *b, uint16_t tag, uint32_t v)
{
    uint8_t x[4];
    wr32(x, v);
    put_tlv(b, tag, x, 4);
}

void epd_ctl_put_u64(epd_ctl_buf_t *b, uint16_t tag, uint64_t v)
{
    uint8_t x[8];
    wr32(x, (uint32_t)(v >> 32));
    wr32(x + 4, (uint32_t)v);
    put_tlv(b, tag, x, 8);
}

void epd_ctl_put_bytes(epd_ctl_buf_t *b, uint16_t tag, const void *v, size_t n)
{
    put_tlv(b, tag, v, n);
}

void epd_ctl_put_str(epd_ctl_buf_t *b, uint16_t tag, const char *s)
{
    put_tlv(b, tag, s, s ? strlen(s) : 0);
}

size_t epd_ctl_nest_begin(epd_ctl_buf_t *b, uint16_t tag)
{
    size_t mark = b->len;
    put_tlv(b, tag, NULL, 0);
    return mark;
}

void epd_ctl_nest_end(epd_ctl_buf_t *b, size_t mark)
{
    if (b->err) return;
    wr32(b->p + mark + 2, (uint32_t)(b->len - mark - EPD_CTL_TLV_HEADER_LEN));
}
