"""GPU experiment: ``fused_dit.linear_gate_residual`` (GEMM with the gated residual in cuBLASLt's
epilogue) vs the unfused pair it replaces (addmm, then ``gate_residual``), on the Qwen-Image-Edit
block's to_out / fc2 shapes (image L 8192 with the zero_cond_t split 4096 | 4096; text L 208).

Prints, per shape: max error vs the fp32 reference (fused and unfused), median us (do_bench, L2
flushed, after a clock warm-up), the cuBLAS kernel(s) the fused op ran; writes JSON to $OUT or
bench/results. Usage: PYTHONPATH=$PWD python tools/gated_linear_experiments.py [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops import reference as ref  # noqa: E402
from fused_dit_ops.bench.harness import env_info  # noqa: E402

SHAPES = {  # name: (L, K, N, split)
    "img to_out 8192x3072->3072 split 4096": (8192, 3072, 3072, [4096]),
    "img fc2 8192x12288->3072 split 4096": (8192, 12288, 3072, [4096]),
    "img to_out 8192x3072->3072 no index": (8192, 3072, 3072, None),
    "txt to_add_out 208x3072->3072": (208, 3072, 3072, None),
    "txt fc2 208x12288->3072": (208, 12288, 3072, None),
}


def kernels_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:80] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from triton.testing import do_bench
    dev = "cuda"
    dt = torch.bfloat16
    torch.manual_seed(0)
    # clock warm-up (an idle GPU ramps its clock during the first ~second of work)
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    t0 = time.time()
    while time.time() - t0 < 2.0:
        a @ a
    torch.cuda.synchronize()
    rows = []
    for name, (L, K, N, split) in SHAPES.items():
        x = torch.randn(1, L, K, device=dev, dtype=dt)
        w = (torch.randn(N, K, device=dev, dtype=dt) * 0.02)
        b = torch.randn(N, device=dev, dtype=dt) * 0.02
        r = torch.randn(1, L, N, device=dev, dtype=dt)
        G = 2 if split else 1
        g = torch.randn(G, N, device=dev, dtype=dt)
        idx = ref.index_from_split(split, L, dev) if split else None

        def fused():
            return fdo.linear_gate_residual(x, w, b, r, g, split)

        def unfused():
            y = F.linear(x, w, b)
            return torch.ops.fused_dit.gate_residual.default(r, y, g, idx)

        def gemm_only():
            return F.linear(x, w, b)

        want = ref.linear_gate_residual(x.float(), w.float(), b.float(), r.float(), g.float(), split)
        err_f = (fused().float() - want).abs().max().item()
        err_u = (unfused().float() - want).abs().max().item()
        times = {"fused": [], "unfused": [], "gemm_only": []}
        for _ in range(args.rounds):
            for k, fn in (("fused", fused), ("unfused", unfused), ("gemm_only", gemm_only)):
                times[k].append(do_bench(fn, warmup=25, rep=200))
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        row = dict(shape=name, L=L, K=K, N=N, split=split, max_err_fused=err_f, max_err_unfused=err_u,
                   us=med, all_ms=times, kernels_fused=kernels_of(fused), kernels_unfused=kernels_of(unfused))
        rows.append(row)
        print(f"{name:42s} fused {med['fused']:8.1f} us  unfused {med['unfused']:8.1f} us  gemm {med['gemm_only']:8.1f}"
              f"  saved {med['unfused'] - med['fused']:6.1f} us  err fused {err_f:.3e} unfused {err_u:.3e}", flush=True)
        print("   fused kernels:", row["kernels_fused"])
        print("   unfused kernels:", row["kernels_unfused"])
    out = dict(benchmark="linear_gate_residual vs addmm + gate_residual", tool="tools/gated_linear_experiments.py",
               env=env_info(), rows=rows)
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    path = os.path.join(d, f"gated-linear-{time.strftime('%Y%m%dT%H%M', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("json:", path)


if __name__ == "__main__":
    main()
