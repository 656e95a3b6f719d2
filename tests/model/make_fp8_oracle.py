#!/usr/bin/python3
"""FP8 fixtures for epd's block-quantized checkpoints (quantization_config quant_method "fp8"),
made from the tiny oracle checkpoints' weights:

    /usr/bin/python3 make_fp8_oracle.py --out tests/model/fp8

writes
  qwen3/       Qwen3-MoE (tests/model/oracle's weights, experts 0-7 of 16): every Linear weight
               e4m3 with <name>_scale_inv fp32 in blocks of [40, 64] (ragged rows, and ragged
               channels where there are 96; block_k a multiple of 32 for the GPU), as
               the Qwen3 -FP8 checkpoints ship them (lm_head and the routers listed in
               modules_to_not_convert), plus one more listed module that stays bf16
  qwen3_ref/   the same model with those weights dequantised by this script (no
               quantization_config)
  dsv3/        DeepSeek-V3 (make_deepseek_oracle.py's v3 weights, experts 0-7 of 16), blocks
               [48, 40], no modules_to_not_convert (as DeepSeek-V3 ships), the
               multi-token-prediction layer quantized too (a loader skips it)
  dsv3_ref/    dequantised
  unit.safetensors  e4m3 tensors with their scales and this script's dequantisation:
               codes.ref [256] the value of every code; edge.weight [5][7] (every special code:
               zeros, subnormals, the largest normal, NaN) with F32 scales in blocks of [2, 3];
               big.weight [37][50] blocks [16, 16]; bfs.weight [9][20] with BF16 scales in blocks
               of [4, 16]; each X.ref is fp32 e4m3(X.weight) * X.weight_scale_inv[block]

The e4m3 format (e4m3fn, as safetensors' F8_E4M3 and torch.float8_e4m3fn have it): sign, 4
exponent bits of bias 7, 3 mantissa bits; exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is
NaN and there are no infinities, so the largest value is 1.75 * 2^8 = 448. Decoding and encoding
are written here from that definition (torch 1.13 has no float8 dtypes), independently of epd's
C code.

Scales: the experts' are powers of two (UE8M0, as DeepSeek-V3.1 ships them), so that their
dequantised values are exact in bf16 and the reference checkpoints stay small; every other
weight's is amax / 448 of its block, an arbitrary fp32, and its reference is F32: the model test
demands the same fp32 products, bit for bit. The dequantisation is one fp32 multiply per weight,
as epd's is.
"""
import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_deepseek_oracle as mdo  # noqa: E402

E_KEEP = 8  # experts kept of the oracles' 16: fixtures of a few MB


def e4m3_table():
    """The value of each of the 256 codes, fp32 (NaN for 0x7f and 0xff)."""
    vals = []
    for q in range(256):
        s, e, m = q >> 7, (q >> 3) & 15, q & 7
        if e == 15 and m == 7:
            v = float("nan")
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        vals.append(-v if s else v)
    return torch.tensor(vals, dtype=torch.float32)


TABLE = e4m3_table()
POS = TABLE[:127]  # codes 0..126: the finite non-negative values, ascending


def e4m3_encode(x):
    """Nearest e4m3 code of each fp32 value (ties to the even code), saturating at +-448."""
    a = x.abs().clamp(max=448.0).contiguous()
    hi = torch.searchsorted(POS, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - POS[lo], POS[hi] - a
    pick = torch.where(dhi < dlo, hi, lo)
    tie = dhi == dlo
    pick = torch.where(tie & (lo % 2 == 1), hi, pick)
    code = pick.to(torch.uint8)
    return torch.where(torch.signbit(x), code | 0x80, code).to(torch.uint8)


def blocks(shape, bn, bk):
    return (shape[0] + bn - 1) // bn, (shape[1] + bk - 1) // bk


def expand(s, shape, bn, bk):
    """A [rows/bn][cols/bk] scale to the weight's [rows][cols]."""
    return s.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def dequant(q, s, bn, bk):
    """fp32 e4m3(q) * s[r / bn][c / bk]: one fp32 product per weight."""
    return TABLE[q.long()] * expand(s.to(torch.float32), q.shape, bn, bk)


def quantize(w, bn, bk, pow2):
    """(e4m3 codes, fp32 scale_inv): scale amax / 448 per block, or the power of two at or above
    it; an all-zero block gets scale 1."""
    nr, nc = blocks(w.shape, bn, bk)
    s = torch.ones(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            amax = float(w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max())
            if amax > 0:
                v = torch.tensor(amax, dtype=torch.float32) / 448.0
                s[i, j] = torch.exp2(torch.ceil(torch.log2(v))) if pow2 else v
    q = e4m3_encode(w.to(torch.float32) / expand(s, w.shape, bn, bk))
    return q, s


def read_safetensors(path):
    """name -> fp32 tensor (BF16 and F32 files: the oracles)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b0, b1 = e["data_offsets"]
        raw = bytearray(data[b0:b1])
        if e["dtype"] == "BF16":
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).to(torch.float32)
        elif e["dtype"] == "F32":
            t = torch.frombuffer(raw, dtype=torch.float32).clone()
        else:
            raise SystemExit("%s: %s: dtype %s" % (path, name, e["dtype"]))
        out[name] = t.reshape(e["shape"])
    return out


def is_linear(name):
    """The Linear weights an FP8 checkpoint quantizes: not the embedding, lm_head, norms or
    routers."""
    if not name.endswith(".weight") or name.endswith("norm.weight"):
        return False
    return not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.weight", ".enorm", ".hnorm"))


def write_pair(out, name, cfg, weights, bn, bk, skip):
    """out/name (fp8) and out/name_ref (dequantised)."""
    q_t, q_dt, r_t, r_dt = {}, {}, {}, {}
    nq = 0
    for n, w in weights.items():
        module = n[: -len(".weight")] if n.endswith(".weight") else n
        if not is_linear(n) or module in skip:
            q_t[n] = r_t[n] = w
            if n.endswith("e_score_correction_bias"):
                q_dt[n] = r_dt[n] = "F32"
            continue
        expert = ".mlp.experts." in n
        q, s = quantize(w, bn, bk, pow2=expert)
        d = dequant(q, s, bn, bk)
        assert not torch.isnan(d).any(), n
        q_t[n], q_dt[n] = q, "F8_E4M3"
        q_t[n + "_scale_inv"], q_dt[n + "_scale_inv"] = s, "F32"
        r_t[n] = d
        if expert:
            assert torch.equal(d.to(torch.bfloat16).to(torch.float32), d), n  # exact in bf16
        else:
            r_dt[n] = "F32"
        nq += 1
    qcfg = dict(cfg)
    qcfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [bn, bk],
    }
    if skip:
        qcfg["quantization_config"]["modules_to_not_convert"] = sorted(skip)
    for d, c, t, dt in ((name, qcfg, q_t, q_dt), (name + "_ref", cfg, r_t, r_dt)):
        os.makedirs(os.path.join(out, d), exist_ok=True)
        mdo.write_safetensors(os.path.join(out, d, "model.safetensors"), t, dt)
        with open(os.path.join(out, d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
            f.write("\n")
    print("%s: %d fp8 weights, blocks [%d, %d]" % (name, nq, bn, bk))


def keep_experts(w, cfg_key, cfg):
    """Experts 0..E_KEEP-1 of each layer, and the routers' rows (and bias) for them."""
    out = {}
    for n, t in w.items():
        if ".mlp.experts." in n and int(n.split(".mlp.experts.")[1].split(".")[0]) >= E_KEEP:
            continue
        if n.endswith("mlp.gate.weight") or n.endswith("mlp.gate.e_score_correction_bias"):
            t = t[:E_KEEP]
        out[n] = t
    cfg = dict(cfg)
    cfg[cfg_key] = E_KEEP
    return out, cfg


def qwen3(out):
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(here, "oracle")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    w, cfg = keep_experts(read_safetensors(os.path.join(src, "model.safetensors")),
                          "num_local_experts", cfg)
    moe = [l for l in range(cfg["num_hidden_layers"]) if l not in cfg.get("mlp_only_layers", [])]
    skip = {"lm_head"} | {"model.layers.%d.mlp.gate" % l for l in moe}
    skip.add("model.layers.1.mlp.down_proj")  # a Linear left unquantized: stays BF16
    write_pair(out, "qwen3", cfg, w, 40, 64, skip)


def dsv3(out):
    cfg = mdo.CONFIGS["v3"]
    w = mdo.make_weights(cfg, mdo.SEEDS["v3"])
    w, cfg = keep_experts(w, "n_routed_experts", cfg)
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(7)
    w["model.layers.%d.eh_proj.weight" % L] = mdo.bf16(torch.randn(H, 2 * H, generator=g) * 0.05)
    w["model.layers.%d.enorm.weight" % L] = mdo.bf16(torch.ones(H))
    write_pair(out, "dsv3", cfg, w, 48, 40, set())


def unit(out):
    g = torch.Generator().manual_seed(11)
    t, dt = {"codes.ref": TABLE.clone()}, {"codes.ref": "F32"}
    special = [0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x08, 0x88, 0x38, 0xb8, 0x7e, 0xfe, 0x7f,
               0xff, 0x77, 0x78, 0xf7, 0x3f, 0x40, 0x41]
    cases = {"edge": ((5, 7), 2, 3, "F32"), "big": ((37, 50), 16, 16, "F32"),
             "bfs": ((9, 20), 4, 16, "BF16")}
    for name, (shape, bn, bk, sdt) in cases.items():
        q = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
        if name == "edge":
            flat = q.view(-1)
            flat[: len(special)] = torch.tensor(special)
            flat[-1] = 0x7e  # 448, in the block of the huge scale
        else:  # no NaN codes
            q = torch.where((q & 0x7f) == 0x7f, q - 1, q)
        q = q.to(torch.uint8)
        nr, nc = blocks(shape, bn, bk)
        s = torch.exp(torch.randn(nr, nc, generator=g) * 3.0).to(torch.float32)
        if name == "edge":
            s[0, 0] = 1e-38  # products below fp32's normal range: subnormal results
            s[-1, -1] = 1e37  # and beyond its largest value: infinity
        if sdt == "BF16":
            s = mdo.bf16(s)
        t[name + ".weight"], dt[name + ".weight"] = q, "F8_E4M3"
        t[name + ".weight_scale_inv"], dt[name + ".weight_scale_inv"] = s, sdt
        t[name + ".ref"], dt[name + ".ref"] = dequant(q, s, bn, bk), "F32"
    mdo.write_safetensors(os.path.join(out, "unit.safetensors"), t, dt)
    print("unit.safetensors: %d tensors" % len(t))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    qwen3(a.out)
    dsv3(a.out)
    unit(a.out)


if __name__ == "__main__":
    main()
