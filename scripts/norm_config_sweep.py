"""Launch configurations of the ``norm_scale_shift`` kernel (CUDA) at the widths whose whole-row
tile is 8192 lanes (Wan 14B's C 5120 at 32760 and 75600 tokens, FLUX.2's C 6144 at 4608 tokens),
bf16 activations, fp32 shift / scale as column views of Wan's [B, 6, C] modulation, no affine.
GPU time by CUDA-graph replay over rotating inputs larger than L2, the configurations alternating
over ``--rounds`` rounds (median), each against the bandwidth floor (read x, write y; the copy
bandwidth measured in the run), as ``bench wan-ops`` reports it; and each output's largest
difference from the default configuration's.

    python scripts/norm_config_sweep.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import json
import statistics

import torch

from fused_dit_ops.bench import harness, wan_ops
from fused_dit_ops.kernels import modulation as km

SHAPES = [("wan14b", 32760, 5120), ("wan14b-720p", 75600, 5120), ("flux2-joint", 4608, 6144)]


def configs(C: int) -> dict:
    base = km._norm_config(C)
    out = {"default": base}
    for name, change in [("warps16", {"num_warps": 16}), ("warps4", {"num_warps": 4}),
                         ("no_gather", {"PARAM_GATHER": False}), ("no_stream", {"STREAM_STORES": False}),
                         ("rows2_warps16", {"BLOCK_M": 2, "num_warps": 16}), ("iters2", {"ITERS": 2})]:
        out[name] = dict(base, **change)
    return out


def main():
    a, bw = harness.kernel_script_args(__doc__)
    rows = []
    for name, L, C in SHAPES:
        def make():
            x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
            e = torch.randn(1, 6, C, device="cuda") * 0.3
            return x, e[:, 0], e[:, 1]

        cfgs = configs(C)
        times = {k: [] for k in cfgs}
        for _, order in harness.rotated_rounds(list(cfgs), a.rounds):
            for k in order:
                times[k].append(harness.time_graph_us(
                    make, lambda x, sh, sc, cfg=cfgs[k]: km.norm_scale_shift(x, sh, sc, None, None, None, 1e-6,
                                                                            config=cfg)))
        args = make()
        ref = km.norm_scale_shift(*args, None, None, None, 1e-6).float()
        floor_us = wan_ops.bytes_moved("norm_scale_shift", wan_ops.Shape(name, 1, L, C, C // 128, 0)) / bw * 1e6
        for k, cfg in cfgs.items():
            out = km.norm_scale_shift(*args, None, None, None, 1e-6, config=cfg).float()
            us = statistics.median(times[k])
            rows.append(dict(shape=name, L=L, C=C, config=k, us=us, pct_floor=100 * floor_us / us,
                             x_vs_default=us / statistics.median(times["default"]),
                             max_abs_diff=(out - ref).abs().max().item(), cfg=str(cfg)))
    print(harness.format_table(rows, ["shape", "L", "C", "config", "us", "pct_floor", "x_vs_default",
                                      "max_abs_diff"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(env=harness.env_info(), copy_bandwidth_TBps=bw / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
