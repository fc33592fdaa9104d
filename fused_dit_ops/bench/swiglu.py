"""``python -m fused_dit_ops bench swiglu``: the SwiGLU MLP input projection (FLUX.2's MLP).

``out = silu(y[:, :F]) * y[:, F:]`` of ``y = x @ W.T``, x [L, C], W [2F, C] (no bias, as FLUX.2):

  torch          ``F.linear`` (cuBLAS) + torch ``silu(a) * b`` (diffusers' ``Flux2FeedForward`` /
                 ``Flux2SwiGLU``: the [L, 2F] product is written, read back, and the silu output
                 written and read once more)
  compile        ``torch.compile`` of the same
  fused-triton   ``swiglu_linear(backend="triton")``: one Triton GEMM whose epilogue applies the
                 SwiGLU, writing only [L, F]
  fused-cublas   ``fused_dit_ops.swiglu_linear`` (backend "cublas", the default): the cuBLAS GEMM,
                 then one Triton elementwise kernel (reads [L, 2F] once, writes [L, F])

Shapes (``--shapes``): flux2-img (4096 image tokens), flux2-txt (512 text tokens), flux2-joint
(4608, the single blocks), each C 6144 -> 2 x 18432; ``LxCxF`` for others. Timed by CUDA-graph
replay on inputs rotated past L2; reported: us, TFLOP/s (2 L C 2F), the floor at 800 TFLOP/s, the
ratio to torch and compile, and each output's relative error against an fp32 product.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import harness

SHAPES = {"flux2-img": (4096, 6144, 18432), "flux2-txt": (512, 6144, 18432), "flux2-joint": (4608, 6144, 18432)}


def _shape(name):
    if name in SHAPES:
        return SHAPES[name]
    try:
        L, C, F_ = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"unknown shape {name!r}: one of {', '.join(SHAPES)} or LxCxF") from None
    return L, C, F_


def stock(x, w):
    y = F.linear(x, w)
    Fh = y.shape[-1] // 2
    return F.silu(y[..., :Fh]) * y[..., Fh:]


def providers(x, w, skip_compile=False):
    import fused_dit_ops as fdo
    out = {
        "torch": lambda a, b: stock(a, b),
        "fused-triton": lambda a, b: fdo.swiglu_linear(a, b, None, "triton"),
        "fused-cublas": lambda a, b: fdo.swiglu_linear(a, b),
    }
    if not skip_compile:
        out["compile"] = torch.compile(stock)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops bench swiglu",
                                description=harness.plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES) + " or LxCxF")
    p.add_argument("--dtype", default="bf16", help="bf16 (default) or fp16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="directory for the JSON results (default bench/results)")
    args = p.parse_args(argv)
    harness.require_cuda()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows: list[dict] = []
    for name in args.shapes.split(","):
        L, C, F_ = _shape(name)
        w = (torch.randn(2 * F_, C, device="cuda") * 0.02).to(dtype)
        flops = 2 * L * C * 2 * F_
        x0 = torch.randn(L, C, device="cuda", dtype=dtype)
        want = stock(x0.float(), w.float())
        base = {}
        start = len(rows)
        for prov, fn in providers(x0, w, args.no_compile).items():
            try:
                err = ((fn(x0, w).float() - want).norm() / want.norm()).item()
                us = harness.time_graph_us(lambda: (torch.randn(L, C, device="cuda", dtype=dtype), w), fn)
            except Exception as e:  # noqa: BLE001
                print(f"[{name}] skip {prov}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            floor = flops / 800e12 * 1e6
            rows.append(dict(shape=name, L=L, C=C, F=F_, provider=prov, us=us, TFLOPs=flops / us / 1e6,
                             floor_us=floor, pct_floor=100 * floor / us, rel_err_vs_fp32=err))
            if prov in ("torch", "compile"):
                base[prov] = us
        for r in rows[start:]:
            for b, us in base.items():
                r[f"x_vs_{b}"] = us / r["us"]
        del w, x0, want
        torch.cuda.empty_cache()
    print(harness.format_table(rows, ["shape", "provider", "us", "TFLOPs", "floor_us", "pct_floor", "x_vs_torch",
                                      "x_vs_compile", "rel_err_vs_fp32"]))
    path = harness.write_results("swiglu", rows, {"dtype": args.dtype}, out_dir=args.out)
    print(f"wrote {path}")
    return 0
