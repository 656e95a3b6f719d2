"""What the oracle generators (make_oracle.py, make_qwen3vocab_oracle.py) share: the log, a
tiny Qwen3-MoE config on eager code paths, O(1) bf16-rounded random weights, the checkpoint's
canonical tensor names, greedy decoding with the KV cache and the bf16 simulation of epd's MoE
exchange. Imported from the generator's own folder; needs torch (and transformers for
qwen3_moe_config)."""
import math
import os
import re
import sys
import time

import torch

T0 = time.time()
LOG = []


def log(msg):
    line = "[%6.1fs] %s" % (time.time() - T0, msg)
    print(line, flush=True)
    LOG.append(line)


def qwen3_moe_config(sizes, tie, mlp_only=(), bos=None, eos=None):
    """A Qwen3MoeConfig of the generator's sizes (a dict holding VOCAB, HIDDEN, DENSE_INTER,
    MOE_INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MAX_POS, EPS, ROPE_THETA, EXPERTS, TOPK: its
    globals()), with rope_theta set whichever way this transformers version takes it, eager
    attention and per-expert loops (no grouped-matmul kernel that a CPU build may lack)."""
    from transformers import Qwen3MoeConfig

    theta = sizes["ROPE_THETA"]
    kw = dict(
        vocab_size=sizes["VOCAB"],
        hidden_size=sizes["HIDDEN"],
        intermediate_size=sizes["DENSE_INTER"],
        moe_intermediate_size=sizes["MOE_INTER"],
        num_hidden_layers=sizes["LAYERS"],
        num_attention_heads=sizes["HEADS"],
        num_key_value_heads=sizes["KV_HEADS"],
        head_dim=sizes["HEAD_DIM"],
        hidden_act="silu",
        max_position_embeddings=sizes["MAX_POS"],
        rms_norm_eps=sizes["EPS"],
        tie_word_embeddings=tie,
        attention_bias=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=list(mlp_only),
        num_experts=sizes["EXPERTS"],
        num_experts_per_tok=sizes["TOPK"],
        norm_topk_prob=True,
        output_router_logits=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    try:
        cfg = Qwen3MoeConfig(rope_theta=theta, **kw)
    except TypeError:
        cfg = Qwen3MoeConfig(rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)
    d = cfg.to_dict()
    got = d.get("rope_theta")
    if got is None and isinstance(d.get("rope_parameters"), dict):
        got = d["rope_parameters"].get("rope_theta")
    if got is None or abs(float(got) - theta) > 1e-3:
        log("rope_theta did not stick (%r); setting rope_parameters" % (got,))
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    cfg._attn_implementation = "eager"
    try:
        cfg._experts_implementation = "eager"
    except Exception as e:
        log("config._experts_implementation: %r" % (e,))
    return cfg


def force_eager(model):
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except Exception as e:  # older/newer API: the config flag still applies
            log("set_experts_implementation: %r" % (e,))
    return model


def init_params(model, seed, out_gain=1.0):
    """Random weights with O(1) activations (the default 0.02 init makes every logit nearly
    equal, which would hide layer bugs and make greedy decoding a coin toss), rounded to bf16.
    out_gain scales the blocks' output projections (o_proj, down_proj)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                v = 0.5 + torch.rand(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            elif name.endswith("mlp.gate.weight") or name.endswith("router.weight"):
                v = torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(p.shape[-1]))
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
                if out_gain != 1.0 and ("o_proj" in name or "down_proj" in name):
                    v = v * out_gain
            p.copy_(v.to(torch.bfloat16).to(torch.float32))


def moe_layers_of(model):
    return [i for i, l in enumerate(model.model.layers)
            if hasattr(l.mlp, "gate") and hasattr(l.mlp, "experts")]


def canonical_state_dict(model, cfg):
    """Checkpoint tensors under the names of the published Qwen3-MoE checkpoints
    (model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight), whatever layout this
    transformers version keeps in memory (per-expert modules or fused [E][..][..] tensors);
    a tied lm_head is left out."""
    out = {}
    I = cfg.moe_intermediate_size
    H = cfg.hidden_size
    for k, t in model.state_dict().items():
        t = t.detach().to(torch.float32).contiguous()
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if m:
            base, kind = m.group(1), m.group(2)
            for e in range(t.shape[0]):
                te = t[e]
                if kind == "gate_up_proj":
                    if tuple(te.shape) == (2 * I, H):
                        gate, up = te[:I], te[I:]
                    elif tuple(te.shape) == (H, 2 * I):
                        gate, up = te[:, :I].t(), te[:, I:].t()
                    else:
                        raise SystemExit("unexpected gate_up_proj shape %s" % (tuple(t.shape),))
                    out["%s.%d.gate_proj.weight" % (base, e)] = gate.contiguous()
                    out["%s.%d.up_proj.weight" % (base, e)] = up.contiguous()
                else:
                    if tuple(te.shape) == (H, I):
                        down = te
                    elif tuple(te.shape) == (I, H):
                        down = te.t()
                    else:
                        raise SystemExit("unexpected down_proj shape %s" % (tuple(t.shape),))
                    out["%s.%d.down_proj.weight" % (base, e)] = down.contiguous()
            continue
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        out[k] = t
    return out


def greedy(model, prompt, new_tokens):
    """Greedy decode with the KV cache; returns tokens and the logits rows used to pick them."""
    tokens, rows = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=True)
        pkv = out.past_key_values
        logits = out.logits[0, -1].to(torch.float32)
        for s in range(new_tokens):
            rows.append(logits.clone())
            nxt = int(torch.argmax(logits).item())
            tokens.append(nxt)
            if s + 1 == new_tokens:
                break
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=pkv,
                        use_cache=True)
            pkv = out.past_key_values
            logits = out.logits[0, -1].to(torch.float32)
    return tokens, rows


def margin(row):
    """Top-1 minus top-2 logit: how close greedy decoding is to a tie."""
    top = torch.topk(row, 2).values
    return float(top[0] - top[1])


def bf16_hooks(model, layers):
    """Rounds the input and output of each MoE block in `layers` to bf16, as epd's bf16
    dispatch and combine do; returns the hooks (remove them after)."""
    hs = []

    def pre(mod, args):
        if not args:
            return None
        return (args[0].to(torch.bfloat16).to(torch.float32),) + tuple(args[1:])

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (out[0].to(torch.bfloat16).to(torch.float32),) + tuple(out[1:])
        return out.to(torch.bfloat16).to(torch.float32)

    for i in layers:
        mlp = model.model.layers[i].mlp
        hs.append(mlp.register_forward_pre_hook(pre))
        hs.append(mlp.register_forward_hook(post))
    return hs


def run_main(main):
    """Runs the generator's main; on any failure the log so far and the traceback also go to
    OUT/log.txt (--out OUT), so that a run on a remote machine leaves its reason behind."""
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()
        out = None
        for i, a in enumerate(sys.argv):
            if a == "--out" and i + 1 < len(sys.argv):
                out = sys.argv[i + 1]
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "log.txt"), "w") as f:
                f.write("\n".join(LOG) + "\n" + traceback.format_exc())
        raise
