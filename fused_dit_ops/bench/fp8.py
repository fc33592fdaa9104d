"""``python -m fused_dit_ops bench fp8``: the FP8 ops at the Qwen-Image-Edit block shapes.

Image stream [1, 8192, 3072] (zero_cond_t index) + text [1, 208, 3072], bf16, one H100:

- norm ops: the bf16 op, its ``*_fp8`` variant (quantisation in the same pass), and the bf16 op
  followed by an unfused quantisation (amax, divide, cast: what FP8 costs without the fusion);
- ``quantize_fp8`` of the attention output [8400, 3072] and, with bias + GELU-tanh, of the fc1
  output [8192, 12288], against the same in torch ops;
- the block's eight GEMMs (q|k|v, output projection, fc1, fc2 of each stream): ``F.linear`` bf16 vs
  ``fp8_linear`` (``torch._scaled_mm``, row-wise scales).

Median us (``triton.testing.do_bench``, L2 flushed), GB/s for the memory-bound rows, TFLOP/s for
the GEMMs, and the FP8 / bf16 ratio. ``--device cpu --tiny``: a smoke run of the same code.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import _configs, harness


def _unfused_quant(y):
    """amax, divide, cast: torch ops, one extra read of y (and the write of q)."""
    s = y.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448
    return (y.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench fp8", description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default) or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="small shapes: a smoke run (CPU ok), not a measurement")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out", default=None, help="JSON directory (default bench/results)")
    args = ap.parse_args(argv)
    device = _configs.resolve_device(args.device, args.tiny, "bench fp8")
    if device is None:
        return 2
    from ..ops import fp8 as F8
    from .. import ops  # noqa: F401  (registers the ops)
    import fused_dit_ops as fdo

    Li, Lt, C, H = (32, 7, 64, 256) if args.tiny else (8192, 208, 3072, 12288)
    dt = torch.float32 if (args.tiny and device == "cpu") else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    h, e, ui, ut = rnd(1, Li, C), rnd(1, Lt, C), rnd(1, Li, C), rnd(1, Lt, C)
    mi, mt = rnd(2, 6 * C, std=0.5), rnd(1, 6 * C, std=0.5)
    i6, t6 = mi.chunk(6, -1), mt.chunk(6, -1)
    idx = (torch.arange(Li, device=device) >= Li // 2).to(torch.int32)[None]
    t = lambda fn: harness.time_us_on(device, fn, rep_ms=args.rep_ms)  # noqa: E731
    act_bytes = (Li + Lt) * C * h.element_size()
    rows = []

    def row(name, us, nbytes=None, flops=None, base=None):
        r = {"case": name, "us": us}
        if nbytes:
            r["GB/s"] = nbytes / us / 1e3
        if flops:
            r["TFLOP/s"] = flops / us / 1e6
        if base is not None:
            r["ratio_vs_bf16"] = us / base
        rows.append(r)
        return us

    with torch.no_grad():
        # norm1 + modulation (both streams)
        b = row("dual_norm_scale_shift bf16", t(lambda: fdo.dual_norm_scale_shift(h, i6[0], i6[1], idx, 1e-6, e, t6[0],
                                                                                  t6[1], None, 1e-6)), 2 * act_bytes)
        row("dual_norm_scale_shift_fp8", t(lambda: F8.dual_norm_scale_shift_fp8(h, i6[0], i6[1], idx, 1e-6, e, t6[0],
                                                                                t6[1], None, 1e-6)),
            act_bytes * 1.5, base=b)

        def unfused():
            ya, yb = fdo.dual_norm_scale_shift(h, i6[0], i6[1], idx, 1e-6, e, t6[0], t6[1], None, 1e-6)
            return _unfused_quant(ya), _unfused_quant(yb)
        row("dual_norm_scale_shift bf16 + unfused quantisation", t(unfused), base=b)
        # gated residual + norm2 + modulation
        b = row("dual_gate_residual_norm_scale_shift bf16",
                t(lambda: fdo.dual_gate_residual_norm_scale_shift(h, ui, i6[2], i6[3], i6[4], idx, 1e-6, e, ut, t6[2],
                                                                  t6[3], t6[4], None, 1e-6)), 4 * act_bytes)
        row("dual_gate_residual_norm_scale_shift_fp8",
            t(lambda: F8.dual_gate_residual_norm_scale_shift_fp8(h, ui, i6[2], i6[3], i6[4], idx, 1e-6, e, ut, t6[2],
                                                                 t6[3], t6[4], None, 1e-6)), act_bytes * 3.5, base=b)
        # attention output, fc1 output
        o = rnd(1, Li + Lt, C)
        b = row("attention output: torch amax/divide/cast", t(lambda: _unfused_quant(o)))
        row("attention output: quantize_fp8", t(lambda: F8.quantize_fp8(o)), act_bytes * 1.5, base=b)
        f1, bias1 = rnd(Li, H), rnd(H)
        b = row("fc1 output: torch bias + GELU-tanh + quantisation",
                t(lambda: _unfused_quant(F.gelu(f1 + bias1, approximate="tanh"))))
        row("fc1 output: quantize_fp8(bias, gelu_tanh)", t(lambda: F8.quantize_fp8(f1, bias1, "gelu_tanh")),
            Li * H * (f1.element_size() + 1), base=b)
        # the eight GEMMs
        total_bf16 = total_fp8 = 0.0
        for name, (n, k) in (("q|k|v", (3 * C, C)), ("out proj", (C, C)), ("fc1", (H, C)), ("fc2", (C, H))):
            for stream, L in (("image", Li), ("text", Lt)):
                x, w, bb = rnd(L, k), rnd(n, k, std=0.02), rnd(n)
                xq, xs = F8.quantize_fp8(x)
                wq, ws = F8.quantize_weight(w)
                fl = 2 * L * n * k
                tb = row(f"{stream} {name} [{L}x{k}]x[{n}x{k}] F.linear bf16", t(lambda: F.linear(x, w, bb)), flops=fl)
                tf = row(f"{stream} {name} fp8_linear", t(lambda: F8.fp8_linear(xq, xs, wq, ws, bb, dt)), flops=fl,
                         base=tb)
                total_bf16 += tb
                total_fp8 += tf
        row("eight GEMMs bf16 (sum)", total_bf16)
        row("eight GEMMs fp8_linear (sum)", total_fp8, base=total_bf16)
    print(f"bench fp8: image {Li} + text {Lt} tokens, C {C}, MLP {H}, {dt}, device {device}")
    print(harness.format_table(rows, ["case", "us", "GB/s", "TFLOP/s", "ratio_vs_bf16"]))
    path = harness.write_results("fp8" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"shape": {"img": Li, "txt": Lt, "C": C, "mlp": H, "dtype": str(dt)},
                                        "device": device}, out_dir=args.out)
    print(f"results: {path}")
    return 0
