/* Helpers of the tcp transport tests, which run their ranks in a forked world
 * (tests/common/fork_world.h, whose CHECK fails the rank): the tests' deterministic source
 * of sizes, offsets and bytes, and one rank's tcp wire set up on loopback. */
#ifndef TCP_TEST_H
#define TCP_TEST_H

#include "fork_world.h"
#include "test_rng.h"
#include "wire_tcp.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64: the tests' deterministic source of sizes, offsets and bytes. */
static inline uint64_t world_rand(uint64_t *s)
{
    return test_splitmix64(s);
}

static inline void world_fill(uint64_t *s, uint8_t *dst, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = world_rand(s);
        for (size_t j = 0; j < 8 && i + j < len; j++)
            dst[i + j] = (uint8_t)(v >> (8 * j));
    }
}

/* One rank's tcp wire on loopback over a tcp bootstrap at `port`, with its own buffer. */
struct rank_ctx {
    ep_tcp_bootstrap_t *bso;
    ep_bootstrap_t bs;
    ep_wire_t *w;
    uint8_t *buf;
    size_t bytes;
};

static inline int rank_setup(int rank, int n, int port, size_t bytes, unsigned timeout_ms,
                             struct rank_ctx *c)
{
    memset(c, 0, sizeof *c);
    ep_status_t st = ep_tcp_bootstrap_create("127.0.0.1", port, rank, n, 10000, &c->bso);
    CHECK(st == EP_OK, "bootstrap: %d %s", st, ep_tcp_bootstrap_last_error());
    ep_tcp_bootstrap_get(c->bso, &c->bs);
    ep_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.tcp_host = "127.0.0.1";
    cfg.timeout_ms = timeout_ms;
    st = ep_wire_tcp_create(&cfg, rank, n, &c->w);
    CHECK(st == EP_OK, "wire create: %d", st);
    c->bytes = bytes;
    c->buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    CHECK(c->buf != NULL, "out of memory");
    memset(c->buf, 0, bytes);
    return 0;
}

static inline int rank_connect(struct rank_ctx *c)
{
    ep_status_t st = c->w->ops->connect(c->w, &c->bs, c->buf, c->bytes);
    CHECK(st == EP_OK, "connect: %d %s", st, c->w->error);
    return 0;
}

static inline void rank_teardown(struct rank_ctx *c)
{
    if (c->w) c->w->ops->destroy(c->w);
    ep_tcp_bootstrap_destroy(c->bso);
    free(c->buf);
}

static inline int barrier(struct rank_ctx *c)
{
    int rc = c->bs.barrier(c->bs.ctx, 10000);
    CHECK(rc == 0, "barrier: %d %s", rc, ep_tcp_bootstrap_last_error());
    return 0;
}

#endif /* TCP_TEST_H */
