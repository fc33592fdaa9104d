"""Host-side cost per call of each op (GPU, tiny shapes, so the CPU is the bottleneck):
validation alone, the Triton launcher alone, torch.ops dispatch, and the public function."""
import time

import torch

import fused_dit_ops as fdo
from fused_dit_ops.kernels import modulation as k
from fused_dit_ops.ops import modulation as m


def per_call_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    B, L, C, dt = 1, 64, 3072, torch.bfloat16
    x = torch.randn(B, L, C, device="cuda", dtype=dt)
    u = torch.randn_like(x)
    mod = torch.randn(2 * B, 6 * C, device="cuda", dtype=dt)
    sh, sc, g, sh2, sc2, _ = mod.chunk(6, -1)
    idx = (torch.arange(L, device="cuda") > 30).int()[None]
    rows = [
        ("scale_shift_gate", lambda: m._check_scale_shift_gate(x, sh, sc, g, idx),
         lambda: k.scale_shift_gate(x, sh, sc, g, idx), lambda: torch.ops.fused_dit.scale_shift_gate.default(x, sh, sc, g, idx),
         lambda: fdo.scale_shift_gate(x, sh, sc, g, idx)),
        ("norm_scale_shift", lambda: m._check_norm_scale_shift(x, sh, sc, idx, None, None, 1e-6, "layer"),
         lambda: k.norm_scale_shift(x, sh, sc, idx), lambda: torch.ops.fused_dit.norm_scale_shift.default(x, sh, sc, idx, None, None, 1e-6, "layer"),
         lambda: fdo.norm_scale_shift(x, sh, sc, idx)),
        ("gate_residual_norm_scale_shift", lambda: m._check_gate_residual_norm_scale_shift(x, u, g, sh2, sc2, idx, 1e-6),
         lambda: k.gate_residual_norm_scale_shift(x, u, g, sh2, sc2, idx), lambda: torch.ops.fused_dit.gate_residual_norm_scale_shift.default(x, u, g, sh2, sc2, idx, 1e-6),
         lambda: fdo.gate_residual_norm_scale_shift(x, u, g, sh2, sc2, idx)),
        ("gate_residual", lambda: m._check_gate_residual(x, u, g, idx),
         lambda: k.gate_residual(x, u, g, idx), lambda: torch.ops.fused_dit.gate_residual.default(x, u, g, idx),
         lambda: fdo.gate_residual(x, u, g, idx)),
    ]
    from fused_dit_ops.kernels import _launch
    for fast in (True, False):
        _launch.set_enabled(fast)
        print(f"Triton fast launch {'ON' if fast else 'OFF'}")
        print(f"{'op':32s} {'validate':>9s} {'launcher':>9s} {'torch.ops':>9s} {'public':>9s}  (us per call, host)")
        for name, *fns in rows:
            print(f"{name:32s} " + " ".join(f"{per_call_us(f):9.1f}" for f in fns))
    _launch.set_enabled(True)
    e = lambda: torch.add(x, u)  # noqa: E731
    print(f"{'torch.add (reference point)':32s} {per_call_us(e):9.1f}")
    # attention through fa3-fwd: its public flash_attn_func vs the registered op our shim calls
    from fused_dit_ops import attention_dispatch as ad
    mod = ad._fa3_module()
    if mod is not None and torch.cuda.get_device_capability() == (9, 0):
        q = torch.randn(1, 256, 24, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            rows = [("fa3 flash_attn_func", lambda: mod.flash_attn_func(q, q, q)),
                    ("fa3 shim runner (raw op if found)", lambda: ad._run_fa3(q, q, q, None, False)),
                    ("fused_dit.attention (torch.ops)", lambda: torch.ops.fused_dit.attention.default(
                        q, q, q, None, False, "fa3"))]
            print(f"raw fa3-fwd op found: {ad._fa3_raw_forward(mod) is not None}")
            for name, f in rows:
                print(f"{name:32s} {per_call_us(f):9.1f}")


if __name__ == "__main__":
    main()
