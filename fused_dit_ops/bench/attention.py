"""``python -m fused_dit_ops bench attention``: every attention backend, the automatic choice, and
the shim's overhead over calling the chosen backend directly.

Rows per shape (``fused_dit_ops.shapes.ATTENTION``: qwen-edit N 8400, flux N 4608, wan14b N 32760,
short N 1024; B 1, 128-dim heads, non-causal, bf16 by default):

- ``<backend>``: ``torch.ops.fused_dit.attention(..., backend=<backend>)`` (forced);
- ``auto``: the op with the automatic choice (what a model gets);
- ``direct:<chosen>``: the chosen backend called straight (``attention_dispatch.run_backend``:
  the library function, e.g. ``fa3_fwd_interface.flash_attn_func`` or SDPA under
  ``sdpa_kernel``), without the op's dispatch, checks and selection. ``overhead_pct`` on the
  ``auto`` row = auto / direct - 1 (target <= 2%).

Columns: ms (median, CUDA events, ``harness.time_us``), TFLOP/s = 4 B N^2 H D / t, ``vs_best``
= t_best / t (1.0 = fastest row of the shape). ``auto`` and ``direct`` are timed alternately
three times each and the smallest median kept, so clock drift does not show up as overhead.
Unavailable backends are listed with the reason and skipped; ``math`` is skipped above N 4096
(it materialises the [B, H, N, N] score matrix).

``--fp8`` adds, per shape, the FP8 attention of ``patch(attention_precision="fp8")``:

- ``fp8``: ``fused_dit.attention_fp8`` on e4m3 q, k, v with per-(batch, head) descales
  (FlashAttention-3's FP8 forward; the quantisation not included);
- ``step-bf16``: the block's bf16 attention step, ``joint_qk_norm_rope_`` (QK RMSNorm + RoPE in place
  on the joint q, k) then ``attention`` (automatic backend);
- ``step-fp8``: the FP8 step, ``joint_qk_norm_rope_fp8`` (the same norm + RoPE written as e4m3, v
  quantised) then ``attention_fp8``: what FP8 attention saves or costs in a block.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import harness

_MATH_MAX_N = 4096


def _flops(B, N, H, D) -> float:
    return 4.0 * B * N * N * H * D


def _host_select_us(q, k, v) -> float:
    """Host time of the op's Python-side work per call (checks + cached selection), no kernel."""
    from ..attention_dispatch import select
    from ..ops.attention import _check_attention
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        _check_attention(q, k, v, None, False, None)
        select(q, k, v, False, None)
    return (time.perf_counter() - t0) / n * 1e6


def _fp8_rows(add, make, B, N, H, D, Lt, dtype, sname, skipped, dev="cuda") -> None:
    """The ``--fp8`` rows of one shape (see the module doc): ``add(label, backend, fn, make_args)``
    times ``fn`` over argument sets from ``make_args``."""
    from .. import reference as ref
    from ..ops import attention_fp8 as A8
    from ..ops.rope import joint_qk_norm_rope_
    why = A8.fp8_attention_unavailable_reason(dev)
    if why is None and dtype != torch.bfloat16:
        why = "FP8 attention takes a bfloat16 model (FlashAttention-3's FP8 forward returns bfloat16)"
    if why is not None:
        skipped.append(dict(shape=sname, backend="fp8", reason=why))
        print(f"  skip {sname}/fp8: {why}")
        return
    ws = [(1 + 0.1 * torch.randn(D, device=dev)).to(dtype) for _ in range(4)]
    pos = torch.arange(max(Lt, N - Lt, 1), device=dev, dtype=torch.float32)[:, None]
    ang = pos / 10000.0 ** (torch.arange(D // 2, device=dev, dtype=torch.float32) / (D // 2))
    tab = torch.cat([ang.cos(), ang.sin()], 1).contiguous()

    def make_joint():  # q, k, v column views of one joint projection, as in a block
        buf = torch.randn(B, N, 3 * H * D, device=dev, dtype=dtype)
        return tuple(buf[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))

    def make_fp8():  # e4m3 q, k, v with their per-(batch, head) descales
        qs = [ref.quantize_fp8_heads(t) for t in make()]
        return (*(t for t, _ in qs), *(d for _, d in qs))

    op = torch.ops.fused_dit.attention.default
    add("fp8", "fa3-fp8", lambda *a: A8.attention_fp8(*a), make_fp8)

    def step_bf16(q, k, v):
        joint_qk_norm_rope_(q, k, Lt, *ws, tab, tab)
        return op(q, k, v, None, False, None)

    def step_fp8(q, k, v):
        o = A8.joint_qk_norm_rope_fp8(q, k, v, Lt, *ws, tab, tab)
        return A8.attention_fp8(*o)

    for label, fn in (("step-bf16", step_bf16), ("step-fp8", step_fp8)):
        add(label, label, fn, make_joint)


def main(argv=None) -> int:
    import fused_dit_ops  # noqa: F401  (registers the op)
    from .. import attention_dispatch as disp
    from ..shapes import ATTENTION

    p = argparse.ArgumentParser(prog="python -m fused_dit_ops bench attention",
                                description=harness.plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(ATTENTION), help=f"comma list of {', '.join(ATTENTION)}")
    p.add_argument("--backends", default=",".join(disp.BACKENDS), help="comma list of backends to time")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rep-ms", type=int, default=300, help="timing window per row (default 300 ms)")
    p.add_argument("--fp8", action="store_true",
                   help="also time FP8 attention (attention_fp8) and the bf16 / FP8 attention steps of a block "
                        "(QK norm + RoPE, then attention); needs FlashAttention-3 FP8 (sm90), bf16")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    harness.require_cuda()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in ATTENTION]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(ATTENTION)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in disp.BACKENDS]
    if bad:
        p.error(f"unknown backends {bad}; choose from {', '.join(disp.BACKENDS)}")

    print("attention backends on this device:")
    for b in disp.attention_backends(dtype=dtype):
        print(f"  {b.name:10s} {'yes  [' + b.impl + ']' if b.available else 'no: ' + b.reason}")

    rows, skipped = [], []
    op = torch.ops.fused_dit.attention.default
    for sname in names:
        s = ATTENTION[sname]
        B, N, H, D = s.B, s.N, s.H, s.D
        # Big shapes are ~20 ms per call: a shorter window keeps the run within ~3 minutes.
        rep = args.rep_ms if N <= 10000 else max(args.rep_ms // 2, 100)

        def make():
            return tuple(torch.randn(B, N, H, D, device="cuda", dtype=dtype) for _ in range(3))

        sets = 2 if N <= 10000 else 1
        probe = make()
        chosen = disp.select(*probe, False, None)
        shape_rows = []

        def add(label, backend, fn, make_args=None):
            us = harness.time_us(harness.rotating(make_args or make, fn, n_sets=sets), rep_ms=rep)
            r = dict(shape=sname, B=B, N=N, H=H, D=D, dtype=args.dtype, row=label, backend=backend,
                     ms=us / 1e3, tflops=_flops(B, N, H, D) / (us * 1e-6) / 1e12)
            shape_rows.append(r)
            return r

        for b in backends:
            why = disp.runtime_reason(b, disp.runtime_capabilities("cuda"), *probe, False)
            if why is None and b == "math" and N > _MATH_MAX_N:
                why = disp.Reason("input", f"math: skipped above N={_MATH_MAX_N} "
                                           f"(materialises [B, H, N, N] scores)")
            if why is not None:
                skipped.append(dict(shape=sname, backend=b, reason=why.text))
                print(f"  skip {sname}/{b}: {why.text}")
                continue
            add(b, b, lambda q, k, v, b=b: op(q, k, v, None, False, b))

        # auto vs direct, alternated; the smallest median of each kept.
        best = {}
        for _ in range(3):
            for label, fn in (("auto", lambda q, k, v: op(q, k, v, None, False, None)),
                              (f"direct:{chosen}", lambda q, k, v: disp.run_backend(chosen, q, k, v))):
                us = harness.time_us(harness.rotating(make, fn, n_sets=sets), rep_ms=rep)
                best[label] = min(best.get(label, float("inf")), us)
        for label, us in best.items():
            shape_rows.append(dict(shape=sname, B=B, N=N, H=H, D=D, dtype=args.dtype, row=label,
                                   backend=chosen, ms=us / 1e3,
                                   tflops=_flops(B, N, H, D) / (us * 1e-6) / 1e12))
        if args.fp8:
            _fp8_rows(add, make, B, N, H, D, s.L_txt or 0, dtype, sname, skipped)
        auto_row = next(r for r in shape_rows if r["row"] == "auto")
        auto_row["overhead_pct"] = 100.0 * (best["auto"] / best[f"direct:{chosen}"] - 1.0)
        auto_row["host_us_per_call"] = _host_select_us(*probe)
        t_best = min(r["ms"] for r in shape_rows)
        for r in shape_rows:
            r["vs_best"] = t_best / r["ms"]
        rows += shape_rows
        del probe
        torch.cuda.empty_cache()

    cols = ["shape", "N", "H", "row", "ms", "tflops", "vs_best", "overhead_pct", "host_us_per_call"]
    print(harness.format_table(rows, cols))
    targets = {}
    qe = [r for r in rows if r["shape"] == "qwen-edit" and r["row"] == "auto"]
    if qe:
        targets = {"qwen_edit_auto_tflops": qe[0]["tflops"], "target_tflops": 670.0,
                   "qwen_edit_overhead_pct": qe[0]["overhead_pct"], "target_overhead_pct": 2.0}
        print(f"qwen-edit auto: {qe[0]['tflops']:.0f} TFLOP/s (target >= 670), overhead "
              f"{qe[0]['overhead_pct']:.2f}% (target <= 2%)")
    path = harness.write_results("attention", rows, extra={"skipped": skipped, "targets": targets},
                                 out_dir=args.out)
    print(f"wrote {path}")
    return 0
