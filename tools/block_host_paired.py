"""Host time of one eager Qwen-Image-Edit block, stock vs patched, in paired rounds (diagnostic, GPU).

At small image sizes the eager block is bound by host time (Python, dispatch, launch calls), and
that time moves by tens of percent between processes and machines on the GPU hosts here. So this
alternates stock and patched in one process: each round unpatches, times the stock block, patches
again and times the patched block (patching is outside the timed regions), and reports medians and
the median of the per-round ratios patched / stock. Measures, per call:
  host_ms : host time with the GPU kept busy (``block_diag.host_times``), and host_cpu_ms the
            thread's CPU time over the same calls (less sensitive to the host's scheduling noise);
  e2e_ms  : back-to-back calls, wall clock (``block_diag.e2e_ms``).
Writes block-host-paired<tag>.json to $OUT or --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_diag import e2e_ms, host_times  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--img-tokens", type=int, nargs="+", default=[1024, 1024],
                    help="token count per image, target first (default 1024 1024)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import fused_dit_ops as fdo
    from fused_dit_ops.bench import harness
    from fused_dit_ops.bench.block import capture_block_call
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs

    model = build_qwen_image_transformer("edit-2511", num_layers=1, device="cuda", dtype=torch.bfloat16)
    inputs = make_qwen_inputs(model, img_tokens=args.img_tokens)
    stock_call = capture_block_call(model, inputs)
    fdo.patch(model)
    patched_call = capture_block_call(model, inputs)

    def runner(bak):
        block, a, kw = bak

        def call():
            with torch.no_grad():
                return block(*a, **kw)
        return call

    s_call, p_call = runner(stock_call), runner(patched_call)
    rows = []
    for r in range(args.rounds):
        fdo.unpatch(model)
        s_call()
        torch.cuda.synchronize()
        s = dict(zip(("host_ms", "host_cpu_ms"), host_times(s_call)), e2e_ms=e2e_ms(s_call))
        fdo.patch(model)
        p_call()
        torch.cuda.synchronize()
        p = dict(zip(("host_ms", "host_cpu_ms"), host_times(p_call)), e2e_ms=e2e_ms(p_call))
        rows.append({"round": r, "stock": s, "patched": p})
        print(f"round {r}: stock host {s['host_ms']:.3f} (cpu {s['host_cpu_ms']:.3f}) e2e {s['e2e_ms']:.3f} | "
              f"patched host {p['host_ms']:.3f} (cpu {p['host_cpu_ms']:.3f}) e2e {p['e2e_ms']:.3f} ms", flush=True)
    fdo.unpatch(model)

    def med(f):
        return statistics.median(f(x) for x in rows)

    summary = {f"{w}_{k}": med(lambda x, w=w, k=k: x[w][k]) for w in ("stock", "patched")
               for k in ("host_ms", "host_cpu_ms", "e2e_ms")}
    summary["ratio_host"] = med(lambda x: x["patched"]["host_ms"] / x["stock"]["host_ms"])
    summary["ratio_host_cpu"] = med(lambda x: x["patched"]["host_cpu_ms"] / x["stock"]["host_cpu_ms"])
    summary["ratio_e2e"] = med(lambda x: x["patched"]["e2e_ms"] / x["stock"]["e2e_ms"])
    print("medians: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    res = {"img_tokens": args.img_tokens, "rounds": rows, "median": summary, "env": harness.env_info(),
           "command": "python tools/block_host_paired.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(args.out, f"block-host-paired{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
