"""``python -m fused_dit_ops check``: every op on this device against the float64 reference.

Prints a pass/fail table (relative Frobenius error, max elementwise error, time) and returns
non-zero if any op fails. On a GPU it uses the Qwen-Image-Edit image-stream shape; on CPU (or
with --small) a small one.
"""
from __future__ import annotations

import time

import torch

from . import reference as ref

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def _inputs(op, B, L, C, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1234)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(B, L, C)
    mod = rnd(2 * B, 6 * C, std=0.3)
    shift, scale, gate, shift2, scale2, _ = mod.chunk(6, dim=-1)
    idx = (torch.arange(L) >= L // 2).to(torch.int32).repeat(B, 1).to(device)
    if op == "scale_shift_gate":
        return (x, shift, scale, gate, idx)
    if op == "norm_scale_shift":
        return (x, shift, scale, idx)
    u = rnd(B, L, C)
    if op == "gate_residual":
        return (x, u, gate, idx)
    return (x, u, gate, shift2, scale2, idx)


def _oracle(op, args):
    a64 = tuple(a.double().cpu() if isinstance(a, torch.Tensor) and a.is_floating_point()
                else (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args)
    if op == "gate_residual_norm_scale_shift":
        return ref.gate_residual_norm_scale_shift(*a64, residual_dtype=args[0].dtype)
    return getattr(ref, op)(*a64)


def _time_ms(fn, device) -> float:
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _f64(t):
    return t.detach().to("cpu", torch.float64) if t.is_floating_point() else t.detach().cpu()


def cases(device: str, small: bool):
    """(label, run, oracle, tol) for every op: run() returns the op's outputs (for an in-place op,
    the tensors it wrote), oracle() their float64 reference on CPU; tol: the outputs' dtype (its
    relative-error bound in TOL) or 0.0 for ops that only move data (bit-exact)."""
    import fused_dit_ops as fdo
    big = torch.device(device).type == "cuda" and not small
    B, L, C = (1, 8192, 3072) if big else (1, 256, 512)
    dtype = torch.bfloat16
    for op in ("scale_shift_gate", "norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual"):
        args = _inputs(op, B, L, C, dtype, device)
        yield (f"{op} [{B},{L},{C}] bf16 index", lambda op=op, a=args: getattr(fdo, op)(*a),
               lambda op=op, a=args: _oracle(op, a), dtype)

    # dual-stream ops: the image stream (with the index) and a text stream (without) in one launch
    Lt_ = 208 if big else 16
    for single in ("norm_scale_shift", "gate_residual_norm_scale_shift"):
        a = _inputs(single, B, L, C, dtype, device)
        b = _inputs(single, B, Lt_, C, dtype, device)
        b = tuple(t[:B] if t is not None and t.dim() == 2 and t.shape[0] == 2 * B else t for t in b[:-1]) + (None,)
        yield (f"dual_{single} [{B},{L}+{Lt_},{C}] bf16",
               lambda s=single, a=a, b=b: getattr(fdo, "dual_" + s)(*a, 1e-6, *b, 1e-6),
               lambda s=single, a=a, b=b: (*_as_tuple(_oracle(s, a)), *_as_tuple(_oracle(s, b))), dtype)

    g = torch.Generator(device="cpu").manual_seed(4321)
    H, D = (24, 128) if big else (4, 64)
    Lt, Li = (208, 8192) if big else (16, 96)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)
    # projections as packed QKV rows (V a strided chunk, as in a packed-QKV model)
    txt = rnd(1, Lt, 3 * H * D).unflatten(-1, (3, H, D))
    img = rnd(1, Li, 3 * H * D).unflatten(-1, (3, H, D))
    streams = (txt[:, :, 0], txt[:, :, 1], txt[:, :, 2], img[:, :, 0], img[:, :, 1], img[:, :, 2])
    ang_t = torch.rand(Lt, D // 2, generator=g) * 6.3
    ang_i = torch.rand(Li, D // 2, generator=g) * 6.3
    tab_t = torch.cat([ang_t.cos(), ang_t.sin()], -1).to(device)
    tab_i = torch.cat([ang_i.cos(), ang_i.sin()], -1).to(device)
    ws = [(1 + 0.1 * torch.randn(D, generator=g)).to(device=device, dtype=dtype) for _ in range(4)]

    def run_rope():
        q, k = streams[3].clone(), streams[4].clone()
        fdo.rope(q, k, tab_i)
        return q, k
    yield (f"rope q,k [1,{Li},{H},{D}] bf16", run_rope,
           lambda: ref.rope(_f64(streams[3]), _f64(streams[4]), _f64(tab_i)), dtype)
    yield (f"joint_qkv_cat Lt {Lt} + Li {Li}, strided v (exact)", lambda: fdo.joint_qkv_cat(*streams),
           lambda: ref.joint_qkv_cat(*(_f64(t) for t in streams)), 0.0)
    yield (f"qk_norm_rope_cat Lt {Lt} + Li {Li}", lambda: fdo.qk_norm_rope_cat(*streams, *ws, tab_t, tab_i),
           lambda: ref.qk_norm_rope_cat(*(_f64(t) for t in streams), *(_f64(w) for w in ws), _f64(tab_t),
                                        _f64(tab_i)), dtype)
    # q/k/v projections of both streams into one joint buffer, each stream's weights packed
    K = H * D
    xt, xi = rnd(1, Lt, K), rnd(1, Li, K)
    pw = [(rnd(3 * K, K, std=0.02), rnd(3 * K, std=0.02)) for _ in range(2)]
    lin = [([w[j * K:(j + 1) * K] for j in range(3)], [b[j * K:(j + 1) * K] for j in range(3)]) for w, b in pw]
    yield (f"joint_linear Lt {Lt} + Li {Li}, K {K}, packed q|k|v",
           lambda: fdo.joint_linear(xt, xi, *lin[0], *lin[1]),
           lambda: ref.joint_linear(_f64(xt), _f64(xi), *([_f64(t) for t in ts] for pr in lin for ts in pr)),
           dtype)
    # FLUX.2's MLP input: [L, C] -> silu(gate) * linear of a [2F, C] projection (C 6144, F 18432 on a GPU)
    Lm, Cm, Fm = (256, 6144, 18432) if big else (40, 96, 144)  # (the float64 reference runs on the CPU)
    xm, wm = rnd(1, Lm, Cm), rnd(2 * Fm, Cm, std=0.02)
    yield (f"swiglu_linear [1,{Lm},{Cm}] -> 2 x {Fm}", lambda: fdo.swiglu_linear(xm, wm),
           lambda: ref.swiglu_linear(_f64(xm), _f64(wm)), dtype)
    N = 1024 if big else 64  # the float64 reference materialises [B, H, N, N]
    q, k, v = rnd(1, N, H, D), rnd(1, N, H, D), rnd(1, N, H, D)
    yield (f"attention [1,{N},{H},{D}] bf16", lambda: fdo.attention(q, k, v),
           lambda: ref.attention(_f64(q), _f64(k), _f64(v)), dtype)


def run_check(device: str | None = None, small: bool = False) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        print(f"fused_dit_ops check: bad --device {device!r}: {e}")
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"fused_dit_ops check: --device {device}, but CUDA is not available (torch {torch.__version__}); "
              "run it without --device for the CPU check")
        return 2
    rows, failed = [], 0
    for label, run, oracle, tol in cases(device, small):
        try:
            out = run()
            outs = out if isinstance(out, tuple) else (out,)
            refs = oracle()
            refs = refs if isinstance(refs, tuple) else (refs,)
            errs = []
            for o, r in zip(outs, refs):
                o64 = o.detach().double().cpu()
                rel = ((o64 - r).norm() / r.norm()).item() if torch.isfinite(o64).all() else float("inf")
                errs.append((rel, (o64 - r).abs().max().item()))
            rel = max(e[0] for e in errs)
            tol = TOL[tol] if isinstance(tol, torch.dtype) else tol
            ok = rel == 0.0 if tol == 0.0 else rel < tol
            ms = _time_ms(run, device)
            rows.append((label, "PASS" if ok else "FAIL", f"{rel:.2e}", f"{max(e[1] for e in errs):.2e}", f"{ms:.3f}"))
            failed += not ok
        except Exception as e:  # noqa: BLE001  (a check reports every failure, it does not stop)
            rows.append((label, "ERROR", type(e).__name__, str(e)[:60], "-"))
            failed += 1
    head = ("op", "result", "rel err", "max abs err", "ms")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    print(f"fused_dit_ops check on {device}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
