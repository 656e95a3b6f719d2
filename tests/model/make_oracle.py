#!/usr/bin/env python3
"""Correctness oracle for epd's Qwen3-MoE forward pass: a tiny random Qwen3-MoE checkpoint
(bf16 safetensors + config.json, Hugging Face layout) and what transformers computes on it.

Run where torch + transformers are installed (the device machine; the GPU is not used):
    python3 make_oracle.py --out DIR        (oracle_lib.py beside it)
writes DIR/model.safetensors, DIR/config.json, DIR/expected.json, DIR/log.txt.

The reference is an fp32 computation on the CPU: the bf16 weights are upcast to fp32 and
transformers runs its eager attention in fp32, as epd's plain-C model does.

expected.json:
  cases[i].prompt        token ids of the prompt
  cases[i].tokens        greedy continuation (new_tokens ids), KV cache decode
  cases[i].logits        [new_tokens][vocab] fp32 logits: row 0 at the last prompt position,
                         row s at the position of generated token s-1
  cases[i].margins       top1 - top2 logit gap of each row (how close greedy is to a tie)
  moe_layers             indices of the layers that transformers built as sparse MoE blocks
  debug                  prompt 0: per-layer outputs [layers][T][hidden] and the final norm
  bf16_sim               greedy tokens / max logit change when the MoE block's input and
                         output are rounded to bf16 (what epd's bf16 dispatch/combine does)
"""
import argparse
import json
import os

import torch
from oracle_lib import (LOG, bf16_hooks, canonical_state_dict, force_eager, greedy, init_params,
                        log, margin, moe_layers_of, qwen3_moe_config, run_main)

HIDDEN = 128
LAYERS = 3
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
EXPERTS = 16
TOPK = 4
MOE_INTER = 96  # != HIDDEN/2 so a fused gate_up tensor's layout is unambiguous by shape
DENSE_INTER = 256
VOCAB = 384
MLP_ONLY = [1]  # layer 1 is a dense SwiGLU MLP: exercises that path too
ROPE_THETA = 1000000.0
EPS = 1e-6
MAX_POS = 512
NEW_TOKENS = 16
PROMPT_LENS = [6, 1, 11, 19]
SEEDS = 24


def make_config():
    return qwen3_moe_config(globals(), tie=False, mlp_only=MLP_ONLY)


def make_prompts():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def evaluate(model, prompts, moe):
    res = [greedy(model, p, NEW_TOKENS) for p in prompts]
    hs = bf16_hooks(model, moe)
    try:
        sim = [greedy(model, p, NEW_TOKENS) for p in prompts]
    finally:
        for h in hs:
            h.remove()
    same = all(a[0] == b[0] for a, b in zip(res, sim))
    diff = 0.0
    for a, b in zip(res, sim):
        for ra, rb in zip(a[1], b[1]):
            diff = max(diff, float((ra - rb).abs().max()))
    minm = min(margin(r) for t, rows in res for r in rows)
    return res, same, diff, minm


def r8(x):
    return float("%.8g" % x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    import transformers
    from transformers import Qwen3MoeForCausalLM, AutoModelForCausalLM
    from safetensors.torch import save_file

    log("torch %s transformers %s" % (torch.__version__, transformers.__version__))
    cfg = make_config()
    prompts = make_prompts()
    log("prompts %s" % prompts)

    # Pick the seed whose greedy paths are furthest from ties and survive bf16 rounding of the
    # MoE exchange, so the C test can demand EQUAL tokens without flaking on a near-tie.
    best = None
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = force_eager(Qwen3MoeForCausalLM(cfg).to(torch.float32).eval())
        init_params(model, seed)
        moe = moe_layers_of(model)
        res, same, diff, minm = evaluate(model, prompts, moe)
        log("seed %d: moe layers %s, min margin %.4f, bf16-sim tokens equal %s, max dlogit %.3g"
            % (seed, moe, minm, same, diff))
        score = (1 if same else 0, minm)
        if best is None or score > best[0]:
            best = (score, seed)
        if same and minm > 0.03 and minm > 10 * diff:
            break
    seed = best[1]
    log("chosen seed %d" % seed)

    torch.manual_seed(seed)
    model = force_eager(Qwen3MoeForCausalLM(cfg).to(torch.float32).eval())
    init_params(model, seed)
    for k, t in model.state_dict().items():
        if ".layers." not in k or ".layers.0." in k or ".layers.1." in k:
            log("in-memory %s %s" % (k, tuple(t.shape)))
    sd = canonical_state_dict(model, cfg)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(sd.items())},
              os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(args.out)
    with open(os.path.join(args.out, "config.json")) as f:
        cj = json.load(f)
    # Published Qwen3 configs carry rope_theta at the top level; keep it there too.
    if "rope_theta" not in cj:
        cj["rope_theta"] = ROPE_THETA
    cj.pop("_attn_implementation", None)
    cj.pop("_experts_implementation", None)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
    log("saved %d tensors, %d bytes" % (len(sd), os.path.getsize(os.path.join(args.out, "model.safetensors"))))

    # The oracle is computed on the model transformers loads back from these files.
    ref = None
    for kw in ({"dtype": torch.float32, "attn_implementation": "eager",
                "experts_implementation": "eager"},
               {"dtype": torch.float32, "attn_implementation": "eager"},
               {"torch_dtype": torch.float32, "attn_implementation": "eager"}):
        try:
            ref = AutoModelForCausalLM.from_pretrained(args.out, **kw)
            break
        except (TypeError, ValueError) as e:
            log("from_pretrained%s: %r" % (sorted(kw), e))
    ref = force_eager(ref.to(torch.float32).eval())
    reload_diff = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            reload_diff = max(reload_diff, float((model(ids).logits - ref(ids).logits).abs().max()))
    log("reloaded-vs-in-memory max |dlogit| %.3g" % reload_diff)
    if reload_diff > 1e-4:
        log("WARNING: the reloaded checkpoint does not compute what the in-memory model does")
    moe_ref = moe_layers_of(ref)
    res, same, diff, minm = evaluate(ref, prompts, moe_ref)

    # The cached decode must equal a full recompute of each sequence.
    cache_diff = 0.0
    with torch.no_grad():
        for p, (toks, rows) in zip(prompts, res):
            full = ref(torch.tensor([p + toks[:-1]])).logits[0].to(torch.float32)
            for s, row in enumerate(rows):
                cache_diff = max(cache_diff, float((full[len(p) - 1 + s] - row).abs().max()))
    log("cache-vs-recompute max |dlogit| %.3g" % cache_diff)

    # Per-layer outputs of prompt 0 (and the final norm), to locate a wrong layer quickly.
    caps = {}

    def cap(name):
        def f(mod, a, out):
            o = out[0] if isinstance(out, tuple) else out
            caps[name] = o.detach()[0].to(torch.float32).clone()
        return f

    hooks = []
    for i, layer in enumerate(ref.model.layers):
        hooks.append(layer.register_forward_hook(cap("layer%d" % i)))
        hooks.append(layer.self_attn.register_forward_hook(cap("attn%d" % i)))
        hooks.append(layer.mlp.register_forward_hook(cap("mlp%d" % i)))
    hooks.append(ref.model.norm.register_forward_hook(cap("norm")))
    hooks.append(ref.model.embed_tokens.register_forward_hook(cap("embed")))
    with torch.no_grad():
        ref(torch.tensor([prompts[0]]))
    for h in hooks:
        h.remove()

    def mat(t):
        return [[r8(x) for x in row] for row in t.tolist()]

    expected = {
        "generator": "tests/model/make_oracle.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": seed,
        "weights": "bf16 safetensors, upcast to fp32",
        "compute": "fp32 on the cpu, eager attention, KV cache decode",
        "new_tokens": NEW_TOKENS,
        "moe_layers": moe_ref,
        "reload_max_abs_diff": reload_diff,
        "cache_max_abs_diff": cache_diff,
        "bf16_sim": {"tokens_equal": same, "max_abs_logit_diff": diff},
        "min_margin": minm,
        "cases": [
            {"prompt": p, "tokens": toks, "margins": [r8(margin(r)) for r in rows],
             "logits": [[r8(x) for x in r.tolist()] for r in rows]}
            for p, (toks, rows) in zip(prompts, res)
        ],
        "debug": {
            "prompt": 0,
            "embed": mat(caps["embed"]),
            "attn": [mat(caps["attn%d" % i]) for i in range(LAYERS)],
            "mlp": [mat(caps["mlp%d" % i]) for i in range(LAYERS)],
            "layer": [mat(caps["layer%d" % i]) for i in range(LAYERS)],
            "norm": mat(caps["norm"]),
        },
    }
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f)
    for c in expected["cases"]:
        log("prompt %s -> %s (min margin %.4f)" % (c["prompt"], c["tokens"], min(c["margins"])))
    log("bf16-sim tokens equal %s, max dlogit %.3g, min margin %.4f" % (same, diff, minm))
    log("done")
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    run_main(main)
