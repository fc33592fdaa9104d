"""``python -m fused_dit_ops bench fp8``: the FP8 ops at the Qwen-Image-Edit block shapes.

Image stream [1, 8192, 3072] (zero_cond_t index) + text [1, 208, 3072], bf16, one H100:

- norm ops: the bf16 op, its ``*_fp8`` variant (quantisation in the same pass), and the bf16 op
  followed by an unfused quantisation (amax, divide, cast: what FP8 costs without the fusion);
- ``quantize_fp8`` of the attention output [8400, 3072] and, with bias + GELU-tanh, of the fc1
  output [8192, 12288], against the same in torch ops;
- ``quantize_fp8_cat`` of a single-stream block's output-projection input [attention | act(MLP)]
  (Flux.1: 3072 + GELU-tanh of 12288; FLUX.2: 6144 + SwiGLU of 2 x 18432; 4608 tokens) against
  the activation, cat and quantisation in torch ops; ``gate_residual_layer_norm_fp8`` at a Wan
  block's shape (32760 x 5120) against its bf16 op;
- the block's eight GEMMs (q|k|v, output projection, fc1, fc2 of each stream): ``F.linear`` bf16 vs
  ``fp8_linear`` (``torch._scaled_mm``, row-wise scales).

GPU time per call in us (``harness.time_graph_us``: CUDA-graph replay over rotating input sets
larger than L2, so no host launch cost and inputs from DRAM), GB/s for the memory-bound rows,
TFLOP/s for the GEMMs, the FP8 / bf16 ratio, and for the norm ops the host time per eager call
(``host_us``: what an uncaptured, uncompiled caller pays on the CPU). ``--device cpu --tiny``: a
smoke run of the same code.
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

    def t(make, fn):
        """GPU time of fn(*make()) (fresh input sets from ``make``, rotated past L2)."""
        if device == "cuda":
            return harness.time_graph_us(make, fn)
        a = make()
        return harness.time_us_on(device, lambda: fn(*a), rep_ms=args.rep_ms)

    def host(fn):
        return harness.host_us_per_call(fn) if device == "cuda" else None

    act_bytes = (Li + Lt) * C * h.element_size()
    rows = []

    def row(name, us, nbytes=None, flops=None, base=None, host_us=None):
        r = {"case": name, "us": us}
        if host_us is not None:
            r["host_us"] = host_us
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
        streams = lambda: (rnd(1, Li, C), rnd(1, Lt, C))  # noqa: E731
        norm16 = lambda h, e: fdo.dual_norm_scale_shift(h, i6[0], i6[1], idx, 1e-6, e, t6[0], t6[1], None, 1e-6)  # noqa: E731
        norm8 = lambda h, e: F8.dual_norm_scale_shift_fp8(h, i6[0], i6[1], idx, 1e-6, e, t6[0], t6[1], None, 1e-6)  # noqa: E731
        b = row("dual_norm_scale_shift bf16", t(streams, norm16), 2 * act_bytes, host_us=host(lambda: norm16(h, e)))
        row("dual_norm_scale_shift_fp8", t(streams, norm8), act_bytes * 1.5, base=b, host_us=host(lambda: norm8(h, e)))

        def unfused(h, e):
            ya, yb = norm16(h, e)
            return _unfused_quant(ya), _unfused_quant(yb)
        row("dual_norm_scale_shift bf16 + unfused quantisation", t(streams, unfused), base=b)
        # gated residual + norm2 + modulation
        four = lambda: (rnd(1, Li, C), rnd(1, Li, C), rnd(1, Lt, C), rnd(1, Lt, C))  # noqa: E731
        grn16 = lambda h, ui, e, ut: fdo.dual_gate_residual_norm_scale_shift(  # noqa: E731
            h, ui, i6[2], i6[3], i6[4], idx, 1e-6, e, ut, t6[2], t6[3], t6[4], None, 1e-6)
        grn8 = lambda h, ui, e, ut: F8.dual_gate_residual_norm_scale_shift_fp8(  # noqa: E731
            h, ui, i6[2], i6[3], i6[4], idx, 1e-6, e, ut, t6[2], t6[3], t6[4], None, 1e-6)
        b = row("dual_gate_residual_norm_scale_shift bf16", t(four, grn16), 4 * act_bytes,
                host_us=host(lambda: grn16(h, ui, e, ut)))
        row("dual_gate_residual_norm_scale_shift_fp8", t(four, grn8), act_bytes * 3.5, base=b,
            host_us=host(lambda: grn8(h, ui, e, ut)))
        # attention output, fc1 output
        att = lambda: (rnd(1, Li + Lt, C),)  # noqa: E731
        b = row("attention output: torch amax/divide/cast", t(att, _unfused_quant))
        row("attention output: quantize_fp8", t(att, F8.quantize_fp8), act_bytes * 1.5, base=b)
        bias1 = rnd(H)
        fc1 = lambda: (rnd(Li, H),)  # noqa: E731
        b = row("fc1 output: torch bias + GELU-tanh + quantisation",
                t(fc1, lambda f1: _unfused_quant(F.gelu(f1 + bias1, approximate="tanh"))))
        row("fc1 output: quantize_fp8(bias, gelu_tanh)", t(fc1, lambda f1: F8.quantize_fp8(f1, bias1, "gelu_tanh")),
            Li * H * (2 + 1), base=b)
        # Flux.1 single-stream block: [attention | GELU-tanh(MLP columns of the q|k|v|MLP output)] -> proj_out
        # input, one row per token; FLUX.2 (C 6144, SwiGLU over 2 x 18432) the same way
        L1 = Li // 2 + 512 if not args.tiny else Li
        for label, (c, f, act) in (("Flux.1 single", (C, H, "gelu_tanh")),
                                   ("FLUX.2 single", ((96, 288, "swiglu") if args.tiny else (6144, 18432, "swiglu")))):
            fw = 2 * f if act == "swiglu" else f
            pair = lambda c=c, fw=fw: (rnd(1, L1, c), rnd(1, L1, 3 * c + fw)[..., 3 * c:])  # noqa: E731

            def cat_torch(ao, mlp, act=act, f=f):
                m = (F.gelu(mlp, approximate="tanh") if act == "gelu_tanh"
                     else F.silu(mlp[..., :f]) * mlp[..., f:])
                return _unfused_quant(torch.cat([ao, m], -1))
            b = row(f"{label} proj_out input [{L1}x({c}+{f})]: torch {act} + cat + quantisation", t(pair, cat_torch))
            row(f"{label} proj_out input: quantize_fp8_cat",
                t(pair, lambda ao, mlp, act=act: F8.quantize_fp8_cat(ao, mlp, act)),
                L1 * ((c + fw) * 2 + c + f), base=b)
        # Wan block: gated residual + affine norm2, quantised for the cross-attention q (C 5120, fp32 gate)
        cw, lw = (64, Li) if args.tiny else (5120, 32760)
        wan = lambda: (rnd(1, lw, cw), rnd(1, lw, cw))  # noqa: E731
        gw = (torch.randn(1, 6, cw, generator=g) * 0.5).to(device)[:, 2]
        ww, bw = (1 + 0.1 * torch.randn(cw, generator=g)).to(device), (0.1 * torch.randn(cw, generator=g)).to(device)
        wbytes = lw * cw * h.element_size()
        b = row(f"Wan gate_residual_layer_norm [{lw}x{cw}] bf16",
                t(wan, lambda xw, uw: fdo.ops.gate_residual_norm.gate_residual_layer_norm(xw, uw, gw, None, ww, bw)),
                4 * wbytes)
        row("Wan gate_residual_layer_norm_fp8",
            t(wan, lambda xw, uw: F8.gate_residual_layer_norm_fp8(xw, uw, gw, None, ww, bw)), 3.5 * wbytes, base=b)
        # the eight GEMMs (activations rotated; one weight each)
        total_bf16 = total_fp8 = 0.0
        for name, (n, k) in (("q|k|v", (3 * C, C)), ("out proj", (C, C)), ("fc1", (H, C)), ("fc2", (C, H))):
            for stream, L in (("image", Li), ("text", Lt)):
                w, bb = rnd(n, k, std=0.02), rnd(n)
                wq, ws = F8.quantize_weight(w)
                fl = 2 * L * n * k
                x16 = lambda L=L, k=k: (rnd(L, k),)  # noqa: E731
                x8 = lambda L=L, k=k: F8.quantize_fp8(rnd(L, k))  # noqa: E731
                tb = row(f"{stream} {name} [{L}x{k}]x[{n}x{k}] F.linear bf16",
                         t(x16, lambda x, w=w, bb=bb: F.linear(x, w, bb)), flops=fl)
                tf = row(f"{stream} {name} fp8_linear",
                         t(x8, lambda xq, xs, wq=wq, ws=ws, bb=bb: F8.fp8_linear(xq, xs, wq, ws, bb, dt)), flops=fl,
                         base=tb)
                total_bf16 += tb
                total_fp8 += tf
        row("eight GEMMs bf16 (sum)", total_bf16)
        row("eight GEMMs fp8_linear (sum)", total_fp8, base=total_bf16)
    print(f"bench fp8: image {Li} + text {Lt} tokens, C {C}, MLP {H}, {dt}, device {device}")
    print(harness.format_table(rows, ["case", "us", "GB/s", "TFLOP/s", "ratio_vs_bf16", "host_us"]))
    path = harness.write_results("fp8" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"shape": {"img": Li, "txt": Lt, "C": C, "mlp": H, "dtype": str(dt)},
                                        "device": device}, out_dir=args.out)
    print(f"results: {path}")
    return 0
