"""Where does the patched 60-layer forward's time go? (diagnostic, GPU only)

Builds the Qwen-Image-Edit-2511 transformer as ``bench model`` does (random bf16 weights, cond text
225 / uncond 208 tokens), patches it, and for each forward prints: wall ms (CUDA events), the
kernel-time sum and the GPU-busy share from one torch.profiler capture, and the top kernels per
layer. CONFIGS picks the configurations (default patched): "stock", or "patched" with any of the
suffixes -nopack (pack_qkv=False), -nomod (pack_mod=False), -nolook (lookahead=False), -nodual
(dual_launch=False). ROUNDS=n
repeats the config list n times, interleaved (profiles only in the first round). JSON to $OUT.
"""
from __future__ import annotations

import json
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs


def timed(model, inp, n=3):
    ms = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        model(**inp)
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def kernel_table(model, inp, layers, top=14):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inp)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in evs)
    start = min(e.time_range.start for e in evs)
    end = max(e.time_range.end for e in evs)
    by = {}
    for e in evs:
        k = e.name[:70]
        n, t = by.get(k, (0, 0.0))
        by[k] = (n + 1, t + e.device_time)
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernel_ms": total / 1e3, "span_ms": (end - start) / 1e3,
            "top_per_layer_us": [(k, n / layers, t / layers) for k, (n, t) in rows]}


def main():
    out_dir = os.environ.get("OUT", ".")
    layers = int(os.environ.get("LAYERS", "60"))
    model = build_qwen_image_transformer("edit-2511", num_layers=layers, device="cuda", dtype=torch.bfloat16)
    cond = make_qwen_inputs(model, txt_len=225, seed=1)
    uncond = make_qwen_inputs(model, txt_len=208, seed=2)
    uncond["hidden_states"] = cond["hidden_states"]
    from fused_dit_ops.bench.harness import env_info
    res = {"benchmark": "60-layer patched forward: wall time per config, kernel times per layer",
           "tool": "tools/model_diag.py", "env": env_info(), "gpu": torch.cuda.get_device_name(),
           "layers": layers, "rows": []}
    import fused_dit_ops as fdo
    configs = os.environ.get("CONFIGS", "patched").split(",")
    rounds = int(os.environ.get("ROUNDS", "1"))
    for rnd in range(rounds):
        for cfg in configs:
            if cfg != "stock":
                flags = set(cfg.split("-")[1:])
                fdo.patch(model, pack_qkv="nopack" not in flags, pack_mod="nomod" not in flags,
                          lookahead="nolook" not in flags, dual_launch="nodual" not in flags,
                          reuse_mod="reuse" in flags)  # inputs repeat: reuse would skip every GEMV
            try:
                with torch.no_grad():
                    for _ in range(2):
                        model(**cond)
                        model(**uncond)
                    for name, inp in (("cond", cond), ("uncond", uncond)):
                        row = {"config": cfg, "round": rnd, "forward": name, "wall_ms": timed(model, inp)}
                        if rnd == 0:
                            row.update(kernel_table(model, inp, layers))
                            row["wall_ms_after_profile"] = timed(model, inp)
                        res["rows"].append(row)
                        if rnd:
                            print(f"round {rnd} {cfg} {name}: wall {row['wall_ms']:.1f} ms")
                            continue
                        print(f"\n{cfg} {name}: wall {row['wall_ms']:.1f} ms (again {row['wall_ms_after_profile']:.1f}), "
                              f"kernel sum {row['kernel_ms']:.1f} ms, span {row['span_ms']:.1f} ms; per layer:")
                        for k, n, t in row["top_per_layer_us"]:
                            print(f"   {t:8.1f} us  x{n:4.1f}  {k}")
            finally:
                fdo.unpatch(model)
                torch.cuda.empty_cache()
    summary = {}
    for r in res["rows"]:
        summary.setdefault(r["config"], []).append(r["wall_ms"])
    res["median_wall_ms"] = {k: statistics.median(v) for k, v in summary.items()}
    print("median wall ms over rounds and cond/uncond:", {k: round(v, 1) for k, v in res["median_wall_ms"].items()})
    with open(os.path.join(out_dir, "model-diag.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
