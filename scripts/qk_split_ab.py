"""A/B of ``qk_norm_rope_across_heads``'s two row layouts (CUDA): one power-of-two register tile
(``split=False``) against the row held as two power-of-two segments (``split=True``; the default
where one tile would mask more than a quarter of its lanes, C 5120 = 4096 + 1024), at Wan's widths
and token counts, bf16, q and k as column views of a packed q|k|v projection, interleaved RoPE.
GPU time by CUDA-graph replay over rotating inputs larger than L2, the two alternating over
``--rounds`` rounds; ratio of medians, and the outputs' largest elementwise relative difference.

    python scripts/qk_split_ab.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from fused_dit_ops.bench import harness
from fused_dit_ops.kernels import qk_norm_across_heads as kq

SHAPES = [("wan14b", 32760, 40), ("wan14b-720p", 75600, 40), ("wan-ti2v5b", 27280, 24), ("wan1.3b", 32760, 12)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    harness.require_cuda()
    rows = []
    for name, L, heads in SHAPES:
        C, D = heads * 128, 128

        def make():
            q = torch.randn(1, L, 3 * C, device="cuda", dtype=torch.bfloat16)
            ang = torch.rand(L, D // 2, device="cuda", dtype=torch.float64) * 6.28
            tab = torch.cat([ang.cos(), ang.sin()], -1).float()
            w = (1 + 0.3 * torch.randn(C, device="cuda")).bfloat16()
            return q[..., :C], q[..., C:2 * C], w, w, tab

        times = {False: [], True: []}
        for _ in range(a.rounds):
            for split in (False, True):
                times[split].append(harness.time_graph_us(
                    make, lambda q, k, wq, wk, tab, s=split: kq.qk_norm_rope_across_heads(
                        q, k, wq, wk, tab, heads, 1e-6, True, split=s)))
        args = make()
        one = kq.qk_norm_rope_across_heads(*args, heads, 1e-6, True, split=False)
        two = kq.qk_norm_rope_across_heads(*args, heads, 1e-6, True, split=True)
        diff = max(((x.float() - y.float()).abs() / y.float().abs().clamp_min(1e-30)).max().item()
                   for x, y in zip(one, two))
        t1, t2 = statistics.median(times[False]), statistics.median(times[True])
        rows.append(dict(shape=name, L=L, C=C, default_split=kq.segments(C) is not None, us_one_tile=t1,
                         us_two_segments=t2, ratio=t2 / t1, max_rel_diff=diff))
    print(harness.format_table(rows, list(rows[0])))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(env=harness.env_info(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
