/* Internal state of the cluster module, shared by its files: cluster.c (lifecycle, accessors,
 * status), cluster_link.c (links), cluster_peer.c (HELLO, peer state, heartbeats, health),
 * cluster_coord.c (coordinator, rank table, readiness) and cluster_boot.c (libep bootstrap
 * through the coordinator). Not a public interface. */
#ifndef EPD_CLUSTER_INT_H
#define EPD_CLUSTER_INT_H

#include <pthread.h>

#include "cluster.h"

typedef struct cl_conn cl_conn_t;
typedef struct cl_boot cl_boot_t;

/* Reconnect backoff: starts small so a restarted peer is found quickly, doubles, and stays
 * well below the heartbeat timeout so a rejoin never waits for a long backoff. */
#define RETRY_INITIAL_MS 100
#define RETRY_MAX_MS 1000

typedef struct cl_nodeinfo {
    int id;
    char hostname[256];
    char name[64];
    char backend[32];
    char http[256];
    char ctl[256];
    uint32_t ranks;
    uint32_t caps;
    uint32_t first_rank; /* in a rank table */
    epd_cluster_gpu_t gpus[EPD_CFG_MAX_GPUS];
    int ngpus;
    uint8_t *endpoint;
    size_t endpoint_len;
} cl_nodeinfo_t;

typedef struct cl_peer {
    struct epd_cluster *cl;
    int id;
    epd_addr_t addr;
    epd_peer_state_t state;
    char reason[256];      /* why it is not up (suspect, down, refused) */
    cl_conn_t *conn;       /* the link in use (authenticated) or the outbound one in progress */
    uint64_t last_seen_ms; /* loop time of the last valid frame */
    uint64_t up_since_ms;
    int hello_ok;
    cl_nodeinfo_t info;
    uint64_t epoch_seen;
    uint64_t incarnation; /* 0: never seen */
    uint8_t node_state;
    uint32_t load;
    uint64_t hb_seq;
    double rtt_s;        /* < 0: none yet */
    uint64_t last_hb_ms; /* loop time of its last HEARTBEAT */
    uv_timer_t retry;    /* connect backoff and connect deadline */
    int retry_ms;
    int refused_us; /* it refused this node: reason in refused_why */
    char refused_why[256];
    epd_metric_t *m_state;
    epd_metric_t *m_rtt;
} cl_peer_t;

typedef struct cl_table {
    int valid;
    uint64_t epoch;
    int coord;
    int complete;
    int nranks;
    int nnodes;
    cl_nodeinfo_t *nodes; /* ordered by id */
    uint8_t *acked;       /* coordinator: per node */
} cl_table_t;

struct epd_cluster {
    uv_loop_t *loop;
    epd_config_t cfg;
    epd_metrics_t *metrics;
    epd_ctl_secret_t secret;
    epd_cluster_opts_t opts; /* pointers below are owned copies */
    uint8_t *fingerprint;
    uint8_t *settings;
    uint8_t *endpoint;
    char backend[32];
    char http_addr[256];
    char hostname[256];

    cl_peer_t *peers;
    int npeers;
    cl_conn_t *conns; /* every open link, authenticated or not */
    int nconns;

    uv_tcp_t listener;
    int listening;
    int port;
    uv_timer_t tick;
    uv_timer_t stop_timer;
    int handles; /* open libuv handles, for on_stopped */
    int started;
    int stopping;
    int stop_armed;
    int stopped_notified;

    cl_table_t table;
    int formed;
    uint64_t max_epoch;
    int coordinator; /* lowest id alive, in this node's view */
    int evaluating;
    int reevaluate;
    int retable;          /* coordinator: a member restarted or fell behind; new epoch needed */
    uint64_t incarnation; /* random per start, in HELLO */

    epd_node_state_t state;
    uint32_t load;
    int ready;
    char ready_reason[512];

    /* rate-limited rejection log */
    uint64_t rl_window_ms;
    int rl_count;
    int rl_suppressed;

    epd_metric_t *m_epoch;
    epd_metric_t *m_rejected[EPD_CTL_REJECT_COUNT];

    cl_boot_t *boot;
};

struct cl_conn {
    uv_tcp_t tcp;
    epd_cluster_t *c;
    cl_peer_t *peer;
    int outbound;
    int authed;
    int hello_rx;
    int closing;
    int linked; /* on c->conns */
    uint64_t started_ms;
    epd_ctl_decoder_t dec;
    epd_ctl_auth_t auth;
    uv_connect_t creq;
    uv_shutdown_t sreq;
    char remote[64];
    cl_conn_t *next;
    cl_conn_t *prev;
};

static inline uint64_t cl_now_ms(const epd_cluster_t *c)
{
    return uv_now(c->loop);
}

/* cluster.c */
cl_peer_t *cl_peer_by_id(const epd_cluster_t *c, int id);
void cl_handle_closed(epd_cluster_t *c); /* a handle counted in c->handles finished closing */

/* cluster_link.c */
int cl_raw_write(cl_conn_t *cn, const uint8_t *p, size_t n);
int cl_conn_send_buf(cl_conn_t *cn, epd_ctl_buf_t *b); /* sends and resets b */
int cl_send_node(epd_cluster_t *c, int node_id, epd_ctl_buf_t *frame);
void cl_reject_conn(cl_conn_t *cn, epd_ctl_reject_t r, const char *detail);
void cl_conn_unlink(epd_cluster_t *c, cl_conn_t *cn);
void cl_on_conn_closed(uv_handle_t *h);
void cl_conn_close(cl_conn_t *cn);
void cl_on_shutdown(uv_shutdown_t *req, int status);
void cl_start_connect(epd_cluster_t *c, cl_peer_t *p);
void cl_schedule_retry(cl_peer_t *p, epd_cluster_t *c);
void cl_on_connection(uv_stream_t *server, int status);

/* cluster_peer.c */
void cl_peer_metric(epd_cluster_t *c, cl_peer_t *p);
void cl_set_peer_state(epd_cluster_t *c, cl_peer_t *p, epd_peer_state_t s, const char *reason);
void cl_send_hello(cl_conn_t *cn);
void cl_on_hello(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_on_heartbeat(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_on_heartbeat_ack(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_on_tick(uv_timer_t *t);

/* cluster_coord.c */
void cl_nodeinfo_free(cl_nodeinfo_t *n);
void cl_table_clear(cl_table_t *t);
const cl_nodeinfo_t *cl_table_node(const epd_cluster_t *c, int node_id, int *index);
int cl_in_table(const epd_cluster_t *c, int id);
void cl_parse_nodeinfo(const uint8_t *p, uint32_t len, cl_nodeinfo_t *n);
void cl_on_rank_table(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_on_table_ack(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_on_commit(cl_conn_t *cn, const epd_ctl_msg_t *m);
void cl_update_readiness(epd_cluster_t *c);
/* Runs after every membership event (see cluster_coord.c). */
void cl_evaluate(epd_cluster_t *c);

/* cluster_boot.c */
int cl_boot_create(epd_cluster_t *c, int local_ranks, cl_boot_t **out);
int cl_boot_start(cl_boot_t *b);  /* opens its uv_async (counted in c->handles) */
void cl_boot_close(cl_boot_t *b); /* closes its uv_async (counted in c->handles) */
void cl_boot_destroy(cl_boot_t *b);
/* New epoch / formed state (loop thread): waiters of another epoch fail with `why`. */
void cl_boot_set_epoch(cl_boot_t *b, uint64_t epoch, int formed, int first_rank, int nranks,
                       const char *why);
/* Fails every waiter (a peer went down). */
void cl_boot_abort(cl_boot_t *b, const char *why);
void cl_boot_on_contrib(cl_boot_t *b, int from, const epd_ctl_msg_t *m);
/* Collectives the local ranks entered so far (any thread). */
uint64_t cl_boot_collectives(const cl_boot_t *b);
void cl_boot_on_result(cl_boot_t *b, const epd_ctl_msg_t *m);
/* 0, or a negative errno with err saying why (epd_cluster_bootstrap_wait's statuses). */
int cl_boot_get(cl_boot_t *b, int local_rank, unsigned generation, unsigned wait_ms,
                ep_bootstrap_t *out, epd_err_t *err);

#endif /* EPD_CLUSTER_INT_H */
