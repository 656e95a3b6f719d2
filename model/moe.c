/* The expert-parallel MoE block: route on this rank, send each token's activations (bf16) to
 * the ranks of its experts with ep_ll_dispatch, run the local experts on the received rows,
 * and bring the weighted sum back with ep_ll_combine.
 *
 * Precision: routing is fp32 on the token's own rank; the activations travel as bf16, expert
 * outputs go back as bf16 and the combined sum arrives as bf16 (libep's LL contract), so the
 * block's output carries bf16 rounding (relative ~2^-9) that the fp32 reference does not. */
#include "model_internal.h"
#include "ops.h"

#include <errno.h>

static int ep_fail(epd_model_t *m, const char *op, ep_status_t st, int layer, epd_err_t *err)
{
    int peer = ep_group_failed_peer(m->group);
    return epd_err_set(err, st == EP_ERR_TIMEOUT ? -ETIMEDOUT : -EIO,
                       "layer %d: %s on rank %d failed: %s (%s%s%d)", layer, op, m->rank,
                       ep_strerror(st), ep_group_last_error(m->group),
                       peer >= 0 ? "; peer rank " : "", peer);
}

int epd_moe_forward(epd_model_t *m, int layer, int rows, epd_err_t *err)
{
    const epd_hf_config_t *c = &m->cfg;
    const epd_layer_w_t *w = &m->layers[layer];
    const int H = c->hidden_size, E = c->num_experts, K = c->num_experts_per_tok;
    const int I = c->moe_intermediate_size;
    const int S = m->max_tokens * m->nranks;

    /* router: fp32 logits [T][E] -> top-k over global experts -> libep slot ids */
    epd_linear(m->router_logits, m->xn, w->router, rows, H, E);
    ep_route_params_t rp = {
        .kind = EP_ROUTE_SOFTMAX_TOPK,
        .num_experts = E,
        .topk = K,
        .renormalize = c->norm_topk_prob,
        .routed_scaling_factor = 1.0f,
    };
    ep_status_t st = ep_route_host(&rp, m->router_logits, rows, m->topk_idx, m->topk_w);
    if (st != EP_OK)
        return epd_err_set(err, -EINVAL, "layer %d: ep_route_host: %s", layer,
                           ep_group_last_error(NULL));
    for (int i = 0; i < rows * K; i++) {
        m->expert_tokens[m->topk_idx[i]]++;
        m->topk_idx[i] = m->placement.slot_of[m->topk_idx[i]];
    }
    for (size_t i = 0; i < (size_t)rows * H; i++)
        m->xb[i] = epd_f32_to_bf16(m->xn[i]);

    ep_ll_dispatch_args_t da = {
        .x = m->xb,
        .num_tokens = rows,
        .topk_idx = m->topk_idx,
        .topk_weights = m->topk_w,
    };
    ep_ll_dispatch_out_t dout;
    ep_ll_handle_t *handle = NULL;
    st = ep_ll_dispatch(m->group, &da, &dout, &handle, NULL);
    if (st != EP_OK) return ep_fail(m, "ep_ll_dispatch", st, layer, err);

    /* local experts on their received rows: recv_x and expert_y are [L][S][H] bf16 */
    const uint16_t *recv = dout.recv_x;
    for (int l = 0; l < m->local; l++) {
        int n = dout.recv_count[l];
        if (n < 0 || n > S)
            return epd_err_set(err, -EIO,
                               "layer %d: libep reported %d rows for local expert %d "
                               "(at most %d)",
                               layer, n, l, S);
        const float *gate = w->gate + (size_t)l * I * H, *up = w->up + (size_t)l * I * H;
        const float *down = w->down + (size_t)l * H * I;
        for (int r = 0; r < n; r++) {
            const uint16_t *xr = recv + ((size_t)l * S + r) * H;
            uint16_t *yr = m->expert_y + ((size_t)l * S + r) * H;
            for (int i = 0; i < H; i++)
                m->row_in[i] = epd_bf16_to_f32(xr[i]);
            epd_swiglu(m->row_out, m->row_in, gate, up, down, 1, H, I, m->ffn_tmp);
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
    for (size_t i = 0; i < (size_t)rows * H; i++)
        m->h[i] += epd_bf16_to_f32(m->comb[i]);
    return 0;
}
