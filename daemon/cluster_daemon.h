/* The control plane inside epd: builds the cluster from the loaded config (fingerprint,
 * settings for naming a difference, ranks, GPUs), drives the "cluster" readiness component,
 * and serves GET /v1/cluster, POST /v1/admin/drain and POST /v1/admin/down. */
#ifndef EPD_CLUSTER_DAEMON_H
#define EPD_CLUSTER_DAEMON_H

#include <stddef.h>
#include <uv.h>

#include "cluster.h"
#include "engine.h"
#include "epd_config.h"
#include "http.h"
#include "metrics.h"
#include "state.h"

typedef struct epd_cluster_daemon epd_cluster_daemon_t;

typedef struct epd_cluster_daemon_opts {
    uv_loop_t *loop;
    const epd_config_t *cfg; /* borrowed; outlives the object */
    epd_metrics_t *metrics;
    epd_state_t *state;
    int component;           /* the "cluster" readiness component */
    epd_http_server_t *http; /* routes are registered here */
    const char *http_addr;   /* host:port peers and epctl can reach this node's HTTP API at */
    /* POST /v1/admin/down: the daemon's graceful stop (called after the response is sent). */
    void (*request_stop)(void *ctx, const char *why);
    void *ctx;
} epd_cluster_daemon_opts_t;

/* With cluster.peers empty the node is a cluster of one: no control-plane socket, the
 * component is ok at once. 0, or a negative errno with err naming the cause. */
int epd_cluster_daemon_start(const epd_cluster_daemon_opts_t *o, epd_cluster_daemon_t **out,
                             epd_err_t *err);
/* The engine's hook for a peer going down (it aborts in-flight EP ops: ep_group_abort). */
void epd_cluster_daemon_on_peer_down(epd_cluster_daemon_t *d,
                                     void (*fn)(void *ctx, int node_id, const char *reason),
                                     void *ctx);
/* NULL for a single node. */
epd_cluster_t *epd_cluster_daemon_cluster(epd_cluster_daemon_t *d);
/* How the engine's ranks join the cluster-wide EP group (NULL for a single node): global ranks
 * from the configured membership (nodes ordered by id: the only table that ever forms),
 * bootstraps served by the control plane, WAKE sent to the peers. Valid while d lives. */
const epd_engine_cluster_t *epd_cluster_daemon_engine_hooks(epd_cluster_daemon_t *d);
/* The engine that WAKE frames and peers going down are forwarded to (NULL to detach). */
void epd_cluster_daemon_set_engine(epd_cluster_daemon_t *d, epd_engine_t *e);
/* Leaves the cluster (graceful: peers are told at once); handles close as the loop runs. */
void epd_cluster_daemon_stop(epd_cluster_daemon_t *d, int graceful, const char *why);
/* After the loop has finished. */
void epd_cluster_daemon_destroy(epd_cluster_daemon_t *d);

#endif /* EPD_CLUSTER_DAEMON_H */
