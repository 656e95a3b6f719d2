/* Internal state of the cluster module, shared by cluster.c (links, membership, health) and
 * cluster_boot.c (libep bootstrap through the coordinator). Not a public interface. */
#ifndef EPD_CLUSTER_INT_H
#define EPD_CLUSTER_INT_H

#include <pthread.h>

#include "cluster.h"

typedef struct cl_conn cl_conn_t;
typedef struct cl_boot cl_boot_t;

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

/* cluster.c, for cluster_boot.c */
int cl_send_node(epd_cluster_t *c, int node_id, epd_ctl_buf_t *frame);
const cl_nodeinfo_t *cl_table_node(const epd_cluster_t *c, int node_id, int *index);
void cl_handle_closed(epd_cluster_t *c);

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
void cl_boot_on_result(cl_boot_t *b, const epd_ctl_msg_t *m);
int cl_boot_get(cl_boot_t *b, int local_rank, unsigned generation, unsigned wait_ms,
                ep_bootstrap_t *out, char *err, size_t errlen);

#endif /* EPD_CLUSTER_INT_H */
