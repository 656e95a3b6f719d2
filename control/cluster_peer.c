/* Cluster peers: what this node knows about each configured peer and how it changes. HELLO
 * (announce this node; check a peer's config fingerprint and ranks, refuse it when they differ,
 * recognise a restart by its incarnation), the peer state (unknown, up, suspect, down, refused)
 * and what going down aborts, heartbeats with their RTT, and the tick that applies the health
 * rule of cluster.h (silence -> suspect -> down) and the handshake deadlines. */
#include "cluster_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "log.h"

#define SUB "cluster"

/* ---- peer state ---- */

void cl_peer_metric(epd_cluster_t *c, cl_peer_t *p)
{
    if (p->m_state) epd_metric_set(p->m_state, (double)p->state);
}

void cl_set_peer_state(epd_cluster_t *c, cl_peer_t *p, epd_peer_state_t s, const char *reason)
{
    if (p->state == s) return;
    epd_peer_state_t old = p->state;
    p->state = s;
    snprintf(p->reason, sizeof p->reason, "%s", reason ? reason : "");
    cl_peer_metric(c, p);
    if (s == EPD_PEER_UP) {
        EPD_INFO(SUB, "peer %d (%s:%d) up", p->id, p->addr.host, p->addr.port);
        p->up_since_ms = cl_now_ms(c);
        p->reason[0] = 0;
        return;
    }
    EPD_WARN(SUB, "peer %d (%s:%d) %s -> %s: %s", p->id, p->addr.host, p->addr.port,
             epd_peer_state_name(old), epd_peer_state_name(s), p->reason);
    if (s == EPD_PEER_DOWN) {
        p->hello_ok = 0;
        if (p->conn) cl_conn_close(p->conn);
        if (cl_in_table(c, p->id) && c->boot) {
            char why[320];
            snprintf(why, sizeof why, "peer %d down: %s", p->id, p->reason);
            cl_boot_abort(c->boot, why);
        }
        if (c->opts.on_peer_down) c->opts.on_peer_down(c->opts.cb_ctx, p->id, p->reason);
    }
}

/* ---- HELLO ---- */

void cl_send_hello(cl_conn_t *cn)
{
    epd_cluster_t *c = cn->c;
    epd_ctl_buf_t b;
    char ctl[300];
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HELLO);
    epd_ctl_put_u32(&b, EPD_CTL_T_NODE_ID, (uint32_t)c->cfg.node_id);
    epd_ctl_put_str(&b, EPD_CTL_T_HOSTNAME, c->hostname);
    epd_ctl_put_str(&b, EPD_CTL_T_NAME, c->cfg.name);
    /* the epoch of the table we hold (a coordinator resyncs members that lag) */
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.valid ? c->table.epoch : 0);
    epd_ctl_put_u32(&b, EPD_CTL_T_RANKS, (uint32_t)c->opts.local_ranks);
    epd_ctl_put_u64(&b, EPD_CTL_T_INCARNATION, c->incarnation);
    epd_ctl_put_str(&b, EPD_CTL_T_BACKEND, c->backend);
    epd_ctl_put_u32(&b, EPD_CTL_T_CAPS, c->opts.transport_caps);
    epd_ctl_put_bytes(&b, EPD_CTL_T_FINGERPRINT, c->fingerprint, c->opts.fingerprint_len);
    if (c->opts.settings_len)
        epd_ctl_put_bytes(&b, EPD_CTL_T_SETTINGS, c->settings, c->opts.settings_len);
    if (c->opts.endpoint_len)
        epd_ctl_put_bytes(&b, EPD_CTL_T_ENDPOINT, c->endpoint, c->opts.endpoint_len);
    for (int i = 0; i < c->opts.num_gpus; i++) {
        size_t mk = epd_ctl_nest_begin(&b, EPD_CTL_T_GPU);
        epd_ctl_put_u32(&b, EPD_CTL_T_ORDINAL, (uint32_t)c->opts.gpus[i].ordinal);
        epd_ctl_put_str(&b, EPD_CTL_T_PCI, c->opts.gpus[i].pci_bus_id);
        epd_ctl_nest_end(&b, mk);
    }
    if (c->http_addr[0]) epd_ctl_put_str(&b, EPD_CTL_T_HTTP, c->http_addr);
    snprintf(ctl, sizeof ctl, "%s:%d", c->cfg.listen.host, c->port);
    epd_ctl_put_str(&b, EPD_CTL_T_CTL_ADDR, ctl);
    epd_ctl_put_u8(&b, EPD_CTL_T_STATE, (uint8_t)c->state);
    if (epd_ctl_frame_end(&b) == 0)
        cl_conn_send_buf(cn, &b);
    else
        EPD_ERROR(SUB, "HELLO does not fit in a control frame (endpoint or settings too large)");
    epd_ctl_buf_fini(&b);
}

static void refuse_peer(cl_conn_t *cn, const char *reason, const char *setting)
{
    epd_cluster_t *c = cn->c;
    cl_peer_t *p = cn->peer;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_REFUSE);
    epd_ctl_put_str(&b, EPD_CTL_T_REASON, reason);
    if (setting && *setting) epd_ctl_put_str(&b, EPD_CTL_T_SETTING, setting);
    if (epd_ctl_frame_end(&b) == 0) cl_conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
    /* A refused node keeps reconnecting: say it once per reason, not once per attempt. */
    if (p->state != EPD_PEER_REFUSED || strcmp(p->reason, reason) != 0)
        EPD_ERROR(SUB, "refusing node %d (%s): %s", p->id, cn->remote, reason);
    else
        EPD_DEBUG(SUB, "refusing node %d (%s) again: %s", p->id, cn->remote, reason);
    p->hello_ok = 0;
    cl_set_peer_state(c, p, EPD_PEER_REFUSED, reason);
    /* uv_close would drop the queued REFUSE: shut the write side down first (it completes once
     * the frame is handed to the kernel) and close from its callback. */
    cn->closing = 1;
    cl_conn_unlink(c, cn);
    if (p->conn == cn) p->conn = NULL;
    cn->sreq.data = cn;
    if (uv_shutdown(&cn->sreq, (uv_stream_t *)&cn->tcp, cl_on_shutdown) < 0)
        uv_close((uv_handle_t *)&cn->tcp, cl_on_conn_closed);
    if (cn->outbound) cl_schedule_retry(p, c);
    cl_evaluate(c);
}

void cl_on_hello(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    epd_cluster_t *c = cn->c;
    cl_peer_t *p = cn->peer;
    cl_nodeinfo_t n;
    char why[512], setting[256] = "";
    const uint8_t *fp, *settings = NULL;
    uint32_t fpl, sl = 0;
    uint64_t epoch = 0, incarnation = 0;
    uint8_t st = 0;

    cl_parse_nodeinfo(m->payload, m->len, &n);
    if (n.id != p->id) {
        snprintf(why, sizeof why, "HELLO names node %d on the link authenticated as node %d", n.id,
                 p->id);
        cl_nodeinfo_free(&n);
        cl_reject_conn(cn, EPD_CTL_REJECT_AUTH_FAILED, why);
        return;
    }
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_FINGERPRINT, &fp, &fpl);
    epd_ctl_get_bytes(m->payload, m->len, EPD_CTL_T_SETTINGS, &settings, &sl);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_STATE, &st);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_INCARNATION, &incarnation);
    cn->hello_rx = 1;

    if (fpl != c->opts.fingerprint_len || memcmp(fp, c->fingerprint, fpl) != 0) {
        char d[400] = "";
        int r = -1;
        if (c->opts.config_diff && settings)
            r = c->opts.config_diff(c->opts.cb_ctx, settings, sl, d, sizeof d);
        if (r == 1) {
            snprintf(setting, sizeof setting, "%.255s", d);
            snprintf(why, sizeof why, "config of node %d differs from node %d: %s", p->id,
                     c->cfg.node_id, d);
        } else if (r == -1 && d[0]) {
            snprintf(why, sizeof why, "config fingerprint of node %d differs; its settings: %s",
                     p->id, d);
        } else {
            snprintf(why, sizeof why, "config fingerprint of node %d differs from node %d's", p->id,
                     c->cfg.node_id);
        }
        cl_nodeinfo_free(&n);
        refuse_peer(cn, why, setting);
        return;
    }
    if ((int)n.ranks != c->opts.local_ranks) {
        snprintf(why, sizeof why, "node %d runs %u ranks, node %d runs %d: ranks per node differ",
                 p->id, n.ranks, c->cfg.node_id, c->opts.local_ranks);
        cl_nodeinfo_free(&n);
        refuse_peer(cn, why, "compute.ranks_per_node");
        return;
    }
    /* A new process behind a known node id (restarted before we marked it down) lost its EP
     * state: the engine aborts what it had in flight with it, and the cluster re-forms. A
     * member that merely reconnected but holds another epoch missed a table: resync it. */
    if (p->incarnation && incarnation != p->incarnation && p->hello_ok) {
        EPD_WARN(SUB, "peer %d restarted (new incarnation)", p->id);
        if (cl_in_table(c, p->id) && c->boot) cl_boot_abort(c->boot, "peer restarted");
        if (c->opts.on_peer_down) c->opts.on_peer_down(c->opts.cb_ctx, p->id, "restarted");
    }
    if (cl_in_table(c, p->id) &&
        ((p->incarnation && incarnation != p->incarnation) || epoch != c->table.epoch))
        c->retable = 1;
    p->incarnation = incarnation;
    cl_nodeinfo_free(&p->info);
    p->info = n;
    p->epoch_seen = epoch;
    p->node_state = st;
    if (epoch > c->max_epoch) c->max_epoch = epoch;
    p->hello_ok = 1;
    p->last_seen_ms = cl_now_ms(c);
    cl_set_peer_state(c, p, EPD_PEER_UP, NULL);
    cl_evaluate(c);
}

/* ---- heartbeats ---- */

static void send_heartbeat(cl_conn_t *cn)
{
    epd_cluster_t *c = cn->c;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HEARTBEAT);
    epd_ctl_put_u64(&b, EPD_CTL_T_SEQ, ++cn->peer->hb_seq);
    epd_ctl_put_u64(&b, EPD_CTL_T_TIME, uv_hrtime());
    epd_ctl_put_u8(&b, EPD_CTL_T_STATE, (uint8_t)c->state);
    epd_ctl_put_u32(&b, EPD_CTL_T_LOAD, c->load);
    epd_ctl_put_u64(&b, EPD_CTL_T_EPOCH, c->table.epoch);
    if (epd_ctl_frame_end(&b) == 0) cl_conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
}

void cl_on_heartbeat(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    cl_peer_t *p = cn->peer;
    uint64_t seq, t, epoch;
    uint8_t st;
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_SEQ, &seq);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_TIME, &t);
    epd_ctl_get_u8(m->payload, m->len, EPD_CTL_T_STATE, &st);
    epd_ctl_get_u32(m->payload, m->len, EPD_CTL_T_LOAD, &p->load);
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_EPOCH, &epoch);
    p->node_state = st;
    p->epoch_seen = epoch;
    p->last_hb_ms = cl_now_ms(cn->c);
    if (epoch > cn->c->max_epoch) cn->c->max_epoch = epoch;
    epd_ctl_buf_t b;
    epd_ctl_buf_init(&b);
    epd_ctl_frame_begin(&b, EPD_CTL_HEARTBEAT_ACK);
    epd_ctl_put_u64(&b, EPD_CTL_T_SEQ, seq);
    epd_ctl_put_u64(&b, EPD_CTL_T_TIME, t);
    if (epd_ctl_frame_end(&b) == 0) cl_conn_send_buf(cn, &b);
    epd_ctl_buf_fini(&b);
}

void cl_on_heartbeat_ack(cl_conn_t *cn, const epd_ctl_msg_t *m)
{
    cl_peer_t *p = cn->peer;
    uint64_t t, now = uv_hrtime();
    epd_ctl_get_u64(m->payload, m->len, EPD_CTL_T_TIME, &t);
    if (t > now) return; /* not our clock: ignore rather than record a negative RTT */
    p->rtt_s = (double)(now - t) / 1e9;
    if (p->m_rtt) epd_metric_observe(p->m_rtt, p->rtt_s);
}

/* ---- tick: heartbeats, health, handshake deadlines ---- */

void cl_on_tick(uv_timer_t *t)
{
    epd_cluster_t *c = t->data;
    uint64_t now = cl_now_ms(c);
    uint64_t to = (uint64_t)c->cfg.heartbeat_timeout_ms;
    for (int i = 0; i < c->npeers; i++) {
        cl_peer_t *p = &c->peers[i];
        if (p->conn && p->conn->authed && p->conn->hello_rx && !p->conn->closing)
            send_heartbeat(p->conn);
        if (p->state != EPD_PEER_UP && p->state != EPD_PEER_SUSPECT) continue;
        uint64_t silence = now - p->last_seen_ms;
        char why[128];
        if (silence >= 2 * to) {
            snprintf(why, sizeof why,
                     "no frame for %" PRIu64
                     " ms (down after 2 x timeouts.heartbeat_timeout_ms = %d ms)",
                     silence, 2 * c->cfg.heartbeat_timeout_ms);
            cl_set_peer_state(c, p, EPD_PEER_DOWN, why);
        } else if (silence >= to && p->state == EPD_PEER_UP) {
            snprintf(why, sizeof why,
                     "no frame for %" PRIu64 " ms (timeouts.heartbeat_timeout_ms %d)", silence,
                     c->cfg.heartbeat_timeout_ms);
            cl_set_peer_state(c, p, EPD_PEER_SUSPECT, why);
        }
    }
    int pending = 0;
    for (cl_conn_t *cn = c->conns, *next; cn; cn = next) {
        next = cn->next;
        if (cn->authed) continue;
        pending++;
        if (now - cn->started_ms >= (uint64_t)c->cfg.connect_timeout_ms) {
            EPD_DEBUG(SUB, "link %s: no handshake within %d ms; closing", cn->remote,
                      c->cfg.connect_timeout_ms);
            cl_conn_close(cn);
        }
    }
    cl_evaluate(c);
}
