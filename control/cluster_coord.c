/* Cluster coordination: the coordinator (the lowest node id alive in this node's view), its rank
 * table and epochs (broadcast, ACK, COMMIT, "formed"), a member's side of the same (adopt,
 * acknowledge, commit), the node descriptions tables carry, and readiness. cl_evaluate() runs
 * after every membership event. */
#include "cluster_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define SUB "cluster"

void cl_nodeinfo_free(cl_nodeinfo_t *n)
{
    free(n->endpoint);
    n->endpoint = NULL;
    n->endpoint_len = 0;
}

void cl_table_clear(cl_table_t *t)
{
    for (int i = 0; i < t->nnodes; i++)
        cl_nodeinfo_free(&t->nodes[i]);
    free(t->nodes);
    free(t->acked);
    memset(t, 0, sizeof *t);
}

const cl_nodeinfo_t *cl_table_node(const epd_cluster_t *c, int node_id, int *index)
{
    if (!c->table.valid) return NULL;
    for (int i = 0; i < c->table.nnodes; i++) {
        if (c->table.nodes[i].id == node_id) {
            if (index) *index = i;
            return &c->table.nodes[i];
        }
    }
    return NULL;
}

int cl_in_table(const epd_cluster_t *c, int id)
{
    return cl_table_node(c, id, NULL) != NULL;
}

void cl_parse_nodeinfo(const uint8_t *p, uint32_t len, cl_nodeinfo_t *n)
{
    uint32_t v;
    const uint8_t *blob;
    uint32_t bl;
    memset(n, 0, sizeof *n);
    if (epd_ctl_get_u32(p, len, EPD_CTL_T_NODE_ID, &v) == 0) n->id = (int)v;
    epd_ctl_get_str(p, len, EPD_CTL_T_HOSTNAME, n->hostname, sizeof n->hostname);
    epd_ctl_get_str(p, len, EPD_CTL_T_NAME, n->name, sizeof n->name);
    epd_ctl_get_str(p, len, EPD_CTL_T_BACKEND, n->backend, sizeof n->backend);
    epd_ctl_get_str(p, len, EPD_CTL_T_HTTP, n->http, sizeof n->http);
    epd_ctl_get_str(p, len, EPD_CTL_T_CTL_ADDR, n->ctl, sizeof n->ctl);
    epd_ctl_get_u32(p, len, EPD_CTL_T_RANKS, &n->ranks);
    epd_ctl_get_u32(p, len, EPD_CTL_T_CAPS, &n->caps);
    epd_ctl_get_u32(p, len, EPD_CTL_T_FIRST_RANK, &n->first_rank);
    if (epd_ctl_get_bytes(p, len, EPD_CTL_T_ENDPOINT, &blob, &bl) == 0 && bl > 0) {
        n->endpoint = malloc(bl);
        if (n->endpoint) {
            memcpy(n->endpoint, blob, bl);
            n->endpoint_len = bl;
        }
    }
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *val;
    uint32_t vl;
    epd_ctl_iter_init(&it, p, len);
    while (epd_ctl_iter_next(&it, &tag, &val, &vl)) {
        if (tag != EPD_CTL_T_GPU || n->ngpus >= EPD_CFG_MAX_GPUS) continue;
        epd_cluster_gpu_t *g = &n->gpus[n->ngpus++];
        if (epd_ctl_get_u32(val, vl, EPD_CTL_T_ORDINAL, &v) == 0) g->ordinal = (int)v;
        epd_ctl_get_str(val, vl, EPD_CTL_T_PCI, g->pci_bus_id, sizeof g->pci_bus_id);
    }
}

/* ---- rank table ---- */

static void adopt_table(epd_cluster_t *c, cl_table_t *t)
{
    cl_table_clear(&c->table);
    c->table = *t;
    memset(t, 0, sizeof *t);
    c->formed = 0;
    if (c->table.epoch > c->max_epoch) c->max_epoch = c->table.epoch;
    if (c->m_epoch) epd_metric_set(c->m_epoch, (double)c->table.epoch);
    int idx;
    const cl_nodeinfo_t *me = cl_table_node(c, c->cfg.node_id, &idx);
    char why[96];
    snprintf(why, sizeof why, "epoch changed to %" PRIu64, c->table.epoch);
    if (c->boot)
        cl_boot_set_epoch(c->boot, c->table.epoch, 0, me ? (int)me->first_rank : -1,
                          c->table.nranks, why);
    EPD_INFO(SUB, "rank table epoch %" PRIu64 " from coordinator %d: %d nodes, %d ranks%s",
             c->table.epoch, c->table.coord, c->table.nnodes, c->table.nranks,
             c->table.complete ? "" : " (incomplete)");
}

static void set_formed(epd_cluster_t *c)
{
    if (c->formed) return;
    c->formed = 1;
    int idx;
    const cl_nodeinfo_t *me = cl_table_node(c, c->cfg.node_id, &idx);
    if (c->boot)
        cl_boot_set_epoch(c->boot, c->table.epoch, 1, me ? (int)me->first_rank : -1,
                          c->table.nranks, "");
    EPD_INFO(SUB,
             "cluster formed at epoch %" PRIu64 ": %d nodes, %d ranks (this node: first "
             "rank %d)",
             c->table.epoch, c->table.nnodes, c->table.nranks, me ? (int)me->first_rank : -1);
    if (c->opts.on_formed) c->opts.on_formed(c->opts.cb_ctx, c->table.epoch);
}

static void put_node(epd_ctl_buf_t *b, const cl_nodeinfo_t *n)
{
    size_t mk = epd_ctl_nest_begin(b, EPD_CTL_T_NODE);
    epd_ctl_put_u32(b, EPD_CTL_T_NODE_ID, (uint32_t)n->id);
    epd_ctl_put_str(b, EPD_CTL_T_HOSTNAME, n->hostname);
    epd_ctl_put_str(b, EPD_CTL_T_NAME, n->name);
    epd_ctl_put_u32(b, EPD_CTL_T_FIRST_RANK, n->first_rank);
    epd_ctl_put_u32(b, EPD_CTL_T_RANKS, n->ranks);
    epd_ctl_put_str(b, EPD_CTL_T_BACKEND, n->backend);
    epd_ctl_put_u32(b, EPD_CTL_T_CAPS, n->caps);
    for (int g = 0; g < n->ngpus; g++) {
        size_t gm = epd_ctl_nest_begin(b, EPD_CTL_T_GPU);
        epd_ctl_put_u32(b, EPD_CTL_T_ORDINAL, (uint32_t)n->gpus[g].ordinal);
        epd_ctl_put_str(b, EPD_CTL_T_PCI, n->gpus[g].pci_bus_id);
        epd_ctl_nest_end(b, gm);
    }
    if (n->endpoint_len) epd_ctl_put_bytes(b, EPD_CTL_T_ENDPOINT, n->endpoint, n->endpoint_len);
    if (n->http[0]) epd_ctl_put_str(b, EPD_CTL_T_HTTP, n->http);
    if (n->ctl[0]) epd_ctl_put_str(b, EPD_CTL_T_CTL_ADDR, n->ctl);
    epd_ctl_nest_end(b, mk);
}

static void self_info(const epd_cluster_t *c, cl_nodeinfo_t *n)
{
    memset(n, 0, sizeof *n);
    n->id = c->cfg.node_id;
    snprintf(n->hostname, sizeof n->hostname, "%s", c->hostname);
    snprintf(n->name, sizeof n->name, "%s", c->cfg.name);
    snprintf(n->backend, sizeof n->backend, "%s", c->backend);
    snprintf(n->http, sizeof n->http, "%s", c->http_addr);
    snprintf(n->ctl, sizeof n->ctl, "%.200s:%d", c->cfg.listen.host, c->port);
    n->ranks = (uint32_t)c->opts.local_ranks;
    n->caps = c->opts.transport_caps;
    n->ngpus = c->opts.num_gpus;
    memcpy(n->gpus, c->opts.gpus, sizeof n->gpus);
    if (c->opts.endpoint_len && (n->endpoint = malloc(c->opts.endpoint_len))) {
        memcpy(n->endpoint, c->endpoint, c->opts.endpoint_len);
        n->endpoint_len = c->opts.endpoint_len;
    }
}

static int alive_member(const cl_peer_t *p)
{
    return p->hello_ok && (p->state == EPD_PEER_UP || p->state == EPD_PEER_SUSPECT);
}

static void broadcast_table(epd_cluster_t *c, int complete)
{
    cl_table_t t;
    memset(&t, 0, sizeof t);
    int n = 1;
    for (int i = 0; i < c->npeers; i++)
        n += alive_member(&c->peers[i]);
    t.nodes = calloc((size_t)n, sizeof *t.nodes);
    t.acked = calloc((size_t)n, 1);
    if (!t.nodes || !t.acked) {
        free(t.nodes);
        free(t.acked);
        EPD_ERROR(SUB, "out of memory building a rank table");
        return;
    }
    /* Members ordered by node id; rank = node_index * ranks_per_node + local. */
    int k = 0, last = -1;
    for (;;) {
        int best = -1;
        if (c->cfg.node_id > last) best = c->cfg.node_id;
        for (int i = 0; i < c->npeers; i++) {
            cl_peer_t *p = &c->peers[i];
            if (alive_member(p) && p->id > last && (best < 0 || p->id < best)) best = p->id;
        }
        if (best < 0) break;
        cl_nodeinfo_t *ni = &t.nodes[k];
        if (best == c->cfg.node_id) {
            self_info(c, ni);
        } else {
            cl_peer_t *p = cl_peer_by_id(c, best);
            *ni = p->info;
            ni->endpoint = NULL;
            if (p->info.endpoint_len && (ni->endpoint = malloc(p->info.endpoint_len)))
                memcpy(ni->endpoint, p->info.endpoint, p->info.endpoint_len);
            else
                ni->endpoint_len = 0;
        }
        ni->first_rank = (uint32_t)t.nranks;
        t.nranks += (int)ni->ranks;
        k++;
        last = best;
    }
    t.nnodes = k;
    t.valid = 1;
    t.coord = c->cfg.node_id;
    t.complete = complete;
    uint64_t e = c->max_epoch > c->table.epoch ? c->max_epoch : c->table.epoch;
    t.epoch = e + 1;

    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_RANK_TABLE);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, t.epoch);
    epd_ctl_put_u32(&b, EPD_CTL_T_COORD, (uint32_t)t.coord);
    epd_ctl_put_u8(&b, EPD_CTL_T_COMPLETE, (uint8_t)complete);
    epd_ctl_put_u32(&b, EPD_CTL_T_NRANKS, (uint32_t)t.nranks);
    for (int i = 0; i < t.nnodes; i++)
        put_node(&b, &t.nodes[i]);
    if (epd_ctl_frame_end(&b) < 0) {
        EPD_ERROR(SUB, "rank table of %d nodes does not fit in a control frame", t.nnodes);
        epd_ctl_buf_fini(&b);
        cl_table_clear(&t);
        return;
    }
    adopt_table(c, &t);
    for (int i = 0; i < c->table.nnodes; i++) {
        if (c->table.nodes[i].id == c->cfg.node_id)
            c->table.acked[i] = 1;
        else
            cl_send_node(c, c->table.nodes[i].id, &b);
    }
    epd_ctl_buf_fini(&b);
}

static void maybe_commit(epd_cluster_t *c)
{
    if (!c->table.valid || c->table.coord != c->cfg.node_id || !c->table.complete || c->formed)
        return;
    for (int i = 0; i < c->table.nnodes; i++)
        if (!c->table.acked[i]) return;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_COMMIT);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.epoch);
    if (epd_ctl_frame_end(&b) == 0)
        for (int i = 0; i < c->table.nnodes; i++)
            if (c->table.nodes[i].id != c->cfg.node_id) cl_send_node(c, c->table.nodes[i].id, &b);
    epd_ctl_buf_fini(&b);
    set_formed(c);
}

static void coordinate(epd_cluster_t *c)
{
    int alive = 1, members_same = 1, member_gone = 0;
    for (int i = 0; i < c->npeers; i++) {
        cl_peer_t *p = &c->peers[i];
        int a = alive_member(p);
        alive += a;
        int t = cl_in_table(c, p->id);
        if (a != t) members_same = 0;
        if (t && !a) member_gone = 1;
    }
    int complete = alive == c->npeers + 1;
    if (c->table.valid && !cl_in_table(c, c->cfg.node_id)) members_same = 0;
    int mine = c->table.valid && c->table.coord == c->cfg.node_id;
    if (!c->table.valid || !mine) c->retable = 0; /* a fresh table is coming anyway */
    if (mine && members_same && !c->retable) {
        maybe_commit(c);
        return;
    }
    /* A complete membership always gets a table; an incomplete one only replaces a table whose
     * member died (so its ranks stop being used), never waits on a table of its own. */
    if (complete || (c->table.valid && (member_gone || c->retable))) {
        c->retable = 0;
        broadcast_table(c, complete);
    }
    maybe_commit(c);
}

void cl_on_rank_table(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    cl_table_t t;
    uint64_t epoch;
    uint32_t coord, nranks;
    uint8_t complete;
    memset(&t, 0, sizeof t);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_COORD, &coord);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_COMPLETE, &complete);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_NRANKS, &nranks);
    if ((int)coord != cn->peer->id) {
        char why[128];
        snprintf(why, sizeof why, "RANK_TABLE from node %d names coordinator %u", cn->peer->id,
                 coord);
        cl_reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    if (epoch < c->table.epoch ||
        (epoch == c->table.epoch && c->table.valid && (int)coord >= c->table.coord)) {
        EPD_DEBUG(SUB, "ignoring stale rank table epoch %" PRIu64 " from node %u", epoch, coord);
        return;
    }
    int n = 0;
    epd_ctl_iter_t it;
    uint16_t tag;
    const uint8_t *v;
    uint32_t vl;
    epd_ctl_iter_init(&it, m->payload, m->len);
    while (epd_ctl_iter_next(&it, &tag, &v, &vl))
        n += tag == EPD_CTL_T_NODE;
    if (n == 0 || n > c->npeers + 1) {
        char why[128];
        snprintf(why, sizeof why, "RANK_TABLE epoch %" PRIu64 " lists %d nodes (cluster has %d)",
                 epoch, n, c->npeers + 1);
        cl_reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    t.nodes = calloc((size_t)n, sizeof *t.nodes);
    t.acked = calloc((size_t)n, 1);
    if (!t.nodes || !t.acked) {
        free(t.nodes);
        free(t.acked);
        return;
    }
    epd_ctl_iter_init(&it, m->payload, m->len);
    uint32_t expect_rank = 0;
    const char *bad = NULL;
    int last_id = -1;
    while (epd_ctl_iter_next(&it, &tag, &v, &vl)) {
        if (tag != EPD_CTL_T_NODE) continue;
        cl_nodeinfo_t *ni = &t.nodes[t.nnodes++];
        cl_parse_nodeinfo(v, vl, ni);
        if (ni->id <= last_id)
            bad = "nodes not ordered by id";
        else if (ni->id != c->cfg.node_id && !cl_peer_by_id(c, ni->id))
            bad = "unknown node id";
        else if (ni->first_rank != expect_rank)
            bad = "ranks not contiguous";
        last_id = ni->id;
        expect_rank += ni->ranks;
    }
    if (!bad && expect_rank != nranks) bad = "rank count does not match its nodes";
    if (bad) {
        char why[160];
        snprintf(why, sizeof why, "RANK_TABLE epoch %" PRIu64 " from node %u: %s", epoch, coord,
                 bad);
        cl_table_clear(&t);
        cl_reject_conn(cn, EPD_CTL_REJECT_MALFORMED, why);
        return;
    }
    t.valid = 1;
    t.epoch = epoch;
    t.coord = (int)coord;
    t.complete = complete != 0;
    t.nranks = (int)nranks;
    adopt_table(c, &t);
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_TABLE_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, epoch);
    if (epd_ctl_frame_end(&b) == 0) cl_conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
    cl_evaluate(c);
}

void cl_on_table_ack(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    uint64_t epoch;
    int idx;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    if (!c->table.valid || c->table.coord != c->cfg.node_id || epoch != c->table.epoch) return;
    if (!cl_table_node(c, cn->peer->id, &idx)) return;
    c->table.acked[idx] = 1;
    maybe_commit(c);
    cl_evaluate(c);
}

void cl_on_commit(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    uint64_t epoch;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    if (!c->table.valid || epoch != c->table.epoch || c->table.coord != cn->peer->id ||
        !c->table.complete)
        return;
    set_formed(c);
    cl_evaluate(c);
}

/* ---- readiness ---- */

void cl_update_readiness(epd_cluster_t *c)
{
    char why[512] = "";
    size_t n = 0;
    int ready = 0;
    if (c->stopping) {
        snprintf(why, sizeof why, "node is stopping");
    } else {
        for (int i = 0; i < c->npeers && !why[0]; i++) {
            cl_peer_t *p = &c->peers[i];
            if (p->refused_us)
                snprintf(why, sizeof why, "refused by node %d: %.400s", p->id, p->refused_why);
        }
        if (!why[0]) {
            /* "waiting for peers" while none has failed yet (bring-up), else "peers not up" */
            int failed = 0;
            for (int i = 0; i < c->npeers; i++)
                failed |= c->peers[i].state != EPD_PEER_UP && c->peers[i].state != EPD_PEER_UNKNOWN;
            for (int i = 0; i < c->npeers; i++) {
                cl_peer_t *p = &c->peers[i];
                if (p->state == EPD_PEER_UP) continue;
                if (n == 0)
                    n += (size_t)snprintf(why, sizeof why, "%s",
                                          failed ? "peers not up:" : "waiting for peers:");
                if (p->state == EPD_PEER_UNKNOWN && n < sizeof why) {
                    n += (size_t)snprintf(why + n, sizeof why - n,
                                          " node %d (%.60s:%d) not reached yet;", p->id,
                                          p->addr.host, p->addr.port);
                    continue;
                }
                if (n < sizeof why)
                    n += (size_t)snprintf(why + n, sizeof why - n, " node %d %s%s%.100s%s;", p->id,
                                          epd_peer_state_name(p->state), p->reason[0] ? " (" : "",
                                          p->reason, p->reason[0] ? ")" : "");
            }
        }
        if (!why[0]) {
            if (!c->table.valid)
                snprintf(why, sizeof why, "waiting for the rank table from coordinator %d",
                         c->coordinator);
            else if (!cl_in_table(c, c->cfg.node_id))
                snprintf(why, sizeof why, "not in rank table epoch %" PRIu64, c->table.epoch);
            else if (!c->table.complete)
                snprintf(why, sizeof why, "rank table epoch %" PRIu64 " is incomplete",
                         c->table.epoch);
            else if (!c->formed)
                snprintf(why, sizeof why,
                         "rank table epoch %" PRIu64 " not yet acknowledged by every node",
                         c->table.epoch);
            else
                ready = 1;
        }
    }
    if (n > 0 && why[strlen(why) - 1] == ';') why[strlen(why) - 1] = 0;
    if (ready == c->ready && strcmp(why, c->ready_reason) == 0) return;
    c->ready = ready;
    snprintf(c->ready_reason, sizeof c->ready_reason, "%s", why);
    if (ready)
        EPD_INFO(SUB, "cluster ready at epoch %" PRIu64, c->table.epoch);
    else
        EPD_INFO(SUB, "cluster not ready: %s", why);
    if (c->opts.on_ready) c->opts.on_ready(c->opts.cb_ctx, ready, why);
}

static void evaluate_once(epd_cluster_t *c)
{
    int coord = c->cfg.node_id;
    for (int i = 0; i < c->npeers; i++)
        if (alive_member(&c->peers[i]) && c->peers[i].id < coord) coord = c->peers[i].id;
    c->coordinator = coord;
    if (coord == c->cfg.node_id) coordinate(c);
    cl_update_readiness(c);
}

/* Runs after every membership event. Sending may close a link, which re-enters here; such
 * nested calls only ask the outer one to run again. */
void cl_evaluate(epd_cluster_t *c)
{
    if (c->stopping || !c->started) {
        if (c->stopping) cl_update_readiness(c);
        return;
    }
    if (c->evaluating) {
        c->reevaluate = 1;
        return;
    }
    c->evaluating = 1;
    int rounds = 0;
    do {
        c->reevaluate = 0;
        evaluate_once(c);
    } while (c->reevaluate && ++rounds < 8);
    c->evaluating = 0;
}
