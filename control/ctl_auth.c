/* Control-plane authentication: loading the cluster secret and the mutual HMAC-SHA256
 * challenge-response (protocol in ctl_auth.h). */
#include "ctl_auth.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#define AUTH_LABEL "epd-ctl-v1"

int epd_ctl_secret_set(epd_ctl_secret_t *s, const void *key, size_t len)
{
    if (len < EPD_CTL_SECRET_MIN || len > EPD_CTL_SECRET_MAX) return -1;
    memcpy(s->key, key, len);
    s->len = len;
    return 0;
}

void epd_ctl_secret_wipe(epd_ctl_secret_t *s)
{
    OPENSSL_cleanse(s->key, sizeof s->key);
    s->len = 0;
}

int epd_ctl_secret_load(const char *path, epd_ctl_secret_t *s, epd_err_t *err)
{
    unsigned char buf[EPD_CTL_SECRET_MAX + 2];
    struct stat st;
    size_t n = 0;
    int fd = -1, rc;

    s->len = 0;
    if (!path || !*path) {
        rc = epd_err_set(err, -EINVAL, "cluster.secret_file is not set");
        goto fail;
    }
    fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        rc = epd_err_set(err, -errno, "cluster.secret_file %s: cannot open: %s", path,
                         strerror(errno));
        goto fail;
    }
    if (fstat(fd, &st) < 0) {
        rc = epd_err_set(err, -errno, "cluster.secret_file %s: fstat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = epd_err_set(err, -EINVAL, "cluster.secret_file %s: not a regular file", path);
        goto fail;
    }
    if (st.st_uid != geteuid()) {
        rc = epd_err_set(err, -EPERM,
                         "cluster.secret_file %s: owned by uid %u, not by the daemon's uid %u",
                         path, (unsigned)st.st_uid, (unsigned)geteuid());
        goto fail;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        rc = epd_err_set(err, -EPERM,
                         "cluster.secret_file %s: mode %04o gives access to group or others; "
                         "chmod 0600 it",
                         path, (unsigned)(st.st_mode & 07777));
        goto fail;
    }
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc =
                epd_err_set(err, -errno, "cluster.secret_file %s: read: %s", path, strerror(errno));
            goto fail;
        }
        if (r == 0) break;
        n += (size_t)r;
        if (n == sizeof buf) break;
    }
    if (n > EPD_CTL_SECRET_MAX + 1) {
        rc = epd_err_set(err, -EINVAL, "cluster.secret_file %s: longer than %d bytes", path,
                         EPD_CTL_SECRET_MAX);
        goto fail;
    }
    while (n > 0 &&
           (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    if (n < EPD_CTL_SECRET_MIN || n > EPD_CTL_SECRET_MAX) {
        rc = epd_err_set(err, -EINVAL, "cluster.secret_file %s: %zu bytes, need %d..%d", path, n,
                         EPD_CTL_SECRET_MIN, EPD_CTL_SECRET_MAX);
        goto fail;
    }
    memcpy(s->key, buf, n);
    s->len = n;
    OPENSSL_cleanse(buf, sizeof buf);
    close(fd);
    return 0;
fail:
    OPENSSL_cleanse(buf, sizeof buf);
    if (fd >= 0) close(fd);
    return rc;
}

void epd_ctl_auth_init(epd_ctl_auth_t *a, epd_ctl_auth_role_t role, const epd_ctl_secret_t *secret,
                       uint32_t self_id, uint32_t expect_peer, const char *cluster)
{
    memset(a, 0, sizeof *a);
    a->role = role;
    a->state = EPD_CTL_AUTH_START;
    a->secret = secret;
    a->self_id = self_id;
    a->peer_id = expect_peer;
    snprintf(a->cluster, sizeof a->cluster, "%s", cluster ? cluster : "");
}

void epd_ctl_auth_fini(epd_ctl_auth_t *a)
{
    OPENSSL_cleanse(a->nonce_c, sizeof a->nonce_c);
    OPENSSL_cleanse(a->nonce_s, sizeof a->nonce_s);
}

static int reject(epd_ctl_auth_t *a, epd_ctl_reject_t r, const char *what)
{
    a->state = EPD_CTL_AUTH_FAILED;
    a->reason = r;
    snprintf(a->detail, sizeof a->detail, "%s", what);
    return -1;
}

/* mac = HMAC-SHA256(K, label | role | len(cluster) | cluster | idc | ids | Nc | Ns) */
static int proof(const epd_ctl_auth_t *a, char role, uint32_t idc, uint32_t ids,
                 unsigned char mac[EPD_CTL_MAC_LEN])
{
    unsigned char msg[sizeof AUTH_LABEL + 1 + 1 + 64 + 8 + 2 * EPD_CTL_NONCE_LEN];
    size_t n = 0, cl = strlen(a->cluster);
    memcpy(msg, AUTH_LABEL, sizeof AUTH_LABEL - 1);
    n += sizeof AUTH_LABEL - 1;
    msg[n++] = (unsigned char)role;
    msg[n++] = (unsigned char)cl;
    memcpy(msg + n, a->cluster, cl);
    n += cl;
    for (int i = 3; i >= 0; i--)
        msg[n++] = (unsigned char)(idc >> (8 * i));
    for (int i = 3; i >= 0; i--)
        msg[n++] = (unsigned char)(ids >> (8 * i));
    memcpy(msg + n, a->nonce_c, EPD_CTL_NONCE_LEN);
    n += EPD_CTL_NONCE_LEN;
    memcpy(msg + n, a->nonce_s, EPD_CTL_NONCE_LEN);
    n += EPD_CTL_NONCE_LEN;
    unsigned int mlen = 0;
    if (!HMAC(EVP_sha256(), a->secret->key, (int)a->secret->len, msg, n, mac, &mlen) ||
        mlen != EPD_CTL_MAC_LEN)
        return -1;
    return 0;
}

int epd_ctl_auth_start(epd_ctl_auth_t *a, epd_ctl_buf_t *out)
{
    if (a->role != EPD_CTL_AUTH_CLIENT || a->state != EPD_CTL_AUTH_START)
        return reject(a, EPD_CTL_REJECT_OUT_OF_ORDER, "auth start called twice or by a server");
    if (!a->secret || a->secret->len == 0)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "no cluster secret");
    if (RAND_bytes(a->nonce_c, EPD_CTL_NONCE_LEN) != 1)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "RAND_bytes failed");
    epd_ctl_frame_begin(out, EPD_CTL_AUTH_HELLO);
    epd_ctl_put_u32(out, EPD_CTL_T_NODE_ID, a->self_id);
    epd_ctl_put_bytes(out, EPD_CTL_T_NONCE, a->nonce_c, EPD_CTL_NONCE_LEN);
    epd_ctl_put_str(out, EPD_CTL_T_CLUSTER, a->cluster);
    if (epd_ctl_frame_end(out) < 0) return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "out of memory");
    a->state = EPD_CTL_AUTH_WAIT_CHALLENGE;
    return 0;
}

static int is_auth_type(int t)
{
    return t >= EPD_CTL_AUTH_HELLO && t <= EPD_CTL_AUTH_OK;
}

static int server_on_hello(epd_ctl_auth_t *a, const epd_ctl_msg_t *m, epd_ctl_buf_t *out,
                           int (*accept_peer)(void *, uint32_t, char *, size_t), void *ctx)
{
    char cluster[64], why[128];
    const uint8_t *nonce;
    uint32_t nlen, id;
    if (epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_NODE_ID, &id) < 0 ||
        epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_NONCE, &nonce, &nlen) < 0 ||
        nlen != EPD_CTL_NONCE_LEN ||
        epd_ctl_get_str(m->payload, m->len, EPD_CTL_T_CLUSTER, cluster, sizeof cluster) < 0)
        return reject(a, EPD_CTL_REJECT_MALFORMED, "AUTH_HELLO without a 32-byte nonce");
    if (strcmp(cluster, a->cluster) != 0) {
        snprintf(why, sizeof why, "node %u belongs to cluster '%.40s', not '%.40s'", id, cluster,
                 a->cluster);
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, why);
    }
    if (accept_peer && accept_peer(ctx, id, why, sizeof why) != 0)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, why);
    a->peer_id = id;
    memcpy(a->nonce_c, nonce, EPD_CTL_NONCE_LEN);
    if (RAND_bytes(a->nonce_s, EPD_CTL_NONCE_LEN) != 1)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "RAND_bytes failed");
    unsigned char mac[EPD_CTL_MAC_LEN];
    if (proof(a, 'S', a->peer_id, a->self_id, mac) < 0)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "HMAC failed");
    epd_ctl_frame_begin(out, EPD_CTL_AUTH_CHALLENGE);
    epd_ctl_put_u32(out, EPD_CTL_T_NODE_ID, a->self_id);
    epd_ctl_put_bytes(out, EPD_CTL_T_NONCE, a->nonce_s, EPD_CTL_NONCE_LEN);
    epd_ctl_put_bytes(out, EPD_CTL_T_MAC, mac, EPD_CTL_MAC_LEN);
    if (epd_ctl_frame_end(out) < 0) return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "out of memory");
    a->state = EPD_CTL_AUTH_WAIT_RESPONSE;
    return 0;
}

static int verify(epd_ctl_auth_t *a, const epd_ctl_msg_t *m, char role, const char *who)
{
    const uint8_t *mac;
    uint32_t mlen;
    unsigned char want[EPD_CTL_MAC_LEN];
    char why[128];
    if (epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_MAC, &mac, &mlen) < 0 ||
        mlen != EPD_CTL_MAC_LEN) {
        snprintf(why, sizeof why, "%s without a 32-byte proof", epd_ctl_type_name(m->type));
        return reject(a, EPD_CTL_REJECT_MALFORMED, why);
    }
    uint32_t idc = a->role == EPD_CTL_AUTH_CLIENT ? a->self_id : a->peer_id;
    uint32_t ids = a->role == EPD_CTL_AUTH_CLIENT ? a->peer_id : a->self_id;
    if (proof(a, role, idc, ids, want) < 0)
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "HMAC failed");
    int bad = CRYPTO_memcmp(want, mac, EPD_CTL_MAC_LEN) != 0;
    OPENSSL_cleanse(want, sizeof want);
    if (bad) {
        snprintf(why, sizeof why, "%s node %u failed to prove the cluster secret", who, a->peer_id);
        return reject(a, EPD_CTL_REJECT_AUTH_FAILED, why);
    }
    return 0;
}

int epd_ctl_auth_on_frame(epd_ctl_auth_t *a, const epd_ctl_msg_t *m, epd_ctl_buf_t *out,
                          int (*accept_peer)(void *ctx, uint32_t id, char *why, size_t whylen),
                          void *ctx)
{
    char why[128];
    if (a->state == EPD_CTL_AUTH_FAILED) return -1; /* reason and detail kept from before */
    if (!is_auth_type(m->type)) {
        snprintf(why, sizeof why, "%s frame before authentication", epd_ctl_type_name(m->type));
        return reject(a,
                      a->state == EPD_CTL_AUTH_DONE ? EPD_CTL_REJECT_OUT_OF_ORDER
                                                    : EPD_CTL_REJECT_UNAUTHENTICATED,
                      why);
    }
    int expect = 0;
    switch (a->state) {
    case EPD_CTL_AUTH_START:
        expect = a->role == EPD_CTL_AUTH_SERVER ? EPD_CTL_AUTH_HELLO : 0;
        break;
    case EPD_CTL_AUTH_WAIT_CHALLENGE:
        expect = EPD_CTL_AUTH_CHALLENGE;
        break;
    case EPD_CTL_AUTH_WAIT_RESPONSE:
        expect = EPD_CTL_AUTH_RESPONSE;
        break;
    case EPD_CTL_AUTH_WAIT_OK:
        expect = EPD_CTL_AUTH_OK;
        break;
    default:
        expect = 0;
        break;
    }
    if (m->type != expect) {
        snprintf(why, sizeof why, "%s frame out of order (auth state %d)",
                 epd_ctl_type_name(m->type), (int)a->state);
        return reject(a, EPD_CTL_REJECT_OUT_OF_ORDER, why);
    }
    switch (m->type) {
    case EPD_CTL_AUTH_HELLO:
        return server_on_hello(a, m, out, accept_peer, ctx);
    case EPD_CTL_AUTH_CHALLENGE: {
        uint32_t id;
        const uint8_t *nonce;
        uint32_t nlen;
        if (epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_NODE_ID, &id) < 0 ||
            epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_NONCE, &nonce, &nlen) < 0 ||
            nlen != EPD_CTL_NONCE_LEN)
            return reject(a, EPD_CTL_REJECT_MALFORMED, "AUTH_CHALLENGE without a 32-byte nonce");
        if (id != a->peer_id) {
            snprintf(why, sizeof why, "connected to node %u but node %u answered", a->peer_id, id);
            return reject(a, EPD_CTL_REJECT_AUTH_FAILED, why);
        }
        memcpy(a->nonce_s, nonce, EPD_CTL_NONCE_LEN);
        if (verify(a, m, 'S', "server") < 0) return -1;
        unsigned char mac[EPD_CTL_MAC_LEN];
        if (proof(a, 'C', a->self_id, a->peer_id, mac) < 0)
            return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "HMAC failed");
        epd_ctl_frame_begin(out, EPD_CTL_AUTH_RESPONSE);
        epd_ctl_put_bytes(out, EPD_CTL_T_MAC, mac, EPD_CTL_MAC_LEN);
        if (epd_ctl_frame_end(out) < 0)
            return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "out of memory");
        a->state = EPD_CTL_AUTH_WAIT_OK;
        return 0;
    }
    case EPD_CTL_AUTH_RESPONSE:
        if (verify(a, m, 'C', "client") < 0) return -1;
        epd_ctl_frame_begin(out, EPD_CTL_AUTH_OK);
        if (epd_ctl_frame_end(out) < 0)
            return reject(a, EPD_CTL_REJECT_AUTH_FAILED, "out of memory");
        a->state = EPD_CTL_AUTH_DONE;
        return 1;
    case EPD_CTL_AUTH_OK:
        a->state = EPD_CTL_AUTH_DONE;
        return 1;
    default:
        return reject(a, EPD_CTL_REJECT_OUT_OF_ORDER, "unexpected auth frame");
    }
}
