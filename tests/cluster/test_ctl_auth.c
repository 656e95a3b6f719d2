/* Tests of control-plane authentication (control/ctl_auth.c): the handshake with the right
 * secret, a wrong secret on either side, replayed handshake frames, frames out of order, and
 * the secret file's ownership and mode rules. Proofs are checked against an HMAC computed here
 * with OpenSSL's EVP_MAC interface, independently of the code under test. */
#include <setjmp.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "ctl_auth.h"

static const char KEY_A[] = "correct horse battery staple 42";
static const char KEY_B[] = "a different secret of the same size";

/* Decodes exactly one frame out of buf (consumed from the front). */
static void take_frame(epd_ctl_buf_t *buf, epd_ctl_decoder_t *d, epd_ctl_msg_t *m)
{
    assert_true(buf->len > 0);
    assert_int_equal(epd_ctl_decoder_feed(d, buf->p, buf->len), 0);
    epd_ctl_buf_reset(buf);
    assert_int_equal(epd_ctl_decoder_next(d, m), 1);
}

static int accept_all(void *ctx, uint32_t id, char *why, size_t wl)
{
    return 0;
}

static int accept_none(void *ctx, uint32_t id, char *why, size_t wl)
{
    snprintf(why, wl, "node %u is not in cluster.peers", id);
    return -1;
}

/* HMAC-SHA256 over the documented proof layout, built here from the frame fields. */
static void ref_proof(const char *key, char role, const char *cluster, uint32_t idc, uint32_t ids,
                      const uint8_t *nc, const uint8_t *ns, uint8_t out[32])
{
    uint8_t msg[256];
    size_t n = 0;
    memcpy(msg, "epd-ctl-v1", 10);
    n = 10;
    msg[n++] = (uint8_t)role;
    msg[n++] = (uint8_t)strlen(cluster);
    memcpy(msg + n, cluster, strlen(cluster));
    n += strlen(cluster);
    for (int i = 3; i >= 0; i--)
        msg[n++] = (uint8_t)(idc >> (8 * i));
    for (int i = 3; i >= 0; i--)
        msg[n++] = (uint8_t)(ids >> (8 * i));
    memcpy(msg + n, nc, 32);
    n += 32;
    memcpy(msg + n, ns, 32);
    n += 32;
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0),
                           OSSL_PARAM_construct_end()};
    size_t ol = 0;
    assert_int_equal(EVP_MAC_init(ctx, (const unsigned char *)key, strlen(key), params), 1);
    assert_int_equal(EVP_MAC_update(ctx, msg, n), 1);
    assert_int_equal(EVP_MAC_final(ctx, out, &ol, 32), 1);
    assert_int_equal(ol, 32);
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
}

typedef struct pair {
    epd_ctl_secret_t ks, kc;
    epd_ctl_auth_t srv, cli;
    epd_ctl_buf_t to_srv, to_cli;
    epd_ctl_decoder_t dsrv, dcli;
} pair_t;

static void pair_init(pair_t *p, const char *server_key, const char *client_key)
{
    memset(p, 0, sizeof *p);
    assert_int_equal(epd_ctl_secret_set(&p->ks, server_key, strlen(server_key)), 0);
    assert_int_equal(epd_ctl_secret_set(&p->kc, client_key, strlen(client_key)), 0);
    epd_ctl_auth_init(&p->srv, EPD_CTL_AUTH_SERVER, &p->ks, 2, 0, "prod");
    epd_ctl_auth_init(&p->cli, EPD_CTL_AUTH_CLIENT, &p->kc, 1, 2, "prod");
    epd_ctl_buf_init(&p->to_srv);
    epd_ctl_buf_init(&p->to_cli);
    epd_ctl_decoder_init(&p->dsrv, 0);
    epd_ctl_decoder_init(&p->dcli, 0);
}

static void pair_fini(pair_t *p)
{
    epd_ctl_buf_fini(&p->to_srv);
    epd_ctl_buf_fini(&p->to_cli);
    epd_ctl_decoder_fini(&p->dsrv);
    epd_ctl_decoder_fini(&p->dcli);
    epd_ctl_auth_fini(&p->srv);
    epd_ctl_auth_fini(&p->cli);
}

static void test_right_secret_mutual(void **state)
{
    pair_t p;
    epd_ctl_msg_t m;
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);

    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(m.type, EPD_CTL_AUTH_HELLO);
    const uint8_t *nc;
    uint32_t l;
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_NONCE, &nc, &l), 0);
    uint8_t nonce_c[32];
    memcpy(nonce_c, nc, 32);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);

    take_frame(&p.to_cli, &p.dcli, &m);
    assert_int_equal(m.type, EPD_CTL_AUTH_CHALLENGE);
    const uint8_t *ns, *ms;
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_NONCE, &ns, &l), 0);
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_MAC, &ms, &l), 0);
    uint8_t want[32], nonce_s[32];
    memcpy(nonce_s, ns, 32);
    ref_proof(KEY_A, 'S', "prod", 1, 2, nonce_c, nonce_s, want);
    assert_memory_equal(ms, want, 32);
    assert_memory_not_equal(nonce_c, nonce_s, 32);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), 0);

    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(m.type, EPD_CTL_AUTH_RESPONSE);
    const uint8_t *mc;
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_MAC, &mc, &l), 0);
    ref_proof(KEY_A, 'C', "prod", 1, 2, nonce_c, nonce_s, want);
    assert_memory_equal(mc, want, 32);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 1);
    assert_int_equal(p.srv.peer_id, 1);

    take_frame(&p.to_cli, &p.dcli, &m);
    assert_int_equal(m.type, EPD_CTL_AUTH_OK);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), 1);
    assert_int_equal(p.cli.state, EPD_CTL_AUTH_DONE);
    assert_int_equal(p.srv.state, EPD_CTL_AUTH_DONE);
    pair_fini(&p);
}

static void test_wrong_secret_client_rejects_server(void **state)
{
    pair_t p;
    epd_ctl_msg_t m;
    pair_init(&p, KEY_B, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    take_frame(&p.to_cli, &p.dcli, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), -1);
    assert_int_equal(p.cli.reason, EPD_CTL_REJECT_AUTH_FAILED);
    assert_non_null(strstr(p.cli.detail, "node 2"));
    assert_int_equal(p.to_srv.len, 0); /* no proof is sent to a server that failed its own */
    pair_fini(&p);
}

static void test_wrong_secret_server_rejects_client(void **state)
{
    /* The client skips verifying the server (as an attacker would) and answers with a proof
     * made with the wrong key: the server must refuse it. */
    pair_t p;
    epd_ctl_msg_t m;
    pair_init(&p, KEY_A, KEY_B);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    const uint8_t *nc;
    uint32_t l;
    uint8_t nonce_c[32];
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_NONCE, &nc, &l), 0);
    memcpy(nonce_c, nc, 32);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    take_frame(&p.to_cli, &p.dcli, &m);
    const uint8_t *ns;
    assert_int_equal(epd_ctl_get_bytes(m.payload, m.len, EPD_CTL_T_NONCE, &ns, &l), 0);
    uint8_t forged[32];
    ref_proof(KEY_B, 'C', "prod", 1, 2, nonce_c, ns, forged);
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_AUTH_RESPONSE);
    epd_ctl_put_bytes(&b, EPD_CTL_T_MAC, forged, 32);
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    take_frame(&b, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_AUTH_FAILED);
    assert_int_equal(p.to_cli.len, 0); /* no AUTH_OK */
    epd_ctl_buf_fini(&b);
    pair_fini(&p);
}

static void test_replayed_challenge_and_response(void **state)
{
    /* Session 1 completes; its CHALLENGE replayed to a new client and its RESPONSE replayed to
     * a new server both fail, because each side's nonce is fresh. */
    pair_t p;
    epd_ctl_msg_t m;
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    assert_true(p.to_cli.len < 256);
    uint8_t ch_bytes[256];
    size_t ch_len = p.to_cli.len;
    memcpy(ch_bytes, p.to_cli.p, ch_len);
    take_frame(&p.to_cli, &p.dcli, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), 0);
    uint8_t rs_bytes[256];
    size_t rs_len = p.to_srv.len;
    memcpy(rs_bytes, p.to_srv.p, rs_len);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 1);
    pair_fini(&p);

    /* New client, old challenge. */
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    assert_int_equal(epd_ctl_decoder_feed(&p.dcli, ch_bytes, ch_len), 0);
    assert_int_equal(epd_ctl_decoder_next(&p.dcli, &m), 1);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), -1);
    assert_int_equal(p.cli.reason, EPD_CTL_REJECT_AUTH_FAILED);
    pair_fini(&p);

    /* New server (it issued a fresh challenge), old response. */
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    assert_int_equal(epd_ctl_decoder_feed(&p.dsrv, rs_bytes, rs_len), 0);
    assert_int_equal(epd_ctl_decoder_next(&p.dsrv, &m), 1);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_AUTH_FAILED);
    pair_fini(&p);
}

static void test_out_of_order_and_unauthenticated(void **state)
{
    pair_t p;
    epd_ctl_msg_t m;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);

    /* A RESPONSE before any HELLO. */
    pair_init(&p, KEY_A, KEY_A);
    uint8_t mac[32] = {0};
    epd_ctl_frame_begin(&b, EPD_CTL_AUTH_RESPONSE);
    epd_ctl_put_bytes(&b, EPD_CTL_T_MAC, mac, 32);
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    take_frame(&b, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_OUT_OF_ORDER);
    pair_fini(&p);

    /* A cluster frame (HEARTBEAT) before authentication. */
    pair_init(&p, KEY_A, KEY_A);
    epd_ctl_frame_begin(&b, EPD_CTL_BYE);
    epd_ctl_put_str(&b, EPD_CTL_T_REASON, "x");
    assert_int_equal(epd_ctl_frame_end(&b), 0);
    take_frame(&b, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_UNAUTHENTICATED);
    pair_fini(&p);

    /* A second HELLO after the challenge went out. */
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    uint8_t hello[256];
    size_t hl = p.to_srv.len;
    memcpy(hello, p.to_srv.p, hl);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    assert_int_equal(epd_ctl_decoder_feed(&p.dsrv, hello, hl), 0);
    assert_int_equal(epd_ctl_decoder_next(&p.dsrv, &m), 1);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_OUT_OF_ORDER);
    pair_fini(&p);
    epd_ctl_buf_fini(&b);
}

static void test_unknown_node_and_cluster_refused(void **state)
{
    pair_t p;
    epd_ctl_msg_t m;
    pair_init(&p, KEY_A, KEY_A);
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_none, NULL), -1);
    assert_int_equal(p.srv.reason, EPD_CTL_REJECT_AUTH_FAILED);
    assert_non_null(strstr(p.srv.detail, "node 1 is not in cluster.peers"));
    pair_fini(&p);

    pair_init(&p, KEY_A, KEY_A);
    snprintf(p.cli.cluster, sizeof p.cli.cluster, "staging");
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), -1);
    assert_non_null(strstr(p.srv.detail, "staging"));
    pair_fini(&p);

    /* The client reached a different node than it meant to. */
    pair_init(&p, KEY_A, KEY_A);
    p.cli.peer_id = 5;
    assert_int_equal(epd_ctl_auth_start(&p.cli, &p.to_srv), 0);
    take_frame(&p.to_srv, &p.dsrv, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.srv, &m, &p.to_cli, accept_all, NULL), 0);
    take_frame(&p.to_cli, &p.dcli, &m);
    assert_int_equal(epd_ctl_auth_on_frame(&p.cli, &m, &p.to_srv, NULL, NULL), -1);
    assert_non_null(strstr(p.cli.detail, "node 2 answered"));
    pair_fini(&p);
}

static void write_file(const char *path, const char *content, mode_t mode)
{
    unlink(path);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
    assert_int_equal(chmod(path, mode), 0);
}

static void test_secret_file_rules(void **state)
{
    char dir[] = "/tmp/epd-auth-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256], link[256];
    epd_err_t err;
    snprintf(path, sizeof path, "%s/secret", dir);
    snprintf(link, sizeof link, "%s/link", dir);
    epd_ctl_secret_t s;

    write_file(path, "0123456789abcdef0123\n", 0600);
    assert_int_equal(epd_ctl_secret_load(path, &s, &err), 0);
    assert_int_equal(s.len, 20); /* newline stripped */
    assert_memory_equal(s.key, "0123456789abcdef0123", 20);

    write_file(path, "0123456789abcdef0123\n", 0400);
    assert_int_equal(epd_ctl_secret_load(path, &s, &err), 0);

    write_file(path, "0123456789abcdef0123\n", 0644);
    assert_int_equal(epd_ctl_secret_load(path, &s, &err), -EPERM);
    assert_non_null(strstr(err.msg, "0644"));
    assert_non_null(strstr(err.msg, path));
    assert_null(strstr(err.msg, "0123456789")); /* never the secret */

    write_file(path, "0123456789abcdef0123\n", 0640);
    assert_int_equal(epd_ctl_secret_load(path, &s, &err), -EPERM);

    write_file(path, "short\n", 0600);
    assert_int_equal(epd_ctl_secret_load(path, &s, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "bytes"));

    write_file(path, "0123456789abcdef0123\n", 0600);
    assert_int_equal(symlink(path, link), 0);
    assert_int_equal(epd_ctl_secret_load(link, &s, &err), -ELOOP);
    unlink(link);

    if (geteuid() == 0) {
        /* Owned by someone else (only root can hand a file away). */
        assert_int_equal(chown(path, 65534, 65534), 0);
        assert_int_equal(epd_ctl_secret_load(path, &s, &err), -EPERM);
        assert_non_null(strstr(err.msg, "owned by uid 65534"));
    }

    assert_int_equal(epd_ctl_secret_load(dir, &s, &err), -EINVAL);
    snprintf(link, sizeof link, "%s/missing", dir);
    assert_int_equal(epd_ctl_secret_load(link, &s, &err), -ENOENT);
    assert_non_null(strstr(err.msg, "missing"));
    unlink(path);
    rmdir(dir);
    epd_ctl_secret_wipe(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_right_secret_mutual),
        cmocka_unit_test(test_wrong_secret_client_rejects_server),
        cmocka_unit_test(test_wrong_secret_server_rejects_client),
        cmocka_unit_test(test_replayed_challenge_and_response),
        cmocka_unit_test(test_out_of_order_and_unauthenticated),
        cmocka_unit_test(test_unknown_node_and_cluster_refused),
        cmocka_unit_test(test_secret_file_rules),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
