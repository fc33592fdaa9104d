"""Tile sweep of the swiglu_linear Triton GEMM (CUDA): each (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
on FLUX.2's MLP input shapes (C 6144 -> 2 x 18432, bf16), against F.linear + silu * mul, with the
error of each against an fp32 product. Used to choose ``kernels/swiglu._gemm_config``.

    python scripts/swiglu_tiles.py [--tokens 4608,512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from fused_dit_ops.kernels import swiglu as k

CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
           (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
           (128, 64, 128, 8, 3), (256, 64, 64, 8, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4608,512")
    ap.add_argument("--C", type=int, default=6144)
    ap.add_argument("--F", type=int, default=18432)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    w = (torch.randn(2 * a.F, a.C, device="cuda") * 0.02).bfloat16()
    for L in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(L, a.C, device="cuda", dtype=torch.bfloat16)
        y32 = x.float() @ w.float().t()
        want = F.silu(y32[:, :a.F]) * y32[:, a.F:]
        flops = 2 * L * a.C * 2 * a.F

        def stock():
            y = F.linear(x, w)
            return F.silu(y[:, :a.F]) * y[:, a.F:]
        cands = [("torch", stock), ("cublas+elementwise", lambda: k.swiglu_cublas(x, w, None)),
                 ("triton default", lambda: k.swiglu_linear(x, w, None))]
        cands += [(f"triton {c}", (lambda c=c: k.swiglu_linear(x, w, None, c))) for c in CONFIGS]
        for name, fn in cands:
            try:
                err = ((fn().float() - want).norm() / want.norm()).item()
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            except Exception as e:  # noqa: BLE001  (a config out of shared memory: reported, skipped)
                print(f"L={L} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            rows.append(dict(L=L, provider=name, us=ms * 1e3, tflops=flops / ms / 1e9, rel_err=err))
            print(f"L={L:5d} {name:34s} {ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s  rel {err:.2e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
