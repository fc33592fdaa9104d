"""Launch every CUDA kernel of the package once on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python tools/sanitize_kernels.py

Ragged sizes (L, C not multiples of the tiles), strided views and both index dtypes, so that an
out-of-bounds access at an edge would be reported. Prints one line per launch."""
import torch

import fused_dit_ops as fdo
from fused_dit_ops.kernels import modulation as k


def main():
    dev, dt = "cuda", torch.bfloat16
    B, L, C = 2, 77, 3072 + 8
    x = torch.randn(B, L, 2 * C, device=dev, dtype=dt)[..., :C]
    u = torch.randn(B, L, C, device=dev, dtype=dt)
    mod = torch.randn(2 * B, 6 * C, device=dev, dtype=dt)
    sh, sc, g, sh2, sc2, _ = mod.chunk(6, -1)
    for idx in ((torch.arange(L, device=dev) > 30).int().repeat(B, 1), (torch.arange(L, device=dev) > 30).long().repeat(B, 1)):
        runs = {
            "scale_shift_gate": lambda: fdo.scale_shift_gate(x, sh, sc, g, idx),
            "norm_scale_shift": lambda: fdo.norm_scale_shift(x, sh, sc, idx),
            "norm_scale_shift rms affine": lambda: fdo.norm_scale_shift(x, sh, sc, idx, u[0, 0], None, 1e-6, "rms"),
            "gate_residual_norm_scale_shift": lambda: fdo.gate_residual_norm_scale_shift(x, u, g, sh2, sc2, idx),
            "gate_residual (dispatch)": lambda: fdo.gate_residual(x, u, g, idx),
            "gate_residual (triton)": lambda: k.gate_residual(x, u, g, idx),
            "gate_residual unaligned": lambda: fdo.gate_residual(x[..., 1:3073], u[..., 1:3073], g[:, 1:3073], idx),
        }
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            print(f"launched {name} (index {idx.dtype})")
    # extra kernels registered by later modules add themselves here
    try:
        from tools_sanitize_extra import run_extra  # noqa: F401
    except ImportError:
        pass


if __name__ == "__main__":
    main()
