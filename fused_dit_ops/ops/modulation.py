"""adaLN modulation ops: validation, CUDA (Triton / C++), CPU (reference) and fake impls.

Schemas live in ``fused_dit_ops._schemas``. Every implementation runs the same metadata-only
validator first, so a bad input gets the same message eagerly on CPU or CUDA, and while tracing
under torch.compile (fake).
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._extension import has_cuda_kernel
from .._validation import (TRACING, check_activation, check_index, check_like, check_one_device, check_param,
                           check_same_activation, check_vector, fail, no_backward, refuse_grad)

_NS = "fused_dit"


# --- validators ---------------------------------------------------------------------------------

def _check_scale_shift_gate(x, shift, scale, gate, index):
    op = "scale_shift_gate"
    check_one_device(op, ("x", x), ("shift", shift), ("scale", scale), ("gate", gate), ("index", index))
    B, L, C = check_activation(op, "x", x)
    check_index(op, index, B, L, "x", x)
    for name, p in (("shift", shift), ("scale", scale), ("gate", gate)):
        check_param(op, name, p, B, C, index is not None, "x", x)


def _check_norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm, op="norm_scale_shift", sfx=""):
    """``sfx``: the stream suffix of the dual op's argument names ("_a" / "_b")."""
    xn, ixn = "x" + sfx, "index" + sfx
    check_one_device(op, (xn, x), ("shift" + sfx, shift), ("scale" + sfx, scale), (ixn, index),
                     ("weight", weight), ("bias", bias))
    B, L, C = check_activation(op, xn, x)
    check_index(op, index, B, L, xn, x, name=ixn)
    for name, p in (("shift", shift), ("scale", scale)):
        check_param(op, name + sfx, p, B, C, index is not None, xn, x, index_name=ixn)
    check_vector(op, "weight", weight, C, xn, x)
    check_vector(op, "bias", bias, C, xn, x)
    if norm not in ("layer", "rms"):
        fail(op, f"'norm' must be 'layer' or 'rms', got {norm!r}")
    if norm == "rms" and bias is not None:
        fail(op, "'bias' is only defined for norm='layer', got a bias with norm='rms'")
    if not eps > 0:
        fail(op, f"'eps{sfx}' must be > 0, got {eps}")


def _check_gate_residual(residual, update, gate, index, op="gate_residual", sfx="", *more):
    """``more``: further (name, tensor) pairs that must share the device (shift and scale)."""
    rn, ixn = "residual" + sfx, "index" + sfx
    check_one_device(op, (rn, residual), ("update" + sfx, update), ("gate" + sfx, gate), (ixn, index), *more)
    B, L, C = check_activation(op, rn, residual)
    check_same_activation(op, "update" + sfx, update, rn, residual)
    check_index(op, index, B, L, rn, residual, name=ixn)
    check_param(op, "gate" + sfx, gate, B, C, index is not None, rn, residual, index_name=ixn)
    return B, L, C


def _check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps,
                                          op="gate_residual_norm_scale_shift", sfx=""):
    B, L, C = _check_gate_residual(residual, update, gate, index, op, sfx,
                                   ("shift" + sfx, shift), ("scale" + sfx, scale))
    for name, p in (("shift", shift), ("scale", scale)):
        check_param(op, name + sfx, p, B, C, index is not None, "residual" + sfx, residual,
                    index_name="index" + sfx)
    if not eps > 0:
        fail(op, f"'eps{sfx}' must be > 0, got {eps}")


def _check_dual_pair(op, a, b, a_name, b_name):
    """The two streams of a dual op: same device, dtype, batch and channels (one launch, one config)."""
    check_like(op, b_name, b, a_name, a)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        fail(op, f"'{b_name}' {list(b.shape)} and '{a_name}' {list(a.shape)} must have the same batch B and "
                 f"channels C (only the lengths L may differ); call the single-stream op per stream instead")


_NORM_STREAM = ("x", "shift", "scale", "index")
_GRNS_STREAM = ("residual", "update", "gate", "shift", "scale", "index")


def _check_dual_streams(op, names, a, b, check_stream):
    """The checks of a dual op: every tensor of both streams on one device, each stream as its
    single-stream op checks it (``check_stream(*stream, sfx)``; a stream is its tensors in ``names``
    order, then its eps), then the two streams as a pair (:func:`_check_dual_pair` on the first tensors)."""
    check_one_device(op, *[(n + sfx, t) for sfx, s in (("_a", a), ("_b", b)) for n, t in zip(names, s)])
    check_stream(*a, "_a")
    check_stream(*b, "_b")
    _check_dual_pair(op, a[0], b[0], names[0] + "_a", names[0] + "_b")


def _check_dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm):
    op = "dual_norm_scale_shift"
    _check_dual_streams(op, _NORM_STREAM, (xa, sha, sca, ia, eps_a), (xb, shb, scb, ib, eps_b),
                        lambda x, sh, sc, i, eps, sfx: _check_norm_scale_shift(x, sh, sc, i, None, None, eps, norm,
                                                                               op, sfx))


def _check_dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    op = "dual_gate_residual_norm_scale_shift"
    _check_dual_streams(op, _GRNS_STREAM, (ra, ua, ga, sha, sca, ia, eps_a), (rb, ub, gb, shb, scb, ib, eps_b),
                        lambda *stream: _check_gate_residual_norm_scale_shift(*stream[:-1], op, stream[-1]))


# --- CUDA: Triton launchers (gate_residual: C++ kernel when fused_dit_ops._C is built) ---------

@torch.library.impl(f"{_NS}::scale_shift_gate", "CUDA")
def _scale_shift_gate_cuda(x, shift, scale, gate, index=None):
    from ..kernels import modulation as k
    _check_scale_shift_gate(x, shift, scale, gate, index)
    out = k.scale_shift_gate(x, shift, scale, gate, index)
    return no_backward("scale_shift_gate", out, x, shift, scale, gate) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::norm_scale_shift", "CUDA")
def _norm_scale_shift_cuda(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    from ..kernels import modulation as k
    _check_norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
    out = k.norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
    return no_backward("norm_scale_shift", out, x, shift, scale, weight, bias) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::gate_residual_norm_scale_shift", "CUDA")
def _gate_residual_norm_scale_shift_cuda(residual, update, gate, shift, scale, index=None, eps=1e-6):
    from ..kernels import modulation as k
    _check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
    out = k.gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
    return (no_backward("gate_residual_norm_scale_shift", out, residual, update, gate, shift, scale)
            if torch.is_grad_enabled() else out)


@torch.library.impl(f"{_NS}::dual_norm_scale_shift", "CUDA")
def _dual_norm_scale_shift_cuda(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    from ..kernels import modulation as k
    _check_dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    out = k.dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    return (no_backward("dual_norm_scale_shift", out, xa, sha, sca, xb, shb, scb)
            if torch.is_grad_enabled() else out)


@torch.library.impl(f"{_NS}::dual_gate_residual_norm_scale_shift", "CUDA")
def _dual_gate_residual_norm_scale_shift_cuda(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    from ..kernels import modulation as k
    _check_dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    out = k.dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    return (no_backward("dual_gate_residual_norm_scale_shift", out, ra, ua, ga, sha, sca, rb, ub, gb, shb, scb)
            if torch.is_grad_enabled() else out)


# the C++ kernel (fused_dit_ops._C) when built, else the Triton one (reported by `env`); the checks
# run here either way
_GATE_RESIDUAL_CPP = (torch.ops.fused_dit._gate_residual_cuda.default if has_cuda_kernel("_gate_residual_cuda")
                      else None)


@torch.library.impl(f"{_NS}::gate_residual", "CUDA")
def _gate_residual_cuda(residual, update, gate, index=None):
    _check_gate_residual(residual, update, gate, index)
    if _GATE_RESIDUAL_CPP is not None and gate.dtype == residual.dtype:  # the C++ kernel: one dtype
        out = _GATE_RESIDUAL_CPP(residual, update, gate, index)
    else:
        from ..kernels import modulation as k
        out = k.gate_residual(residual, update, gate, index)
    return no_backward("gate_residual", out, residual, update, gate) if torch.is_grad_enabled() else out


# --- CPU: the reference (fp32 math) ---------------------------------------------------------------

@torch.library.impl(f"{_NS}::scale_shift_gate", "CPU")
def _scale_shift_gate_cpu(x, shift, scale, gate, index=None):
    _check_scale_shift_gate(x, shift, scale, gate, index)
    out = ref.scale_shift_gate(x, shift, scale, gate, index)
    return no_backward("scale_shift_gate", out, x, shift, scale, gate) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::norm_scale_shift", "CPU")
def _norm_scale_shift_cpu(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    _check_norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
    out = ref.norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
    return no_backward("norm_scale_shift", out, x, shift, scale, weight, bias) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::gate_residual_norm_scale_shift", "CPU")
def _gate_residual_norm_scale_shift_cpu(residual, update, gate, shift, scale, index=None, eps=1e-6):
    _check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
    out = ref.gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
    return (no_backward("gate_residual_norm_scale_shift", out, residual, update, gate, shift, scale)
            if torch.is_grad_enabled() else out)


@torch.library.impl(f"{_NS}::gate_residual", "CPU")
def _gate_residual_cpu(residual, update, gate, index=None):
    _check_gate_residual(residual, update, gate, index)
    out = ref.gate_residual(residual, update, gate, index)
    return no_backward("gate_residual", out, residual, update, gate) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::dual_norm_scale_shift", "CPU")
def _dual_norm_scale_shift_cpu(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    _check_dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    out = (ref.norm_scale_shift(xa, sha, sca, ia, None, None, eps_a, norm),
           ref.norm_scale_shift(xb, shb, scb, ib, None, None, eps_b, norm))
    return (no_backward("dual_norm_scale_shift", out, xa, sha, sca, xb, shb, scb)
            if torch.is_grad_enabled() else out)


@torch.library.impl(f"{_NS}::dual_gate_residual_norm_scale_shift", "CPU")
def _dual_gate_residual_norm_scale_shift_cpu(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    _check_dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    out = (*ref.gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a),
           *ref.gate_residual_norm_scale_shift(rb, ub, gb, shb, scb, ib, eps_b))
    return (no_backward("dual_gate_residual_norm_scale_shift", out, ra, ua, ga, sha, sca, rb, ub, gb, shb, scb)
            if torch.is_grad_enabled() else out)


# --- Autograd: a fallthrough ------------------------------------------------------------------------
# The ops have no backward. The dispatcher skips the Autograd key (no kernel of ours runs there, which
# would cost every call: a Python autograd kernel adds ~3 us), so the implementations above run with
# autograd on: with grad enabled and an input that requires grad, ``no_backward`` hands the outputs out
# behind a node whose backward raises, naming the op (the fakes refuse such inputs while tracing).

for _op in ("scale_shift_gate", "norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual",
            "dual_norm_scale_shift", "dual_gate_residual_norm_scale_shift"):
    torch.library.impl(f"{_NS}::{_op}", "Autograd")(torch.library.fallthrough_kernel)


# --- fake (torch.compile / meta): shapes only, never data -------------------------------------------

def _new(x):
    return x.new_empty(x.shape)


@torch.library.register_fake(f"{_NS}::scale_shift_gate")
def _scale_shift_gate_fake(x, shift, scale, gate, index=None):
    _check_scale_shift_gate(x, shift, scale, gate, index)
    refuse_grad("scale_shift_gate", TRACING, ("x", x), ("shift", shift), ("scale", scale), ("gate", gate))
    return _new(x), _new(x)


@torch.library.register_fake(f"{_NS}::norm_scale_shift")
def _norm_scale_shift_fake(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    _check_norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)
    refuse_grad("norm_scale_shift", TRACING, ("x", x), ("shift", shift), ("scale", scale), ("weight", weight),
                ("bias", bias))
    return _new(x)


@torch.library.register_fake(f"{_NS}::gate_residual_norm_scale_shift")
def _gate_residual_norm_scale_shift_fake(residual, update, gate, shift, scale, index=None, eps=1e-6):
    _check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)
    refuse_grad("gate_residual_norm_scale_shift", TRACING, ("residual", residual), ("update", update),
                ("gate", gate), ("shift", shift), ("scale", scale))
    return _new(residual), _new(residual)


@torch.library.register_fake(f"{_NS}::gate_residual")
def _gate_residual_fake(residual, update, gate, index=None):
    _check_gate_residual(residual, update, gate, index)
    refuse_grad("gate_residual", TRACING, ("residual", residual), ("update", update), ("gate", gate))
    return _new(residual)


@torch.library.register_fake(f"{_NS}::dual_norm_scale_shift")
def _dual_norm_scale_shift_fake(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    _check_dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    refuse_grad("dual_norm_scale_shift", TRACING, ("x_a", xa), ("shift_a", sha), ("scale_a", sca), ("x_b", xb),
                ("shift_b", shb), ("scale_b", scb))
    return _new(xa), _new(xb)


@torch.library.register_fake(f"{_NS}::dual_gate_residual_norm_scale_shift")
def _dual_gate_residual_norm_scale_shift_fake(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    _check_dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    refuse_grad("dual_gate_residual_norm_scale_shift", TRACING, ("residual_a", ra), ("update_a", ua), ("gate_a", ga),
                ("shift_a", sha), ("scale_a", sca), ("residual_b", rb), ("update_b", ub), ("gate_b", gb),
                ("shift_b", shb), ("scale_b", scb))
    return _new(ra), _new(ra), _new(rb), _new(rb)


# --- public Python API ------------------------------------------------------------------------------

def scale_shift_gate(x, shift, scale, gate, index=None):
    """(y, gate_out): y = x * (1 + scale_sel) + shift_sel; gate_out = gate_sel as [B, L, C].

    Drop-in for diffusers ``QwenImageTransformerBlock._modulate(x, cat([shift, scale, gate], -1), index)``.
    Parameters are [B, C], or [2B, C] with ``index`` [B, L] (token uses set ``index != 0``).
    """
    return torch.ops.fused_dit.scale_shift_gate.default(x, shift, scale, gate, index)


def norm_scale_shift(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    """y = Norm(x) * (1 + scale_sel) + shift_sel with Norm LayerNorm ("layer") or RMSNorm ("rms")."""
    return torch.ops.fused_dit.norm_scale_shift.default(x, shift, scale, index, weight, bias, eps, norm)


def gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index=None, eps=1e-6):
    """(residual_out, y): residual_out = residual + gate_sel * update;
    y = LayerNorm(residual_out) * (1 + scale_sel) + shift_sel (LayerNorm of residual_out as stored)."""
    return torch.ops.fused_dit.gate_residual_norm_scale_shift.default(
        residual, update, gate, shift, scale, index, eps)


def gate_residual(residual, update, gate, index=None):
    """residual + gate_sel * update."""
    return torch.ops.fused_dit.gate_residual.default(residual, update, gate, index)


def dual_norm_scale_shift(x_a, shift_a, scale_a, index_a, eps_a, x_b, shift_b, scale_b, index_b, eps_b,
                          norm="layer"):
    """(y_a, y_b): :func:`norm_scale_shift` (no weight/bias) of two streams in one launch, e.g. the
    image and text streams of a dual-stream block. Same B, C and dtype; the lengths may differ."""
    return torch.ops.fused_dit.dual_norm_scale_shift.default(x_a, shift_a, scale_a, index_a, eps_a, x_b, shift_b,
                                                            scale_b, index_b, eps_b, norm)


def dual_gate_residual_norm_scale_shift(residual_a, update_a, gate_a, shift_a, scale_a, index_a, eps_a,
                                        residual_b, update_b, gate_b, shift_b, scale_b, index_b, eps_b):
    """(residual_out_a, y_a, residual_out_b, y_b): :func:`gate_residual_norm_scale_shift` of two streams
    in one launch. Same B, C and dtype; the lengths may differ."""
    return torch.ops.fused_dit.dual_gate_residual_norm_scale_shift.default(
        residual_a, update_a, gate_a, shift_a, scale_a, index_a, eps_a,
        residual_b, update_b, gate_b, shift_b, scale_b, index_b, eps_b)
