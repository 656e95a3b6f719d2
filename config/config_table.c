/* The one table of epd settings: JSON path, type, default, bounds, documentation. Parsing,
 * validation, defaults, the dump, the fingerprint and config/README.md all come from here. */
#include <string.h>

#include "config_table.h"

#define OFF(field) offsetof(epd_config_t, field)
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* Bounds shared by several rows. */
#define PORT_MIN 1
#define PORT_MAX 65535
#define HOST_MAX 253 /* longest DNS name; IPv6 literals are far shorter */
#define NODE_ID_MAX 65535
#define TIMEOUT_MAX_MS 3600000 /* an hour: anything longer is a typo for a shorter unit */

static const char *const backend_names[] = {"cpu", "cuda"};
static const int backend_values[] = {EPD_BACKEND_CPU, EPD_BACKEND_CUDA};
static const char *const transport_names[] = {"tcp", "nvlink", "rdma"};
static const int transport_values[] = {EPD_TRANSPORT_TCP, EPD_TRANSPORT_NVLINK, EPD_TRANSPORT_RDMA};
static const char *const placement_names[] = {"contiguous", "explicit"};
static const int placement_values[] = {EPD_PLACEMENT_CONTIGUOUS, EPD_PLACEMENT_EXPLICIT};
#define LEVEL_CFG_NAME(name, prio, cfg, line) cfg,
#define LEVEL_VALUE(name, prio, cfg, line) EPD_LOG_##name,
static const char *const level_names[] = {EPD_LOG_LEVEL_MAP(LEVEL_CFG_NAME)};
static const int level_values[] = {EPD_LOG_LEVEL_MAP(LEVEL_VALUE)};
#undef LEVEL_CFG_NAME
#undef LEVEL_VALUE

#define ENUM_OF(n, v) .names = (n), .values = (v), .num_names = COUNT(n)

static const epd_cfg_setting_t peer_fields[] = {
    {.path = "id",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_REQUIRED,
     .offset = offsetof(epd_peer_t, node_id),
     .min = 0,
     .max = NODE_ID_MAX,
     .doc = "The peer's node.id."},
    {.path = "host",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_REQUIRED,
     .offset = offsetof(epd_peer_t, addr.host),
     .cap = sizeof(((epd_peer_t *)0)->addr.host),
     .min = 1,
     .max = HOST_MAX,
     .charset = EPD_CFG_CHARS_HOST,
     .doc = "The peer's control-plane host (name or IP literal; resolved when connecting)."},
    {.path = "port",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_REQUIRED,
     .offset = offsetof(epd_peer_t, addr.port),
     .min = PORT_MIN,
     .max = PORT_MAX,
     .doc = "The peer's control-plane port (its cluster.listen.port)."},
};

const epd_cfg_setting_t epd_cfg_settings[] = {
    /* node */
    {.path = "node.id",
     .type = EPD_CFG_INT,
     .offset = OFF(node_id),
     .min = 0,
     .max = NODE_ID_MAX,
     .def = 0,
     .doc = "This node's id, unique in the cluster; the lowest live id coordinates bring-up."},
    {.path = "node.name",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_HOSTNAME,
     .offset = OFF(name),
     .cap = sizeof(((epd_config_t *)0)->name),
     .min = 1,
     .max = sizeof(((epd_config_t *)0)->name) - 1,
     .def_str = "",
     .charset = EPD_CFG_CHARS_TEXT,
     .doc = "Human-readable node name for logs, metrics and status (host name if absent)."},
    /* cluster */
    {.path = "cluster.name",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(cluster_name),
     .cap = sizeof(((epd_config_t *)0)->cluster_name),
     .min = 1,
     .max = sizeof(((epd_config_t *)0)->cluster_name) - 1,
     .def_str = "epd",
     .charset = EPD_CFG_CHARS_NAME,
     .doc = "Cluster name; nodes of different clusters refuse each other."},
    {.path = "cluster.listen.host",
     .type = EPD_CFG_STRING,
     .offset = OFF(listen.host),
     .cap = sizeof(((epd_config_t *)0)->listen.host),
     .min = 1,
     .max = HOST_MAX,
     .def_str = "0.0.0.0",
     .charset = EPD_CFG_CHARS_HOST,
     .doc = "Control-plane listen address (peers connect here; authenticated by the secret)."},
    {.path = "cluster.listen.port",
     .type = EPD_CFG_INT,
     .offset = OFF(listen.port),
     .min = PORT_MIN,
     .max = PORT_MAX,
     .def = 7420,
     .doc = "Control-plane listen port."},
    {.path = "cluster.peers",
     .type = EPD_CFG_OBJ_LIST,
     .offset = OFF(peers),
     .cap = EPD_CFG_MAX_PEERS,
     .count_offset = OFF(num_peers),
     .fields = peer_fields,
     .num_fields = COUNT(peer_fields),
     .elem_size = sizeof(epd_peer_t),
     .doc = "Seed list of the other nodes: objects {id, host, port}; empty for a single node."},
    {.path = "cluster.secret_file",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_FS_SECRET,
     .offset = OFF(secret_file),
     .cap = sizeof(((epd_config_t *)0)->secret_file),
     .min = 0,
     .max = sizeof(((epd_config_t *)0)->secret_file) - 1,
     .def_str = "",
     .charset = EPD_CFG_CHARS_PATH,
     .doc = "File holding the shared cluster secret (owner-only mode, at least 16 bytes); "
            "required with peers."},
    /* http */
    {.path = "http.listen.host",
     .type = EPD_CFG_STRING,
     .offset = OFF(http.host),
     .cap = sizeof(((epd_config_t *)0)->http.host),
     .min = 1,
     .max = HOST_MAX,
     .def_str = "127.0.0.1",
     .charset = EPD_CFG_CHARS_HOST,
     .doc = "HTTP API listen address (loopback by default: put a proxy in front to expose it)."},
    {.path = "http.listen.port",
     .type = EPD_CFG_INT,
     .offset = OFF(http.port),
     .min = PORT_MIN,
     .max = PORT_MAX,
     .def = 8080,
     .doc = "HTTP API listen port."},
    {.path = "http.max_header_bytes",
     .type = EPD_CFG_SIZE,
     .offset = OFF(http_max_header_bytes),
     .min = 1024,
     .max = 1 << 20,
     .def = 16 << 10,
     .doc = "Largest request head (request line and headers); larger requests get 431."},
    {.path = "http.max_body_bytes",
     .type = EPD_CFG_SIZE,
     .offset = OFF(http_max_body_bytes),
     .min = 1024,
     .max = 64 << 20,
     .def = 1 << 20,
     .doc = "Largest request body; larger requests get 413."},
    {.path = "http.idle_timeout_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(http_idle_timeout_ms),
     .min = 100,
     .max = TIMEOUT_MAX_MS,
     .def = 30000,
     .doc = "A connection with no request in flight is closed after this long."},
    {.path = "http.max_connections",
     .type = EPD_CFG_INT,
     .offset = OFF(http_max_connections),
     .min = 1,
     .max = 65536,
     .def = 256,
     .doc = "Concurrent HTTP connections; when all are taken, the oldest idle or "
            "header-reading connection is closed to admit a new one."},
    {.path = "http.max_connections_per_client",
     .type = EPD_CFG_INT,
     .offset = OFF(http_max_connections_per_client),
     .min = 1,
     .max = 65536,
     .def = 32,
     .doc = "Concurrent HTTP connections from one client address; further ones are refused."},
    {.path = "http.header_timeout_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(http_header_timeout_ms),
     .min = 100,
     .max = TIMEOUT_MAX_MS,
     .def = 5000,
     .doc = "A request head (a new connection's first, or one started on a kept-alive "
            "connection) must arrive within this long (at most http.idle_timeout_ms); else 408."},
    {.path = "http.admin_token_file",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_FS_SECRET,
     .offset = OFF(http_admin_token_file),
     .cap = sizeof(((epd_config_t *)0)->http_admin_token_file),
     .min = 0,
     .max = sizeof(((epd_config_t *)0)->http_admin_token_file) - 1,
     .def_str = "",
     .charset = EPD_CFG_CHARS_PATH,
     .doc = "File holding the token (owner-only mode, 16+ printable characters) that "
            "`/v1/admin/*` requires as `Authorization: Bearer`; without it they are served "
            "only on a loopback http.listen."},
    {.path = "http.api_key_file",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_FS_SECRET,
     .offset = OFF(http_api_key_file),
     .cap = sizeof(((epd_config_t *)0)->http_api_key_file),
     .min = 0,
     .max = sizeof(((epd_config_t *)0)->http_api_key_file) - 1,
     .def_str = "",
     .charset = EPD_CFG_CHARS_PATH,
     .doc = "File holding the API key (owner-only mode) that every route but /healthz, "
            "/readyz, /metrics and /v1/admin/* requires as `Authorization: Bearer`; empty: "
            "open."},
    /* compute */
    {.path = "compute.backend",
     .type = EPD_CFG_ENUM,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(backend),
     .def = EPD_BACKEND_CPU,
     ENUM_OF(backend_names, backend_values),
     .doc = "Where experts run: `cpu` (reference kernels on host memory) or `cuda`."},
    {.path = "compute.transport",
     .type = EPD_CFG_ENUM,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(transport),
     .def = EPD_TRANSPORT_TCP,
     ENUM_OF(transport_names, transport_values),
     .doc = "EP data plane: `tcp`, `nvlink` (GPUs of one node) or `rdma`."},
    {.path = "compute.gpus",
     .type = EPD_CFG_INT_LIST,
     .offset = OFF(gpus),
     .cap = EPD_CFG_MAX_GPUS,
     .count_offset = OFF(num_gpus),
     .min = 0,
     .max = 63,
     .doc = "CUDA device ordinals this node drives, one rank each (backend `cuda`); an ordinal "
            "may repeat: two ranks then share that GPU."},
    {.path = "compute.num_sms",
     .type = EPD_CFG_INT,
     .offset = OFF(num_sms),
     .min = 1,
     .max = 256,
     .def = 8,
     .doc = "SMs the communication kernels may use per GPU."},
    {.path = "compute.ranks_per_node",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(ranks_per_node),
     .min = 1,
     .max = EPD_CFG_MAX_GPUS,
     .def = 1,
     .doc = "Ranks on this node: backend `cpu` runs this many; with `cuda` it is the number of "
            "GPUs."},
    /* model */
    {.path = "model.path",
     .type = EPD_CFG_STRING,
     .flags = EPD_CFG_F_FS_DIR,
     .offset = OFF(model_path),
     .cap = sizeof(((epd_config_t *)0)->model_path),
     .min = 0,
     .max = sizeof(((epd_config_t *)0)->model_path) - 1,
     .def_str = "",
     .charset = EPD_CFG_CHARS_PATH,
     .doc = "Checkpoint directory (`config.json` + `*.safetensors`); empty = no model loaded."},
    {.path = "model.placement",
     .type = EPD_CFG_ENUM,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(placement),
     .def = EPD_PLACEMENT_CONTIGUOUS,
     ENUM_OF(placement_names, placement_values),
     .doc = "Expert placement: `contiguous` (expert e on rank e / (E/R)) or `explicit`."},
    {.path = "model.expert_map",
     .type = EPD_CFG_INT_LIST,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(expert_map),
     .cap = EPD_CFG_MAX_EXPERT_MAP,
     .count_offset = OFF(num_expert_map),
     .min = 0,
     .max = EPD_CFG_MAX_RANKS - 1,
     .doc = "With placement `explicit`: entry e is the rank that holds expert e."},
    {.path = "model.max_batch_tokens",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(max_batch_tokens),
     .min = 1,
     .max = 65536,
     .def = 128,
     .doc = "Most tokens a rank feeds into one decode step (the LL dispatch bound)."},
    {.path = "model.max_prefill_tokens",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(max_prefill_tokens),
     .min = 0,
     .max = 65536,
     .def = 512,
     .doc = "Most tokens a rank feeds into one prefill step: a step in which some rank has more "
            "than `model.max_batch_tokens` tokens takes the HT dispatch path on every rank. At "
            "or below `model.max_batch_tokens` (0) HT is off and prompts go in LL chunks."},
    {.path = "model.max_seq_len",
     .type = EPD_CFG_INT,
     .flags = EPD_CFG_F_CLUSTER,
     .offset = OFF(max_seq_len),
     .min = 16,
     .max = 1 << 20,
     .def = 4096,
     .doc = "Longest sequence (prompt + completion) in tokens."},
    {.path = "model.max_queued_requests",
     .type = EPD_CFG_INT,
     .offset = OFF(max_queued_requests),
     .min = 1,
     .max = 1 << 20,
     .def = 256,
     .doc = "Completions (one per prompt) waiting for a place on a rank; beyond it requests get "
            "429 with Retry-After."},
    {.path = "model.kv_block_size",
     .type = EPD_CFG_INT,
     .offset = OFF(kv_block_size),
     .min = 1,
     .max = 1024,
     .def = 16,
     .doc = "Tokens per block of the paged KV cache: sequences take KV memory block by block."},
    {.path = "model.kv_memory_fraction",
     .type = EPD_CFG_NUMBER,
     .flags = EPD_CFG_F_OPEN_MIN,
     .offset = OFF(kv_memory_fraction),
     .fmin = 0,
     .fmax = 1,
     .fdef = 0.9,
     .doc = "Backend `cuda`, `model.kv_blocks` 0: the share of the GPU memory left after the "
            "weights and the workspace that the KV pool takes."},
    {.path = "model.kv_blocks",
     .type = EPD_CFG_INT,
     .offset = OFF(kv_blocks),
     .min = 0,
     .max = 1 << 30,
     .def = 0,
     .doc = "KV blocks per rank; 0: automatic (cpu: room for `model.max_seqs_per_rank` sequences "
            "of `model.max_seq_len`, taken as used; cuda: `model.kv_memory_fraction`). Requests "
            "are admitted, and preempted, by free blocks."},
    {.path = "model.max_seqs_per_rank",
     .type = EPD_CFG_INT,
     .offset = OFF(max_seqs_per_rank),
     .min = 1,
     .max = 4096,
     .def = 64,
     .doc = "Sequences a rank prefills or decodes at once (also bounded by "
            "`model.max_batch_tokens` - 1, so that every step leaves a token for a prompt)."},
    {.path = "model.cuda_graphs",
     .type = EPD_CFG_BOOL,
     .offset = OFF(cuda_graphs),
     .def = 1,
     .doc = "Backend `cuda`: replay decode steps as CUDA graphs (false: launch them eagerly)."},
    {.path = "model.fp8_dispatch",
     .type = EPD_CFG_BOOL,
     .offset = OFF(fp8_dispatch),
     .def = 0,
     .doc = "Backend `cuda`: send LL dispatch activations as fp8 e4m3 with scales instead of "
            "bf16."},
    /* timeouts */
    {.path = "timeouts.connect_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(connect_timeout_ms),
     .min = 10,
     .max = TIMEOUT_MAX_MS,
     .def = 5000,
     .doc = "Bound on one control-plane or data-plane connection attempt."},
    {.path = "timeouts.heartbeat_interval_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(heartbeat_interval_ms),
     .min = 10,
     .max = 600000,
     .def = 1000,
     .doc = "Time between heartbeats to each peer."},
    {.path = "timeouts.heartbeat_timeout_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(heartbeat_timeout_ms),
     .min = 20,
     .max = TIMEOUT_MAX_MS,
     .def = 5000,
     .doc = "A peer silent this long is marked down (must exceed the interval)."},
    {.path = "timeouts.ep_op_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(ep_timeout_ms),
     .min = 1,
     .max = TIMEOUT_MAX_MS,
     .def = 10000,
     .doc = "Bound on every EP wait (dispatch, combine, barrier); a timeout fails the request."},
    {.path = "timeouts.shutdown_ms",
     .type = EPD_CFG_INT,
     .offset = OFF(shutdown_timeout_ms),
     .min = 0,
     .max = TIMEOUT_MAX_MS,
     .def = 10000,
     .doc = "Graceful stop budget: in-flight requests get this long before they are failed."},
    /* log */
    {.path = "log.level",
     .type = EPD_CFG_ENUM,
     .offset = OFF(log_level),
     .def = EPD_LOG_INFO,
     ENUM_OF(level_names, level_values),
     .doc = "Least severe level written to the log."},
};

const int epd_cfg_num_settings = COUNT(epd_cfg_settings);
_Static_assert(COUNT(epd_cfg_settings) <= EPD_CFG_MAX_SETTINGS, "raise EPD_CFG_MAX_SETTINGS");
/* ENUM settings are stored and read through int pointers */
_Static_assert(sizeof(epd_backend_t) == sizeof(int), "enum size");
_Static_assert(sizeof(epd_transport_t) == sizeof(int), "enum size");
_Static_assert(sizeof(epd_placement_t) == sizeof(int), "enum size");
_Static_assert(sizeof(epd_log_level_t) == sizeof(int), "enum size");

const epd_cfg_setting_t *epd_cfg_find(const char *path)
{
    for (int i = 0; i < epd_cfg_num_settings; i++)
        if (strcmp(epd_cfg_settings[i].path, path) == 0) return &epd_cfg_settings[i];
    return NULL;
}

const char *epd_cfg_enum_name(const epd_cfg_setting_t *s, int value)
{
    for (int i = 0; i < s->num_names; i++)
        if (s->values[i] == value) return s->names[i];
    return NULL;
}

static const char *enum_name(const char *path, int value)
{
    const char *n = epd_cfg_enum_name(epd_cfg_find(path), value);
    return n ? n : "?";
}

const char *epd_log_level_name(epd_log_level_t l)
{
    return enum_name("log.level", (int)l);
}

const char *epd_backend_name(epd_backend_t b)
{
    return enum_name("compute.backend", (int)b);
}

const char *epd_transport_name(epd_transport_t t)
{
    return enum_name("compute.transport", (int)t);
}

const char *epd_placement_name(epd_placement_t p)
{
    return enum_name("model.placement", (int)p);
}
