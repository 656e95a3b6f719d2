/* Connection set-up through rdma_cm (option cm=1): every rank listens on its device's IPv4
 * address, the bootstrap carries the listeners' addresses, the lower rank of each pair
 * connects (resolve address from its own address, resolve route, create the QP, connect with
 * its rank in the private data), the higher one accepts. Afterwards the proxy watches the
 * event channel: a disconnect fails that peer. */
#include "rdma_wire.h"
#include "epd_clock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#define CM_MAGIC 0x4d435045u /* "EPCM" */

enum { CM_NONE = 0, CM_ADDR, CM_ROUTE, CM_CONNECTING, CM_UP };

struct cm_priv {
    uint32_t magic;
    uint32_t rank;
    uint32_t nranks;
};

static ep_status_t cm_fail(struct wire_rdma *r, int peer, ep_status_t st, const char *what)
{
    int e = errno ? errno : EIO;
    if (peer >= 0)
        return rdma_peer_fail(r, peer, st, "rank %d: rdma_cm %s for rank %d failed: %s",
                              r->base.rank, what, peer, strerror(e));
    return rdma_peer_fail(r, -1, st, "rank %d: rdma_cm %s failed: %s", r->base.rank, what,
                          strerror(e));
}

ep_status_t rdma_cm_open(struct wire_rdma *r)
{
    char err[256];
    struct sockaddr_in sa = {.sin_family = AF_INET};
    if (r->opts.addr[0]) {
        inet_pton(AF_INET, r->opts.addr, &sa.sin_addr);
    } else {
        /* The device the automatic choice (or device=) names; its GID gives the address. */
        struct ibv_context *c = rdma_select(&r->opts, r->base.rank, &r->sel, err, sizeof err);
        if (!c) return rdma_peer_fail(r, -1, EP_ERR_IO, "rank %d: %s", r->base.rank, err);
        ibv_close_device(c);
        if (!r->sel.has_ipv4)
            return rdma_peer_fail(r, -1, EP_ERR_INVALID,
                                  "rank %d: rdma_cm needs an IPv4 address and %s port %d has no "
                                  "IPv4-mapped GID; set the rdma option addr=",
                                  r->base.rank, r->sel.name, r->sel.port);
        sa.sin_addr = r->sel.ipv4;
    }
    if (!(r->cm_ch = rdma_create_event_channel()))
        return cm_fail(r, -1, EP_ERR_IO, "rdma_create_event_channel");
    if (rdma_create_id(r->cm_ch, &r->cm_listen, NULL, RDMA_PS_TCP))
        return cm_fail(r, -1, EP_ERR_IO, "rdma_create_id");
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof ip);
    if (rdma_bind_addr(r->cm_listen, (struct sockaddr *)&sa)) {
        int e = errno;
        return rdma_peer_fail(r, -1, EP_ERR_IO, "rank %d: rdma_bind_addr(%s) failed: %s",
                              r->base.rank, ip, strerror(e));
    }
    if (rdma_listen(r->cm_listen, r->base.nranks)) return cm_fail(r, -1, EP_ERR_IO, "rdma_listen");
    if (!r->cm_listen->verbs)
        return rdma_peer_fail(r, -1, EP_ERR_IO, "rank %d: %s is not the address of an rdma device",
                              r->base.rank, ip);
    r->ctx = r->cm_listen->verbs;
    /* What rdma_cm bound to is what this rank uses (addr= may name another device). */
    snprintf(r->sel.name, sizeof r->sel.name, "%s", ibv_get_device_name(r->ctx->device));
    r->sel.port = r->cm_listen->port_num;
    struct ibv_port_attr pa;
    if (ibv_query_port(r->ctx, (uint8_t)r->sel.port, &pa) == 0) {
        r->sel.roce = pa.link_layer == IBV_LINK_LAYER_ETHERNET;
        r->sel.lid = pa.lid;
        r->sel.active_mtu = pa.active_mtu;
    }
    r->sel.has_ipv4 = 1;
    r->sel.ipv4 = sa.sin_addr;
    return EP_OK;
}

static void conn_param(struct wire_rdma *r, struct rdma_conn_param *cp, struct cm_priv *priv)
{
    memset(cp, 0, sizeof *cp);
    priv->magic = CM_MAGIC;
    priv->rank = (uint32_t)r->base.rank;
    priv->nranks = (uint32_t)r->base.nranks;
    cp->private_data = priv;
    cp->private_data_len = sizeof *priv;
    cp->responder_resources = (uint8_t)r->max_rd_atomic;
    cp->initiator_depth = (uint8_t)r->max_rd_atomic;
    cp->retry_count = 7;
    cp->rnr_retry_count = 7;
}

static ep_status_t set_options(struct wire_rdma *r, struct rdma_cm_id *id, int peer)
{
    uint8_t tos = (uint8_t)r->opts.tc, to = (uint8_t)r->ack_timeout;
    if (tos && rdma_set_option(id, RDMA_OPTION_ID, RDMA_OPTION_ID_TOS, &tos, sizeof tos))
        return cm_fail(r, peer, EP_ERR_IO, "rdma_set_option(TOS)");
    /* Not every kernel knows this option; the default ACK timeout then applies. */
    rdma_set_option(id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &to, sizeof to);
    return EP_OK;
}

static ep_status_t create_qp(struct wire_rdma *r, struct rdma_cm_id *id, int peer)
{
    struct ibv_qp_init_attr ia;
    rdma_qp_init_attr(r, &ia);
    if (rdma_create_qp(id, r->pd, &ia)) return cm_fail(r, peer, EP_ERR_IO, "rdma_create_qp");
    r->peers[peer].qp = id->qp;
    return EP_OK;
}

static int peer_of(struct wire_rdma *r, struct rdma_cm_id *id)
{
    if (!id || !id->context) return -1;
    return (int)((struct rdma_peer *)id->context - r->peers);
}

/* An incoming connection: checks who it says it is and accepts it. */
static ep_status_t on_request(struct wire_rdma *r, struct rdma_cm_event *ev)
{
    const struct cm_priv *pp = ev->param.conn.private_data;
    int n = r->base.nranks, me = r->base.rank;
    if (!pp || ev->param.conn.private_data_len < sizeof *pp || pp->magic != CM_MAGIC ||
        pp->nranks != (uint32_t)n || pp->rank >= (uint32_t)me || r->peers[pp->rank].cm_id) {
        /* Not one of ours, or a duplicate: refuse it and keep waiting for the real ones. */
        rdma_reject(ev->id, NULL, 0);
        rdma_destroy_id(ev->id);
        return EP_OK;
    }
    int peer = (int)pp->rank;
    struct rdma_peer *p = &r->peers[peer];
    p->cm_id = ev->id;
    ev->id->context = p;
    ep_status_t st;
    if ((st = set_options(r, ev->id, peer)) || (st = create_qp(r, ev->id, peer))) return st;
    struct rdma_conn_param cp;
    struct cm_priv priv;
    conn_param(r, &cp, &priv);
    if (rdma_accept(ev->id, &cp)) return cm_fail(r, peer, EP_ERR_IO, "rdma_accept");
    p->cm_state = CM_CONNECTING;
    return EP_OK;
}

static ep_status_t on_event(struct wire_rdma *r, struct rdma_cm_event *ev, int *up)
{
    int peer = ev->event == RDMA_CM_EVENT_CONNECT_REQUEST ? -1 : peer_of(r, ev->id);
    struct rdma_peer *p = peer >= 0 ? &r->peers[peer] : NULL;
    unsigned ms = r->base.timeout_ms;
    ep_status_t st = EP_OK;
    switch (ev->event) {
    case RDMA_CM_EVENT_CONNECT_REQUEST:
        return on_request(r, ev);
    case RDMA_CM_EVENT_ADDR_RESOLVED:
        if (!p) break;
        if (rdma_resolve_route(ev->id, (int)ms))
            return cm_fail(r, peer, EP_ERR_IO, "resolve_route");
        p->cm_state = CM_ROUTE;
        break;
    case RDMA_CM_EVENT_ROUTE_RESOLVED: {
        if (!p) break;
        if ((st = create_qp(r, ev->id, peer))) return st;
        struct rdma_conn_param cp;
        struct cm_priv priv;
        conn_param(r, &cp, &priv);
        if (rdma_connect(ev->id, &cp)) return cm_fail(r, peer, EP_ERR_IO, "rdma_connect");
        p->cm_state = CM_CONNECTING;
        break;
    }
    case RDMA_CM_EVENT_ESTABLISHED:
        if (!p) break;
        p->cm_state = CM_UP;
        (*up)++;
        break;
    default:
        if (!p) break;
        return rdma_peer_fail(r, peer,
                              ev->event == RDMA_CM_EVENT_REJECTED ? EP_ERR_PEER : EP_ERR_IO,
                              "rank %d: rdma_cm connection with rank %d: %s (status %d)",
                              r->base.rank, peer, rdma_event_str(ev->event), ev->status);
    }
    return st;
}

ep_status_t rdma_cm_connect(struct wire_rdma *r, const uint8_t *blobs, size_t blob_len)
{
    int n = r->base.nranks, me = r->base.rank, up = 0;
    ep_status_t st;
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr = r->sel.ipv4};
    for (int i = me + 1; i < n; i++) {
        const struct rdma_blob *b = (const struct rdma_blob *)(blobs + (size_t)i * blob_len);
        struct rdma_peer *p = &r->peers[i];
        struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(b->cm_port)};
        dst.sin_addr.s_addr = b->ipv4;
        if (rdma_create_id(r->cm_ch, &p->cm_id, p, RDMA_PS_TCP))
            return cm_fail(r, i, EP_ERR_IO, "rdma_create_id");
        if ((st = set_options(r, p->cm_id, i))) return st;
        /* The source address picks the device: both rxe ends of one host share a namespace. */
        if (rdma_resolve_addr(p->cm_id, (struct sockaddr *)&src, (struct sockaddr *)&dst,
                              (int)r->base.timeout_ms))
            return cm_fail(r, i, EP_ERR_IO, "resolve_addr");
        p->cm_state = CM_ADDR;
    }
    uint64_t deadline = epd_now_ns() + (uint64_t)r->base.timeout_ms * 1000000ull;
    while (up < n - 1) {
        uint64_t now = epd_now_ns();
        if (now >= deadline) {
            int late = -1;
            for (int i = 0; i < n && late < 0; i++)
                if (i != me && r->peers[i].cm_state != CM_UP) late = i;
            return rdma_peer_fail(r, late, EP_ERR_TIMEOUT,
                                  "rank %d: rdma_cm connection with rank %d not established "
                                  "within %u ms",
                                  me, late, r->base.timeout_ms);
        }
        struct pollfd pfd = {.fd = r->cm_ch->fd, .events = POLLIN};
        int rc = poll(&pfd, 1, (int)((deadline - now) / 1000000ull) + 1);
        if (rc < 0 && errno != EINTR) return cm_fail(r, -1, EP_ERR_IO, "poll");
        if (rc <= 0) continue;
        struct rdma_cm_event *ev;
        if (rdma_get_cm_event(r->cm_ch, &ev)) return cm_fail(r, -1, EP_ERR_IO, "get_cm_event");
        st = on_event(r, ev, &up);
        rdma_ack_cm_event(ev);
        if (st) return st;
    }
    int fl = fcntl(r->cm_ch->fd, F_GETFL);
    if (fl < 0 || fcntl(r->cm_ch->fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return cm_fail(r, -1, EP_ERR_IO, "fcntl(O_NONBLOCK)");
    return EP_OK;
}

void rdma_cm_poll(struct wire_rdma *r)
{
    struct rdma_cm_event *ev;
    while (rdma_get_cm_event(r->cm_ch, &ev) == 0) {
        int peer = peer_of(r, ev->id);
        if (ev->event == RDMA_CM_EVENT_CONNECT_REQUEST) {
            rdma_reject(ev->id, NULL, 0); /* the mesh is complete */
        } else if (peer >= 0 &&
                   (ev->event == RDMA_CM_EVENT_DISCONNECTED ||
                    ev->event == RDMA_CM_EVENT_DEVICE_REMOVAL) &&
                   !atomic_load(&r->peers[peer].failed)) {
            rdma_peer_fail(r, peer, EP_ERR_PEER, "rank %d: rank %d disconnected (%s)", r->base.rank,
                           peer, rdma_event_str(ev->event));
        }
        rdma_ack_cm_event(ev);
    }
}

void rdma_cm_close(struct wire_rdma *r)
{
    for (int i = 0; r->peers && i < r->base.nranks; i++) {
        struct rdma_peer *p = &r->peers[i];
        if (!p->cm_id) continue;
        if (p->cm_state == CM_UP) rdma_disconnect(p->cm_id);
        rdma_destroy_id(p->cm_id);
        p->cm_id = NULL;
    }
    if (r->cm_listen) rdma_destroy_id(r->cm_listen);
    if (r->cm_ch) rdma_destroy_event_channel(r->cm_ch);
    r->cm_listen = NULL;
    r->cm_ch = NULL;
    r->ctx = NULL;
}
