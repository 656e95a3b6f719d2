/* Control-plane authentication: the cluster secret (loaded from a file that only the daemon's
 * user may read) and a mutual HMAC-SHA256 challenge-response over the frames of ctl_frame.h.
 *
 * Handshake (client = the node that connected):
 *   C -> S  AUTH_HELLO      {client id, cluster name, Nc}
 *   S -> C  AUTH_CHALLENGE  {server id, Ns, Ms = HMAC(K, "epd-ctl-v1" 'S' cluster idc ids Nc Ns)}
 *   C -> S  AUTH_RESPONSE   {Mc = HMAC(K, "epd-ctl-v1" 'C' cluster idc ids Nc Ns)}
 *   S -> C  AUTH_OK
 * Each side proves the secret over a nonce the other side just drew (RAND_bytes), so a recorded
 * handshake replayed to either side fails; proofs are compared with CRYPTO_memcmp. The state
 * machine is pure (no I/O): it consumes decoded frames and appends the frames to send. */
#ifndef EPD_CTL_AUTH_H
#define EPD_CTL_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "ctl_frame.h"
#include "epd_err.h"

#define EPD_CTL_NONCE_LEN 32
#define EPD_CTL_MAC_LEN 32
#define EPD_CTL_SECRET_MIN 16 /* bytes; shorter secrets are refused as guessable */
#define EPD_CTL_SECRET_MAX 1024

typedef struct epd_ctl_secret {
    unsigned char key[EPD_CTL_SECRET_MAX];
    size_t len;
} epd_ctl_secret_t;

/* Reads the secret (trailing whitespace stripped). Refused unless `path` is a regular file
 * owned by the effective user with no group/other permission bits (e.g. 0600) and holds
 * EPD_CTL_SECRET_MIN..EPD_CTL_SECRET_MAX bytes. 0, or a negative errno (-EINVAL unset, not a
 * regular file or a bad length; -EPERM wrong owner or mode; the call's errno when the file
 * cannot be opened or read) with a message in err that names the path and what was wrong
 * (never the secret). */
int epd_ctl_secret_load(const char *path, epd_ctl_secret_t *s, epd_err_t *err);
/* Sets the secret from memory (embedding, tests); -1 if the length is out of bounds. */
int epd_ctl_secret_set(epd_ctl_secret_t *s, const void *key, size_t len);
void epd_ctl_secret_wipe(epd_ctl_secret_t *s);

typedef enum epd_ctl_auth_role {
    EPD_CTL_AUTH_CLIENT = 0,
    EPD_CTL_AUTH_SERVER = 1
} epd_ctl_auth_role_t;

typedef enum epd_ctl_auth_state {
    EPD_CTL_AUTH_START = 0,      /* client: nothing sent; server: waiting for AUTH_HELLO */
    EPD_CTL_AUTH_WAIT_CHALLENGE, /* client */
    EPD_CTL_AUTH_WAIT_RESPONSE,  /* server */
    EPD_CTL_AUTH_WAIT_OK,        /* client */
    EPD_CTL_AUTH_DONE,
    EPD_CTL_AUTH_FAILED,
} epd_ctl_auth_state_t;

typedef struct epd_ctl_auth {
    epd_ctl_auth_role_t role;
    epd_ctl_auth_state_t state;
    const epd_ctl_secret_t *secret; /* borrowed */
    uint32_t self_id;
    uint32_t peer_id; /* client: the node it meant to reach; server: learnt from AUTH_HELLO */
    char cluster[64];
    unsigned char nonce_c[EPD_CTL_NONCE_LEN];
    unsigned char nonce_s[EPD_CTL_NONCE_LEN];
    epd_ctl_reject_t reason; /* set when a call returns -1 */
    char detail[160];
} epd_ctl_auth_t;

/* expect_peer: for a client, the node id it connects to (the server must prove it is that
 * node); ignored for a server. */
void epd_ctl_auth_init(epd_ctl_auth_t *a, epd_ctl_auth_role_t role, const epd_ctl_secret_t *secret,
                       uint32_t self_id, uint32_t expect_peer, const char *cluster);
/* Client only: appends AUTH_HELLO to out. 0, or -1 (no randomness, no memory). */
int epd_ctl_auth_start(epd_ctl_auth_t *a, epd_ctl_buf_t *out);
/* Consumes one frame received before authentication finished; may append a reply to out.
 * Returns 1 when authentication is complete, 0 to continue, -1 on rejection (a->reason,
 * a->detail). A server learns the peer id from AUTH_HELLO: accept_peer (may be NULL) decides
 * whether that node may join (return 0 to accept). */
int epd_ctl_auth_on_frame(epd_ctl_auth_t *a, const epd_ctl_msg_t *m, epd_ctl_buf_t *out,
                          int (*accept_peer)(void *ctx, uint32_t id, char *why, size_t whylen),
                          void *ctx);
/* Wipes nonces. */
void epd_ctl_auth_fini(epd_ctl_auth_t *a);

#endif /* EPD_CTL_AUTH_H */
