#!/usr/bin/env python3
"""The PyTorch peer of epd's GPU decode step (DESIGN.md, "Serving on GPUs": "Measured on
nvidia-h200 ... How it was measured"), run on the device machine.

transformers' Qwen3MoeForCausalLM with Qwen3-30B-A3B's real configuration (48 layers, hidden
2048, 128 experts, top-8, moe_intermediate 768, intermediate 6144, 32 query / 4 KV heads of 128,
vocab 151936, rope_theta 1e6), built directly on the GPU in bf16 with transformers' default
random init (no checkpoint), experts through set_experts_implementation("grouped_mm").

Decode: generate(max_new_tokens=n, min_new_tokens=n, cache_implementation="static", greedy) for
n = --n-long (40) and --n-short (8) on a random prompt of --prompt-len tokens per sequence;
ms per step = (t(n_long) - t(n_short)) / (n_long - n_short), each t the fastest of --repeats
runs after a warm-up run. Eager
passes disable_compile=True; "compiled" lets generate compile the forward (torch.compile, CUDA
graphs), which recompiles per batch size (about 2 minutes each): optional (--compile), and
skipped when --deadline would be passed. Prefill: tokens/s of one --prefill-len prompt at
batch 1 (one forward, eager, logits of the last row only).

--model deepseek-v2-lite: transformers' DeepseekV2ForCausalLM at DeepSeek-V2-Lite's shape (27
layers, hidden 2048, the first layer dense with intermediate 10944, then 64 routed experts top-6
of moe_intermediate 1408 plus 2 shared, MLA with kv_lora 512, qk_nope 128, qk_rope 64, v 128, no
q LoRA, 16 heads, vocab 102400, softmax greedy routing, YaRN factor 40 over 4096), the same way.
Its HBM limit counts MLA's weights and the latent cache (kv_lora + qk_rope values per position
and layer), as model-bench --model deepseek-v2-lite does; transformers' own DeepSeek-V2 caches
full keys and values per head, so the peer reads more than that limit.

Also prints each batch's HBM limit: the bytes one decode step must read (dense weights, the
experts its tokens touch under uniform routing, lm_head, KV of the context) at --hbm-tbs.

  python3 scripts/bench_torch_peer.py                       # eager, batches 1 8 64 256
  python3 scripts/bench_torch_peer.py --compile --batch 1 8 --deadline 540
  python3 scripts/bench_torch_peer.py --layers 4 --batch 1 --no-prefill   # a quick check
  python3 scripts/bench_torch_peer.py --model deepseek-v2-lite

Prints a table and JSON lines (prefixed "JSON ") for docs/benchmarks.md.
"""
import argparse
import inspect
import json
import math
import sys
import time

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
    output_router_logits=False, bos_token_id=151643, eos_token_id=151645,
)
DEEPSEEK_V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, bos_token_id=100000, eos_token_id=100001,
)
DEEPSEEK_YARN = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                 "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
# --model: (config class, model class, keyword arguments, rope_theta, extra rope parameters)
MODELS = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_30B_A3B, 1e6, None),
    "deepseek-v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", DEEPSEEK_V2_LITE, 1e4,
                         DEEPSEEK_YARN),
}
T_START = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


def jline(d):
    print("JSON " + json.dumps(d), flush=True)


def hbm_limit_ms_mla(cfg, batch, ctx, tbs):
    """DeepSeek (MLA): per layer the norms, q (or q LoRA), kv_a, kv_b, o and the kv_a norm; dense
    layers' MLP, or the router, the touched experts and the shared experts; lm_head; and the
    latent cache (kv_lora + qk_rope values per position and layer), all bf16."""
    h, L, E, k = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    nh, kvl, rope = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, vd, ql, mi = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["q_lora_rank"], cfg["moe_intermediate_size"]
    qk = nope + rope
    q = (ql * h + ql + nh * qk * ql) if ql else nh * qk * h
    attn = q + (kvl + rope) * h + kvl + nh * (nope + vd) * kvl + h * nh * vd + 2 * h
    touched = E * (1.0 - (1.0 - k / E) ** batch)
    dense = cfg["first_k_dense_replace"]
    moe = h * E + touched * 3 * h * mi + 3 * h * mi * cfg["n_shared_experts"]
    weights = (L * attn + dense * 3 * h * cfg["intermediate_size"] + (L - dense) * moe
               + cfg["vocab_size"] * h + h + batch * h)
    kv = batch * ctx * L * (kvl + rope)
    return 2.0 * (weights + kv) / (tbs * 1e12) * 1e3, touched


def hbm_limit_ms(cfg, batch, ctx, tbs):
    """Bytes one decode step reads at bf16 / bandwidth: attention and router weights of every
    layer, the experts the batch's tokens touch (uniform routing: E * (1 - (1 - k/E)^B)), the
    final norm and lm_head, and the KV of batch * ctx tokens."""
    h, L, E, k = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    hd, nq, nkv, mi = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["moe_intermediate_size"]
    attn = h * nq * hd + 2 * h * nkv * hd + nq * hd * h + 2 * hd + 2 * h  # q k v o, q/k norms, 2 norms
    router = h * E
    expert = 3 * h * mi
    touched = E * (1.0 - (1.0 - k / E) ** batch)
    weights = L * (attn + router + touched * expert) + cfg["vocab_size"] * h + h + batch * h
    kv = batch * ctx * L * 2 * nkv * hd
    return 2.0 * (weights + kv) / (tbs * 1e12) * 1e3, touched


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=1024, help="context before the timed steps")
    ap.add_argument("--n-short", type=int, default=8)
    ap.add_argument("--n-long", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each n (the fastest counts)")
    ap.add_argument("--eager", dest="eager", action="store_true", default=True)
    ap.add_argument("--no-eager", dest="eager", action="store_false")
    ap.add_argument("--compile", action="store_true",
                    help="also the compiled peer (generate's torch.compile; ~2 min per batch size)")
    ap.add_argument("--compile-estimate", type=float, default=180.0,
                    help="seconds a compiled batch size is assumed to take (for --deadline)")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check; "
                    "the figures are then not the peer's)")
    ap.add_argument("--experts-impl", default="grouped_mm",
                    help="set_experts_implementation(...) argument; 'none' leaves the default")
    ap.add_argument("--attn", default=None, help="attention implementation (default: transformers')")
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth, TB/s (H200: 4.8)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from start after which no new measurement begins")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.n_long <= a.n_short:
        ap.error("--n-long must be larger than --n-short")

    def left():
        return math.inf if a.deadline is None else a.deadline - (time.monotonic() - T_START)

    try:
        import torch
    except ImportError as e:
        sys.exit(f"bench_torch_peer: PyTorch is not installed ({e})")
    cfg_name, model_name, base_kw, ROPE_THETA, rope_extra = MODELS[a.model]
    try:
        import transformers
        ConfigClass = getattr(transformers, cfg_name)
        ModelClass = getattr(transformers, model_name)
    except (ImportError, AttributeError) as e:
        sys.exit(f"bench_torch_peer: transformers with {model_name} is needed ({e})")
    if not torch.cuda.is_available():
        sys.exit("bench_torch_peer: no CUDA device")
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    meta = {"bench": "torch_peer", "model": a.model, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__}
    log(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}")

    # ---- configuration (rope_theta moved into rope_parameters in transformers 5)
    kw = dict(base_kw)
    if a.layers:
        kw["num_hidden_layers"] = a.layers
    # the same dance as tests/model/make_qwen3vocab_oracle.py (run with transformers 5.17)
    rope_params = {"rope_type": "default", "rope_theta": ROPE_THETA}
    legacy = {"rope_theta": ROPE_THETA}
    if rope_extra:  # YaRN: transformers 5's rope_parameters, or the hub's rope_scaling
        rope_params = dict(rope_extra, rope_type="yarn", rope_theta=ROPE_THETA)
        legacy = {"rope_theta": ROPE_THETA, "rope_scaling": dict(rope_extra, type="yarn")}
    if "rope_parameters" in inspect.signature(ConfigClass.__init__).parameters:
        attempts = ({"rope_parameters": rope_params}, legacy)
    else:
        attempts = (legacy, {"rope_parameters": rope_params})
    cfg, err = None, None
    for extra in attempts:
        try:
            cfg = ConfigClass(**kw, **extra)
            break
        except TypeError as e:
            err = e
    if cfg is None:
        sys.exit(f"bench_torch_peer: {cfg_name} refused the configuration: {err}")
    d = cfg.to_dict()
    theta = d.get("rope_theta")
    if theta is None and isinstance(d.get("rope_parameters"), dict):
        theta = d["rope_parameters"].get("rope_theta")
    if theta is None or abs(float(theta) - ROPE_THETA) > 1e-3:
        log(f"rope_theta did not stick ({theta!r}): setting rope_parameters")
        cfg.rope_parameters = rope_params
    for k in ("num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "head_dim", "num_key_value_heads", "norm_topk_prob", "kv_lora_rank", "q_lora_rank",
              "first_k_dense_replace", "n_shared_experts"):
        if k in kw and d.get(k) != kw[k]:
            log(f"warning: the config's {k} reads {d.get(k)!r}, wanted {kw[k]!r}")
    if a.attn:
        cfg._attn_implementation = a.attn

    # ---- the model, built on the GPU in bf16 (fp32 first would need 122 GB + the copy)
    torch.manual_seed(a.seed)
    t0 = time.monotonic()
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with dev:
            model = ModelClass(cfg)
    except torch.cuda.OutOfMemoryError as e:
        sys.exit(f"bench_torch_peer: out of GPU memory building the model: {e}")
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    nparams = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    log(f"model built in {time.monotonic() - t0:.1f}s: {nparams / 1e9:.2f} B parameters, {dtypes}, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
    meta.update(layers=cfg.num_hidden_layers, params_b=round(nparams / 1e9, 3),
                attn=getattr(cfg, "_attn_implementation", None))

    experts_impl = "default"
    if a.experts_impl != "none":
        fn = getattr(model, "set_experts_implementation", None)
        if fn is None:
            log("warning: this transformers has no set_experts_implementation: experts run its default")
        else:
            try:
                fn(a.experts_impl)
                experts_impl = a.experts_impl
            except Exception as e:  # noqa: BLE001 - any failure here only changes the peer
                log(f"warning: set_experts_implementation({a.experts_impl!r}) failed: {e}")
    meta["experts_impl"] = experts_impl

    gc = model.generation_config
    for k, v in (("do_sample", False), ("pad_token_id", 0), ("temperature", None), ("top_p", None),
                 ("top_k", None)):
        try:
            setattr(gc, k, v)
        except Exception:  # noqa: BLE001
            pass
    try:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except Exception:  # noqa: BLE001
        pass

    def sync():
        torch.cuda.synchronize()

    def gen(ids, n, compiled):
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      cache_implementation="static", attention_mask=torch.ones_like(ids))
        if not compiled:
            kwargs["disable_compile"] = True
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {n}")

    def timed(ids, n, compiled):
        ts = []
        for _ in range(a.repeats):
            sync()
            t = time.perf_counter()
            gen(ids, n, compiled)
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts)

    results = {}  # (batch, mode) -> ms or a reason

    def decode(batch, compiled):
        mode = "compiled" if compiled else "eager"
        need = a.compile_estimate if compiled else 30.0
        if left() < need:
            results[(batch, mode)] = "skipped (deadline)"
            log(f"batch {batch} {mode}: skipped, {left():.0f}s left before the deadline")
            return
        g = torch.Generator(device=dev).manual_seed(a.seed + batch)
        ids = torch.randint(0, cfg.vocab_size, (batch, a.prompt_len), device=dev, generator=g)
        t0 = time.monotonic()
        try:
            # the long run first: its static cache is the larger, and generate reuses a cache
            # that is large enough, so the short run needs no new cache (nor a recompile)
            gen(ids, a.n_long, compiled)
            if compiled:  # a recompile for the short run must not land in the timed runs
                gen(ids, a.n_short, compiled)
            warm = time.monotonic() - t0
            t_long = timed(ids, a.n_long, compiled)
            t_short = timed(ids, a.n_short, compiled)
        except torch.cuda.OutOfMemoryError:
            results[(batch, mode)] = "OOM"
            log(f"batch {batch} {mode}: out of GPU memory")
            del ids
            torch.cuda.empty_cache()
            return
        except Exception as e:  # noqa: BLE001 - reported, the other measurements go on
            results[(batch, mode)] = f"error: {type(e).__name__}"
            log(f"batch {batch} {mode}: {type(e).__name__}: {str(e)[:400]}")
            torch.cuda.empty_cache()
            return
        ms = (t_long - t_short) / (a.n_long - a.n_short) * 1e3
        results[(batch, mode)] = ms
        was_compiled = hasattr(model, "_compiled_call") if compiled else False
        log(f"batch {batch} {mode}: {ms:.2f} ms/step (t{a.n_long} {t_long:.3f}s, t{a.n_short} "
            f"{t_short:.3f}s, warm-up {warm:.1f}s{', compiled forward seen' if was_compiled else ''})")
        jline({**meta, "what": "decode", "mode": mode, "batch": batch, "prompt_len": a.prompt_len,
               "ms_per_step": round(ms, 3), "t_long_s": round(t_long, 4), "t_short_s": round(t_short, 4),
               "n_long": a.n_long, "n_short": a.n_short, "repeats": a.repeats,
               "warmup_s": round(warm, 1), "compiled_forward": was_compiled if compiled else None,
               "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        del ids
        torch.cuda.empty_cache()

    prefill = None
    if not a.no_prefill:
        if left() < 30:
            prefill = "skipped (deadline)"
        else:
            g = torch.Generator(device=dev).manual_seed(a.seed)
            ids = torch.randint(0, cfg.vocab_size, (1, a.prefill_len), device=dev, generator=g)

            def fwd():
                with torch.inference_mode():
                    try:
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    except TypeError:  # older transformers: num_logits_to_keep, or neither
                        model(input_ids=ids, use_cache=False)
            try:
                fwd()
                ts = []
                for _ in range(max(a.repeats, 3)):
                    sync()
                    t = time.perf_counter()
                    fwd()
                    sync()
                    ts.append(time.perf_counter() - t)
                s = min(ts)
                prefill = a.prefill_len / s
                log(f"prefill batch 1 x {a.prefill_len}: {s * 1e3:.1f} ms, {prefill:.0f} tokens/s")
                jline({**meta, "what": "prefill", "mode": "eager", "batch": 1,
                       "prompt_len": a.prefill_len, "ms": round(s * 1e3, 2),
                       "tokens_per_s": round(prefill, 1)})
            except torch.cuda.OutOfMemoryError:
                prefill = "OOM"
                log("prefill: out of GPU memory")
            except Exception as e:  # noqa: BLE001
                prefill = f"error: {type(e).__name__}"
                log(f"prefill: {type(e).__name__}: {str(e)[:400]}")
            del ids
            torch.cuda.empty_cache()

    for b in a.batch:
        if a.eager:
            decode(b, False)
    if a.compile:
        for b in a.batch:
            decode(b, True)

    # ---- the table
    def rnd(v):
        return round(v, 3) if isinstance(v, float) else v

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    print()
    print(f"PyTorch peer: {model_name} ({a.model}), {cfg.num_hidden_layers} layers, bf16, experts "
          f"{experts_impl}, static cache, prompt {a.prompt_len} tokens, ms per decode step = "
          f"(t{a.n_long} - t{a.n_short}) / {a.n_long - a.n_short}; {gpu}")
    print(f"HBM limit: weights the step touches + KV of the context, read once at {a.hbm_tbs} TB/s")
    hdr = f"{'batch':>6} | {'HBM limit ms':>12} | {'eager ms/step':>14} | {'compiled ms/step':>18} | {'prefill tok/s':>14}"
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for i, b in enumerate(a.batch):
        lim, touched = (hbm_limit_ms_mla if a.model == "deepseek-v2-lite" else hbm_limit_ms)(
            dict(base_kw, num_hidden_layers=cfg.num_hidden_layers), b,
                                    a.prompt_len + (a.n_long + a.n_short) // 2, a.hbm_tbs)
        pf = cell(round(prefill) if isinstance(prefill, float) else prefill) if (i == 0 and b == 1) else ""
        print(f"{b:>6} | {lim:>12.2f} | {cell(results.get((b, 'eager'))):>14} | "
              f"{cell(results.get((b, 'compiled'))):>18} | {pf:>14}")
        summary.append({**meta, "what": "summary", "batch": b, "prompt_len": a.prompt_len,
                        "hbm_limit_ms": round(lim, 3), "experts_touched_per_layer": round(touched, 1),
                        "eager_ms": rnd(results.get((b, "eager"))),
                        "compiled_ms": rnd(results.get((b, "compiled"))),
                        "prefill_tok_s": rnd(prefill) if b == 1 else None})
    if a.no_prefill or 1 not in a.batch:
        print(f"prefill tok/s (batch 1 x {a.prefill_len}): {cell(prefill)}")
    for d in summary:
        jline(d)
    bad = [v for v in results.values() if isinstance(v, str) and not v.startswith("skipped")]
    return 1 if bad or isinstance(prefill, str) and not prefill.startswith("skipped") else 0


if __name__ == "__main__":
    sys.exit(main())
