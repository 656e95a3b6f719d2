/* The control-plane wire format: versioned, length-prefixed frames with a TLV payload, an
 * incremental decoder that validates every frame against its type's schema, and a builder.
 *
 * Frame (all integers big-endian):
 *   magic u32 = 0x45504443 ("EPDC") | version u8 = 1 | type u8 | flags u16 = 0 | length u32
 *   payload[length]: a sequence of TLVs  tag u16 | len u32 | value[len]
 * Integer values are fixed width (u8: 1 byte, u32: 4, u64: 8); strings are UTF-8 without NUL;
 * a nested value is itself a TLV sequence. Unknown tags are skipped (newer peers may add fields);
 * a known tag with the wrong width, a missing required tag or a repeated singular tag makes the
 * frame malformed. */
#ifndef EPD_CTL_FRAME_H
#define EPD_CTL_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define EPD_CTL_MAGIC 0x45504443u
#define EPD_CTL_VERSION 1
#define EPD_CTL_HEADER_LEN 12
#define EPD_CTL_TLV_HEADER_LEN 6
/* Largest payload a peer may send: the biggest legitimate frame is a bootstrap allgather result
 * (ranks x endpoint bytes), far below this; anything larger is an attack or a bug. */
#define EPD_CTL_MAX_PAYLOAD (1u << 20)

/* The frame types: X(name, value); epd_ctl_type_name gives the name ("AUTH_HELLO").
 *   AUTH_HELLO      client -> server: node id, cluster name, client nonce
 *   AUTH_CHALLENGE  server -> client: node id, server nonce, server proof
 *   AUTH_RESPONSE   client -> server: client proof
 *   AUTH_OK         server -> client: both sides proved the secret
 *   HELLO           node description (both directions after auth)
 *   REFUSE          the sender refuses this peer (reason, differing setting)
 *   RANK_TABLE      coordinator -> members: epoch, ranks of every node
 *   TABLE_ACK       member -> coordinator: table of this epoch adopted
 *   COMMIT          coordinator -> members: every member acked, cluster formed
 *   HEARTBEAT       state, load, epoch, send time
 *   HEARTBEAT_ACK   echo of a heartbeat's sequence and time (RTT)
 *   BOOT_CONTRIB    member -> coordinator: local ranks' allgather data
 *   BOOT_RESULT     coordinator -> members: gathered data in rank order
 *   BYE             the sender leaves the cluster (drain finished, stop)
 *   WAKE            the sender's engine has work: wake the receiver's ranks */
#define EPD_CTL_TYPE_MAP(X)                                                                        \
    X(AUTH_HELLO, 1)                                                                               \
    X(AUTH_CHALLENGE, 2)                                                                           \
    X(AUTH_RESPONSE, 3)                                                                            \
    X(AUTH_OK, 4)                                                                                  \
    X(HELLO, 5)                                                                                    \
    X(REFUSE, 6)                                                                                   \
    X(RANK_TABLE, 7)                                                                               \
    X(TABLE_ACK, 8)                                                                                \
    X(COMMIT, 9)                                                                                   \
    X(HEARTBEAT, 10)                                                                               \
    X(HEARTBEAT_ACK, 11)                                                                           \
    X(BOOT_CONTRIB, 12)                                                                            \
    X(BOOT_RESULT, 13)                                                                             \
    X(BYE, 14)                                                                                     \
    X(WAKE, 15)

typedef enum epd_ctl_type {
#define EPD_CTL_TYPE_ENUM(name, value) EPD_CTL_##name = (value),
    EPD_CTL_TYPE_MAP(EPD_CTL_TYPE_ENUM)
#undef EPD_CTL_TYPE_ENUM
        EPD_CTL_TYPE_MAX = 15,
} epd_ctl_type_t;

typedef enum epd_ctl_tag {
    EPD_CTL_T_NODE_ID = 1,      /* u32 */
    EPD_CTL_T_NONCE = 2,        /* bytes[32] */
    EPD_CTL_T_MAC = 3,          /* bytes[32] */
    EPD_CTL_T_CLUSTER = 4,      /* str */
    EPD_CTL_T_HOSTNAME = 5,     /* str */
    EPD_CTL_T_NAME = 6,         /* str */
    EPD_CTL_T_EPOCH = 7,        /* u64 */
    EPD_CTL_T_RANKS = 8,        /* u32: ranks on the node */
    EPD_CTL_T_BACKEND = 9,      /* str */
    EPD_CTL_T_CAPS = 10,        /* u32: bit (1 << ep_transport_kind_t) per transport */
    EPD_CTL_T_FINGERPRINT = 11, /* bytes: config fingerprint */
    EPD_CTL_T_SETTINGS = 12,    /* bytes: the cluster-wide settings, for naming a difference */
    EPD_CTL_T_ENDPOINT = 13,    /* bytes: opaque data-plane endpoint blob */
    EPD_CTL_T_GPU = 14,         /* nested, repeated: ORDINAL, PCI */
    EPD_CTL_T_ORDINAL = 15,     /* u32 */
    EPD_CTL_T_PCI = 16,         /* str: PCI bus id, may be empty */
    EPD_CTL_T_HTTP = 17,        /* str: host:port of the node's HTTP endpoint */
    EPD_CTL_T_REASON = 18,      /* str */
    EPD_CTL_T_SETTING = 19,     /* str: name of a differing setting */
    EPD_CTL_T_COORD = 20,       /* u32: coordinator node id */
    EPD_CTL_T_COMPLETE = 21,    /* u8: every configured node is in the table */
    EPD_CTL_T_NRANKS = 22,      /* u32 */
    EPD_CTL_T_NODE = 23,        /* nested, repeated: one rank-table entry */
    EPD_CTL_T_FIRST_RANK = 24,  /* u32 */
    EPD_CTL_T_SEQ = 25,         /* u64 */
    EPD_CTL_T_TIME = 26,        /* u64: sender's monotonic clock, ns */
    EPD_CTL_T_STATE = 27,       /* u8: epd_cluster_node_state_t */
    EPD_CTL_T_LOAD = 28,        /* u32 */
    EPD_CTL_T_LEN = 29,         /* u32: bytes per rank */
    EPD_CTL_T_DATA = 30,        /* bytes */
    EPD_CTL_T_STATUS = 31,      /* u32: 0 ok, else the negated ep_status_t */
    EPD_CTL_T_CTL_ADDR = 32,    /* str: host:port of the control plane */
    EPD_CTL_T_INCARNATION = 33, /* u64: random per process start (tells a restart from a flap) */
} epd_ctl_tag_t;

/* Why a frame was rejected: X(name, text); the text is the `reason` label of
 * epd_ctl_rejected_frames_total (epd_ctl_reject_name).
 *   TRUNCATED        the stream ended inside a frame
 *   MALFORMED        the payload does not match its type's schema
 *   UNAUTHENTICATED  a non-auth frame before authentication finished
 *   OUT_OF_ORDER     an auth frame in the wrong state, or a protocol step out of turn
 *   AUTH_FAILED      wrong proof, wrong cluster, unknown or unexpected node */
#define EPD_CTL_REJECT_MAP(X)                                                                      \
    X(NONE, "none")                                                                                \
    X(BAD_MAGIC, "bad_magic")                                                                      \
    X(BAD_VERSION, "bad_version")                                                                  \
    X(BAD_TYPE, "bad_type")                                                                        \
    X(BAD_FLAGS, "bad_flags")                                                                      \
    X(OVERSIZE, "oversize")                                                                        \
    X(TRUNCATED, "truncated")                                                                      \
    X(MALFORMED, "malformed")                                                                      \
    X(UNAUTHENTICATED, "unauthenticated")                                                          \
    X(OUT_OF_ORDER, "out_of_order")                                                                \
    X(AUTH_FAILED, "auth_failed")

typedef enum epd_ctl_reject {
#define EPD_CTL_REJECT_ENUM(name, text) EPD_CTL_REJECT_##name,
    EPD_CTL_REJECT_MAP(EPD_CTL_REJECT_ENUM)
#undef EPD_CTL_REJECT_ENUM
        EPD_CTL_REJECT_COUNT,
} epd_ctl_reject_t;

const char *epd_ctl_reject_name(epd_ctl_reject_t r);
const char *epd_ctl_type_name(int type);

/* A validated frame; payload points into the decoder's buffer and stays valid until the next
 * epd_ctl_decoder_feed / epd_ctl_decoder_next on that decoder. */
typedef struct epd_ctl_msg {
    int type;
    uint16_t flags;
    const uint8_t *payload;
    uint32_t len;
} epd_ctl_msg_t;

typedef struct epd_ctl_decoder {
    uint8_t *buf;
    size_t len; /* bytes buffered */
    size_t cap;
    size_t head;       /* start of the first unconsumed frame */
    uint64_t consumed; /* stream offset of buf[head], for messages */
    uint32_t max_payload;
    int failed; /* after a rejection the decoder returns it again */
    epd_ctl_reject_t reason;
    char detail[160]; /* names the byte offset in the stream and what was wrong */
} epd_ctl_decoder_t;

/* max_payload: 0 means EPD_CTL_MAX_PAYLOAD; larger values are clamped to it. */
void epd_ctl_decoder_init(epd_ctl_decoder_t *d, uint32_t max_payload);
void epd_ctl_decoder_fini(epd_ctl_decoder_t *d);
/* Appends received bytes. -1 when out of memory (the decoder is then failed). */
int epd_ctl_decoder_feed(epd_ctl_decoder_t *d, const void *data, size_t n);
/* 1: *msg holds the next frame; 0: more bytes needed; -1: rejected (d->reason, d->detail). */
int epd_ctl_decoder_next(epd_ctl_decoder_t *d, epd_ctl_msg_t *msg);
/* The stream ended: -1 (TRUNCATED) when part of a frame is still buffered, else 0. */
int epd_ctl_decoder_finish(epd_ctl_decoder_t *d);

/* Validates one payload against the schema of `type` (the decoder calls it; exposed for tests).
 * 0 or -1 with detail filled (offsets relative to the payload start + base_off). */
int epd_ctl_payload_check(int type, const uint8_t *p, uint32_t len, uint64_t base_off, char *detail,
                          size_t detail_len);

/* ---- reading a validated payload ---- */

typedef struct epd_ctl_iter {
    const uint8_t *p;
    uint32_t len;
    uint32_t off;
} epd_ctl_iter_t;

void epd_ctl_iter_init(epd_ctl_iter_t *it, const uint8_t *p, uint32_t len);
/* 1 and the next TLV, or 0 at the end (or on a TLV that overruns; validated payloads never do). */
int epd_ctl_iter_next(epd_ctl_iter_t *it, uint16_t *tag, const uint8_t **val, uint32_t *vlen);

/* First TLV with `tag`; -1 if absent or of the wrong width. */
int epd_ctl_get_bytes(const uint8_t *p, uint32_t len, uint16_t tag, const uint8_t **val,
                      uint32_t *vlen);
int epd_ctl_get_u8(const uint8_t *p, uint32_t len, uint16_t tag, uint8_t *out);
int epd_ctl_get_u32(const uint8_t *p, uint32_t len, uint16_t tag, uint32_t *out);
int epd_ctl_get_u64(const uint8_t *p, uint32_t len, uint16_t tag, uint64_t *out);
/* Copies a string value with a terminating NUL; -1 if absent or longer than cap - 1. */
int epd_ctl_get_str(const uint8_t *p, uint32_t len, uint16_t tag, char *out, size_t cap);

/* ---- building frames ---- */

typedef struct epd_ctl_buf {
    uint8_t *p;
    size_t len;
    size_t cap;
    size_t frame_start;
    int err; /* sticky: out of memory or payload over the limit */
} epd_ctl_buf_t;

void epd_ctl_buf_init(epd_ctl_buf_t *b);
void epd_ctl_buf_fini(epd_ctl_buf_t *b);
void epd_ctl_buf_reset(epd_ctl_buf_t *b);
/* Takes the bytes; the buffer is empty afterwards and the caller frees *out. */
uint8_t *epd_ctl_buf_steal(epd_ctl_buf_t *b, size_t *len);

void epd_ctl_frame_begin(epd_ctl_buf_t *b, int type);
/* 0, or -1 when the payload exceeds EPD_CTL_MAX_PAYLOAD or memory ran out (frame dropped). */
int epd_ctl_frame_end(epd_ctl_buf_t *b);
void epd_ctl_put_u8(epd_ctl_buf_t *b, uint16_t tag, uint8_t v);
void epd_ctl_put_u32(epd_ctl_buf_t *b, uint16_t tag, uint32_t v);
void epd_ctl_put_u64(epd_ctl_buf_t *b, uint16_t tag, uint64_t v);
void epd_ctl_put_bytes(epd_ctl_buf_t *b, uint16_t tag, const void *v, size_t n);
void epd_ctl_put_str(epd_ctl_buf_t *b, uint16_t tag, const char *s);
/* Nested TLV: returns a mark for epd_ctl_nest_end, which patches the length. */
size_t epd_ctl_nest_begin(epd_ctl_buf_t *b, uint16_t tag);
void epd_ctl_nest_end(epd_ctl_buf_t *b, size_t mark);

#endif /* EPD_CTL_FRAME_H */
