"""Experiment: under the 700 W cap, does overlapping the block's weight-bound work with its
compute-bound work pay?

The patched Qwen-Image-Edit block (L_img 8192, L_txt 208, D 3072) spends ~3.5 ms in image GEMMs and
attention (compute-bound, power-capped) and ~0.16 ms in the text stream's small-M GEMMs and the
packed modulation GEMV (weight-bandwidth bound). Those are independent of the image stream, so they
can run on a side stream, on SMs left free by a cuBLAS SM carveout
(``torch._C._set_sm_carveout_experimental``) and fa3's ``sm_margin``. A side stream alone did not
help on an H100 (``grouped-gemm-*``): the image GEMMs fill every SM.

A block-shaped sequence of the same GEMMs + fa3 (+ memory-bound stand-ins for the norm ops) is
timed back to back for ``--seconds`` (sustained, as in ``bench block``), with NVML energy, for:
  seq            : everything on one stream (what the patched block does)
  ovl-c{C}-m{M}  : text GEMMs + next block's modulation GEMV on a side stream; image GEMMs with
                   C SMs carved out, fa3 with sm_margin M
and the components alone (image fc1 with a carveout, fa3 with a margin). Rounds are rotated.
Writes $OUT/overlap-experiments.json.  Usage: PYTHONPATH=$PWD python tools/overlap_experiments.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fused_dit_ops.bench import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="seq,ovl-c0-m0,ovl-c8-m8,ovl-c16-m16,ovl-c0-m8")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    bf = torch.bfloat16
    Li, Lt, D, H = 8192, 208, 3072, 24
    W = lambda n, k: torch.randn(n, k, device=dev, dtype=bf) * 0.02  # noqa: E731
    B = lambda n: torch.randn(n, device=dev, dtype=bf) * 0.02  # noqa: E731
    xi, xt = torch.randn(Li, D, device=dev, dtype=bf), torch.randn(Lt, D, device=dev, dtype=bf)
    w = {s: dict(qkv=(W(3 * D, D), B(3 * D)), out=(W(D, D), B(D)), fc1=(W(4 * D, D), B(4 * D)),
                 fc2=(W(D, 4 * D), B(D))) for s in ("img", "txt")}
    wmod, bmod = W(12 * D, D), B(12 * D)  # img_mod + txt_mod packed
    temb = torch.randn(2, D, device=dev, dtype=bf)
    q = torch.randn(1, Li + Lt, H, 128, device=dev, dtype=bf)
    k, v = torch.randn_like(q), torch.randn_like(q)
    big = torch.randn(Li + Lt, D, device=dev, dtype=bf)

    import fa3_fwd_interface  # noqa: F401  (registers torch.ops.fa3_fwd)
    fa3_op = torch.ops.fa3_fwd.fwd.default
    arg_names = [a.name for a in fa3_op._schema.arguments]
    has_margin = "sm_margin" in arg_names
    print("fa3 schema args:", arg_names)
    carve_ok = hasattr(torch._C, "_set_sm_carveout_experimental")
    print("sm carveout api:", carve_ok, "fa3 sm_margin:", has_margin)

    def attn(margin=0):
        kw = {"sm_margin": margin} if has_margin and margin else {}
        return fa3_op(q, k, v, softmax_scale=128 ** -0.5, is_causal=False, num_splits=1, **kw)[0]

    def lin(x, p):
        return F.linear(x, p[0], p[1])

    def fc1(x, p):
        return torch._addmm_activation(p[1], x, p[0].t(), use_gelu=True)

    def mem():  # a memory-bound stand-in for a norm op: 2 reads + 1 write of [L, D]
        return torch.add(big, big)

    def set_carve(c):
        if carve_ok:
            torch._C._set_sm_carveout_experimental(c if c else None)

    side = torch.cuda.Stream()

    _hi = torch.randn(Li, 4 * D, device=dev, dtype=bf)

    def seq_clean():
        set_carve(0)
        lin(xt, w["txt"]["qkv"]); lin(xi, w["img"]["qkv"]); mem()
        attn(); lin(xi, w["img"]["out"]); lin(xt, w["txt"]["out"]); mem()
        fc1(xi, w["img"]["fc1"]); ht = fc1(xt, w["txt"]["fc1"]); lin(ht, w["txt"]["fc2"]); lin(_hi, w["img"]["fc2"])
        F.linear(temb, wmod, bmod); mem()

    def both(side_fn, main_fn, join=True):
        """side_fn on the side stream (after the main stream's work so far) alongside main_fn."""
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            side_fn()
        main_fn()
        if join:
            main.wait_stream(side)

    def make_ovl(c, m):
        def ovl():
            set_carve(c)
            both(lambda: lin(xt, w["txt"]["qkv"]), lambda: lin(xi, w["img"]["qkv"]))
            mem()
            # the next block's modulation (depends on temb only) alongside attention, joined below
            both(lambda: F.linear(temb, wmod, bmod), lambda: attn(m), join=False)
            both(lambda: lin(xt, w["txt"]["out"]), lambda: lin(xi, w["img"]["out"]))
            mem()
            both(lambda: lin(fc1(xt, w["txt"]["fc1"]), w["txt"]["fc2"]),
                 lambda: (fc1(xi, w["img"]["fc1"]), lin(_hi, w["img"]["fc2"])))
            mem()
            set_carve(0)
        return ovl

    variants = {}
    for name in args.variants.split(","):
        if name == "seq":
            variants[name] = seq_clean
        else:
            c, m = name.split("-")[1:]
            variants[name] = make_ovl(int(c[1:]), int(m[1:]))
    for c in (0, 8, 16):
        def one_fc1(c=c):
            set_carve(c)
            fc1(xi, w["img"]["fc1"])
            set_carve(0)
        variants[f"img-fc1-c{c}"] = one_fc1
    for m in (0, 8, 16):
        variants[f"fa3-m{m}"] = (lambda m=m: attn(m))

    # correctness of the carve-out path: same result with and without
    set_carve(16); r1 = fc1(xi, w["img"]["fc1"]); set_carve(0); r0 = fc1(xi, w["img"]["fc1"])
    print("carveout result equal:", bool(torch.equal(r0, r1)))
    if has_margin:
        print("fa3 margin result max diff:", (attn(16) - attn(0)).abs().max().item())

    names = list(variants)
    res = {n: [] for n in names}
    for r, order in harness.rotated_rounds(names, args.rounds):
        for n in order:
            fn = variants[n]
            harness.energy_per_call(fn, 0.5)  # heat to the sustained state
            e = harness.energy_per_call(fn, args.seconds)
            res[n].append(e)
            print(f"round {r} {n:16s} {e['ms_per_call_b2b'] * 1e3:9.1f} us  {e['j_per_call'] * 1e3:8.1f} mJ  {e['avg_power_w']:6.0f} W", flush=True)
    rows = []
    for n in names:
        us = [e["ms_per_call_b2b"] * 1e3 for e in res[n]]
        mj = [e["j_per_call"] * 1e3 for e in res[n]]
        w_ = [e["avg_power_w"] for e in res[n]]
        rows.append(dict(variant=n, us_median=statistics.median(us), us_all=us, mj_median=statistics.median(mj),
                         power_w_median=statistics.median(w_)))
    base = next((r["us_median"] for r in rows if r["variant"] == "seq"), None)
    print(f"\n{'variant':16s} {'us':>9s} {'vs seq':>7s} {'mJ':>8s} {'W':>6s}")
    for r in rows:
        rel = r["us_median"] / base if base and not r["variant"].startswith(("img-", "fa3-")) else float("nan")
        print(f"{r['variant']:16s} {r['us_median']:9.1f} {rel:7.3f} {r['mj_median']:8.1f} {r['power_w_median']:6.0f}")
    out = dict(benchmark="overlap of the block's weight-bound work (side stream, SM carve-out, fa3 sm_margin)",
               tool="tools/overlap_experiments.py", env=harness.env_info(), args=vars(args),
               fa3_sm_margin=has_margin, carveout_api=carve_ok, rows=rows)
    d = os.environ.get("OUT", "bench/results")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "overlap-experiments.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("json:", path)


if __name__ == "__main__":
    main()
