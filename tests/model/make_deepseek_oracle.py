#!/usr/bin/env python3
"""Correctness oracles for epd's DeepSeek-V2 and DeepSeek-V3 forward pass: tiny random
checkpoints (bf16 safetensors + config.json, Hugging Face layout and names) and the greedy
continuations and logits of a reference computation on them.

    python3 make_deepseek_oracle.py --arch v3 --out DIR     # write DIR (reference: deepseek_ref)
    python3 make_deepseek_oracle.py --check DIR             # transformers against DIR/expected.json

Writing needs only torch: the reference is deepseek_ref.py, this project's own fp32 reading of
transformers' DeepseekV2/V3 modelling code (MLA, YaRN, group-limited routing, shared experts),
independent of epd's C code. --check (the device machine, where transformers 5 is installed)
loads DIR into DeepseekV2ForCausalLM / DeepseekV3ForCausalLM in fp32 with eager attention,
decodes the same prompts and reports the largest logit difference and any greedy token that
differs; it exits 1 when a token differs or a logit is off by more than --tol.

expected.json:
  reference            what computed it
  new_tokens           tokens generated per case
  cases[i].prompt      token ids
  cases[i].tokens      greedy continuation
  cases[i].logits      [new_tokens][vocab] fp32: row 0 at the last prompt position, row s at the
                       position of generated token s-1
  cases[i].margins     top1 - top2 of each row (how close greedy is to a tie)
  cases[i].route_margin  the smallest gap between a router's last choice and the next candidate
  moe_layers           the layers with a routed MoE block
"""
import argparse
import json
import math
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_ref  # noqa: E402

NEW_TOKENS = 16
# the last prompt and its continuation run past YaRN's original_max_position_embeddings (64)
PROMPT_LENS = [6, 1, 11, 60]

# V3 in the hub's key forms (rope_theta + rope_scaling of "type" yarn, as DeepSeek-V3 ships);
# V2 in transformers 5's (rope_parameters), with V2-Lite's choices (no q LoRA, mscales 0.707)
# but group-limited routing so that the V2 group rule is exercised.
CONFIGS = {
    "v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 384,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 48,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 24,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "bfloat16",
    },
    "v2": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 384,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 48,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 24,
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "bfloat16",
    },
}
SEEDS = {"v3": 31, "v2": 32}


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def make_weights(cfg, seed):
    """Random weights with O(1) activations, rounded to bf16 (the correction bias stays fp32, as
    transformers keeps it)."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape in deepseek_ref.tensor_shapes(cfg):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            v = 0.5 + torch.rand(shape, generator=g)
        elif "embed_tokens" in name:
            v = torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            w[name] = (torch.rand(shape, generator=g) - 0.5) * 0.2
            continue
        elif name.endswith("mlp.gate.weight"):
            v = torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[-1]))
        else:
            v = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        w[name] = bf16(v)
    return w


def write_safetensors(path, tensors, dtypes=None):
    """The safetensors format: an 8-byte little-endian header length, a JSON header of
    dtype/shape/data_offsets per tensor, then the data. dtypes: name -> "F32", "BF16" or
    "F8_E4M3" (a uint8 tensor of e4m3 codes) where the default (BF16; F32 for the correction
    bias) does not apply."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        dtype = (dtypes or {}).get(name, "F32" if name.endswith("e_score_correction_bias") else "BF16")
        if dtype == "F8_E4M3":
            assert t.dtype == torch.uint8, name
            data = t.numpy().tobytes()
        elif dtype == "F32":
            data = t.to(torch.float32).numpy().tobytes()
        else:
            data = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# epd's MoE exchange rounds activations to bf16 (logits move by ~0.01): a greedy step closer to a
# tie than this would test the rounding, not the model, so such prompts are drawn again
MIN_MARGIN = 0.05
# nor may a router be that close to choosing another expert (or group): the same rounding would
# route a token elsewhere (V3: sigmoid scores; V2: log-probabilities, see deepseek_ref.route)
MIN_ROUTE_MARGIN = {"deepseek_v3": 0.0015, "deepseek_v2": 0.01}


def greedy_cases(logits_fn, vocab, seed, route_margin, eos):
    """One case per PROMPT_LENS entry: a random prompt whose greedy steps all have MIN_MARGIN,
    whose routers keep route_margin, and whose continuation never reaches `eos` (ids 0 and 1,
    DeepSeek's bos and eos, stay out of prompts and continuations: the tiny configs name no
    bos/eos, as the Qwen3-MoE oracle, but a server given them would stop there)."""
    g = torch.Generator().manual_seed(seed + 1000)
    cases = []
    for n in PROMPT_LENS:
        for _ in range(400):
            deepseek_ref.route.min_margin = float("inf")
            c = greedy_case(logits_fn, torch.randint(2, vocab, (n,), generator=g).tolist())
            if min(c["margins"]) >= MIN_MARGIN and deepseek_ref.route.min_margin >= route_margin \
                    and eos not in c["tokens"]:
                c["route_margin"] = deepseek_ref.route.min_margin
                break
        else:
            raise SystemExit("no prompt of %d tokens with greedy margins >= %g" % (n, MIN_MARGIN))
        cases.append(c)
    return cases


def greedy_case(logits_fn, p):
    ids, toks, rows = list(p), [], []
    for _ in range(NEW_TOKENS):
        row = logits_fn(ids)
        rows.append(row)
        nxt = int(torch.argmax(row).item())
        toks.append(nxt)
        ids.append(nxt)
    margins = []
    for r in rows:
        top = torch.topk(r, 2).values
        margins.append(float(top[0] - top[1]))
    return {"prompt": p, "tokens": toks, "logits": [r.tolist() for r in rows], "margins": margins}


def write(arch, out):
    cfg = CONFIGS[arch]
    os.makedirs(out, exist_ok=True)
    w = make_weights(cfg, SEEDS[arch])
    # the multi-token-prediction layer (num_nextn_predict_layers) is in the file as DeepSeek-V3
    # ships it, after the last layer: a loader must skip it
    extra = {}
    for _ in range(cfg.get("num_nextn_predict_layers", 0)):
        L = cfg["num_hidden_layers"]
        extra["model.layers.%d.eh_proj.weight" % L] = bf16(torch.zeros(cfg["hidden_size"], 2 * cfg["hidden_size"]))
        extra["model.layers.%d.enorm.weight" % L] = bf16(torch.ones(cfg["hidden_size"]))
    write_safetensors(os.path.join(out, "model.safetensors"), {**w, **extra})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    model = deepseek_ref.Model(cfg, w)
    cases = greedy_cases(model.last_logits, cfg["vocab_size"], SEEDS[arch],
                         MIN_ROUTE_MARGIN[cfg["model_type"]], 1)
    exp = {
        "reference": "tests/model/deepseek_ref.py (fp32, full recompute per token); "
                     "make_deepseek_oracle.py --check compares transformers",
        "new_tokens": NEW_TOKENS,
        "moe_layers": [l for l in range(cfg["num_hidden_layers"]) if l >= cfg["first_k_dense_replace"]],
        "cases": cases,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(exp, f)
    print("%s: %d cases, smallest greedy margin %.4f" % (out, len(cases),
          min(min(c["margins"]) for c in cases)))


def check(d, tol):
    """transformers' DeepseekV2/V3ForCausalLM on DIR against DIR/expected.json."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    cfg._attn_implementation = "eager"
    try:  # transformers 5 names it dtype, 4 torch_dtype
        model = AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(d, config=cfg, torch_dtype=torch.float32)
    model.eval()
    exp = json.load(open(os.path.join(d, "expected.json")))
    worst, bad = 0.0, 0
    with torch.no_grad():
        for i, c in enumerate(exp["cases"]):
            ids = list(c["prompt"])
            for s in range(exp["new_tokens"]):
                out = model(input_ids=torch.tensor([ids]), use_cache=False)
                row = out.logits[0, -1].to(torch.float32)
                ref = torch.tensor(c["logits"][s])
                worst = max(worst, float((row - ref).abs().max()))
                tok = int(torch.argmax(row))
                if tok != c["tokens"][s]:
                    bad += 1
                    print("case %d step %d: transformers %d, expected %d" % (i, s, tok, c["tokens"][s]))
                ids.append(c["tokens"][s])
    print("%s (transformers %s): max |logit diff| %.6f over %d cases, %d greedy tokens differ"
          % (d, transformers.__version__, worst, len(exp["cases"]), bad))
    return 0 if bad == 0 and worst <= tol else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(CONFIGS))
    ap.add_argument("--out")
    ap.add_argument("--check")
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.check:
        sys.exit(check(a.check, a.tol))
    if not a.arch or not a.out:
        ap.error("--arch and --out (or --check DIR)")
    write(a.arch, a.out)


if __name__ == "__main__":
    main()
