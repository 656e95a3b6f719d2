/* The rdma transport's internals (internal to libep and its tests): settings, device and GID
 * selection, the command ring between the wire's callers and the proxy thread, and the wire's
 * test hooks.
 *
 * Settings: ep_config_t.rdma_options, else the environment variable EP_RDMA_OPTIONS, a list
 * "key=value,key=value" (every key optional, automatic when absent):
 *   device=NAME    verbs device (rxe0, mlx5_0 ...); auto: the active ports of all devices in
 *                  name order, rank r takes port r % count; with near=, the ports of the devices
 *                  nearest that PCI device (rank r % their count)
 *   near=BUSID     PCI bus id (0000:1b:00.0) of the device the rank's data lives on: its GPU.
 *                  The cuda backend adds it itself when no device is named.
 *   port=N         port of that device (auto: its first active port)
 *   gid_index=N    GID table index (auto: RoCE v2 with an IPv4-mapped address, else the first
 *                  RoCE v2 GID, else index 0; InfiniBand ports use the LID)
 *   mtu=N          path MTU in bytes, 256..4096 (auto: the smaller active MTU of both ends)
 *   tc=N           traffic class (IP DSCP/ECN byte on RoCE), 0..255 (default 0)
 *   cm=0|1         connect through rdma_cm instead of exchanging QP numbers (default 0)
 *   addr=IPV4      cm: address to listen on and connect from (auto: the GID's IPv4 address)
 *   sq_depth=N     send queue entries per peer, 16..4096 (default 256)
 *   stage_kb=N     registered staging memory for put sources, 64..1048576 KiB (default 8192)
 */
#ifndef EP_RDMA_H
#define EP_RDMA_H

#include "wire.h"

#include <infiniband/verbs.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define RDMA_OPTIONS_ENV "EP_RDMA_OPTIONS"
#define RDMA_NAME_MAX 64

struct rdma_opts {
    char device[RDMA_NAME_MAX]; /* "" = auto */
    int port;                   /* 0 = auto */
    int gid_index;              /* -1 = auto */
    int mtu;                    /* bytes; 0 = auto */
    int tc;
    int use_cm;
    char addr[RDMA_NAME_MAX]; /* "" = auto */
    char near[RDMA_NAME_MAX]; /* PCI bus id to be near; "" = none */
    int sq_depth;
    size_t stage_bytes;
};

/* Parses `s` (NULL or "" = all automatic) into *o; on error fills err ("rdma option 'mtu=300':
 * not a power of two in 256..4096") and returns -1. */
int rdma_opts_parse(const char *s, struct rdma_opts *o, char *err, size_t errlen);

/* The device port a rank uses, and how peers reach it. */
struct rdma_port_sel {
    char name[RDMA_NAME_MAX];
    int port;
    int gid_index;
    union ibv_gid gid;
    int roce; /* link layer Ethernet: addresses are GIDs (GRH), not LIDs */
    uint16_t lid;
    enum ibv_mtu active_mtu;
    int has_ipv4;
    struct in_addr ipv4; /* from an IPv4-mapped GID */
};

/* Opens the device the options (or the automatic choice for `rank`) name and picks port and
 * GID. Returns the opened context (caller closes) or NULL with err filled. */
struct ibv_context *rdma_select(const struct rdma_opts *o, int rank, struct rdma_port_sel *sel,
                                char *err, size_t errlen);

/* PCI distance between the PCI device `bus_id` (0000:1b:00.0) and verbs device `ibdev`: the
 * number of bridges between them in the PCIe tree, from their paths under
 * <sysfs>/devices (sysfs: "/sys", or a test's tree). -1 when either is not a PCI device there
 * (a software device such as rxe, an unknown bus id). */
int rdma_pci_distance(const char *sysfs, const char *bus_id, const char *ibdev);
/* Of n verbs device names, the indices of those nearest bus_id (ties all kept, in the given
 * order) into `out`; returns their count, or 0 when none has a known distance. */
int rdma_nearest(const char *sysfs, const char *bus_id, const char *const *names, int n, int *out);

/* Registers [addr, addr+len) for the given access: through dmabuf_fd (GPU memory exported with
 * cuMemGetHandleForAddressRange) when >= 0, else as host memory. */
struct ibv_mr *rdma_reg(struct ibv_pd *pd, void *addr, size_t len, int dmabuf_fd, int access);

enum ibv_mtu rdma_mtu_enum(int bytes);
int rdma_mtu_bytes(enum ibv_mtu m);

/* ---- command ring ------------------------------------------------------------------------- */

/* One descriptor: what the producer (the wire's caller today; a GPU kernel writing into mapped
 * host memory later) asks the proxy to post. */
enum rdma_cmd_op { RDMA_CMD_PUT = 1, RDMA_CMD_SET = 2, RDMA_CMD_ADD = 3 };
enum rdma_src { RDMA_SRC_STAGE = 0, RDMA_SRC_LOCAL = 1 }; /* staging copy / own symmetric buffer */

struct rdma_cmd {
    uint8_t op;
    uint8_t src;
    uint16_t peer;
    uint32_t len;        /* PUT: bytes (<= the chunk limit) */
    uint64_t remote_off; /* into the peer's symmetric buffer */
    uint64_t src_off;    /* PUT/SET: into the staging memory or the local buffer */
    uint64_t value;      /* ADD: the addend */
    uint64_t stage_end;  /* staging byte counter after this command's allocation */
};

/* ---- test hooks --------------------------------------------------------------------------- */

/* The queue pair that carries this rank's operations to `peer` (NULL for itself). */
struct ibv_qp *ep_wire_rdma_qp(ep_wire_t *w, int peer);
/* Replaces the remote key used for `peer`'s buffer (call with nothing in flight). */
void ep_wire_rdma_set_rkey(ep_wire_t *w, int peer, uint32_t rkey);
uint32_t ep_wire_rdma_rkey(ep_wire_t *w, int peer);
/* Zero-copy put from this rank's own symmetric buffer: [local_off, +len) must stay unchanged
 * until the next flush returns (the GPU path's form of put). */
ep_status_t ep_wire_rdma_put_local(ep_wire_t *w, int peer, size_t remote_off, size_t local_off,
                                   size_t len);
/* Device name, port and GID index this wire uses (after connect). */
const struct rdma_port_sel *ep_wire_rdma_port(ep_wire_t *w);
/* Whether the queue pairs were connected through rdma_cm. */
int ep_wire_rdma_uses_cm(ep_wire_t *w);

#endif /* EP_RDMA_H */
