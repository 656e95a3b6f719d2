/* The rdma transport's settings and device choice: parsing the option string, picking the
 * device, port and GID a rank uses, registering memory. */
#include "rdma.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SQ_DEPTH 256
#define DEFAULT_STAGE_KB 8192

static int parse_int(const char *v, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) return -1;
    *out = x;
    return 0;
}

int rdma_opts_parse(const char *s, struct rdma_opts *o, char *err, size_t errlen)
{
    memset(o, 0, sizeof *o);
    o->gid_index = -1;
    o->sq_depth = DEFAULT_SQ_DEPTH;
    o->stage_bytes = (size_t)DEFAULT_STAGE_KB << 10;
    if (!s || !*s) return 0;
    char *copy = strdup(s), *save = NULL;
    if (!copy) {
        snprintf(err, errlen, "rdma options: out of memory");
        return -1;
    }
    int rc = 0;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        if (!eq) {
            snprintf(err, errlen, "rdma option '%s': expected key=value", item);
            rc = -1;
            break;
        }
        *eq = 0;
        const char *k = item, *v = eq + 1;
        long x = 0;
        const char *why = NULL;
        if (!strcmp(k, "device") || !strcmp(k, "addr") || !strcmp(k, "near")) {
            if (!*v || strlen(v) >= RDMA_NAME_MAX)
                why = "empty or too long";
            else
                snprintf(!strcmp(k, "device") ? o->device
                         : !strcmp(k, "addr") ? o->addr
                                              : o->near,
                         RDMA_NAME_MAX, "%s", v);
            if (!why && !strcmp(k, "addr")) {
                struct in_addr a;
                if (inet_pton(AF_INET, v, &a) != 1) why = "not an IPv4 address";
            }
        } else if (!strcmp(k, "port")) {
            if (parse_int(v, 1, 255, &x)) why = "not in 1..255";
            o->port = (int)x;
        } else if (!strcmp(k, "gid_index")) {
            if (parse_int(v, 0, 65535, &x)) why = "not in 0..65535";
            o->gid_index = (int)x;
        } else if (!strcmp(k, "mtu")) {
            if (parse_int(v, 256, 4096, &x) || (x & (x - 1)))
                why = "not a power of two in 256..4096";
            o->mtu = (int)x;
        } else if (!strcmp(k, "tc")) {
            if (parse_int(v, 0, 255, &x)) why = "not in 0..255";
            o->tc = (int)x;
        } else if (!strcmp(k, "cm")) {
            if (parse_int(v, 0, 1, &x)) why = "not 0 or 1";
            o->use_cm = (int)x;
        } else if (!strcmp(k, "sq_depth")) {
            if (parse_int(v, 16, 4096, &x)) why = "not in 16..4096";
            o->sq_depth = (int)x;
        } else if (!strcmp(k, "stage_kb")) {
            if (parse_int(v, 64, 1048576, &x)) why = "not in 64..1048576";
            o->stage_bytes = (size_t)x << 10;
        } else {
            why = "unknown key (device, port, gid_index, mtu, tc, cm, addr, near, sq_depth, "
                  "stage_kb)";
        }
        if (why) {
            snprintf(err, errlen, "rdma option '%s=%s': %s", k, v, why);
            rc = -1;
            break;
        }
    }
    free(copy);
    return rc;
}

enum ibv_mtu rdma_mtu_enum(int bytes)
{
    switch (bytes) {
    case 256:
        return IBV_MTU_256;
    case 512:
        return IBV_MTU_512;
    case 1024:
        return IBV_MTU_1024;
    case 2048:
        return IBV_MTU_2048;
    default:
        return IBV_MTU_4096;
    }
}

int rdma_mtu_bytes(enum ibv_mtu m)
{
    return 128 << (int)m;
}

static int is_ipv4_mapped(const union ibv_gid *g)
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return !memcmp(g->raw, prefix, sizeof prefix);
}

static int gid_is_zero(const union ibv_gid *g)
{
    for (int i = 0; i < 16; i++)
        if (g->raw[i]) return 0;
    return 1;
}

/* Picks the GID: the configured index, else RoCE v2 + IPv4-mapped, else any RoCE v2, else 0. */
static int pick_gid(struct ibv_context *ctx, const struct ibv_port_attr *pa,
                    const struct rdma_opts *o, struct rdma_port_sel *sel, char *err, size_t errlen)
{
    if (o->gid_index >= 0) {
        if (o->gid_index >= pa->gid_tbl_len) {
            snprintf(err, errlen, "rdma: %s port %d has %d GIDs; gid_index=%d is out of range",
                     sel->name, sel->port, pa->gid_tbl_len, o->gid_index);
            return -1;
        }
        if (ibv_query_gid(ctx, (uint8_t)sel->port, o->gid_index, &sel->gid) ||
            (sel->roce && gid_is_zero(&sel->gid))) {
            snprintf(err, errlen, "rdma: %s port %d GID index %d is empty", sel->name, sel->port,
                     o->gid_index);
            return -1;
        }
        sel->gid_index = o->gid_index;
        return 0;
    }
    if (!sel->roce) {
        sel->gid_index = 0;
        return ibv_query_gid(ctx, (uint8_t)sel->port, 0, &sel->gid) ? -1 : 0;
    }
    int any_v2 = -1;
    for (int i = 0; i < pa->gid_tbl_len; i++) {
        struct ibv_gid_entry e;
        if (ibv_query_gid_ex(ctx, (uint32_t)sel->port, (uint32_t)i, &e, 0)) continue;
        if (e.gid_type != IBV_GID_TYPE_ROCE_V2 || gid_is_zero(&e.gid)) continue;
        if (is_ipv4_mapped(&e.gid)) {
            sel->gid_index = i;
            sel->gid = e.gid;
            return 0;
        }
        if (any_v2 < 0) any_v2 = i;
    }
    int i = any_v2 >= 0 ? any_v2 : 0;
    if (ibv_query_gid(ctx, (uint8_t)sel->port, i, &sel->gid) || gid_is_zero(&sel->gid)) {
        snprintf(err, errlen,
                 "rdma: %s port %d has no usable GID (no RoCE v2 entry; is an IP address "
                 "assigned to its network device?)",
                 sel->name, sel->port);
        return -1;
    }
    sel->gid_index = i;
    return 0;
}

/* The PCI path of a sysfs link ("/sys/devices/pci0000:00/0000:00:01.0/0000:1b:00.0"), or -1. */
static int pci_path(const char *link, char *out, size_t len)
{
    char *real = realpath(link, NULL);
    if (!real) return -1;
    int ok = strstr(real, "/devices/pci") != NULL && strlen(real) < len;
    if (ok) snprintf(out, len, "%s", real);
    free(real);
    return ok ? 0 : -1;
}

int rdma_pci_distance(const char *sysfs, const char *bus_id, const char *ibdev)
{
    char link[PATH_MAX], a[PATH_MAX], b[PATH_MAX];
    snprintf(link, sizeof link, "%s/bus/pci/devices/%s", sysfs, bus_id);
    if (pci_path(link, a, sizeof a)) return -1;
    snprintf(link, sizeof link, "%s/class/infiniband/%s/device", sysfs, ibdev);
    if (pci_path(link, b, sizeof b)) return -1;
    /* path components below the deepest common ancestor, on both sides */
    char *sa = NULL, *sb = NULL;
    const char *ca[64], *cb[64];
    int na = 0, nb = 0;
    for (char *t = strtok_r(a, "/", &sa); t && na < 64; t = strtok_r(NULL, "/", &sa))
        ca[na++] = t;
    for (char *t = strtok_r(b, "/", &sb); t && nb < 64; t = strtok_r(NULL, "/", &sb))
        cb[nb++] = t;
    int common = 0;
    while (common < na && common < nb && !strcmp(ca[common], cb[common]))
        ++common;
    return (na - common) + (nb - common);
}

int rdma_nearest(const char *sysfs, const char *bus_id, const char *const *names, int n, int *out)
{
    int best = -1, count = 0;
    for (int i = 0; i < n; ++i) {
        const int d = rdma_pci_distance(sysfs, bus_id, names[i]);
        if (d < 0) continue;
        if (best < 0 || d < best) {
            best = d;
            count = 0;
        }
        if (d == best) out[count++] = i;
    }
    return count;
}

static int cmp_dev(const void *a, const void *b)
{
    return strcmp(ibv_get_device_name(*(struct ibv_device *const *)a),
                  ibv_get_device_name(*(struct ibv_device *const *)b));
}

struct ibv_context *rdma_select(const struct rdma_opts *o, int rank, struct rdma_port_sel *sel,
                                char *err, size_t errlen)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    struct ibv_context *ctx = NULL;
    char names[256] = "";
    memset(sel, 0, sizeof *sel);
    if (!list || n == 0) {
        snprintf(err, errlen, "rdma: no verbs device found (%s)",
                 list ? "the device list is empty" : strerror(errno));
        if (list) ibv_free_device_list(list);
        return NULL;
    }
    qsort(list, (size_t)n, sizeof *list, cmp_dev);
    /* Candidates: (device, port) pairs that are active and allowed by the options. */
    struct cand {
        int dev, port;
    } cands[64];
    int nc = 0, found_dev = 0;
    for (int d = 0; d < n && nc < 64; d++) {
        const char *name = ibv_get_device_name(list[d]);
        size_t used = strlen(names);
        snprintf(names + used, sizeof names - used, "%s%s", used ? ", " : "", name);
        if (o->device[0] && strcmp(o->device, name)) continue;
        found_dev = 1;
        struct ibv_context *c = ibv_open_device(list[d]);
        if (!c) continue;
        struct ibv_device_attr da;
        if (!ibv_query_device(c, &da)) {
            for (int p = 1; p <= da.phys_port_cnt && nc < 64; p++) {
                struct ibv_port_attr pa;
                if (o->port && p != o->port) continue;
                if (ibv_query_port(c, (uint8_t)p, &pa) || pa.state != IBV_PORT_ACTIVE) continue;
                cands[nc].dev = d;
                cands[nc].port = p;
                nc++;
            }
        }
        ibv_close_device(c);
    }
    if (!found_dev) {
        snprintf(err, errlen, "rdma: device '%s' not found (devices: %s)", o->device, names);
        goto out;
    }
    if (nc == 0) {
        if (o->port)
            snprintf(err, errlen, "rdma: port %d is not active on %s (devices: %s)", o->port,
                     o->device[0] ? o->device : "any device", names);
        else
            snprintf(err, errlen, "rdma: no active port on %s (devices: %s)",
                     o->device[0] ? o->device : "any device", names);
        goto out;
    }
    /* Ranks of one node spread over its NICs; with near= (a GPU's bus id), over the ports of the
     * devices nearest that GPU in the PCIe tree, when the topology is known. */
    int pick = rank % nc;
    if (o->near[0] && !o->device[0]) {
        const char *cn[64];
        int near_idx[64];
        for (int i = 0; i < nc; ++i)
            cn[i] = ibv_get_device_name(list[cands[i].dev]);
        const int nn = rdma_nearest("/sys", o->near, cn, nc, near_idx);
        if (nn > 0) pick = near_idx[rank % nn];
    }
    struct cand c = cands[pick];
    snprintf(sel->name, sizeof sel->name, "%s", ibv_get_device_name(list[c.dev]));
    sel->port = c.port;
    ctx = ibv_open_device(list[c.dev]);
    if (!ctx) {
        snprintf(err, errlen, "rdma: ibv_open_device(%s) failed: %s", sel->name, strerror(errno));
        goto out;
    }
    struct ibv_port_attr pa;
    if (ibv_query_port(ctx, (uint8_t)sel->port, &pa)) {
        snprintf(err, errlen, "rdma: ibv_query_port(%s, %d) failed: %s", sel->name, sel->port,
                 strerror(errno));
        goto fail_ctx;
    }
    sel->roce = pa.link_layer == IBV_LINK_LAYER_ETHERNET;
    sel->lid = pa.lid;
    sel->active_mtu = pa.active_mtu;
    if (pick_gid(ctx, &pa, o, sel, err, errlen)) goto fail_ctx;
    if (is_ipv4_mapped(&sel->gid)) {
        sel->has_ipv4 = 1;
        memcpy(&sel->ipv4, sel->gid.raw + 12, 4);
    }
    goto out;

fail_ctx:
    ibv_close_device(ctx);
    ctx = NULL;
out:
    ibv_free_device_list(list);
    return ctx;
}

struct ibv_mr *rdma_reg(struct ibv_pd *pd, void *addr, size_t len, int dmabuf_fd, int access)
{
    if (dmabuf_fd >= 0)
        return ibv_reg_dmabuf_mr(pd, 0, len, (uint64_t)(uintptr_t)addr, dmabuf_fd, access);
    return ibv_reg_mr(pd, addr, len, access);
}
