"""A/B of ``qk_norm_rope_across_heads``'s two row layouts (CUDA): one power-of-two register tile
(``split=False``) against the row held as two power-of-two segments (``split=True``; the default
where ``row_segments`` picks it: C 5120 = 4096 + 1024), at Wan's widths and token counts and at
C 6144 (48 heads, 4096 + 2048), bf16, q and k as column views of a packed q|k|v projection, interleaved RoPE.
GPU time by CUDA-graph replay over rotating inputs larger than L2, the two alternating over
``--rounds`` rounds; ratio of medians, and the two outputs' largest difference relative to the
largest value of its head's row (``max_head_rel_diff``).
``pct_floor_*``: 100 x (bytes moved / the copy bandwidth measured in the run) / time, as ``bench
wan-ops`` reports it. Each layout is also timed at 16 warps (``*_w16``; the launcher's default
is 8 at these widths).

    python scripts/qk_split_ab.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import json
import statistics

import torch

from fused_dit_ops.bench import harness, wan_ops
from fused_dit_ops.kernels import qk_norm_across_heads as kq

SHAPES = [("wan14b", 32760, 40), ("wan14b-720p", 75600, 40), ("wan-ti2v5b", 27280, 24), ("wan1.3b", 32760, 12),
          ("c6144", 32760, 48)]


def main():
    a, bw = harness.kernel_script_args(__doc__)
    rows = []
    for name, L, heads in SHAPES:
        C, D = heads * 128, 128

        def make():
            q = torch.randn(1, L, 3 * C, device="cuda", dtype=torch.bfloat16)
            ang = torch.rand(L, D // 2, device="cuda", dtype=torch.float64) * 6.28
            tab = torch.cat([ang.cos(), ang.sin()], -1).float()
            w = (1 + 0.3 * torch.randn(C, device="cuda")).bfloat16()
            return q[..., :C], q[..., C:2 * C], w, w, tab

        variants = [(split, warps) for warps in (None, 16) for split in (False, True)]
        times = {v: [] for v in variants}
        for _ in range(a.rounds):
            for v in variants:
                times[v].append(harness.time_graph_us(
                    make, lambda q, k, wq, wk, tab, v=v: kq.qk_norm_rope_across_heads(
                        q, k, wq, wk, tab, heads, 1e-6, True, split=v[0], num_warps=v[1])))
        args = make()
        one = kq.qk_norm_rope_across_heads(*args, heads, 1e-6, True, split=False)
        two = kq.qk_norm_rope_across_heads(*args, heads, 1e-6, True, split=True)
        # each head's row against its largest |value|: RoPE's x1 cos - x2 sin cancels, so an element's
        # own magnitude says nothing about its rounding (the GPU tests bound it in last places: <= 2)
        diff = max(((x.float() - y.float()).reshape(-1, D).abs().amax(-1)
                    / y.float().reshape(-1, D).abs().amax(-1).clamp_min(1e-30)).max().item()
                   for x, y in zip(one, two))
        med = {v: statistics.median(t) for v, t in times.items()}
        base = med[(False, None)]
        floor_us = wan_ops.bytes_moved("qk_norm_rope_across_heads", wan_ops.Shape(name, 1, L, C, heads, 0)) / bw * 1e6
        rows.append(dict(shape=name, L=L, C=C, default_split=kq.segments(C) is not None,
                         us_one_tile=base, us_two_segments=med[(True, None)],
                         us_one_tile_w16=med[(False, 16)], us_two_segments_w16=med[(True, 16)],
                         ratio=med[(True, None)] / base, ratio_w16=med[(True, 16)] / base,
                         **{f"pct_floor_{'two' if v[0] else 'one'}{'_w16' if v[1] else ''}": 100 * floor_us / t
                            for v, t in med.items()},
                         max_head_rel_diff=diff))
    print(harness.format_table(rows, list(rows[0])))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(env=harness.env_info(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
