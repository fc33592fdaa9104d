"""Triton kernel of ``qk_norm_rope_across_heads``: RMSNorm of q and k over all heads (the whole
[C] row of a token, C = heads x head_dim), then RoPE per head, q and k in one launch.

Grid: (Lq + Lk token rows, B). A program owns one token row of q (rows < Lq) or of k: it loads the
row as its rotation pairs (interleaved: the row contiguously, split into (2i, 2i+1) in registers;
half-split: (i, i + R/2) of each head, dims past the rotary width R paired as they come), reduces the mean square over the whole row in fp32,
multiplies by rsqrt(ms + eps) and the weight (both fp32, in that order), rounds once to the
activation dtype (what ``torch.nn.RMSNorm`` returns), then rotates the first R dims of each head
with the token's table row in fp32 and rounds once on store. Without a table it only normalises.

A row whose power-of-two register tile would leave more than a quarter of its lanes masked
(``row_segments``: C 5120; at C 6144 one tile is faster) is held as two power-of-two segments
instead, the largest power of two < C and the rest (5120 = 4096 + 1024), interleaved or without a
table: no masked lanes, fewer registers per thread (sm_90, 8 warps: 48 against 70) and more rows
resident per SM. Same arithmetic; the mean square's fp32 sum is added in another order, which can
move an output by one ulp.

Layout contract (checked by the op layer): q [B, Lq, C] and k [B, Lk, C] with a contiguous last dim
and free batch/token strides (column views of a packed q|k|v projection); weights [C] contiguous;
table fp32 [P, R] (cos of R/2 frequencies, then sin) with a contiguous last dim, row l for token l.
Outputs: fresh contiguous [B, Lq, C] and [B, Lk, C] in the activation dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, next_power_of_2, row_segments, two_segments
from .modulation import _device_guard


@triton.jit
def _norm_rotate(x1, x2, w1, w2, r, trow, i, rm, ty, HALF_R: tl.constexpr, HAS_ROPE: tl.constexpr):
    """The normalised pairs (rounded once to the activation dtype, as torch.nn.RMSNorm returns them),
    rotated in fp32 by the table row's cos / sin of pair i where rm (the identity elsewhere)."""
    n1 = ((x1 * r) * w1).to(ty).to(tl.float32)
    n2 = ((x2 * r) * w2).to(ty).to(tl.float32)
    if HAS_ROPE:
        cos = tl.load(trow + i, mask=rm, other=1.0)
        sin = tl.load(trow + HALF_R + i, mask=rm, other=0.0)
        return n1 * cos - n2 * sin, n1 * sin + n2 * cos
    return n1, n2


@triton.jit
def _norm_rope_row(x_ptr, w_ptr, o_ptr, tab_ptr, b, l, L, stride_xb, stride_xl, stride_tab, C, eps,
                   HALF_D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_P: tl.constexpr,
                   HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    ty = o_ptr.dtype.element_ty
    row = x_ptr + b * stride_xb + l.to(tl.int64) * stride_xl
    orow = o_ptr + (b * L + l).to(tl.int64) * C
    if INTERLEAVED:
        # the row loaded and stored contiguously (vector accesses), split into its (2i, 2i + 1) pairs in
        # registers: a load of every other element would be a scalar access per value
        c = tl.arange(0, 2 * BLOCK_P)
        cm = c < C
        x = tl.load(row + c, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_P, 2)))
        w1, w2 = tl.split(tl.reshape(w, (BLOCK_P, 2)))
        j = tl.arange(0, BLOCK_P)  # pair index over the row (C / 2 pairs)
        pm = j < C // 2
        i = j % HALF_D
    else:
        j = tl.arange(0, BLOCK_P)  # pair index over the row (C / 2 pairs)
        pm = j < C // 2
        h = j // HALF_D
        i = j % HALF_D
        rot = i < HALF_R
        off1 = h * (2 * HALF_D) + tl.where(rot, i, 2 * HALF_R + 2 * (i - HALF_R))
        off2 = tl.where(rot, off1 + HALF_R, off1 + 1)
        x1 = tl.load(row + off1, mask=pm, other=0.0).to(tl.float32)
        x2 = tl.load(row + off2, mask=pm, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + off1, mask=pm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + off2, mask=pm, other=0.0).to(tl.float32)
    ms = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / C
    r = tl.rsqrt(ms + eps)
    trow = tab_ptr + l.to(tl.int64) * stride_tab
    y1, y2 = _norm_rotate(x1, x2, w1, w2, r, trow, i, pm & (i < HALF_R), ty, HALF_R, HAS_ROPE)
    if INTERLEAVED:
        tl.store(orow + c, tl.reshape(tl.join(y1, y2), (2 * BLOCK_P,)).to(ty), mask=cm)
    else:
        tl.store(orow + off1, y1.to(ty), mask=pm)
        tl.store(orow + off2, y2.to(ty), mask=pm)


@triton.jit
def _load_segment(row, w_ptr, base, C, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Columns [base, base + BLOCK) of the row and of the weight, fp32, split into (2i, 2i + 1) pairs."""
    c = base + tl.arange(0, BLOCK)
    if MASKED:
        cm = c < C
        x = tl.load(row + c, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        x = tl.load(row + c).to(tl.float32)
        w = tl.load(w_ptr + c).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    w1, w2 = tl.split(tl.reshape(w, (BLOCK // 2, 2)))
    return x1, x2, w1, w2


@triton.jit
def _norm_rope_store_segment(x1, x2, w1, w2, r, orow, trow, base, C,
                             HALF_D: tl.constexpr, HALF_R: tl.constexpr, BLOCK: tl.constexpr,
                             MASKED: tl.constexpr, HAS_ROPE: tl.constexpr):
    ty = orow.dtype.element_ty
    j = base // 2 + tl.arange(0, BLOCK // 2)  # pair index over the row
    i = j % HALF_D
    rm = i < HALF_R
    if MASKED:
        rm = rm & (j < C // 2)
    y1, y2 = _norm_rotate(x1, x2, w1, w2, r, trow, i, rm, ty, HALF_R, HAS_ROPE)
    c = base + tl.arange(0, BLOCK)
    y = tl.reshape(tl.join(y1, y2), (BLOCK,)).to(ty)
    if MASKED:
        tl.store(orow + c, y, mask=c < C)
    else:
        tl.store(orow + c, y)


@triton.jit
def _norm_rope_row_segments(x_ptr, w_ptr, o_ptr, tab_ptr, b, l, L, stride_xb, stride_xl, stride_tab, C, eps,
                            HALF_D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_A: tl.constexpr,
                            BLOCK_B: tl.constexpr, MASK_B: tl.constexpr, HAS_ROPE: tl.constexpr):
    """The interleaved row as two segments: [0, BLOCK_A) unmasked, [BLOCK_A, C) in BLOCK_B lanes."""
    row = x_ptr + b * stride_xb + l.to(tl.int64) * stride_xl
    orow = o_ptr + (b * L + l).to(tl.int64) * C
    trow = tab_ptr + l.to(tl.int64) * stride_tab
    xa1, xa2, wa1, wa2 = _load_segment(row, w_ptr, 0, C, BLOCK_A, False)
    ss = tl.sum(xa1 * xa1, axis=0) + tl.sum(xa2 * xa2, axis=0)
    xb1, xb2, wb1, wb2 = _load_segment(row, w_ptr, BLOCK_A, C, BLOCK_B, MASK_B)
    ss += tl.sum(xb1 * xb1, axis=0) + tl.sum(xb2 * xb2, axis=0)
    r = tl.rsqrt(ss / C + eps)
    _norm_rope_store_segment(xa1, xa2, wa1, wa2, r, orow, trow, 0, C, HALF_D, HALF_R, BLOCK_A, False, HAS_ROPE)
    _norm_rope_store_segment(xb1, xb2, wb1, wb2, r, orow, trow, BLOCK_A, C, HALF_D, HALF_R, BLOCK_B, MASK_B,
                             HAS_ROPE)


@triton.jit
def _qk_norm_rope_across_heads_segments_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, qo_ptr, ko_ptr, tab_ptr,
    Lq, Lk, C, eps, s_qb, s_ql, s_kb, s_kl, s_tab,
    HALF_D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    MASK_B: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < Lq:
        _norm_rope_row_segments(q_ptr, wq_ptr, qo_ptr, tab_ptr, b, pid, Lq, s_qb, s_ql, s_tab, C, eps,
                                HALF_D, HALF_R, BLOCK_A, BLOCK_B, MASK_B, HAS_ROPE)
    else:
        _norm_rope_row_segments(k_ptr, wk_ptr, ko_ptr, tab_ptr, b, pid - Lq, Lk, s_kb, s_kl, s_tab, C, eps,
                                HALF_D, HALF_R, BLOCK_A, BLOCK_B, MASK_B, HAS_ROPE)


def _two_segments(C: int):
    """(BLOCK_A, BLOCK_B, MASK_B) of an even C that is not a power of two (see ``two_segments``)."""
    return None if C % 2 else two_segments(C)


def segments(C: int):
    """The two-segment row the launcher picks (``row_segments``; rows are rotation pairs: C even)."""
    return None if C % 2 else row_segments(C)


@triton.jit
def _qk_norm_rope_across_heads_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, qo_ptr, ko_ptr, tab_ptr,
    Lq, Lk, C, eps, s_qb, s_ql, s_kb, s_kl, s_tab,
    HALF_D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < Lq:
        _norm_rope_row(q_ptr, wq_ptr, qo_ptr, tab_ptr, b, pid, Lq, s_qb, s_ql, s_tab, C, eps,
                       HALF_D, HALF_R, BLOCK_P, HAS_ROPE, INTERLEAVED)
    else:
        _norm_rope_row(k_ptr, wk_ptr, ko_ptr, tab_ptr, b, pid - Lq, Lk, s_kb, s_kl, s_tab, C, eps,
                       HALF_D, HALF_R, BLOCK_P, HAS_ROPE, INTERLEAVED)


def qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True,
                              split=None, num_warps=None):
    """``split``: None picks the two-segment row where it applies (see :func:`segments`); True / False
    force it on (interleaved or no table only) / off, for tests and A/B timing. ``num_warps``: None
    picks 8 for rows of 2048 lanes or more, else 4 (A/B timing may force another)."""
    B, Lq, C = q.shape
    Lk = k.shape[1]
    qo = torch.empty((B, Lq, C), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, Lk, C), dtype=k.dtype, device=k.device)
    if B == 0 or C == 0 or Lq + Lk == 0:
        return qo, ko
    D = C // heads
    R = cos_sin.shape[1] if cos_sin is not None else D
    tab = cos_sin if cos_sin is not None else q
    pairs = bool(interleaved) or cos_sin is None  # no table: no pairs
    seg = (segments(C) if split is None else _two_segments(C) if split else None) if pairs else None
    if seg:
        fn, cx, lanes = _qk_norm_rope_across_heads_segments_kernel, (D // 2, R // 2, *seg, cos_sin is not None), seg[0]
    else:
        lanes = next_power_of_2(C // 2)
        fn, cx = _qk_norm_rope_across_heads_kernel, (D // 2, R // 2, lanes, cos_sin is not None, pairs)
    with _device_guard(q):
        launch(fn, (Lq + Lk, B),
               (q, k, q_weight, k_weight, qo, ko, tab, Lq, Lk, C, float(eps),
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), tab.stride(0) if cos_sin is not None else 0),
               cx, {"num_warps": num_warps or (8 if lanes >= 2048 else 4)})
    return qo, ko
