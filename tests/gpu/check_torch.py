#!/usr/bin/env python3
"""Cross-checks the LL dispatch's fp8 cast against PyTorch (run on the device machine).

Reads the dump test_cuda_ll --dump FILE writes: per row, x bf16 [H], the kernel's e4m3 bytes [H]
and fp32 scales [H/128]. Recomputes scale = max(amax, 1e-4) / 448 and q = (x / scale) cast to
torch.float8_e4m3fn (saturated to +-448 first, as the kernel's satfinite cast does) and demands
identical bytes and scales. Usage: check_torch.py FILE H
"""
import sys

import numpy as np
import torch


def main():
    path, H = sys.argv[1], int(sys.argv[2])
    G = H // 128
    rec = H * 2 + H + G * 4
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % rec:
        print(f"check_torch: {path}: {raw.size} bytes is not a multiple of the {rec}-byte row")
        return 1
    n = raw.size // rec
    rows = raw.reshape(n, rec)
    xb = torch.from_numpy(rows[:, : 2 * H].copy().view(np.int16)).view(torch.bfloat16)
    q_gpu = torch.from_numpy(rows[:, 2 * H : 3 * H].copy())
    s_gpu = torch.from_numpy(rows[:, 3 * H :].copy().view(np.float32))
    x = xb.float().view(n, G, 128)
    amax = x.abs().amax(dim=2).clamp(min=1e-4)
    scale = amax / 448.0
    q = (x / scale.unsqueeze(2)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    q_ref = q.view(n, H).view(torch.uint8)
    bad_q = int((q_ref != q_gpu).sum())
    bad_s = int((scale.view(n, G) != s_gpu).sum())
    # bf16 round-to-nearest-even: dequantised rows re-cast through torch's bfloat16 must agree
    # with the same cast done in numpy bit arithmetic.
    deq = (q.float() * scale.unsqueeze(2)).view(n, H)
    tb = deq.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    u = deq.numpy().view(np.uint32).astype(np.uint64)
    nb = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    bad_b = int((tb != nb).sum())
    print(f"check_torch: {n} rows x {H}: fp8 mismatches {bad_q}, scale mismatches {bad_s}, "
          f"bf16 RNE mismatches {bad_b} (torch {torch.__version__})")
    return 0 if n > 0 and bad_q == 0 and bad_s == 0 and bad_b == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
