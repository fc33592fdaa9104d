"""Experiment: can the text stream's small-M projections ride along with the image stream's?

Per projection of a Qwen block (text M=208 + image M=8192, bf16), timed with CUDA events over a
loop (no L2 flush; weights exceed L2 anyway):
  separate : F.linear(txt) then F.linear(img) (what the patched block runs; fc1 with the
             cuBLASLt GELU epilogue)
  grouped  : torch._grouped_mm on the joint [txt; img] rows with the two weights stacked (no bias:
             the op has none, so this is a lower bound for that route)
  streams  : text GEMM on a side stream, overlapping the image GEMM
  one      : F.linear on all 8400 rows with one weight (what the pair could cost at best)
Writes $OUT/grouped-gemm.json.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F


def bench(fn, iters=50, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / iters * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    dev = "cuda"
    torch.manual_seed(0)
    Lt, Li = 208, 8192
    rows = []
    side = torch.cuda.Stream()
    for name, K, N, gelu in [("qkv", 3072, 9216, False), ("out", 3072, 3072, False),
                             ("fc1", 3072, 12288, True), ("fc2", 12288, 3072, False)]:
        x = torch.randn(Lt + Li, K, device=dev, dtype=torch.bfloat16)
        xt, xi = x[:Lt], x[Lt:]
        W = torch.randn(2, N, K, device=dev, dtype=torch.bfloat16) * 0.02
        bias = torch.randn(2, N, device=dev, dtype=torch.bfloat16) * 0.02
        offs = torch.tensor([Lt, Lt + Li], device=dev, dtype=torch.int32)

        def lin(xx, g):
            if gelu:
                return torch._addmm_activation(bias[g], xx, W[g].t(), use_gelu=True)
            return F.linear(xx, W[g], bias[g])

        def separate():
            lin(xt, 0)
            lin(xi, 1)

        def one():
            lin(x, 1)

        def grouped():
            torch._grouped_mm(x, W.transpose(-2, -1), offs=offs)

        def streams():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                lin(xt, 0)
            lin(xi, 1)
            torch.cuda.current_stream().wait_stream(side)

        def img_only():
            lin(xi, 1)

        def txt_only():
            lin(xt, 0)

        row = {"proj": name, "K": K, "N": N, "gelu": gelu}
        for k, fn in [("separate", separate), ("img_only", img_only), ("txt_only", txt_only),
                      ("one", one), ("streams", streams), ("grouped", grouped)]:
            try:
                row[k + "_us"] = bench(fn)
            except Exception as e:  # noqa: BLE001
                row[k + "_us"] = None
                row[k + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        try:
            g = torch._grouped_mm(x, W.transpose(-2, -1), offs=offs).float()
            ref = torch.cat([xt.float() @ W[0].float().t(), xi.float() @ W[1].float().t()])
            row["grouped_rel_err"] = ((g - ref).norm() / ref.norm()).item()
        except Exception as e:  # noqa: BLE001
            row["grouped_rel_err"] = str(e)[:100]
        rows.append(row)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    # adaLN modulation linears: img_mod on temb [2, D] and txt_mod on temb[:1], separate vs one
    # packed [2D*6, D] weight
    temb = torch.randn(2, 3072, device=dev, dtype=torch.bfloat16)
    Wm = torch.randn(2 * 18432, 3072, device=dev, dtype=torch.bfloat16) * 0.02
    bm = torch.randn(2 * 18432, device=dev, dtype=torch.bfloat16) * 0.02
    row = {"proj": "mod", "K": 3072, "N": 18432}
    row["separate_us"] = bench(lambda: (F.linear(F.silu(temb), Wm[:18432], bm[:18432]),
                                        F.linear(F.silu(temb[:1]), Wm[18432:], bm[18432:])))
    row["packed_us"] = bench(lambda: F.linear(F.silu(temb), Wm, bm))
    row["packed_nosilu_us"] = bench(lambda: F.linear(temb, Wm, bm))
    rows.append(row)
    print(row, flush=True)
    p = torch.cuda.get_device_properties(0)
    res = dict(benchmark="text+image projections: separate vs grouped vs side stream",
               tool="tools/grouped_gemm_experiments.py",
               env=dict(gpu=p.name, torch=torch.__version__, cuda=torch.version.cuda,
                        git_commit=os.environ.get("FUSED_DIT_GIT_COMMIT", "?"),
                        date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())),
               rows=rows)
    with open(os.path.join(os.environ.get("OUT", "."), "grouped-gemm.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
