"""Triton kernel of ``gate_residual_layer_norm``: the gated residual and an affine LayerNorm of its
result in one pass (a Wan block's attention residual followed by its cross-attention norm).

Per token row: ``r_out = residual + gate_sel * update`` (fp32, rounded once to the activation dtype
and stored), then ``y = LayerNorm(r_out as stored) * weight + bias`` in fp32 (weight and bias in any
float dtype, used in fp32, as ``FP32LayerNorm`` does), rounded once. Parameters and layout as the
modulation kernels (``kernels/modulation.py``, whose helpers this reuses): activations [B, L, C] with
a contiguous last dim, gate [B, C] or [2B, C] with ``index`` [B, L], free row strides; whole rows per
program; outputs fresh and contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch
from .modulation import (_device_guard, _gather_param, _index_args, _layer_norm_rows, _load_rows, _norm_config,
                         _row_select, _store, _whole_rows)


@triton.jit
def _gate_residual_layer_norm_rows(
    pid_m, b, r_ptr, u_ptr, gate_ptr, idx_ptr, r_out_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """BLOCK_M rows (row tile pid_m of batch b): ``r_out = r + gate_sel * u`` rounded to the residual
    dtype and stored, then the LayerNorm (no affine) of r_out as stored, fp32. Returns (normalised
    rows, cols, cmask, mask, output offsets [BLOCK_M, BLOCK_C], output row numbers, rmask, sel)."""
    cols, cmask, l, rmask, mask = _whole_rows(pid_m, L, C, BLOCK_M, BLOCK_C)
    r = _load_rows(r_ptr, b, l, stride_rb, stride_rl, cols, mask).to(tl.float32)
    u = _load_rows(u_ptr, b, l, stride_ub, stride_ul, cols, mask).to(tl.float32)
    sel = _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX)
    gate = _gather_param(gate_ptr, b, B, stride_gate, sel, cols, mask, HAS_INDEX)
    r_out = (r + gate * u).to(r_out_ptr.dtype.element_ty)
    row = (b * L + l).to(tl.int64)
    out_off = row[:, None] * C + cols[None, :]
    _store(r_out_ptr + out_off, r_out, mask, STREAM_STORES)
    n = _layer_norm_rows(r_out.to(tl.float32), cmask, C, eps, False)
    return n, cols, cmask, mask, out_off, row, rmask, sel


@triton.jit
def _affine_rows(n, w_ptr, bias_ptr, cols, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """n * weight + bias (each optional) of fp32 rows [BLOCK_M, BLOCK_C]: the LayerNorm's affine part."""
    if HAS_WEIGHT:
        n = n * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        n = n + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return n


@triton.jit
def _gate_residual_layer_norm_kernel(
    r_ptr, u_ptr, gate_ptr, idx_ptr, w_ptr, bias_ptr, r_out_ptr, y_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n, cols, cmask, mask, out_off, _, _, _ = _gate_residual_layer_norm_rows(
        pid_m, b, r_ptr, u_ptr, gate_ptr, idx_ptr, r_out_ptr, L, C, B, eps,
        stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
        HAS_INDEX, BLOCK_M, BLOCK_C, STREAM_STORES)
    n = _affine_rows(n, w_ptr, bias_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    _store(y_ptr + out_off, n.to(y_ptr.dtype.element_ty), mask, STREAM_STORES)


def gate_residual_layer_norm(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6, config=None):
    B, L, C = residual.shape
    r_out = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    y = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    if y.numel() == 0:
        return r_out, y
    cfg = dict(config or _norm_config(C))
    bm, bc = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_C")
    stream = cfg.pop("STREAM_STORES", True)
    for k in ("ITERS", "PARAM_GATHER"):
        cfg.pop(k, None)
    idx, sib, sil = _index_args(index, residual)
    with _device_guard(residual):
        launch(_gate_residual_layer_norm_kernel, (cdiv(L, bm), B),
               (residual, update, gate, idx, residual if weight is None else weight,
                residual if bias is None else bias, r_out, y, L, C, B, float(eps),
                residual.stride(0), residual.stride(1), update.stride(0), update.stride(1), gate.stride(0), sib, sil),
               (index is not None, weight is not None, bias is not None, bm, bc, stream), cfg)
    return r_out, y
