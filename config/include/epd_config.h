/* The epd configuration model: JSON -> validated structs. One table of settings
 * (config_table.c) drives parsing and validation (config_parse.c), the dump and fingerprint
 * (config_emit.c) and the documentation in config/README.md (config_doc.c). */
#ifndef EPD_CONFIG_H
#define EPD_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define EPD_CFG_MAX_PEERS 256
#define EPD_CFG_MAX_GPUS 16
#define EPD_CFG_MAX_EXPERT_MAP 4096
/* Ranks a cluster can have: every node (this one and its peers) with at most MAX_GPUS ranks. */
#define EPD_CFG_MAX_RANKS ((EPD_CFG_MAX_PEERS + 1) * EPD_CFG_MAX_GPUS)
/* A config file larger than this is refused before parsing (a config is a few KiB; the bound
 * keeps a mistaken path such as a checkpoint shard from being slurped into memory). */
#define EPD_CFG_MAX_FILE_BYTES (1u << 20)
/* Errors kept per load; further ones are only counted (errs->dropped). */
#define EPD_CFG_MAX_ERRORS 100
/* The cluster secret keys HMACs: fewer bytes than this cannot carry enough entropy. */
#define EPD_CFG_SECRET_MIN_BYTES 16
/* SHA-256 of the settings that must agree across a cluster. */
#define EPD_CFG_FINGERPRINT_LEN 32

/* The log levels: X(NAME, syslog priority, config name, log-line name). The values are syslog
 * priorities, so journald's <N> prefix is the level itself. */
#define EPD_LOG_LEVEL_MAP(X)                                                                       \
    X(ERROR, 3, "error", "ERROR")                                                                  \
    X(WARN, 4, "warn", "WARN")                                                                     \
    X(INFO, 6, "info", "INFO")                                                                     \
    X(DEBUG, 7, "debug", "DEBUG")

typedef enum epd_log_level {
#define EPD_LOG_LEVEL_ENUM(name, prio, cfg, line) EPD_LOG_##name = prio,
    EPD_LOG_LEVEL_MAP(EPD_LOG_LEVEL_ENUM)
#undef EPD_LOG_LEVEL_ENUM
} epd_log_level_t;

typedef enum epd_backend { EPD_BACKEND_CPU = 0, EPD_BACKEND_CUDA = 1 } epd_backend_t;
typedef enum epd_transport {
    EPD_TRANSPORT_TCP = 0,
    EPD_TRANSPORT_NVLINK = 1,
    EPD_TRANSPORT_RDMA = 2,
} epd_transport_t;
typedef enum epd_placement {
    EPD_PLACEMENT_CONTIGUOUS = 0,
    EPD_PLACEMENT_EXPLICIT = 1
} epd_placement_t;

typedef struct epd_addr {
    char host[256];
    int port;
} epd_addr_t;

typedef struct epd_peer {
    int node_id;
    epd_addr_t addr; /* control-plane address */
} epd_peer_t;

typedef struct epd_config {
    /* node */
    int node_id;   /* node.id, 0..65535, unique in the cluster */
    char name[64]; /* node.name, defaults to the host name */
    /* cluster */
    char cluster_name[64];               /* cluster.name */
    epd_addr_t listen;                   /* cluster.listen: control-plane address */
    epd_peer_t peers[EPD_CFG_MAX_PEERS]; /* cluster.peers: seed peers (other nodes) */
    int num_peers;
    char secret_file[4096]; /* cluster.secret_file, "" = none (single node only) */
    /* http */
    epd_addr_t http; /* http.listen, loopback by default */
    size_t http_max_header_bytes;
    size_t http_max_body_bytes;
    int http_idle_timeout_ms;
    int http_max_connections;
    int http_max_connections_per_client;
    int http_header_timeout_ms;
    char http_admin_token_file[4096]; /* "" = none: admin endpoints only on a loopback listener */
    char http_api_key_file[4096];     /* "" = the inference API is open */
    /* compute */
    epd_backend_t backend;      /* compute.backend: "cpu" | "cuda" */
    epd_transport_t transport;  /* compute.transport: "tcp" | "nvlink" | "rdma" */
    int gpus[EPD_CFG_MAX_GPUS]; /* compute.gpus: device ordinals (cuda) */
    int num_gpus;
    int num_sms;        /* compute.num_sms: SMs for communication kernels */
    int ranks_per_node; /* cpu backend: ranks this node runs (cuda: one per GPU) */
    /* model */
    char model_path[4096];                  /* model.path: checkpoint directory, "" = none */
    epd_placement_t placement;              /* model.placement: "contiguous" | "explicit" */
    int expert_map[EPD_CFG_MAX_EXPERT_MAP]; /* model.expert_map[e] = rank (explicit) */
    int num_expert_map;
    int max_batch_tokens;      /* model.max_batch_tokens: LL bound per rank */
    int max_prefill_tokens;    /* model.max_prefill_tokens: HT bound per rank (off if <= LL's) */
    int max_seq_len;           /* model.max_seq_len */
    int max_queued_requests;   /* model.max_queued_requests: waiting for a rank; beyond -> 429 */
    int kv_block_size;         /* model.kv_block_size: tokens per KV block */
    double kv_memory_fraction; /* model.kv_memory_fraction: of free GPU memory for KV (cuda) */
    int kv_blocks;             /* model.kv_blocks: KV pool per rank (0: automatic) */
    int max_seqs_per_rank;     /* model.max_seqs_per_rank: sequences a rank runs at once */
    int cuda_graphs;           /* model.cuda_graphs: replay decode steps as CUDA graphs */
    int fp8_dispatch;          /* model.fp8_dispatch: LL activations as fp8 (cuda) */
    /* timeouts */
    int connect_timeout_ms;    /* timeouts.connect_ms */
    int heartbeat_interval_ms; /* timeouts.heartbeat_interval_ms */
    int heartbeat_timeout_ms;  /* timeouts.heartbeat_timeout_ms */
    int ep_timeout_ms;         /* timeouts.ep_op_ms: bound on every EP wait */
    int shutdown_timeout_ms;   /* timeouts.shutdown_ms: graceful stop budget */
    /* logging */
    epd_log_level_t log_level; /* log.level: "error" | "warn" | "info" | "debug" */
} epd_config_t;

/* All errors of one load, each naming its JSON path or file: the error contract of epd_err.h
 * (a negative errno status plus messages), with every message kept rather than the first, so
 * that `epctl config check` and `epd --check` show them all at once. */
typedef struct epd_config_errors {
    char **msgs; /* "ORIGIN: json.path: what is wrong", one per error */
    int count;
    int cap;
    int dropped; /* errors beyond EPD_CFG_MAX_ERRORS: counted, not kept */
    /* 0, or the status of the first error: -EINVAL the config is wrong (every JSON or setting
     * error); the call's errno (-ENOENT, -EACCES ...) the file could not be opened, examined or
     * read; -EFBIG larger than EPD_CFG_MAX_FILE_BYTES; -ENOMEM out of memory. */
    int status;
} epd_config_errors_t;

/* Flags for epd_config_parse_ex / epd_config_load_ex. */
enum epd_config_flags {
    /* Do not look at the file system (model.path, cluster.secret_file): for checking a config
     * meant for another machine. The daemon always loads without it. */
    EPD_CONFIG_SKIP_FS_CHECKS = 1u << 0,
};

/* Every setting at its documented default (node.name: this machine's host name). */
void epd_config_defaults(epd_config_t *cfg);
/* Parses and validates a JSON text (need not be NUL-terminated). `origin` names the source in
 * messages (a file name). *cfg is filled from the defaults first; *errs is initialised here
 * (free it with epd_config_errors_free whatever the result).
 * Returns 0 if there are no errors; otherwise errs->status (a negative errno) with every error
 * in *errs. */
int epd_config_parse(const char *json, size_t len, const char *origin, epd_config_t *cfg,
                     epd_config_errors_t *errs);
int epd_config_parse_ex(const char *json, size_t len, const char *origin, unsigned flags,
                        epd_config_t *cfg, epd_config_errors_t *errs);
/* Reads and parses a file (unreadable, empty or oversized files are errors too). */
int epd_config_load(const char *path, epd_config_t *cfg, epd_config_errors_t *errs);
int epd_config_load_ex(const char *path, unsigned flags, epd_config_t *cfg,
                       epd_config_errors_t *errs);
void epd_config_errors_free(epd_config_errors_t *errs);
/* One error per line, then "ORIGIN: N more errors not shown" if some were dropped. */
void epd_config_errors_print(const epd_config_errors_t *errs, FILE *out);

/* The effective config (defaults filled in) as indented JSON text that epd_config_parse reads
 * back to an equal config. Returns a malloc'd string (release with free()), NULL if out of
 * memory. */
char *epd_config_dump_json(const epd_config_t *cfg);
/* The same as a cJSON tree (release with cJSON_Delete), for embedding in a larger document. */
struct cJSON *epd_config_to_cjson(const epd_config_t *cfg);

/* SHA-256 over the settings every node of a cluster must share (those marked cluster-wide in
 * config/README.md). Returns 0, or -EIO if libcrypto failed. */
int epd_config_fingerprint(const epd_config_t *cfg, uint8_t digest[EPD_CFG_FINGERPRINT_LEN]);
/* The same as 64 lowercase hex digits and a NUL. */
int epd_config_fingerprint_hex(const epd_config_t *cfg, char hex[2 * EPD_CFG_FINGERPRINT_LEN + 1]);
/* Compares the cluster-wide settings of a and b. Returns 0 if equal; 1 if not, with the first
 * differing setting and both values in buf (e.g. `compute.transport: "tcp" vs "rdma"`);
 * -ENOMEM if out of memory. */
int epd_config_diff(const epd_config_t *a, const epd_config_t *b, char *buf, size_t len);
/* The same over every setting (what a reload would change). */
int epd_config_diff_all(const epd_config_t *a, const epd_config_t *b, char *buf, size_t len);

/* The settings reference (markdown) that config/README.md carries, generated from the table.
 * Returns a malloc'd string (release with free()), NULL if out of memory. */
char *epd_config_doc_markdown(void);

const char *epd_log_level_name(epd_log_level_t l);
const char *epd_backend_name(epd_backend_t b);
const char *epd_transport_name(epd_transport_t t);
const char *epd_placement_name(epd_placement_t p);

#endif /* EPD_CONFIG_H */
