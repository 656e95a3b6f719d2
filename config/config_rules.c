/* The checks that follow the walk in config_parse.c: the cross-setting rules (epd_cfg_rules,
 * each with its one-line documentation) and the file-system checks of model.path and
 * cluster.secret_file. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config_int.h"

/* ---- cross-setting rules ---- */

static bool ok(ctx_t *c, const char *path)
{
    int idx = cfg_setting_index(epd_cfg_find(path));
    return idx >= 0 && !c->bad[idx];
}

static bool present(ctx_t *c, const char *path)
{
    int idx = cfg_setting_index(epd_cfg_find(path));
    return idx >= 0 && c->present[idx];
}

static void rule_heartbeat(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "timeouts.heartbeat_interval_ms") || !ok(c, "timeouts.heartbeat_timeout_ms")) return;
    if (cfg->heartbeat_timeout_ms <= cfg->heartbeat_interval_ms)
        cfg_report(c, "timeouts.heartbeat_timeout_ms",
                   "must exceed timeouts.heartbeat_interval_ms (%d), got %d",
                   cfg->heartbeat_interval_ms, cfg->heartbeat_timeout_ms);
}

static void rule_gpus(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "compute.backend") || !ok(c, "compute.gpus")) return;
    if (cfg->backend == EPD_BACKEND_CUDA && cfg->num_gpus == 0)
        cfg_report(c, "compute.gpus", "backend \"cuda\" needs at least one GPU");
    if (cfg->backend == EPD_BACKEND_CPU && cfg->num_gpus > 0)
        cfg_report(c, "compute.gpus", "only used with backend \"cuda\" (backend is \"cpu\")");
}

static void rule_ranks(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "compute.backend") || !ok(c, "compute.gpus") || !ok(c, "compute.ranks_per_node") ||
        cfg->backend != EPD_BACKEND_CUDA || cfg->num_gpus == 0)
        return;
    if (present(c, "compute.ranks_per_node") && cfg->ranks_per_node != cfg->num_gpus)
        cfg_report(c, "compute.ranks_per_node",
                   "with backend \"cuda\" it is the number of compute.gpus (%d), got %d",
                   cfg->num_gpus, cfg->ranks_per_node);
    cfg->ranks_per_node = cfg->num_gpus;
}

static void rule_transport(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "compute.transport") || cfg->transport != EPD_TRANSPORT_NVLINK) return;
    if (ok(c, "compute.backend") && cfg->backend != EPD_BACKEND_CUDA)
        cfg_report(c, "compute.transport", "\"nvlink\" needs backend \"cuda\"");
    if (cfg->num_peers > 0)
        cfg_report(c, "compute.transport",
                   "\"nvlink\" joins the GPUs of one node; with cluster.peers use \"rdma\" or "
                   "\"tcp\"");
}

static void rule_placement(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "model.placement") || !ok(c, "model.expert_map")) return;
    if (cfg->placement == EPD_PLACEMENT_EXPLICIT && cfg->num_expert_map == 0)
        cfg_report(c, "model.expert_map",
                   "placement \"explicit\" needs an expert map (the rank of each expert)");
    if (cfg->placement == EPD_PLACEMENT_CONTIGUOUS && cfg->num_expert_map > 0)
        cfg_report(c, "model.expert_map", "only used with placement \"explicit\"");
}

static bool wildcard(const char *host)
{
    return strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0;
}

static void rule_peers(ctx_t *c, epd_config_t *cfg)
{
    bool own_id = ok(c, "node.id");
    bool own_addr = ok(c, "cluster.listen.host") && ok(c, "cluster.listen.port");
    for (int i = 0; i < cfg->num_peers; i++) {
        if (c->peer_bad[i]) continue;
        const epd_peer_t *p = &cfg->peers[i];
        char path[PATH_BUF];
        cfg_bprintf(path, sizeof(path), "cluster.peers[%d].id", i);
        if (own_id && p->node_id == cfg->node_id)
            cfg_report(c, path, "%d is this node's own node.id", p->node_id);
        for (int j = 0; j < i; j++) {
            if (!c->peer_bad[j] && cfg->peers[j].node_id == p->node_id) {
                cfg_report(c, path, "duplicate peer id %d (also cluster.peers[%d])", p->node_id, j);
                break;
            }
        }
        cfg_bprintf(path, sizeof(path), "cluster.peers[%d]", i);
        for (int j = 0; j < i; j++) {
            const epd_peer_t *q = &cfg->peers[j];
            if (!c->peer_bad[j] && q->addr.port == p->addr.port &&
                strcasecmp(q->addr.host, p->addr.host) == 0) {
                cfg_report(c, path, "duplicate address %s:%d (also cluster.peers[%d])",
                           p->addr.host, p->addr.port, j);
                break;
            }
        }
        if (own_addr && p->addr.port == cfg->listen.port &&
            strcasecmp(p->addr.host, cfg->listen.host) == 0)
            cfg_report(c, path, "address %s:%d is this node's own cluster.listen", p->addr.host,
                       p->addr.port);
    }
}

static void rule_secret(ctx_t *c, epd_config_t *cfg)
{
    /* num_peers counts the entries even where one of them had an error */
    if (ok(c, "cluster.secret_file") && cfg->num_peers > 0 && cfg->secret_file[0] == '\0')
        cfg_report(c, "cluster.secret_file", "required when cluster.peers is not empty");
}

static void rule_ports(ctx_t *c, epd_config_t *cfg)
{
    if (!ok(c, "http.listen.host") || !ok(c, "http.listen.port") || !ok(c, "cluster.listen.host") ||
        !ok(c, "cluster.listen.port"))
        return;
    const epd_addr_t *h = &cfg->http, *l = &cfg->listen;
    if (h->port == l->port &&
        (strcasecmp(h->host, l->host) == 0 || wildcard(h->host) || wildcard(l->host)))
        cfg_report(c, "http.listen.port",
                   "%d is also cluster.listen.port on an overlapping address", h->port);
}

const epd_cfg_rule_t epd_cfg_rules[] = {
    {rule_heartbeat, "`timeouts.heartbeat_timeout_ms` must exceed "
                     "`timeouts.heartbeat_interval_ms`."},
    {rule_gpus, "Backend `cuda` needs at least one entry in `compute.gpus`; backend `cpu` takes "
                "none."},
    {rule_ranks, "With backend `cuda`, `compute.ranks_per_node` is the number of GPUs (if given, "
                 "it must equal it)."},
    {rule_transport, "Transport `nvlink` needs backend `cuda` and no `cluster.peers` (it joins "
                     "the GPUs of one node)."},
    {rule_placement, "Placement `explicit` needs `model.expert_map`; `contiguous` takes none."},
    {rule_peers, "Peers have distinct ids and distinct host:port addresses, none equal to this "
                 "node's `node.id` or `cluster.listen`."},
    {rule_secret, "`cluster.secret_file` is required when `cluster.peers` is not empty."},
    {rule_ports, "`http.listen` and `cluster.listen` must not share a port on overlapping "
                 "addresses."},
};
const int epd_cfg_num_rules = (int)(sizeof(epd_cfg_rules) / sizeof(epd_cfg_rules[0]));

/* ---- file-system checks (model.path, cluster.secret_file) ---- */

static void check_dir(ctx_t *c, const char *path, const char *dir)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        cfg_report(c, path, "cannot access \"%s\": %s", dir, strerror(errno));
        return;
    }
    if (!S_ISDIR(st.st_mode)) {
        cfg_report(c, path, "\"%s\" is not a directory", dir);
        return;
    }
    if (access(dir, R_OK | X_OK) != 0)
        cfg_report(c, path, "directory \"%s\" is not readable: %s", dir, strerror(errno));
}

static void check_secret(ctx_t *c, const char *path, const char *file)
{
    struct stat st;
    if (stat(file, &st) != 0) {
        cfg_report(c, path, "cannot access \"%s\": %s", file, strerror(errno));
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        cfg_report(c, path, "\"%s\" is not a regular file", file);
        return;
    }
    if ((st.st_mode & 077) != 0) {
        cfg_report(c, path,
                   "\"%s\" has mode %04o; a secret must be readable by its owner only (0600)", file,
                   (unsigned)(st.st_mode & 07777));
        return;
    }
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cfg_report(c, path, "cannot read \"%s\": %s", file, strerror(errno));
        return;
    }
    close(fd);
    if (st.st_size < EPD_CFG_SECRET_MIN_BYTES)
        cfg_report(c, path, "\"%s\" holds %lld bytes; a secret needs at least %d", file,
                   (long long)st.st_size, EPD_CFG_SECRET_MIN_BYTES);
}

void cfg_check_files(ctx_t *c, epd_config_t *cfg)
{
    for (int i = 0; i < epd_cfg_num_settings; i++) {
        const epd_cfg_setting_t *s = &epd_cfg_settings[i];
        if (!(s->flags & (EPD_CFG_F_FS_DIR | EPD_CFG_F_FS_SECRET)) || c->bad[i]) continue;
        const char *value = (const char *)cfg + s->offset;
        if (value[0] == '\0') continue;
        if (s->flags & EPD_CFG_F_FS_DIR)
            check_dir(c, s->path, value);
        else
            check_secret(c, s->path, value);
    }
}
