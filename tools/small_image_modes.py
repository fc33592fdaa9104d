"""Small images: which way to run the patched model? (diagnostic, GPU only)

At small image sizes the eager block is bound by host time (``tools/block_diag.py --img-tokens``).
This times one model forward (N real Qwen-Image-Edit-2511 layers, bf16, random weights) at a few
image sizes, five ways:

  stock-eager      the diffusers model
  stock-graphs     ``torch.compile(model, mode="reduce-overhead")`` (inductor + CUDA graphs)
  patched-eager    after ``fused_dit_ops.patch(model)``
  patched-graphs   patched, then ``torch.compile(model, mode="reduce-overhead")``
  patched-capture  the patched *eager* forward captured once in a ``torch.cuda.CUDAGraph`` with
                   static inputs and replayed (keeps the eager-only packing; what a serving stack
                   that captures graphs itself gets)

Timing: CUDA events around each forward, median of ``--iters`` after warm-up. Writes
small-image-modes.json (rows: size, mode, ms per forward, rel. error vs stock eager) to $OUT/--out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def timed_ms(fn, iters):
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sizes", default="256,1024", help="image tokens per image (target + 1 reference)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="stock-eager,stock-graphs,patched-eager,patched-graphs,patched-capture")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import fused_dit_ops as fdo
    from fused_dit_ops.bench import harness
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs

    model = build_qwen_image_transformer("edit-2511", num_layers=args.layers, device="cuda", dtype=torch.bfloat16)
    modes = args.modes.split(",")
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        kw = make_qwen_inputs(model, img_tokens=(n, n))
        ref = None
        for mode in modes:
            torch._dynamo.reset()
            if mode.startswith("patched"):
                fdo.patch(model, reuse_mod=False)  # one repeated forward: no GEMV reuse
            try:
                with torch.no_grad():
                    if mode.endswith("graphs"):
                        fwd = torch.compile(model, mode="reduce-overhead", fullgraph=False)
                        call = lambda fwd=fwd: fwd(**kw)[0]  # noqa: E731
                    elif mode == "patched-capture":
                        for _ in range(2):
                            model(**kw)
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            static_out = model(**kw)[0]
                        call = lambda g=g, o=static_out: (g.replay(), o)[1]  # noqa: E731
                    else:
                        call = lambda: model(**kw)[0]  # noqa: E731
                    t0 = time.perf_counter()
                    for _ in range(args.warmup):
                        out = call()
                    torch.cuda.synchronize()
                    warm_s = time.perf_counter() - t0
                    ms = timed_ms(call, args.iters)
                    out = call().float().clone()
                    torch.cuda.synchronize()
                if ref is None:
                    ref = out
                err = ((out - ref).norm() / ref.norm()).item()
                row = {"img_tokens": [n, n], "mode": mode, "ms_forward": ms, "ms_per_layer": ms / args.layers,
                       "warmup_s": warm_s, "rel_err_vs_first": err}
            except Exception as e:  # keep the other modes
                row = {"img_tokens": [n, n], "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                call = g = fwd = None  # noqa: F841 (drop graphs and their memory pools)
                if mode.startswith("patched"):
                    fdo.unpatch(model)
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {"benchmark": "small-image modes", "tool": "tools/small_image_modes.py", "env": harness.env_info(),
           "layers": args.layers, "iters": args.iters, "rows": rows}
    with open(os.path.join(args.out, "small-image-modes.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
