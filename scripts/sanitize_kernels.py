"""Launch every CUDA kernel of the package once on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py

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
            # dual: stream a = x with the index, stream b = its first 13 rows without one
            "dual_norm_scale_shift": lambda: fdo.dual_norm_scale_shift(x, sh, sc, idx, 1e-6, x[:, :13], sh[:B],
                                                                       sc[:B], None, 1e-6),
            "dual_gate_residual_norm_scale_shift": lambda: fdo.dual_gate_residual_norm_scale_shift(
                x, u, g, sh2, sc2, idx, 1e-6, x[:, :13], u[:, :13], g[:B], sh2[:B], sc2[:B], None, 1e-6),
            "gate_residual (triton)": lambda: k.gate_residual(x, u, g, idx),
            "gate_residual unaligned": lambda: fdo.gate_residual(x[..., 1:3073], u[..., 1:3073], g[:, 1:3073], idx),
        }
        for name, fn in runs.items():
            fn()
            fn()  # second call: the Triton fast-launch path (kernels/_launch.py)
            torch.cuda.synchronize()
            print(f"launched {name} (index {idx.dtype}) x2")
    # RoPE / joint QKV kernels: ragged lengths, V as a strided chunk of packed QKV
    H, D, Lt, Li = 3, 128, 13, 77
    txt = torch.randn(1, Lt, 3 * H * D, device=dev, dtype=dt)
    img = torch.randn(1, Li, 3 * H * D, device=dev, dtype=dt)
    tq, tk, tv = (t.unflatten(-1, (H, D)) for t in txt.chunk(3, -1))
    iq, ik, iv = (t.unflatten(-1, (H, D)) for t in img.chunk(3, -1))
    tab_t = torch.randn(Lt, D, device=dev)
    tab_i = torch.randn(Li, D, device=dev)
    w = [torch.randn(D, device=dev, dtype=dt) for _ in range(4)]
    runs = {
        "joint_qkv_cat": lambda: fdo.joint_qkv_cat(tq, tk, tv, iq, ik, iv),
        "qk_norm_rope_cat": lambda: fdo.qk_norm_rope_cat(tq, tk, tv, iq, ik, iv, *w, tab_t, tab_i),
        "rope (triton)": lambda: fdo.rope(iq, ik, tab_i, backend="triton"),
        "rope (auto)": lambda: fdo.rope(iq, ik, tab_i),
    }
    for name, fn in runs.items():
        fn()
        fn()
        torch.cuda.synchronize()
        print(f"launched {name} x2")
    # Wan-style ops: fp32 modulation parameters on bf16 activations, RMSNorm over all heads + RoPE of q
    # and k (different token counts without a table), gated residual + affine LayerNorm
    e = torch.randn(2 * B, 6, C, device=dev)
    f_sh, f_sc, f_g = e[:, 0], e[:, 1], e[:, 2]
    Hq, Lk = 5, 19
    qkv = torch.randn(B, L, 3 * Hq * D, device=dev, dtype=dt)
    q5, k5 = qkv[..., :Hq * D], qkv[..., Hq * D:2 * Hq * D]
    kt = torch.randn(B, Lk, Hq * D, device=dev, dtype=dt)
    wq, wk = torch.randn(Hq * D, device=dev), torch.randn(Hq * D, device=dev, dtype=dt)
    tab = torch.randn(L, D, device=dev)
    nw, nb = torch.randn(C, device=dev), torch.randn(C, device=dev)
    idx = (torch.arange(L, device=dev) > 30).int().repeat(B, 1)
    Cs = 5128
    xs = torch.randn(B, L, 2 * Cs, device=dev, dtype=dt)[..., Cs:]
    es = torch.randn(2 * B, 6, Cs, device=dev)
    s_sh, s_sc, s_w = es[:, 0], es[:, 1], torch.randn(Cs, device=dev, dtype=dt)
    f5 = torch.randn(2 * B, 6, Hq * D, device=dev)
    runs = {
        "norm_scale_shift fp32 params": lambda: fdo.norm_scale_shift(x, f_sh, f_sc, idx),
        "gate_residual fp32 gate": lambda: fdo.gate_residual(x, u, f_g, idx),
        "gate_residual_norm_scale_shift fp32 params": lambda: fdo.gate_residual_norm_scale_shift(x, u, f_g, f_sh, f_sc,
                                                                                                 idx),
        "qk_norm_rope_across_heads": lambda: fdo.qk_norm_rope_across_heads(q5, k5, wq, wk, tab, Hq),
        "qk_norm_rope_across_heads no table": lambda: fdo.qk_norm_rope_across_heads(q5, kt, wq, wk, None, Hq),
        "gate_residual_layer_norm": lambda: fdo.gate_residual_layer_norm(x, u, f_g, idx, nw, nb),
        # rows held as two segments: C 5128 = 4096 + 1032 (the rest masked in 2048 lanes), 640 = 512 + 128
        "norm_scale_shift two segments, masked rest": lambda: fdo.norm_scale_shift(xs, s_sh, s_sc, idx),
        "norm_scale_shift two segments, rms affine": lambda: fdo.norm_scale_shift(xs, s_sh, s_sc, idx, s_w, None,
                                                                                  1e-6, "rms"),
        "norm_scale_shift two segments, strided": lambda: fdo.norm_scale_shift(q5, f5[:, 0], f5[:, 1], idx),
    }
    for name, fn in runs.items():
        fn()
        fn()
        torch.cuda.synchronize()
        print(f"launched {name} x2")
    from fused_dit_ops.kernels import _launch
    print(f"Triton launches: {_launch.stats}")


if __name__ == "__main__":
    main()
