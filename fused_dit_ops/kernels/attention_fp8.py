"""Triton kernels that write the FP8 attention inputs (e4m3 q, k, v with one fp32 descale per (batch,
head)), and their launcher.

``joint_qk_norm_rope_fp8`` runs two kernels:

1. ``_v_amax_kernel``: per (batch, head), the absolute maximum of v over its tokens and head_dim.
   Grid (token chunks of BLOCK_N, H, B): each program reduces its chunk in registers and folds it
   into a zero-initialised fp32 [B, H] buffer with one ``atomic_max`` (a few dozen atomics per
   address at 8k tokens). A NaN makes the head's maximum +inf (atomics cannot carry NaN reliably):
   every dequantised value of that head is then NaN, as in the reference. The q / k scale needs no
   pass over the data: the programs of the first chunk derive it from the RMSNorm weights
   (sqrt(D) * max|w| over both streams * margin / 448; see :mod:`fused_dit_ops.reference`) and write
   the q and k descales.
2. ``_qk_v_fp8_kernel``: grid (tokens, head groups, B), one token's [BLOCK_H, D] of q, k and v per
   program: q and k get the RMSNorm + RoPE of ``kernels/rope.py`` (same helpers, same roundings),
   divided by the q / k scale from step 1 (one scalar load each) and written as e4m3; v is divided
   by its (batch, head) scale from step 1 and written as e4m3, so the quantisation of q and k costs
   nothing beyond the bf16 kernel's work. The programs of token 0 write the v descales.

Values are ``clamp(y * (1 / scale), -448, 448)`` (the reciprocal an IEEE-rounded division, once per
scale: a division per value would cost more ALU time than the memory traffic), cast to
float8_e4m3fn on store (round to nearest), as :mod:`fused_dit_ops.reference` computes them. Outputs
are new contiguous tensors; inputs are read through their strides (views of a joint projection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2
from ._launch import launch as launch_kernel
from .rope import _block_h, _device_guard, _load_pairs, _norm_scale, _store_pairs, _weight_pairs

FP8_MAX = 448.0
V_BLOCK_N = 256  # tokens per program of the v amax kernel
V_SUB_N = 32  # tokens per tile inside it


@triton.jit
def _bound_scale(wa, wb, sqrt_d_margin, D: tl.constexpr, D_BLOCK: tl.constexpr):
    """sqrt(D) * max(|wa|, |wb|) * margin / 448 (1 for all-zero weights), fp32."""
    c = tl.arange(0, D_BLOCK)
    m = c < D
    a = tl.max(tl.abs(tl.load(wa + c, mask=m, other=0.0).to(tl.float32)), axis=0)
    b = tl.max(tl.abs(tl.load(wb + c, mask=m, other=0.0).to(tl.float32)), axis=0)
    w = tl.maximum(a, b)
    return tl.where(w == 0.0, 1.0, tl.div_rn(w * sqrt_d_margin, 448.0))


@triton.jit
def _v_amax_kernel(v_ptr, amax_ptr, qd, kd, wqt, wkt, wqi, wki, sqrt_d_margin, N, H, s_b, s_l, s_h,
                   D: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
                   QK_SCALES: tl.constexpr):
    """``QK_SCALES``: the programs of the first token chunk also write the q and k descales of their
    (batch, head) (``joint_qk_norm_rope_fp8``; ``quantize_heads`` passes dummies)."""
    t0 = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if QK_SCALES:
        if t0 == 0:
            tl.store(qd + b * H + h, _bound_scale(wqt, wqi, sqrt_d_margin, D, D_BLOCK))
            tl.store(kd + b * H + h, _bound_scale(wkt, wki, sqrt_d_margin, D, D_BLOCK))
    c = tl.arange(0, D_BLOCK)
    cm = c < D
    m = tl.zeros((SUB_N,), dtype=tl.float32)
    n_nan = tl.zeros((SUB_N,), dtype=tl.int32)
    for i in range(0, BLOCK_N, SUB_N):
        t = t0 + i + tl.arange(0, SUB_N)
        msk = (t < N)[:, None] & cm[None, :]
        x = tl.load(v_ptr + b * s_b + t.to(tl.int64)[:, None] * s_l + h * s_h + c[None, :], mask=msk,
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        m = tl.maximum(m, tl.max(tl.where(msk, tl.abs(x), 0.0), axis=1))
        n_nan += tl.sum(tl.where(msk & (x != x), 1, 0), axis=1)
    amax = tl.max(m, axis=0)
    amax = tl.where(tl.sum(n_nan, axis=0) > 0, float("inf"), amax)
    tl.atomic_max(amax_ptr + b * H + h, amax)


@triton.jit
def _quant(y, inv, QMAX: tl.constexpr):
    """clamp(y * inv, -QMAX, QMAX) (inv = 1 / scale; NaN kept)."""
    return tl.clamp(y * inv, -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _heads_row_fp8(x_row, s_h, out_row, amax_row, heads64, hmask, D: tl.constexpr, D_BLOCK: tl.constexpr):
    """One token's [BLOCK_H, D] (head h at x_row + h * s_h) scaled by 1 / its (batch, head) scale (amax /
    448 from ``amax_row``, 1 for an all-zero head) and stored quantised at out_row (heads D apart);
    returns the scales."""
    am = tl.load(amax_row + heads64, mask=hmask, other=0.0)
    s = tl.where(am == 0.0, 1.0, tl.div_rn(am, 448.0))
    c = tl.arange(0, D_BLOCK)
    m = hmask[:, None] & (c < D)[None, :]
    x = tl.load(x_row + (heads64 * s_h)[:, None] + c[None, :], mask=m, other=0.0)
    q = _quant(x.to(tl.float32), tl.div_rn(1.0, s)[:, None], 448.0)
    tl.store(out_row + (heads64 * D)[:, None] + c[None, :], q.to(out_row.dtype.element_ty), mask=m)
    return s


@triton.jit
def _qk_row_fp8(x_in, s_in_h, x_out, s_out_h, w_ptr, heads64, hmask, cos, sin, eps, inv,
                D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, TAIL: tl.constexpr,
                TAIL_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
                ROUND: tl.constexpr):
    """RMSNorm + RoPE of [BLOCK_H, D] head rows of one token of q or k (as ``kernels/rope.py``),
    multiplied by ``inv`` (1 / scale) and stored quantised (head rows of the output at heads64 * s_out_h)."""
    hin = heads64 * s_in_h
    hout = heads64 * s_out_h
    x1, x2 = _load_pairs(x_in, hin, hmask, HALF, HALF_BLOCK, BLOCK_H, INTERLEAVED)
    ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
    if TAIL > 0:
        j = tl.arange(0, TAIL_BLOCK)
        tm = hmask[:, None] & (j < TAIL)[None, :]
        xt = tl.load(x_in + hin[:, None] + 2 * HALF + j[None, :], mask=tm, other=0.0).to(tl.float32)
        ss += tl.sum(xt * xt, axis=1)
    r = tl.rsqrt(ss / D + eps)[:, None]
    wty: tl.constexpr = w_ptr.dtype.element_ty
    w1, w2 = _weight_pairs(w_ptr, HALF, HALF_BLOCK, INTERLEAVED)
    x1 = _norm_scale(x1, r, w1[None, :], ROUND, wty)
    x2 = _norm_scale(x2, r, w2[None, :], ROUND, wty)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x1 * sin[None, :] + x2 * cos[None, :]
    _store_pairs(x_out, hout, hmask, _quant(y1, inv, 448.0), _quant(y2, inv, 448.0), HALF, HALF_BLOCK,
                 BLOCK_H, INTERLEAVED)
    if TAIL > 0:
        wt = tl.load(w_ptr + 2 * HALF + j, mask=j < TAIL, other=0.0).to(tl.float32)
        xt = _norm_scale(xt, r, wt[None, :], ROUND, wty)
        tl.store(x_out + hout[:, None] + 2 * HALF + j[None, :], _quant(xt, inv, 448.0).to(x_out.dtype.element_ty),
                 mask=tm)


@triton.jit
def _qk_v_fp8_kernel(
    q, k, v, q8, k8, v8, qd, kd, vd, vmax,
    wqt, wkt, wqi, wki, ct, ci,
    Lt, H, Pt, Pi, eps,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, o_b, o_l, s_ct, s_ci,
    D: tl.constexpr, D_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
    TAIL: tl.constexpr, TAIL_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROUND: tl.constexpr,
):
    lo = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    heads64 = heads.to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    sq = tl.load(qd + b * H)  # the q / k scales of ``_v_amax_kernel`` (one value per tensor)
    sk = tl.load(kd + b * H)
    i = tl.arange(0, HALF_BLOCK)
    if lo < Lt:
        row = tl.minimum(lo, Pt - 1)
        cos = tl.load(ct + row * s_ct + i, mask=i < HALF, other=1.0)
        sin = tl.load(ct + row * s_ct + HALF + i, mask=i < HALF, other=0.0)
        wq = wqt
        wk = wkt
    else:
        row = tl.minimum(lo - Lt, Pi - 1)
        cos = tl.load(ci + row * s_ci + i, mask=i < HALF, other=1.0)
        sin = tl.load(ci + row * s_ci + HALF + i, mask=i < HALF, other=0.0)
        wq = wqi
        wk = wki
    out = b * o_b + lo * o_l
    _qk_row_fp8(q + b * sq_b + lo * sq_l, sq_h, q8 + out, D, wq, heads64, hmask, cos, sin, eps, tl.div_rn(1.0, sq),
                D, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, ROUND)
    _qk_row_fp8(k + b * sk_b + lo * sk_l, sk_h, k8 + out, D, wk, heads64, hmask, cos, sin, eps, tl.div_rn(1.0, sk),
                D, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, ROUND)
    # v: per-(batch, head) scale from its amax (1 for an all-zero head)
    sv = _heads_row_fp8(v + b * sv_b + lo * sv_l, sv_h, v8 + out, vmax + b * H, heads64, hmask, D, D_BLOCK)
    if lo == 0:
        tl.store(vd + b * H + heads64, sv, mask=hmask)


@triton.jit
def _heads_fp8_kernel(x, x8, xd, amax_ptr, H, s_b, s_l, s_h, o_b, o_l,
                      D: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's [BLOCK_H, D] of x quantised with its (batch, head) scale from ``_v_amax_kernel`` (the
    v step of ``_qk_v_fp8_kernel``); the programs of token 0 write the descales."""
    lo = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    heads64 = heads.to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    s = _heads_row_fp8(x + b * s_b + lo * s_l, s_h, x8 + b * o_b + lo * o_l, amax_ptr + b * H, heads64, hmask, D,
                       D_BLOCK)
    if lo == 0:
        tl.store(xd + b * H + heads64, s, mask=hmask)


def quantize_heads(x, *, config=None, q_dtype=torch.float8_e4m3fn):
    """(x8 [B, N, H, D] contiguous, descale fp32 [B, H]) of x [B, N, H, D] (last dim contiguous, other
    strides free): per (batch, head) amax / 448 (1 for an all-zero head, +inf for a head holding a NaN),
    two launches (the amax reduction, then the cast). ``q_dtype=torch.float32``: the values before
    the e4m3 cast (test hook, as ``joint_qk_norm_rope_fp8``)."""
    B, N, H, D = x.shape
    out = torch.empty((B, N, H, D), dtype=q_dtype, device=x.device)
    descale = torch.ones((B, H), dtype=torch.float32, device=x.device)
    if B == 0 or H == 0 or D == 0 or N == 0:
        return out, descale
    amax = torch.zeros((B, H), dtype=torch.float32, device=x.device)
    cfg = dict(config or {})
    bh = cfg.pop("BLOCK_H", _block_h(H))
    nw = cfg.pop("num_warps", 4)
    with _device_guard(x):
        launch_kernel(_v_amax_kernel, (cdiv(N, V_BLOCK_N), H, B),
                      (x, amax, amax, amax, x, x, x, x, 1.0, N, H, x.stride(0), x.stride(1), x.stride(2)),
                      (D, next_power_of_2(D), V_BLOCK_N, V_SUB_N, False), dict(num_warps=4))
        launch_kernel(_heads_fp8_kernel, (N, cdiv(H, bh), B),
                      (x, out, descale, amax, H, x.stride(0), x.stride(1), x.stride(2), N * H * D, H * D),
                      (D, next_power_of_2(D), bh), dict(num_warps=nw, **cfg))
    return out, descale


def joint_qk_norm_rope_fp8(q, k, v, txt_len, weights, tables, eps, interleaved, *, config=None,
                           q_dtype=torch.float8_e4m3fn):
    """(q8, k8, v8, q_descale, k_descale, v_descale) of joint q, k, v [B, N, H, D] (last dim contiguous,
    other strides free). ``weights``: (wq_txt, wk_txt, wq_img, wk_img) [D]; ``tables``: (txt, img) fp32
    [P, R]. ``q_dtype=torch.float32``: the values just before the e4m3 cast (a test hook: the Triton
    interpreter's fp32 -> e4m3 conversion is wrong where rounding carries into the exponent)."""
    from .. import reference as ref
    B, N, H, D = q.shape
    dev = q.device
    outs = [torch.empty((B, N, H, D), dtype=q_dtype, device=dev) for _ in range(3)]
    descales = [torch.empty((B, H), dtype=torch.float32, device=dev) for _ in range(3)]
    if B == 0 or H == 0 or D == 0:
        return (*outs, *descales)
    if N == 0:  # no token program writes the descales: the bound scales and 1 for v
        descales[0].copy_(ref.qk_bound_scale((weights[0], weights[2]), D).expand(B, H))
        descales[1].copy_(ref.qk_bound_scale((weights[1], weights[3]), D).expand(B, H))
        descales[2].fill_(1.0)
        return (*outs, *descales)
    vmax = torch.zeros((B, H), dtype=torch.float32, device=dev)
    cfg = dict(config or {})
    bh = cfg.pop("BLOCK_H", _block_h(H))
    nw = cfg.pop("num_warps", 4)
    R = tables[0].shape[1]
    half = R // 2
    tail = D - 2 * half
    wround = weights[0].dtype in (torch.float16, torch.bfloat16)
    sqrt_d_margin = float(torch.tensor(float(D) ** 0.5 * ref.QK_BOUND_MARGIN, dtype=torch.float32))
    with _device_guard(q):
        launch_kernel(_v_amax_kernel, (cdiv(N, V_BLOCK_N), H, B),
                      (v, vmax, descales[0], descales[1], weights[0], weights[1], weights[2], weights[3],
                       sqrt_d_margin, N, H, v.stride(0), v.stride(1), v.stride(2)),
                      (D, next_power_of_2(D), V_BLOCK_N, V_SUB_N, True), dict(num_warps=4))
        launch_kernel(
            _qk_v_fp8_kernel, (N, cdiv(H, bh), B),
            (q, k, v, outs[0], outs[1], outs[2], descales[0], descales[1], descales[2], vmax,
             weights[0], weights[1], weights[2], weights[3], tables[0], tables[1],
             txt_len, H, tables[0].shape[0], tables[1].shape[0], float(eps),
             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2), N * H * D, H * D, tables[0].stride(0), tables[1].stride(0)),
            (D, next_power_of_2(D), max(half, 1), next_power_of_2(max(half, 1)), tail,
             next_power_of_2(max(tail, 1)), bh, interleaved, wround),
            dict(num_warps=nw, **cfg))
    return (*outs, *descales)
