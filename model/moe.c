/* The expert-parallel MoE block: route on this rank, then exchange the tokens through one of
 * libep's two paths, chosen for the whole group per step (epd_model_forward_step):
 *  - LL (decode-sized steps): ep_ll_dispatch sends each token's activations (bf16) to the
 *    ranks of its experts, one row per (token, expert); the local experts run on their rows;
 *    ep_ll_combine brings each expert output back as bf16 and sums them, weighted, in top-k
 *    slot order.
 *  - HT (prefill-sized steps): ep_ht_dispatch sends each token once to every rank that holds
 *    one of its experts, with its top-k ids rewritten to local ids (-1 elsewhere) and its
 *    weights; the receiving rank runs each of its local experts of the token, multiplies by the
 *    weight and sums in top-k slot order (fp32); that per-rank partial goes back as bf16 and
 *    ep_ht_combine sums the partials of the token's ranks (fp32, rank order) on the source.
 *
 * Precision: routing is fp32 on the token's own rank; activations travel as bf16. LL rounds
 * every expert output to bf16 and the weighted sum once more; HT rounds each rank's partial sum
 * to bf16 and the sum of the partials once more. Either way a relative ~2^-9 at each MoE input
 * and output that the fp32 reference does not have. With one rank HT rounds once less than LL;
 * with several, how the experts are grouped into ranks decides what is rounded, so HT results
 * depend on the rank count (not on threads vs processes, nor on the rest of the batch). */
#include "model_internal.h"
#include "ops.h"

#include <errno.h>
#include <string.h>

/* Every failure of libep's exchange (a timeout, a peer gone, an abort, rows it should not have
 * delivered) is EPD_EEXCHANGE: the group must be re-formed before the next step. */
static int ep_fail(epd_cpu_model_t *m, const char *op, ep_status_t st, int layer, epd_err_t *err)
{
    int peer = ep_group_failed_peer(m->group);
    return epd_err_set(err, EPD_EEXCHANGE, "layer %d: %s on rank %d failed: %s (%s%s%d)", layer, op,
                       m->rank, ep_strerror(st), ep_group_last_error(m->group),
                       peer >= 0 ? "; peer rank " : "", peer);
}

/* One expert (local slot l) on one fp32 row: m->row_out[H]. */
static void run_expert(epd_cpu_model_t *m, const epd_layer_w_t *w, int l, const float *x)
{
    const int H = m->cfg.hidden_size, I = m->cfg.moe_intermediate_size;
    epd_swiglu(m->row_out, x, w->gate + (size_t)l * I * H, w->up + (size_t)l * I * H,
               w->down + (size_t)l * H * I, 1, H, I, m->ffn_tmp);
}

static int moe_ll(epd_cpu_model_t *m, int layer, int rows, epd_err_t *err)
{
    const epd_layer_w_t *w = &m->layers[layer];
    const int H = m->cfg.hidden_size;
    const int S = m->ll_tokens * m->nranks;
    ep_ll_dispatch_args_t da = {
        .x = m->xb,
        .num_tokens = rows,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
    };
    ep_ll_dispatch_out_t dout;
    ep_ll_handle_t *handle = NULL;
    ep_status_t st = ep_ll_dispatch(m->group, &da, &dout, &handle, NULL);
    if (st != EP_OK) return ep_fail(m, "ep_ll_dispatch", st, layer, err);

    /* local experts on their received rows: recv_x and expert_y are [L][S][H] bf16 */
    const uint16_t *recv = dout.recv_x;
    for (int l = 0; l < m->local; l++) {
        int n = dout.recv_count[l];
        if (n < 0 || n > S)
            return epd_err_set(err, EPD_EEXCHANGE,
                               "layer %d: libep reported %d rows for local expert %d "
                               "(at most %d)",
                               layer, n, l, S);
        for (int r = 0; r < n; r++) {
            const uint16_t *xr = recv + ((size_t)l * S + r) * H;
            uint16_t *yr = m->expert_y + ((size_t)l * S + r) * H;
            for (int i = 0; i < H; i++)
                m->row_in[i] = epd_bf16_to_f32(xr[i]);
            run_expert(m, w, l, m->row_in);
            for (int i = 0; i < H; i++)
                yr[i] = epd_f32_to_bf16(m->row_out[i]);
        }
    }

    ep_ll_combine_args_t ca = {
        .handle = handle,
        .expert_y = m->expert_y,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
        .out = m->comb,
    };
    st = ep_ll_combine(m->group, &ca, NULL);
    if (st != EP_OK) return ep_fail(m, "ep_ll_combine", st, layer, err);
    return 0;
}

static int moe_ht(epd_cpu_model_t *m, int layer, int rows, epd_err_t *err)
{
    const epd_layer_w_t *w = &m->layers[layer];
    const int H = m->cfg.hidden_size, K = m->cfg.num_experts_per_tok;
    ep_ht_dispatch_args_t da = {
        .x = m->xb,
        .num_tokens = rows,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
    };
    /* received rows: ht_x [N][H] bf16, ht_idx / ht_w [N][k], ht_y [N][H] bf16 partial sums */
    ep_ht_dispatch_out_t o = {
        .capacity = m->ht_cap,
        .recv_x = m->ht_x,
        .recv_topk_idx = m->ht_idx,
        .recv_topk_weights = m->ht_w,
        .num_recv_per_expert = m->ht_per_expert,
    };
    ep_ht_handle_t *h = NULL;
    ep_status_t st = ep_ht_dispatch(m->group, &da, &o, &h);
    if (st != EP_OK) return ep_fail(m, "ep_ht_dispatch", st, layer, err);
    int rc = 0;
    if (o.num_recv_tokens < 0 || o.num_recv_tokens > m->ht_cap) {
        rc = epd_err_set(err, EPD_EEXCHANGE,
                         "layer %d: libep reported %d received rows (at most %d)", layer,
                         o.num_recv_tokens, m->ht_cap);
        goto out;
    }
    for (int n = 0; n < o.num_recv_tokens; n++) {
        const uint16_t *xr = m->ht_x + (size_t)n * H;
        for (int i = 0; i < H; i++) {
            m->row_in[i] = epd_bf16_to_f32(xr[i]);
            m->row_acc[i] = 0.0f;
        }
        for (int j = 0; j < K; j++) {
            int32_t l = m->ht_idx[(size_t)n * K + j];
            if (l < 0) continue;
            if (l >= m->local) { /* the combine still runs, so that the peers' step ends */
                if (!rc)
                    rc = epd_err_set(err, EPD_EEXCHANGE,
                                     "layer %d: libep delivered row %d for local expert %d "
                                     "(this rank has %d)",
                                     layer, n, l, m->local);
                continue;
            }
            float wj = m->ht_w[(size_t)n * K + j];
            run_expert(m, w, l, m->row_in);
            for (int i = 0; i < H; i++)
                m->row_acc[i] += wj * m->row_out[i];
        }
        uint16_t *yr = m->ht_y + (size_t)n * H;
        for (int i = 0; i < H; i++)
            yr[i] = epd_f32_to_bf16(m->row_acc[i]);
    }
    st = ep_ht_combine(m->group, h, m->ht_y, m->comb, NULL);
    if (st != EP_OK && !rc) rc = ep_fail(m, "ep_ht_combine", st, layer, err);
out:
    ep_ht_handle_destroy(h);
    return rc;
}

ep_route_params_t epd_moe_route_params(const epd_hf_config_t *c, const float *bias)
{
    static const ep_route_kind_t kind[] = {
        [EPD_ROUTER_SOFTMAX] = EP_ROUTE_SOFTMAX_TOPK,
        [EPD_ROUTER_SOFTMAX_GROUP] = EP_ROUTE_SOFTMAX_GROUP,
        [EPD_ROUTER_SIGMOID_GROUP] = EP_ROUTE_SIGMOID_GROUP,
    };
    return (ep_route_params_t){
        .kind = kind[c->router],
        .num_experts = c->num_experts,
        .topk = c->num_experts_per_tok,
        .renormalize = c->norm_topk_prob,
        .routed_scaling_factor = (float)c->routed_scaling_factor,
        .num_groups = c->n_group,
        .topk_groups = c->topk_group,
        .bias = bias,
    };
}

int epd_moe_forward(epd_cpu_model_t *m, int layer, int rows, int ht, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    const epd_layer_w_t *w = &m->layers[layer];
    const int H = c->hidden_size, E = c->num_experts, K = c->num_experts_per_tok;

    /* router: fp32 logits [T][E] -> top-k over global experts -> libep slot ids */
    epd_linear(m->router_logits, m->xn, w->router, rows, H, E);
    ep_route_params_t rp = epd_moe_route_params(c, w->router_bias);
    ep_status_t st = ep_route_host(&rp, m->router_logits, rows, m->topk_idx, m->topk_w);
    if (st != EP_OK)
        return epd_err_set(err, -EINVAL, "layer %d: ep_route_host: %s", layer,
                           ep_group_last_error(NULL));
    for (int i = 0; i < rows * K; i++) {
        m->expert_tokens[m->topk_idx[i]]++;
        m->topk_idx[i] = m->placement->slot_of[m->topk_idx[i]];
    }
    for (size_t i = 0; i < (size_t)rows * H; i++)
        m->xb[i] = epd_f32_to_bf16(m->xn[i]);

    int rc = ht ? moe_ht(m, layer, rows, err) : moe_ll(m, layer, rows, err);
    if (rc) return rc;
    for (size_t i = 0; i < (size_t)rows * H; i++)
        m->h[i] += epd_bf16_to_f32(m->comb[i]);
    return 0;
}
