"""The ops' eager fast path: the one place that decides "CUDA eager, launch without dispatch".

An integration that calls several ops per block (``fused_dit_ops.integrations``) picks a namespace
once per call with :func:`ops_for` and calls the ops on it by their schema's positional arguments:

- :data:`DISPATCH`: ``torch.ops.fused_dit.*`` (dispatch, each op's checks, CPU references, fake
  implementations): what torch.compile traces, the CPU runs, and torch.profiler / dispatch modes see;
- the direct namespace (:func:`direct`), taken only when :func:`fast` says so (CUDA tensors, eager,
  grad mode off, no torch.compile tracing, no Python dispatch mode, no torch.profiler): each op runs
  its own input check (the validator its registered implementations run, so a bad input gets the
  same ``FusedDitInputError``) and then its kernel launcher, without the dispatcher (40-80 us of
  host time per op on the GPU hosts here; small images are bound by host time).

Two launchers skip the check on the direct path, for buffers the caller built itself in the same
call: ``joint_linear_unchecked`` (activations the modulation ops just wrote, weights the caller
packed) and ``attention_unchecked`` (q, k, v views of the joint buffer ``joint_linear`` returned).
On :data:`DISPATCH` those two names are the checked ops, so callers never branch.

Only this module (and the ops' registrations) import ``fused_dit_ops.kernels``.
"""
from __future__ import annotations

import types

import torch

from .. import attention_dispatch as _attn
from . import linear as _linear
from . import modulation as _mod
from . import rope as _rope

_OPS = torch.ops.fused_dit
# built at import (the schemas are declared by then): dynamo cannot trace its construction, and a
# compiled block may be the first caller (eager CUDA calls take the direct namespace)
DISPATCH = types.SimpleNamespace(
    norm_scale_shift=_OPS.norm_scale_shift.default,
    dual_norm_scale_shift=_OPS.dual_norm_scale_shift.default,
    gate_residual_norm_scale_shift=_OPS.gate_residual_norm_scale_shift.default,
    dual_gate_residual_norm_scale_shift=_OPS.dual_gate_residual_norm_scale_shift.default,
    gate_residual=_OPS.gate_residual.default,
    joint_qk_norm_rope_=_OPS.joint_qk_norm_rope_.default,
    qk_norm_rope_cat=_OPS.qk_norm_rope_cat.default,
    attention=_OPS.attention.default,
    joint_linear_unchecked=_OPS.joint_linear.default,
    attention_unchecked=_OPS.attention.default,
)
_DIRECT = None


def fast(x: torch.Tensor) -> bool:
    """May ops on ``x`` skip dispatch? Eager CUDA inference only: grad mode off (the ops have no
    backward), not while torch.compile traces, no Python dispatch mode (FlopCounterMode, fake
    tensors) that must see each op, and not under torch.profiler (whose op names and shapes
    ``fused_dit_ops profile`` reads)."""
    return (not torch.compiler.is_compiling() and x.is_cuda and not torch.is_grad_enabled()
            and not torch._C._len_torch_dispatch_stack() and not torch.autograd._profiler_enabled())


def ops_for(x: torch.Tensor):
    """The namespace to call for a block whose activations are ``x``: :func:`direct` or :data:`DISPATCH`."""
    return direct() if fast(x) else DISPATCH


def attention_unchecked(q, k, v, softmax_scale=None, causal=False, backend=None):
    """``fused_dit.attention`` minus dispatch and checks."""
    out = _attn.RUNNERS[_attn.select(q, k, v, causal, backend)](q, k, v, softmax_scale, causal)
    return out if out.is_contiguous() else out.contiguous()


def direct():
    """The direct namespace (same names and signatures as :data:`DISPATCH`); built on first use
    (the kernels need triton)."""
    global _DIRECT
    if _DIRECT is not None:
        return _DIRECT
    from ..kernels import modulation as km
    from ..kernels import rope as kr

    def norm_scale_shift(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
        _mod._check_norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
        return km.norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)

    def dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
        _mod._check_dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
        return km.dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)

    def gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index=None, eps=1e-6):
        _mod._check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
        return km.gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)

    def dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
        _mod._check_dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a,
                                                        rb, ub, gb, shb, scb, ib, eps_b)
        return km.dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)

    def gate_residual(residual, update, gate, index=None):
        if _mod._GATE_RESIDUAL_CPP is not None:  # the C++ kernel: its op runs the checks
            return _OPS.gate_residual.default(residual, update, gate, index)
        _mod._check_gate_residual(residual, update, gate, index)
        return km.gate_residual(residual, update, gate, index)

    def joint_qk_norm_rope_(q, k, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps=1e-6, interleaved=True):
        _rope._check_joint_qk_norm_rope(q, k, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps)
        kr.joint_qk_norm_rope_(q, k, txt_len, (wqt, wkt, wqi, wki), (txt_tab, img_tab), eps, interleaved)

    _DIRECT = types.SimpleNamespace(
        norm_scale_shift=norm_scale_shift, dual_norm_scale_shift=dual_norm_scale_shift,
        gate_residual_norm_scale_shift=gate_residual_norm_scale_shift,
        dual_gate_residual_norm_scale_shift=dual_gate_residual_norm_scale_shift,
        gate_residual=gate_residual, joint_qk_norm_rope_=joint_qk_norm_rope_,
        qk_norm_rope_cat=DISPATCH.qk_norm_rope_cat,  # q/k/v from module calls: the op and its checks
        attention=DISPATCH.attention,
        joint_linear_unchecked=_linear.joint_linear_unchecked, attention_unchecked=attention_unchecked)
    return _DIRECT
