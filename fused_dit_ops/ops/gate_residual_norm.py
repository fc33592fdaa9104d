"""``fused_dit.gate_residual_layer_norm``: gated residual + affine LayerNorm of its result, one pass.

A Wan block's self-attention residual ``(x.float() + attn * gate).type_as(x)`` followed by its
cross-attention norm ``FP32LayerNorm(C, affine)(x.float()).type_as(x)``. Schema in
``fused_dit_ops._schemas``; kernel in ``fused_dit_ops.kernels.gate_residual_norm``; CPU implementation:
``reference.gate_residual_layer_norm``.
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._validation import TRACING, check_tensor, fail, no_backward, refuse_grad
from .modulation import _check_gate_residual

_NS = "fused_dit"
_OP = "gate_residual_layer_norm"


def _check(residual, update, gate, index, weight, bias, eps, op=_OP):
    B, L, C = _check_gate_residual(residual, update, gate, index, op, "", ("weight", weight), ("bias", bias))
    for name, v in (("weight", weight), ("bias", bias)):
        if v is None:
            continue
        check_tensor(op, name, v, ndim=1)
        if v.shape[0] != C:
            fail(op, f"'{name}' must have shape [C] = [{C}], got [{v.shape[0]}]")
        if C > 1 and v.stride(0) != 1:
            fail(op, f"'{name}' must be contiguous, got stride {v.stride(0)}")
    if not eps > 0:
        fail(op, f"'eps' must be > 0, got {eps}")


@torch.library.impl(f"{_NS}::{_OP}", "CUDA")
def _cuda(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    from ..kernels import gate_residual_norm as k
    _check(residual, update, gate, index, weight, bias, eps)
    out = k.gate_residual_layer_norm(residual, update, gate, index, weight, bias, eps)
    return no_backward(_OP, out, residual, update, gate, weight, bias) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::{_OP}", "CPU")
def _cpu(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    _check(residual, update, gate, index, weight, bias, eps)
    out = ref.gate_residual_layer_norm(residual, update, gate, index, weight, bias, eps)
    return no_backward(_OP, out, residual, update, gate, weight, bias) if torch.is_grad_enabled() else out


torch.library.impl(f"{_NS}::{_OP}", "Autograd")(torch.library.fallthrough_kernel)


@torch.library.register_fake(f"{_NS}::{_OP}")
def _fake(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    _check(residual, update, gate, index, weight, bias, eps)
    refuse_grad(_OP, TRACING, ("residual", residual), ("update", update), ("gate", gate), ("weight", weight),
                ("bias", bias))
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


def gate_residual_layer_norm(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    """(residual_out, y): residual_out = residual + gate_sel * update (fp32 math, one rounding);
    y = LayerNorm(residual_out as stored) * weight + bias (fp32, one rounding; weight and bias [C] in
    any float dtype, each optional). Gate [B, C], or [2B, C] with ``index`` [B, L], in the activation's
    dtype or fp32."""
    return torch.ops.fused_dit.gate_residual_layer_norm.default(residual, update, gate, index, weight, bias, eps)
