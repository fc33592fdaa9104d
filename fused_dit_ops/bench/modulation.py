"""``python -m fused_dit_ops bench modulation``: the four modulation ops vs eager and compiled torch.

Providers per (shape, op): ``eager`` (the diffusers expression: torch.where selects from the 0/1
index, bf16 arithmetic), ``compile`` (torch.compile of that same expression, default mode),
``fused`` (torch.ops.fused_dit.*), and for gate_residual also ``fused-triton`` (the Triton kernel
that serves CUDA when the C++ extension is not built). Parameters are row views of one
[rows, 6C] modulation output, as diffusers' ``mod.chunk`` produces.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from ..shapes import STREAMS
from . import harness

OPS = ["scale_shift_gate", "norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual"]
# activation-sized tensors moved per op (reads + writes), for GB/s and the floor
TRAFFIC = {"scale_shift_gate": 3, "norm_scale_shift": 2, "gate_residual_norm_scale_shift": 4, "gate_residual": 3}


def _sel(p, idx):
    if idx is None:
        return p.unsqueeze(1)
    B = p.shape[0] // 2
    return torch.where(idx.unsqueeze(-1) == 0, p[:B].unsqueeze(1), p[B:].unsqueeze(1))


# The eager expressions, written as diffusers writes them (QwenImageTransformerBlock, 0.42).
def eager_scale_shift_gate(x, shift, scale, gate, idx):
    return x * (1 + _sel(scale, idx)) + _sel(shift, idx), _sel(gate, idx)


def eager_norm_scale_shift(x, shift, scale, idx):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + _sel(scale, idx)) + _sel(shift, idx)


def eager_gate_residual_norm_scale_shift(r, u, gate, shift, scale, idx):
    h = r + _sel(gate, idx) * u
    return h, F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + _sel(scale, idx)) + _sel(shift, idx)


def eager_gate_residual(r, u, gate, idx):
    return r + _sel(gate, idx) * u


EAGER = {"scale_shift_gate": eager_scale_shift_gate, "norm_scale_shift": eager_norm_scale_shift,
         "gate_residual_norm_scale_shift": eager_gate_residual_norm_scale_shift,
         "gate_residual": eager_gate_residual}


def make_args(op, s, dtype):
    rows = 2 * s.B if s.has_index else s.B
    x = torch.randn(s.B, s.L, s.C, device="cuda", dtype=dtype)
    mod = torch.randn(rows, 6 * s.C, device="cuda", dtype=dtype) * 0.3
    shift, scale, gate, shift2, scale2, _ = mod.chunk(6, dim=-1)
    idx = None
    if s.has_index:
        idx = (torch.arange(s.L, device="cuda") >= s.L - s.n_ref).to(torch.int32).repeat(s.B, 1)
    if op == "scale_shift_gate":
        return (x, shift, scale, gate, idx)
    if op == "norm_scale_shift":
        return (x, shift, scale, idx)
    u = torch.randn_like(x)
    if op == "gate_residual":
        return (x, u, gate, idx)
    return (x, u, gate, shift2, scale2, idx)


def providers(op):
    import fused_dit_ops as fdo
    from .. import _extension
    from ..kernels import modulation as k
    out = {"eager": EAGER[op], "compile": torch.compile(EAGER[op], dynamic=False), "fused": getattr(fdo, op)}
    if op == "gate_residual" and _extension.C_LOADED:
        out["fused-triton"] = k.gate_residual
    return out


def _cfgs(spec, **extra):
    return [dict(BLOCK_M=m, BLOCK_C=c, ITERS=i, num_warps=w, **extra) for m, c, i, w in spec]


_ELEMENTWISE_SWEEP = [(4, 1024, 1, 4), (1, 1024, 1, 4), (1, 2048, 1, 4), (1, 1024, 1, 2), (1, 4096, 1, 8)]
_NORM_SWEEP = [(1, 4096, 1, 8), (2, 4096, 2, 8), (1, 4096, 8, 8), (4, 4096, 1, 16)]
_NORM_GATHER_SWEEP = [(1, 4096, 1, 8), (1, 4096, 1, 4), (2, 4096, 1, 8), (2, 4096, 2, 8), (4, 4096, 1, 16),
                      (1, 4096, 4, 8), (2, 4096, 1, 4)]
SWEEP = {"scale_shift_gate": _cfgs(_ELEMENTWISE_SWEEP),
         "norm_scale_shift": _cfgs(_NORM_SWEEP) + _cfgs(_NORM_GATHER_SWEEP, PARAM_GATHER=True),
         "gate_residual_norm_scale_shift": _cfgs(_NORM_SWEEP) + _cfgs(_NORM_GATHER_SWEEP, PARAM_GATHER=True),
         "gate_residual": _cfgs(_ELEMENTWISE_SWEEP)}


def run_sweep(dtype) -> list[dict]:
    """Time each Triton launch configuration on the Qwen-Image-Edit image stream."""
    from ..kernels import modulation as k
    s = STREAMS["qwen-edit-img"]
    bw = harness.copy_bandwidth_bytes_per_s()
    rows = []
    for op, cfgs in SWEEP.items():
        fn = getattr(k, op)
        for cfg in cfgs:
            us = harness.time_graph_us(lambda: make_args(op, s, dtype), lambda *a, cfg=cfg: fn(*a, config=cfg))
            floor = TRAFFIC[op] * s.B * s.L * s.C * dtype.itemsize / bw * 1e6
            rows.append({"op": op, "config": str(cfg), "us": us, "pct_floor": 100 * floor / us})
    return rows


DUAL_OPS = {"dual_norm_scale_shift": "norm_scale_shift",
            "dual_gate_residual_norm_scale_shift": "gate_residual_norm_scale_shift"}


def run_dual(dtype, rounds: int) -> list[dict]:
    """Image + text stream of a Qwen-Image-Edit block: one dual launch vs two single-stream launches
    (GPU time by graph replay; the difference is the second launch and the small stream's ramp)."""
    import fused_dit_ops as fdo
    si, st = STREAMS["qwen-edit-img"], STREAMS["qwen-edit-txt"]
    rows = []
    for dual, single in DUAL_OPS.items():
        def make(single=single):
            a, b = make_args(single, si, dtype), make_args(single, st, dtype)
            return (*a, 1e-6, *b, 1e-6)  # (stream a args, eps_a, stream b args, eps_b)

        def two(*args, single=single):
            n = len(args) // 2
            f = getattr(fdo, single)
            if single == "norm_scale_shift":
                return f(*args[:4], None, None, args[4]), f(*args[5:9], None, None, args[9])
            return f(*args[:n]), f(*args[n:])

        provs = {"fused-dual": getattr(fdo, dual), "fused-two-launches": two}
        times = {n: [] for n in provs}
        for _ in range(max(1, rounds)):
            for n, fn in provs.items():
                times[n].append(harness.time_graph_us(make, fn))
        for n, v in times.items():
            rows.append({"shape": "qwen-edit img+txt", "op": dual, "provider": n, "us": statistics.median(v),
                         "us_rounds": v})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench modulation",
                                 description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen-edit-img,qwen-edit-txt,flux-img,wan14b,odd-L",
                    help=f"comma list from: {', '.join(STREAMS)}")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per provider, interleaved; the median is reported (default 3)")
    ap.add_argument("--sweep", action="store_true", help="also sweep Triton tile configs (Qwen image stream)")
    ap.add_argument("--no-dual", action="store_true",
                    help="skip the dual-stream rows (image + text in one launch vs two launches)")
    ap.add_argument("--out", default=None, help="JSON directory (default bench/results)")
    args = ap.parse_args(argv)
    harness.require_cuda()
    dtype = getattr(torch, args.dtype)
    bw = harness.copy_bandwidth_bytes_per_s()
    print(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}")
    rows = []
    for sname in args.shapes.split(","):
        s = STREAMS[sname]
        for op in args.ops.split(","):
            nbytes = TRAFFIC[op] * s.B * s.L * s.C * dtype.itemsize + (s.B * s.L * 4 if s.has_index else 0)
            floor_us = nbytes / bw * 1e6
            provs = {n: f for n, f in providers(op).items() if not (n == "compile" and args.no_compile)}
            # rounds interleave the providers, so that clock/thermal drift hits all of them alike
            rounds = {n: [] for n in provs}
            for _ in range(max(1, args.rounds)):
                for pname, fn in provs.items():
                    rounds[pname].append(harness.time_graph_us(lambda: make_args(op, s, dtype), fn))
            times = {n: statistics.median(v) for n, v in rounds.items()}
            host = {}
            for pname, fn in provs.items():
                one = make_args(op, s, dtype)
                host[pname] = harness.host_us_per_call(lambda: fn(*one), n=50)
            for pname, us in times.items():
                rows.append({"shape": sname, "op": op, "provider": pname, "us": us, "us_rounds": rounds[pname],
                             "host_us": host[pname],
                             "GB/s": nbytes / us / 1e3, "floor_us": floor_us, "pct_floor": 100 * floor_us / us,
                             "x_vs_eager": times["eager"] / us,
                             "x_vs_compile": (times["compile"] / us) if "compile" in times else None})
            torch.cuda.empty_cache()
    cols = ["shape", "op", "provider", "us", "GB/s", "floor_us", "pct_floor", "x_vs_eager", "x_vs_compile",
            "host_us"]
    print("us: GPU time per call by CUDA-graph replay over rotating inputs > L2; host_us: eager host "
          "cost per call (hidden behind GPU work when the GPU is the bottleneck)")
    print(harness.format_table(rows, cols))
    extra = {"copy_bandwidth_TBps": bw / 1e12, "dtype": args.dtype, "rounds": args.rounds}
    if not args.no_dual:
        dual = run_dual(dtype, args.rounds)
        print(harness.format_table(dual, ["shape", "op", "provider", "us"]))
        extra["dual"] = dual
    if args.sweep:
        sweep = run_sweep(dtype)
        print(harness.format_table(sweep, ["op", "config", "us", "pct_floor"]))
        extra["sweep"] = sweep
    path = harness.write_results("modulation", rows, extra, args.out)
    print(f"wrote {path}")
    return 0
