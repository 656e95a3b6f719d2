/* The tcp wire's byte formats and its introspection calls (internal to libep and its tests).
 *
 * All integers are little-endian. Every rank runs one listener; ranks exchange endpoint blobs
 * through the bootstrap, then the lower rank of each pair connects to the higher one. A
 * connection starts with a HELLO from the connecting rank, answered by a HELLO from the
 * accepting rank; after that it carries frames in both directions.
 *
 * Endpoint blob (EP_TCP_BLOB_BYTES, one per rank, allgathered):
 *   0 u32 magic EP_TCP_MAGIC   4 u16 version   6 u16 zero      8 u32 rank   12 u32 nranks
 *  16 u64 nonce (rank 0's is the group's)     24 u64 buffer bytes          32 u32 port
 *  36 u32 zero                40 char host[EP_TCP_HOST_MAX] (NUL-terminated)
 *
 * HELLO (EP_TCP_HELLO_BYTES):
 *   0 u32 magic   4 u16 version   6 u16 kind (1: from the connecting rank, 2: the answer)
 *   8 u32 rank   12 u32 nranks   16 u64 group nonce   24 u64 buffer bytes
 *
 * Frame header (EP_TCP_FRAME_BYTES), followed by `arg` payload bytes for a PUT:
 *   0 u32 type (EP_TCP_FRAME_*)   4 u32 op (SIGNAL: ep_signal_op_t; else zero)
 *   8 u64 offset into the receiver's buffer   16 u64 arg (PUT: length; SIGNAL: value; BYE: 0)
 */
#ifndef EP_WIRE_TCP_H
#define EP_WIRE_TCP_H

#include "wire.h"

#define EP_TCP_MAGIC 0x57545045u /* "EPTW" */
#define EP_TCP_VERSION 1
#define EP_TCP_HOST_MAX 64
#define EP_TCP_BLOB_BYTES (40 + EP_TCP_HOST_MAX)
#define EP_TCP_HELLO_BYTES 32
#define EP_TCP_HELLO_CONNECT 1
#define EP_TCP_HELLO_ACCEPT 2
#define EP_TCP_FRAME_BYTES 24

/* Frame types: X(NAME, value). BYE is the orderly close: the connection's end that follows is
 * no failure. */
#define EP_TCP_FRAME_MAP(X) X(PUT, 1) X(SIGNAL, 2) X(BYE, 3)

enum ep_tcp_frame_type {
#define EP_TCP_FRAME_ENUM(name, value) EP_TCP_FRAME_##name = value,
    EP_TCP_FRAME_MAP(EP_TCP_FRAME_ENUM)
#undef EP_TCP_FRAME_ENUM
};

/* Why the calling thread's last ep_wire_tcp_create failed (bad tcp_host/tcp_port, the port in
 * use ...); "" after a success. Failures of a created wire are in ep_wire_t.error. */
const char *ep_wire_tcp_create_error(void);
/* The port the wire listens on (known from ep_wire_tcp_create on). */
int ep_wire_tcp_port(const ep_wire_t *w);
/* Connections the listener refused so far (garbage, wrong group, duplicate or unknown rank) and
 * the reason of the last one; `why` may be NULL. */
unsigned ep_wire_tcp_refused(ep_wire_t *w, char *why, size_t why_len);

#endif /* EP_WIRE_TCP_H */
