"""GPU experiment driver for tools/cublaslt_probe.cu (JIT-built here).

1. Which pointer modes / epilogues does cuBLASLt offer algorithms for (bf16, sm90)? In particular
   CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST (a per-output-channel alpha = the adaLN gate,
   beta * C = the residual), which ``linear_gate_residual`` needs.
2. For the Qwen-Image-Edit block's GEMMs (image L 8192, text L 208): time the top-N heuristic
   algorithms against torch (addmm / _addmm_activation), to see whether the heuristic's first
   choice leaves time on the table.

3. ``--sustained S``: the image GEMMs only, each algorithm run back to back for S seconds after a
   heat-up (the GPU at its power cap, as in ``bench block``), with NVML energy per call, in rotated
   rounds: whether an algorithm that is no faster on a cool GPU draws less energy, and so runs
   faster under the cap.

Usage: PYTHONPATH=$PWD python tools/cublaslt_probe.py [--topn 16] [--iters 20] [--sustained 1.5]
Writes JSON to $OUT (or bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fused_dit_ops.bench.harness import env_info  # noqa: E402

DEFAULT, BIAS, GELU_BIAS = 1, 4, 36
MODES = {"host": 0, "device": 1, "device_vector": 2, "alpha_vec_beta_zero": 3, "alpha_vec_beta_host": 4}
GEMMS = {  # name: (rows, K, N, epilogue)
    "img qkv": (8192, 3072, 9216, BIAS),
    "img to_out": (8192, 3072, 3072, BIAS),
    "img fc1+gelu": (8192, 3072, 12288, GELU_BIAS),
    "img fc2": (8192, 12288, 3072, BIAS),
    "txt qkv": (208, 3072, 9216, BIAS),
    "txt to_out": (208, 3072, 3072, BIAS),
    "txt fc1+gelu": (208, 3072, 12288, GELU_BIAS),
    "txt fc2": (208, 12288, 3072, BIAS),
}


def event_us(fn, iters):
    for _ in range(3):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return 1000 * e0.elapsed_time(e1) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topn", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sustained", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from torch.utils.cpp_extension import load
    t0 = time.time()
    ext = load(name="cublaslt_probe", sources=[os.path.join(os.path.dirname(__file__), "cublaslt_probe.cu")],
               extra_ldflags=["-lcublasLt"], extra_cuda_cflags=["-O2"], verbose=False)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    dev, dt = "cuda", torch.bfloat16
    if args.sustained > 0:
        return sustained(ext, args)
    doc = dict(benchmark="cuBLASLt probe: pointer modes / epilogues; top-N algorithms vs torch",
               tool="tools/cublaslt_probe.py", env=env_info(), modes={}, gemms=[])
    dummy_b = torch.zeros(12288, device=dev, dtype=torch.float32)
    for mname, mode in MODES.items():
        for ename, ep in (("default", DEFAULT), ("bias", BIAS)):
            for bt in (-1, 0):  # bias type: D's type, fp32
                if ep == DEFAULT and bt == 0:
                    continue
                n = ext.heur_count(3072, 4096, 3072, mode, ep, bt, dummy_b)
                key = f"{mname}/{ename}/bias_{'f32' if bt == 0 else 'dtype'}"
                doc["modes"][key] = n
                print(f"heuristics {key:45s} {n}", flush=True)
    # gate-as-alpha correctness, if offered
    if doc["modes"].get("alpha_vec_beta_host/bias/bias_f32", 0) or doc["modes"].get("alpha_vec_beta_host/default/bias_dtype", 0):
        rows, K, N = 4096, 3072, 3072
        x = torch.randn(rows, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        b = torch.randn(N, device=dev, dtype=dt) * 0.02
        r = torch.randn(rows, N, device=dev, dtype=dt)
        g = torch.randn(N, device=dev, dtype=torch.float32)
        out = torch.empty(rows, N, device=dev, dtype=dt)
        want = r.float() + g * (x.float() @ w.float().t() + b.float())
        use_bias = doc["modes"].get("alpha_vec_beta_host/bias/bias_f32", 0) > 0
        t = ext.tune(x, w, (g * b.float()) if use_bias else None, BIAS, 4, 10, out, g, r, -1)
        err = (out.float() - (want if use_bias else r.float() + g * (x.float() @ w.float().t()))).abs().max().item()
        doc["alpha_vec"] = dict(times_us=t, max_err=err, with_bias=use_bias)
        print(f"alpha-vector epilogue: times {t} max err {err:.3e} (bias {use_bias})", flush=True)
    # clock warm-up
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    t1 = time.time()
    while time.time() - t1 < 2.0:
        a @ a
    del a
    for name, (rows, K, N, ep) in GEMMS.items():
        x = torch.randn(rows, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        b = torch.randn(N, device=dev, dtype=dt) * 0.02
        out = torch.empty(rows, N, device=dev, dtype=dt)
        if ep == GELU_BIAS:
            def ref():
                return torch._addmm_activation(b, x, w.t(), use_gelu=True)
        else:
            def ref():
                return torch.addmm(b, x, w.t())
        t_ref0 = event_us(ref, args.iters)
        ts = ext.tune(x, w, b, ep, args.topn, args.iters, out, None, None, -1)
        t_ref1 = event_us(ref, args.iters)
        ok = [t for t in ts if t > 0]
        best = min(ok) if ok else float("nan")
        ib = ts.index(best) if ok else -1
        # correctness of the best algorithm
        if ib >= 0:
            ext.tune(x, w, b, ep, args.topn, 1, out, None, None, ib)
            err = (out.float() - ref().float()).abs().max().item()
        else:
            err = float("nan")
        row = dict(gemm=name, rows=rows, K=K, N=N, epilogue=ep, torch_us=[t_ref0, t_ref1], lt_us=ts,
                   best_index=ib, best_us=best, heuristic_first_us=ts[0] if ts else None, max_diff_best_vs_torch=err)
        doc["gemms"].append(row)
        print(f"{name:14s} torch {t_ref0:7.1f}/{t_ref1:7.1f} us  lt#0 {ts[0] if ts else -1:7.1f}  best #{ib} {best:7.1f}"
              f"  ({len(ts)} algos)  diff {err:.2e}  all {[round(t, 1) for t in ts]}", flush=True)
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    path = os.path.join(d, f"cublaslt-probe-{time.strftime('%Y%m%dT%H%M', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("json:", path)


def sustained(ext, args):
    """Each image GEMM's top-N algorithms (and torch) timed back to back under the power cap."""
    import statistics
    from fused_dit_ops.bench import harness
    dev, dt = "cuda", torch.bfloat16
    doc = dict(benchmark="cuBLASLt top-N algorithms under sustained load (power cap): us and mJ per call",
               tool="tools/cublaslt_probe.py --sustained", env=env_info(), args=vars(args), gemms=[])
    for name, (rows, K, N, ep) in GEMMS.items():
        if rows < 1024:
            continue
        x = torch.randn(rows, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        b = torch.randn(N, device=dev, dtype=dt) * 0.02
        out = torch.empty(rows, N, device=dev, dtype=dt)
        n_alg = len(ext.tune(x, w, b, ep, args.topn, 1, out, None, None, 10 ** 6))
        it = args.iters
        if ep == GELU_BIAS:
            def ref():
                for _ in range(it):
                    torch._addmm_activation(b, x, w.t(), use_gelu=True)
        else:
            def ref():
                for _ in range(it):
                    torch.addmm(b, x, w.t())
        cands = {"torch": ref}
        for i in range(n_alg):
            cands[f"lt#{i}"] = (lambda i=i: ext.tune(x, w, b, ep, args.topn, it, out, None, None, i))
        res = {c: [] for c in cands}
        for r, order in harness.rotated_rounds(list(cands), args.rounds):
            for c in order:
                harness.energy_per_call(cands[c], 0.4)
                e = harness.energy_per_call(cands[c], args.sustained)
                res[c].append((e["ms_per_call_b2b"] * 1e3 / it, e["j_per_call"] * 1e3 / it, e["avg_power_w"]))
        row = dict(gemm=name, rows=rows, K=K, N=N, epilogue=ep, algos={})
        for c, vals in res.items():
            us = statistics.median(v[0] for v in vals)
            mj = statistics.median(v[1] for v in vals)
            pw = statistics.median(v[2] for v in vals)
            row["algos"][c] = dict(us=us, mj=mj, w=pw, us_all=[v[0] for v in vals])
        base = row["algos"]["torch"]["us"]
        line = "  ".join(f"{c} {a['us']:.0f}us/{a['mj']:.0f}mJ ({a['us'] / base:.3f})" for c, a in row["algos"].items())
        print(f"{name:14s} {line}", flush=True)
        doc["gemms"].append(row)
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    path = os.path.join(d, f"cublaslt-sustained-{time.strftime('%Y%m%dT%H%M', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("json:", path)


if __name__ == "__main__":
    main()
