"""Row layouts and launch configurations of the ``norm_scale_shift`` kernel (CUDA): one power-of-two
register tile (the one-tile kernel at its launcher configuration, and with 16 warps) against the row
held as two power-of-two segments (``split=True``: 4096 + 1024 at C 5120, the launcher's default
there and at C 6144 as 4096 + 2048; 2048 + 1024 at C 3072; 1024 + 512 at C 1536) at 4, 8 and 16 warps,
at Wan's and FLUX.2's widths and token counts, bf16 activations, fp32 shift / scale as column
views of Wan's [B, 6, C] modulation, no affine.
GPU time by CUDA-graph replay over rotating inputs larger than L2, the variants alternating over
``--rounds`` rounds (median), each against the bandwidth floor (read x, write y; the copy
bandwidth measured in the run), as ``bench wan-ops`` reports it; ``x_vs_one_tile``: the ratio of
medians against the one-tile kernel; ``max_row_rel_diff``: each output's largest difference from
the one-tile kernel's relative to the largest |value| of its row.

    python scripts/norm_config_sweep.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import json
import statistics

import torch

from fused_dit_ops.bench import harness, wan_ops
from fused_dit_ops.kernels import modulation as km
from fused_dit_ops.kernels._launch import row_segments

SHAPES = [("wan14b", 32760, 5120), ("wan14b-720p", 75600, 5120), ("flux2-joint", 4608, 6144),
          ("wan-ti2v5b", 27280, 3072), ("wan1.3b", 32760, 1536)]


def variants(C: int) -> dict:
    """name -> (config, split) of ``modulation.norm_scale_shift``."""
    one = km._norm_config(C)
    return {"one_tile": (one, False), "one_tile_w16": (dict(one, num_warps=16), False),
            "two_segments_w4": ({"num_warps": 4}, True), "two_segments_w8": ({"num_warps": 8}, True),
            "two_segments_w16": ({"num_warps": 16}, True)}


def main():
    a, bw = harness.kernel_script_args(__doc__)
    rows = []
    for name, L, C in SHAPES:
        def make():
            x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
            e = torch.randn(1, 6, C, device="cuda") * 0.3
            return x, e[:, 0], e[:, 1]

        vs = variants(C)
        times = {k: [] for k in vs}
        for _, order in harness.rotated_rounds(list(vs), a.rounds):
            for k in order:
                times[k].append(harness.time_graph_us(
                    make, lambda x, sh, sc, v=vs[k]: km.norm_scale_shift(x, sh, sc, None, None, None, 1e-6,
                                                                        config=v[0], split=v[1])))
        args = make()
        ref = km.norm_scale_shift(*args, None, None, None, 1e-6, split=False).float()
        floor_us = wan_ops.bytes_moved("norm_scale_shift", wan_ops.Shape(name, 1, L, C, C // 128, 0)) / bw * 1e6
        default = "two_segments_w8" if row_segments(C, km.NORM_SEGMENTS_MIN_TILE) else "one_tile"
        for k, (cfg, split) in vs.items():
            out = km.norm_scale_shift(*args, None, None, None, 1e-6, config=cfg, split=split).float()
            us = statistics.median(times[k])
            diff = ((out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)).max().item()
            rows.append(dict(shape=name, L=L, C=C, variant=k, launcher_default=k == default, us=us,
                             pct_floor=100 * floor_us / us, x_vs_one_tile=us / statistics.median(times["one_tile"]),
                             max_row_rel_diff=diff, cfg=str(cfg)))
    print(harness.format_table(rows, ["shape", "L", "C", "variant", "launcher_default", "us", "pct_floor",
                                      "x_vs_one_tile", "max_row_rel_diff"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(env=harness.env_info(), copy_bandwidth_TBps=bw / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
