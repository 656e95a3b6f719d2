"""DeepSeek-V2 / V3 forward pass in fp32 torch: the test reference for epd's C model, written
from transformers' DeepseekV2/V3 modelling code (read, not imported) and DeepSeek's papers.
Independent of epd's C code: the attention is computed in the expanded form (keys and values per
head from kv_b_proj), where epd caches the latent and absorbs kv_b_proj into the query and the
output.

    m = Model(config_dict, {name: fp32 tensor})
    m.last_logits(token_ids) -> [vocab] logits at the last position (a full recompute)
"""
import math

import torch


def _q_lora(cfg):
    return cfg.get("q_lora_rank") or 0


def tensor_shapes(cfg):
    """(name, shape) of every tensor of the checkpoint, in a fixed order."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kvl, ql = cfg["kv_lora_rank"], _q_lora(cfg)
    E, I, Id = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    Is = I * cfg["n_shared_experts"]
    v3 = cfg["model_type"] == "deepseek_v3"
    out = [("model.embed_tokens.weight", (V, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
        a = p + "self_attn."
        if ql:
            out += [(a + "q_a_proj.weight", (ql, H)), (a + "q_a_layernorm.weight", (ql,)),
                    (a + "q_b_proj.weight", (nh * (nope + rope), ql))]
        else:
            out += [(a + "q_proj.weight", (nh * (nope + rope), H))]
        out += [(a + "kv_a_proj_with_mqa.weight", (kvl + rope, H)), (a + "kv_a_layernorm.weight", (kvl,)),
                (a + "kv_b_proj.weight", (nh * (nope + vd), kvl)), (a + "o_proj.weight", (H, nh * vd))]
        m = p + "mlp."
        if l < cfg["first_k_dense_replace"]:
            out += [(m + "gate_proj.weight", (Id, H)), (m + "up_proj.weight", (Id, H)),
                    (m + "down_proj.weight", (H, Id))]
            continue
        out += [(m + "gate.weight", (E, H))]
        if v3:
            out += [(m + "gate.e_score_correction_bias", (E,))]
        for e in range(E):
            x = m + "experts.%d." % e
            out += [(x + "gate_proj.weight", (I, H)), (x + "up_proj.weight", (I, H)), (x + "down_proj.weight", (H, I))]
        s = m + "shared_experts."
        out += [(s + "gate_proj.weight", (Is, H)), (s + "up_proj.weight", (Is, H)), (s + "down_proj.weight", (H, Is))]
    return out


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_params(cfg):
    """inv_freq [rope/2] and the factor on cos/sin: plain RoPE, or YaRN (transformers'
    _compute_yarn_parameters)."""
    rs = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    base = rs.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg["qk_rope_head_dim"]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rs.get("rope_type", rs.get("type", "default")) != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    ms, msa = rs.get("mscale"), rs.get("mscale_all_dim")
    af = rs.get("attention_factor")
    if af is None:
        af = yarn_mscale(factor, ms) / yarn_mscale(factor, msa) if ms and msa else yarn_mscale(factor, 1.0)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = math.floor(corr_dim(beta_fast)), math.ceil(corr_dim(beta_slow))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, af


def softmax_scale(cfg):
    s = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type", "default")) == "yarn" and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        s = s * m * m
    return s


def rotate(x, pos, inv, af, interleave):
    """x [T, heads, d]: pairs (2i, 2i+1) when interleaved (DeepSeek's layout), else (i, i+d/2)."""
    ang = pos[:, None].to(torch.float32) * inv[None, :]  # [T, d/2]
    c, s = (torch.cos(ang) * af)[:, None, :], (torch.sin(ang) * af)[:, None, :]
    d = x.shape[-1]
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
    ra, rb = a * c - b * s, b * c + a * s
    if interleave:
        return torch.stack((ra, rb), dim=-1).reshape(x.shape)
    return torch.cat((ra, rb), dim=-1)


def route(cfg, logits, bias):
    """[T, E] router logits -> (indices [T, k], weights [T, k])."""
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    v3 = cfg["model_type"] == "deepseek_v3"
    method = cfg.get("topk_method", "noaux_tc" if v3 else "greedy")
    scale = cfg.get("routed_scaling_factor", 2.5 if v3 else 1.0)
    norm = cfg.get("norm_topk_prob", v3)
    if v3:
        val = torch.sigmoid(logits)
        sel = val + bias
        G = cfg["n_group"]
        gscore = sel.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
    else:
        val = torch.softmax(logits, dim=-1)
        sel = val
        if method == "group_limited_greedy":
            G = cfg["n_group"]
            gscore = sel.view(-1, G, E // G).max(dim=-1).values
        else:
            G = 0
    # margins in the units a perturbation moves: sigmoid scores (V3), log-probabilities (V2)
    unit = (lambda x: x) if v3 else torch.log
    margin = float("inf")
    if G:
        gs = unit(torch.sort(gscore, dim=-1, descending=True).values)
        if cfg["topk_group"] < G:
            margin = float((gs[:, cfg["topk_group"] - 1] - gs[:, cfg["topk_group"]]).min())
        keep = torch.topk(gscore, cfg["topk_group"], dim=-1).indices
        gmask = torch.zeros_like(gscore).scatter_(1, keep, 1.0)
        mask = gmask[:, :, None].expand(-1, G, E // G).reshape(-1, E)
        sel = sel.masked_fill(mask == 0, float("-inf"))
    srt = unit(torch.sort(sel, dim=-1, descending=True).values)
    if k < E:
        nxt = srt[:, k]
        gap = torch.where(torch.isinf(nxt), torch.full_like(nxt, float("inf")), srt[:, k - 1] - nxt)
        margin = min(margin, float(gap.min()))
    route.min_margin = min(route.min_margin, margin)
    idx = torch.topk(sel, k, dim=-1).indices
    w = val.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if v3 else 0.0))
    return idx, w * scale


# the smallest gap between the last expert (or group) chosen and the next one, over the calls
# since it was reset: how close the routing is to changing its choice
route.min_margin = float("inf")


class Model:
    def __init__(self, cfg, weights):
        self.cfg, self.w = cfg, weights
        self.inv, self.af = rope_params(cfg)
        self.scale = softmax_scale(cfg)
        self.interleave = cfg.get("rope_interleave", True) or cfg["model_type"] == "deepseek_v2"

    def attention(self, l, x, pos):
        c, w = self.cfg, self.w
        a = "model.layers.%d.self_attn." % l
        T, nh = x.shape[0], c["num_attention_heads"]
        nope, rope, vd, kvl = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        if _q_lora(c):
            q = rmsnorm(x @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], 1e-6) @ w[a + "q_b_proj.weight"].T
        else:
            q = x @ w[a + "q_proj.weight"].T
        q = q.view(T, nh, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = x @ w[a + "kv_a_proj_with_mqa.weight"].T
        lat, k_pe = ckv[:, :kvl], ckv[:, kvl:]
        kv = (rmsnorm(lat, w[a + "kv_a_layernorm.weight"], 1e-6) @ w[a + "kv_b_proj.weight"].T).view(T, nh, nope + vd)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q_pe = rotate(q_pe, pos, self.inv, self.af, self.interleave)
        k_pe = rotate(k_pe[:, None, :], pos, self.inv, self.af, self.interleave)  # [T, 1, rope]
        scores = (torch.einsum("thd,shd->hts", q_nope, k_nope) +
                  torch.einsum("thd,sd->hts", q_pe, k_pe[:, 0])) * self.scale
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        o = torch.einsum("hts,shd->thd", p, v).reshape(T, nh * vd)
        return o @ w[a + "o_proj.weight"].T

    def mlp(self, l, x):
        c, w = self.cfg, self.w
        m = "model.layers.%d.mlp." % l
        if l < c["first_k_dense_replace"]:
            return swiglu(x, w[m + "gate_proj.weight"], w[m + "up_proj.weight"], w[m + "down_proj.weight"])
        bias = w.get(m + "gate.e_score_correction_bias")
        idx, wt = route(c, x @ w[m + "gate.weight"].T, bias)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = "%sexperts.%d." % (m, int(idx[t, j]))
                out[t] += wt[t, j] * swiglu(x[t:t + 1], w[e + "gate_proj.weight"], w[e + "up_proj.weight"],
                                            w[e + "down_proj.weight"])[0]
        s = m + "shared_experts."
        return out + swiglu(x, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"])

    def last_logits(self, ids):
        c, w = self.cfg, self.w
        eps = c.get("rms_norm_eps", 1e-6)
        h = w["model.embed_tokens.weight"][torch.tensor(ids)]
        pos = torch.arange(len(ids))
        for l in range(c["num_hidden_layers"]):
            p = "model.layers.%d." % l
            h = h + self.attention(l, rmsnorm(h, w[p + "input_layernorm.weight"], eps), pos)
            h = h + self.mlp(l, rmsnorm(h, w[p + "post_attention_layernorm.weight"], eps))
        return rmsnorm(h[-1], w["model.norm.weight"], eps) @ w["lm_head.weight"].T
