/* Cluster membership over the control plane: authenticated libuv TCP links to every configured
 * peer, HELLO exchange, the coordinator's rank table and its epochs, heartbeats and peer
 * health, and libep's bootstrap served through the coordinator.
 *
 * Links: the node with the lower id connects (retrying with backoff), the higher one accepts;
 * every link authenticates (ctl_auth.h), then both sides send HELLO.
 *
 * Coordinator: the lowest node id among this node and the peers it sees alive. It broadcasts a
 * RANK_TABLE (epoch = highest epoch seen + 1; rank = node_index * ranks_per_node + local, nodes
 * ordered by id) when every configured node has said HELLO with a matching config fingerprint,
 * or when a member of the current table is down (the new table leaves it out and is marked
 * incomplete). Every member ACKs; when all members of a complete table acked, the coordinator
 * sends COMMIT and the cluster is "formed" at that epoch.
 *
 * Health (exact rule): every link carries a HEARTBEAT each timeouts.heartbeat_interval_ms,
 * answered by HEARTBEAT_ACK (RTT). "Silence" is the time since the last valid frame from a peer.
 *   silence >= heartbeat_timeout_ms            -> suspect (also at once when its link drops)
 *   silence >= 2 * heartbeat_timeout_ms        -> down (its link is closed)
 *   a BYE frame                                -> down at once (graceful leave)
 * A peer returns to up when a new link authenticates and its HELLO arrives. HELLO carries a
 * random incarnation per process start: a peer that restarted before it was marked down is
 * recognised (on_peer_down runs with "restarted") and the coordinator forms a new epoch, as it
 * does for a member whose HELLO shows it holds another epoch than the current table.
 * Readiness ("cluster" component) is true when the cluster is formed at the current epoch, the
 * table is complete and every configured peer is up; otherwise the reason says why.
 *
 * Threads: everything runs on the loop thread except epd_cluster_bootstrap()'s callbacks, which
 * engine threads call (they block on a condition variable with a timeout while the loop
 * exchanges the data). */
#ifndef EPD_CLUSTER_H
#define EPD_CLUSTER_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <uv.h>

#include "ctl_auth.h"
#include "ep.h"
#include "epd_config.h"
#include "metrics.h"

typedef struct epd_cluster epd_cluster_t;

/* X(name, value, text): the enums and their names (epd_*_state_name) from one table.
 * UNKNOWN: never reached since this node started; REFUSED: authenticated but refused (config
 * differs, wrong ranks ...). */
#define EPD_PEER_STATE_MAP(X)                                                                      \
    X(UNKNOWN, 0, "unknown")                                                                       \
    X(UP, 1, "up")                                                                                 \
    X(SUSPECT, 2, "suspect")                                                                       \
    X(DOWN, 3, "down")                                                                             \
    X(REFUSED, 4, "refused")

/* What a node announces about itself in heartbeats. */
#define EPD_NODE_STATE_MAP(X)                                                                      \
    X(STARTING, 0, "starting")                                                                     \
    X(SERVING, 1, "serving")                                                                       \
    X(DRAINING, 2, "draining")                                                                     \
    X(STOPPING, 3, "stopping")

typedef enum epd_peer_state {
#define EPD_PEER_STATE_ENUM(name, value, text) EPD_PEER_##name = (value),
    EPD_PEER_STATE_MAP(EPD_PEER_STATE_ENUM)
#undef EPD_PEER_STATE_ENUM
} epd_peer_state_t;

typedef enum epd_node_state {
#define EPD_NODE_STATE_ENUM(name, value, text) EPD_NODE_##name = (value),
    EPD_NODE_STATE_MAP(EPD_NODE_STATE_ENUM)
#undef EPD_NODE_STATE_ENUM
} epd_node_state_t;

/* "invalid" for a value outside the table */
const char *epd_peer_state_name(epd_peer_state_t s);
const char *epd_node_state_name(epd_node_state_t s);

typedef struct epd_cluster_gpu {
    int ordinal;
    char pci_bus_id[32]; /* "" when the backend cannot read it */
} epd_cluster_gpu_t;

typedef struct epd_cluster_opts {
    uv_loop_t *loop;
    const epd_config_t *cfg; /* node.id, cluster.*, timeouts.*; copied */
    epd_metrics_t *metrics;  /* may be NULL */
    /* The secret; NULL to load it from cfg->secret_file. Copied. */
    const epd_ctl_secret_t *secret;
    int local_ranks; /* ranks this node runs (GPUs, or cpu ranks_per_node) */
    epd_cluster_gpu_t gpus[EPD_CFG_MAX_GPUS];
    int num_gpus;
    const char *backend;     /* "cpu" | "cuda" */
    uint32_t transport_caps; /* bit (1 << ep_transport_kind_t) per usable transport */
    const char *http_addr;   /* host:port of this node's HTTP endpoint, for epctl; may be NULL */
    /* Config fingerprint (equal on every node of a cluster) and the settings it covers, in a
     * form config_diff understands; both copied. */
    const void *fingerprint;
    size_t fingerprint_len;
    const void *settings;
    size_t settings_len;
    /* Names the first setting that differs between ours and a peer's settings blob: 0 equal,
     * 1 different (why filled), -1 unreadable blob (why filled). NULL: fingerprints only. */
    int (*config_diff)(void *ctx, const void *peer_settings, size_t len, char *why, size_t whylen);
    /* Opaque data-plane endpoint blob, carried in HELLO and the rank table; copied. */
    const void *endpoint;
    size_t endpoint_len;
    /* Called on the loop thread. on_ready: the "cluster" readiness changed (reason "" when
     * ready). on_peer_down: a peer went down (abort in-flight EP ops). on_formed: the cluster
     * formed at `epoch`. on_stopped: epd_cluster_stop finished closing every handle. */
    void (*on_ready)(void *ctx, int ready, const char *reason);
    void (*on_peer_down)(void *ctx, int node_id, const char *reason);
    void (*on_formed)(void *ctx, uint64_t epoch);
    void (*on_stopped)(void *ctx);
    /* A peer's engine has work (WAKE): wake this node's ranks. May be NULL. */
    void (*on_wake)(void *ctx, int node_id);
    void *cb_ctx;
} epd_cluster_opts_t;

/* 0, or a negative errno with err naming what was wrong (-EINVAL options or config, the secret
 * file's status (epd_ctl_secret_load), -ENOMEM). */
int epd_cluster_create(const epd_cluster_opts_t *opts, epd_cluster_t **out, epd_err_t *err);
/* Listens on cluster.listen and starts connecting to peers. 0, or a negative errno (libuv's, for
 * the listen address; -EADDRNOTAVAIL when it does not resolve) with err naming it. */
int epd_cluster_start(epd_cluster_t *c, epd_err_t *err);
/* Closes every link (graceful: BYE first, so peers mark this node down at once) and handle;
 * on_stopped runs when done. Safe to call twice. */
void epd_cluster_stop(epd_cluster_t *c, int graceful, const char *reason);
/* Frees the object; call after on_stopped (or when start was never called). */
void epd_cluster_destroy(epd_cluster_t *c);

/* Port actually bound (cluster.listen port 0 picks one); -1 before start. */
int epd_cluster_listen_port(const epd_cluster_t *c);
uint64_t epd_cluster_epoch(const epd_cluster_t *c);
int epd_cluster_is_formed(const epd_cluster_t *c);
int epd_cluster_is_ready(const epd_cluster_t *c, char *reason, size_t len);
/* -1 when unknown */
int epd_cluster_first_rank(const epd_cluster_t *c);
int epd_cluster_nranks(const epd_cluster_t *c);
epd_peer_state_t epd_cluster_peer_state(const epd_cluster_t *c, int node_id);

void epd_cluster_set_state(epd_cluster_t *c, epd_node_state_t s);
epd_node_state_t epd_cluster_get_state(const epd_cluster_t *c);
void epd_cluster_set_load(epd_cluster_t *c, uint32_t load);

/* GET /v1/cluster: rank table, epoch, peers with state, last heartbeat, RTT. Caller frees. */
cJSON *epd_cluster_status_json(const epd_cluster_t *c);

/* An ep_bootstrap_t for local rank `local_rank` at the current formed epoch: allgather and
 * barrier block the calling (engine) thread, never the loop thread, and fail with
 * EP_ERR_TIMEOUT, or EP_ERR_PEER when the epoch changes while they wait. Valid until the next
 * epoch; 0 or a negative ep_status_t (EP_ERR_STATE: not formed). Any thread. */
int epd_cluster_bootstrap(epd_cluster_t *c, int local_rank, ep_bootstrap_t *out);
/* The same for an engine that re-forms its group: waits (engine thread, at most timeout_ms)
 * until the cluster is formed, then returns the bootstrap of `generation` (the engine's count
 * of group formations). Collectives are matched across nodes by (epoch, generation, sequence),
 * so ranks that failed at different points of one generation still meet in the next. 0, or a
 * negative errno with err saying why (-ETIMEDOUT: not formed in time; -EAGAIN: not formed and
 * timeout_ms 0; -ESHUTDOWN: stopping; -EINVAL: no such local rank). */
int epd_cluster_bootstrap_wait(epd_cluster_t *c, int local_rank, unsigned generation,
                               unsigned timeout_ms, ep_bootstrap_t *out, epd_err_t *err);
/* Names the collectives that the holder of `bs` (from the functions above) runs from now on,
 * e.g. "engine: join"; `what` must stay valid (a string literal). The coordinator fails a
 * collective whose nodes name different purposes, or give different sizes, with a message that
 * names both. From the thread that runs those collectives. */
void epd_cluster_bootstrap_purpose(const ep_bootstrap_t *bs, const char *what);
/* Why the calling thread's last failed allgather or barrier through such a bootstrap failed
 * ("ranks are out of step at collective 3 of generation 0 (epoch 2): node 1 is at engine: join
 * (20 bytes per rank), node 0 at engine: step control (20 bytes per rank)"); "" if none. */
const char *epd_cluster_bootstrap_last_error(void);
/* Loop thread: sends WAKE to every peer (their on_wake runs). */
void epd_cluster_wake_peers(epd_cluster_t *c);

#endif /* EPD_CLUSTER_H */
