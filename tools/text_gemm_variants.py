"""Experiment: which call form gets cuBLAS to run the text stream's small-M linears fastest?

Text stream of a Qwen block (M = 208 tokens, bf16, bias): q/k/v packed (N 9216), out (N 3072),
fc1 with GELU-tanh (N 12288), fc2 (K 12288). Variants:
  addmm      : torch.addmm(bias, x, W.t())  (cuBLASLt bias epilogue: what the patched block runs)
  mm+bias    : torch.mm(x, W.t()) then .add_(bias)
  mm         : torch.mm(x, W.t()) alone (no bias: a lower bound for the GEMM itself)
  addmm-pad  : addmm on x padded to 256 rows (a tile multiple), result rows [:M]
  lt         : addmm with torch.backends.cuda.preferred_blas_library("cublaslt")
Timing: CUDA events around 20 back-to-back calls after a 256 MB L2 flush, median of 7; plus the
kernels (and memsets) each variant launches, from torch.profiler. JSON to $OUT/text-gemm.json.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def timed(fn, reps=7, inner=20):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / inner * 1e3)
    return statistics.median(ts)


def kernels(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main():
    torch.manual_seed(0)
    M = int(os.environ.get("M", "208"))
    rows = []
    for name, K, N, gelu in [("qkv", 3072, 9216, False), ("out", 3072, 3072, False),
                             ("fc1", 3072, 12288, True), ("fc2", 12288, 3072, False)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        xp = torch.zeros(256, K, device="cuda", dtype=torch.bfloat16)
        xp[:M] = x
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.02
        act = (lambda y: torch.nn.functional.gelu(y, approximate="tanh")) if gelu else (lambda y: y)
        if gelu:
            base = lambda xx=x: torch._addmm_activation(b, xx, W.t(), use_gelu=True)  # noqa: E731
        else:
            base = lambda xx=x: torch.addmm(b, xx, W.t())  # noqa: E731
        variants = {
            "addmm": base,
            "mm+bias": lambda: act(torch.mm(x, W.t()).add_(b)),
            "mm": lambda: torch.mm(x, W.t()),
            "addmm-pad": lambda: base(xp)[:M],
        }
        ref = base().float()
        row = {"proj": name, "M": M, "K": K, "N": N}
        for v, fn in variants.items():
            row[v + "_us"] = timed(fn)
            row[v + "_kernels"] = kernels(fn)
            if v != "mm":
                row[v + "_maxdiff"] = (fn().float() - ref).abs().max().item()
        old = torch.backends.cuda.preferred_blas_library()
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["lt_us"] = timed(base)
            row["lt_kernels"] = kernels(base)
        finally:
            torch.backends.cuda.preferred_blas_library(old)
        rows.append(row)
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                     if k.endswith("_us") or k.endswith("maxdiff")}, flush=True)
        for k, v in row.items():
            if k.endswith("_kernels"):
                print(f"   {k}: {v}")
    p = torch.cuda.get_device_properties(0)
    res = dict(benchmark="text-stream small-M linears: call forms", tool="tools/text_gemm_variants.py",
               env=dict(gpu=p.name, torch=torch.__version__, cuda=torch.version.cuda,
                        git_commit=os.environ.get("FUSED_DIT_GIT_COMMIT", "?"),
                        date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())),
               rows=rows)
    with open(os.path.join(os.environ.get("OUT", "."), "text-gemm.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
