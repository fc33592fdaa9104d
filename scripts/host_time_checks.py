"""Host time of the eager fast path's input checks (``fused_dit_ops.ops._eager``), per op and per block.

CPU tensors of a Qwen-Image block at 2048 image tokens (index present) and 256 text tokens, bf16,
laid out as the patched block has them; the launchers are stubbed out and ``fast()`` is forced, so
what is timed is the fast path's Python: ``fast()``, the check, the call. Two variants, interleaved
rounds, the minimum of each: "validator" runs the op's full validator on every call; "remembered"
is the fast path as it is (``_check``: the validator once per metadata signature).

    python scripts/host_time_checks.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import timeit

import torch

import fused_dit_ops  # noqa: F401  (registers the ops)
from fused_dit_ops.kernels import modulation as km
from fused_dit_ops.kernels import rope as kr
from fused_dit_ops.ops import _eager
from fused_dit_ops.ops import modulation as mod


def inputs(Li=2048, Lt=256, C=3072, Dh=128, dtype=torch.bfloat16):
    h, e = torch.randn(1, Li, C, dtype=dtype), torch.randn(1, Lt, C, dtype=dtype)
    uh, ue = torch.randn(1, Li, C, dtype=dtype), torch.randn(1, Lt, C, dtype=dtype)
    both = torch.randn(2, 12 * C, dtype=dtype)  # the packed modulation GEMV's output (two parameter sets)
    im, tm = both[:, :6 * C].chunk(6, -1), both[:1, 6 * C:].chunk(6, -1)
    index = torch.zeros(1, Li, dtype=torch.int64)
    buf = torch.randn(1, Lt + Li, 3 * C, dtype=dtype)  # joint q|k|v
    q, k = (buf[..., j * C:(j + 1) * C].unflatten(-1, (-1, Dh)) for j in range(2))
    w = [torch.nn.Parameter(torch.randn(Dh, dtype=dtype)) for _ in range(4)]
    return {
        "dual_gate_residual_norm_scale_shift": (h, uh, im[2], im[3], im[4], index, 1e-6,
                                                e, ue, tm[2], tm[3], tm[4], None, 1e-6),
        "dual_norm_scale_shift": (h, im[0], im[1], index, 1e-6, e, tm[0], tm[1], None, 1e-6, "layer"),
        "joint_qk_norm_rope_": (q, k, Lt, *w, torch.randn(Lt, Dh), torch.randn(Li, Dh), 1e-6, True),
        "gate_residual": (h, uh, im[5], index),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    for name in ("dual_gate_residual_norm_scale_shift", "dual_norm_scale_shift", "gate_residual"):
        setattr(km, name, lambda *a, **k: None)
    kr.joint_qk_norm_rope_ = lambda *a, **k: None
    mod._GATE_RESIDUAL_CPP = None
    _eager.fast = lambda x: not torch.is_grad_enabled()
    remembered = _eager._check

    def validator(v, *a):
        v(*a)

    ins = inputs()
    dg, jq = ins["dual_gate_residual_norm_scale_shift"], ins["joint_qk_norm_rope_"]

    def block():  # a block inside a forward (look-ahead): dual grns, QK norm + RoPE, dual grns into the next norm1
        _eager.dual_gate_residual_norm_scale_shift(*dg)
        _eager.joint_qk_norm_rope_(*jq)
        _eager.dual_gate_residual_norm_scale_shift(*dg)

    cases = {name: (lambda f=getattr(_eager, name), a=a: f(*a)) for name, a in ins.items()}
    cases["block: 2 dual grns + joint_qk_norm_rope_"] = block
    best = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for variant, check in (("validator", validator), ("remembered", remembered)):
                _eager._check = check
                for name, f in cases.items():
                    n = 2000 if name.startswith("block") else 5000
                    t = min(timeit.repeat(f, number=n, repeat=3)) / n * 1e6
                    best[variant, name] = min(best.get((variant, name), float("inf")), t)
    _eager._check = remembered
    print(f"{'host us per call (launchers stubbed)':45s} {'validator':>10s} {'remembered':>10s}")
    for name in cases:
        a, b = best["validator", name], best["remembered", name]
        print(f"{name:45s} {a:10.2f} {b:10.2f}  {a / b:5.2f}x")


if __name__ == "__main__":
    main()
