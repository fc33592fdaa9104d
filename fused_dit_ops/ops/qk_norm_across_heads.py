"""``fused_dit.qk_norm_rope_across_heads``: RMSNorm of q and k over all heads, then RoPE, one launch.

The self-attention of Wan-style blocks normalises q and k over the whole projection row
(``torch.nn.RMSNorm(heads x head_dim)``, "rms_norm_across_heads") before splitting heads, then rotates
each head with a 3D RoPE table; their cross-attention normalises q and k the same way without RoPE
(pass ``cos_sin=None``). Schema in ``fused_dit_ops._schemas``; kernel in
``fused_dit_ops.kernels.qk_norm_across_heads``; CPU implementation: ``reference.qk_norm_rope_across_heads``.
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._validation import (TRACING, check_cos_sin_cache, check_last_dim_contiguous, check_like, check_one_device,
                           check_tensor, fail, no_backward, refuse_grad)

_NS = "fused_dit"
_OP = "qk_norm_rope_across_heads"


def _check(q, k, q_weight, k_weight, cos_sin, heads, eps, interleaved=True):
    op = _OP
    check_one_device(op, ("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos_sin", cos_sin))
    check_tensor(op, "q", q, ndim=3)
    check_tensor(op, "k", k, ndim=3)
    check_like(op, "k", k, "q", q)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        fail(op, f"'k' {list(k.shape)} must have the batch B and channels C of 'q' {list(q.shape)} "
                 f"(only the token counts may differ)")
    check_last_dim_contiguous(op, "q", q)
    check_last_dim_contiguous(op, "k", k)
    B, Lq, C = q.shape
    if not isinstance(heads, (int, torch.SymInt)) or heads <= 0 or C % heads != 0:
        fail(op, f"'heads' must be a positive divisor of C={C}, got {heads}")
    D = C // heads
    if D % 2 != 0:
        fail(op, f"head_dim C / heads = {C} / {heads} = {D} must be even (RoPE rotates pairs)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(op, name, w, ndim=1)
        if w.shape[0] != C:
            fail(op, f"'{name}' must have shape [C] = [{C}] (one weight per channel of all heads), "
                     f"got [{w.shape[0]}]")
        if C > 1 and w.stride(0) != 1:
            fail(op, f"'{name}' must be contiguous, got stride {w.stride(0)}")
    if cos_sin is not None:
        check_cos_sin_cache(op, "cos_sin", cos_sin, D, q, min_rows=max(Lq, k.shape[1]))
    if not eps > 0:
        fail(op, f"'eps' must be > 0, got {eps}")


@torch.library.impl(f"{_NS}::{_OP}", "CUDA")
def _cuda(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    from ..kernels import qk_norm_across_heads as kn
    _check(q, k, q_weight, k_weight, cos_sin, heads, eps)
    out = kn.qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin, heads, eps, interleaved)
    return no_backward(_OP, out, q, k, q_weight, k_weight) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::{_OP}", "CPU")
def _cpu(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    _check(q, k, q_weight, k_weight, cos_sin, heads, eps)
    out = ref.qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin, heads, eps, interleaved)
    return no_backward(_OP, out, q, k, q_weight, k_weight) if torch.is_grad_enabled() else out


torch.library.impl(f"{_NS}::{_OP}", "Autograd")(torch.library.fallthrough_kernel)


@torch.library.register_fake(f"{_NS}::{_OP}")
def _fake(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    _check(q, k, q_weight, k_weight, cos_sin, heads, eps)
    refuse_grad(_OP, TRACING, ("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight))
    return q.new_empty(q.shape), k.new_empty(k.shape)


def qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    """(q_out, k_out), new contiguous [B, Lq, C] and [B, Lk, C]: ``torch.nn.RMSNorm(C)`` of each row
    (fp32 math, weight in fp32, one rounding), then with ``cos_sin`` (fp32 [P, R], cos of R/2
    frequencies then sin; row l for token l) RoPE of the first R dims of each of the ``heads`` heads
    (fp32, one rounding). q and k may have different token counts; view the outputs as
    [B, L, heads, C / heads] for ``fused_dit.attention``."""
    return torch.ops.fused_dit.qk_norm_rope_across_heads.default(q, k, q_weight, k_weight, cos_sin, heads, eps,
                                                                  interleaved)
