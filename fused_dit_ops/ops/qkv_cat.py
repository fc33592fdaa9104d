"""``joint_qkv_cat`` / ``joint_qkv_cat_out``: the joint [text, image] q, k, v of a double-stream block
as a copy (no norm, no RoPE): validation, CUDA (C++ kernel when ``fused_dit_ops._C`` is built, else
the Triton kernel), CPU (reference), fake. Schemas in ``fused_dit_ops._schemas``.

- ``joint_qkv_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v) -> (q, k, v)`` and
  ``joint_qkv_cat_out(..., q_out!, k_out!, v_out!)``: [B, Lt + Li, H, D] = cat([txt, img], 1) of each,
  one launch.

The joint-input checks here are shared with ``rope.py``'s ``qk_norm_rope_cat`` (the same inputs,
normed and rotated on the way).
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._extension import has_cuda_kernel
from .._validation import (TRACING, check_heads, check_like, check_one_device, check_same_heads, fail, no_backward,
                           no_backward_inplace, refuse_grad, refuse_leaf_inplace)

_NS = "fused_dit"


# --- validators ---------------------------------------------------------------------------------

_IN_NAMES = ("txt_q", "txt_k", "txt_v", "img_q", "img_k", "img_v")
_OUT_NAMES = ("q_out", "k_out", "v_out")


def _check_joint_inputs(op, txt_q, txt_k, txt_v, img_q, img_k, img_v, devices=False):
    """The six joint inputs. ``devices``: first check they share one device, naming the odd one out
    (callers that check more tensors' devices themselves, e.g. ``qk_norm_rope_cat``, leave it off)."""
    if devices:
        check_one_device(op, *zip(_IN_NAMES, (txt_q, txt_k, txt_v, img_q, img_k, img_v)))
    check_heads(op, "txt_q", txt_q, ndim=4)
    B, Lt, H, D = txt_q.shape
    check_same_heads(op, "txt_k", txt_k, "txt_q", txt_q, seq_dim=None)
    check_same_heads(op, "txt_v", txt_v, "txt_q", txt_q, seq_dim=None)
    check_same_heads(op, "img_q", img_q, "txt_q", txt_q, seq_dim=1)
    check_same_heads(op, "img_k", img_k, "img_q", img_q, seq_dim=None)
    check_same_heads(op, "img_v", img_v, "img_q", img_q, seq_dim=None)
    return B, Lt, img_q.shape[1], H, D


def _check_outs(op, outs, B, N, H, D, ref_t):
    for name, o in zip(_OUT_NAMES, outs):
        check_heads(op, name, o, ndim=4)
        if tuple(o.shape) != (B, N, H, D):
            fail(op, f"'{name}' must have shape [B, Lt + Li, H, D] = [{B}, {N}, {H}, {D}], got "
                     f"{list(o.shape)}")
        check_like(op, name, o, "txt_q", ref_t)


def _check_joint_qkv_cat_out(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out):
    op = "joint_qkv_cat_out"
    outs = (q_out, k_out, v_out)
    check_one_device(op, *zip(_IN_NAMES + _OUT_NAMES, (txt_q, txt_k, txt_v, img_q, img_k, img_v) + outs))
    if torch.is_grad_enabled():
        refuse_leaf_inplace(op, *zip(_OUT_NAMES, outs))
    B, Lt, Li, H, D = _check_joint_inputs(op, txt_q, txt_k, txt_v, img_q, img_k, img_v)
    _check_outs(op, outs, B, Lt + Li, H, D, txt_q)
    return B, Lt, Li, H, D


# --- CUDA ---------------------------------------------------------------------------------------

def _alloc_joint(t, N):
    B, _, H, D = t.shape
    return t.new_empty((B, N, H, D))


# the C++ kernels (fused_dit_ops._C) when built, else the Triton one (reported by `env`); the checks
# run here either way
_CAT_CPP = (torch.ops.fused_dit._joint_qkv_cat_cuda.default if has_cuda_kernel("_joint_qkv_cat_cuda") else None)
_CAT_OUT_CPP = (torch.ops.fused_dit._joint_qkv_cat_out_cuda.default if has_cuda_kernel("_joint_qkv_cat_out_cuda")
                else None)


@torch.library.impl(f"{_NS}::joint_qkv_cat", "CUDA")
def _joint_qkv_cat_cuda(txt_q, txt_k, txt_v, img_q, img_k, img_v):
    B, Lt, Li, H, D = _check_joint_inputs("joint_qkv_cat", txt_q, txt_k, txt_v, img_q, img_k, img_v,
                                          devices=True)
    if _CAT_CPP is not None:
        outs = _CAT_CPP(txt_q, txt_k, txt_v, img_q, img_k, img_v)
    else:
        from ..kernels import rope as kr
        outs = tuple(_alloc_joint(t, Lt + Li) for t in (txt_q, txt_k, txt_v))
        kr.joint_qkv_cat_out((txt_q, txt_k, txt_v), (img_q, img_k, img_v), outs)
    return (no_backward("joint_qkv_cat", outs, txt_q, txt_k, txt_v, img_q, img_k, img_v)
            if torch.is_grad_enabled() else outs)


@torch.library.impl(f"{_NS}::joint_qkv_cat_out", "CUDA")
def _joint_qkv_cat_out_cuda(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out):
    _check_joint_qkv_cat_out(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out)
    if _CAT_OUT_CPP is not None:
        _CAT_OUT_CPP(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out)
    else:
        from ..kernels import rope as kr
        kr.joint_qkv_cat_out((txt_q, txt_k, txt_v), (img_q, img_k, img_v), (q_out, k_out, v_out))
    if torch.is_grad_enabled():
        no_backward_inplace("joint_qkv_cat_out", (q_out, k_out, v_out), txt_q, txt_k, txt_v, img_q, img_k, img_v)


# --- CPU: the reference ---------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::joint_qkv_cat", "CPU")
def _joint_qkv_cat_cpu(txt_q, txt_k, txt_v, img_q, img_k, img_v):
    _check_joint_inputs("joint_qkv_cat", txt_q, txt_k, txt_v, img_q, img_k, img_v, devices=True)
    outs = ref.joint_qkv_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v)
    return (no_backward("joint_qkv_cat", outs, txt_q, txt_k, txt_v, img_q, img_k, img_v)
            if torch.is_grad_enabled() else outs)


@torch.library.impl(f"{_NS}::joint_qkv_cat_out", "CPU")
def _joint_qkv_cat_out_cpu(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out):
    B, Lt, Li, H, D = _check_joint_qkv_cat_out(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out)
    for o, t, i in ((q_out, txt_q, img_q), (k_out, txt_k, img_k), (v_out, txt_v, img_v)):
        o[:, :Lt].copy_(t)
        o[:, Lt:].copy_(i)
    if torch.is_grad_enabled():
        no_backward_inplace("joint_qkv_cat_out", (q_out, k_out, v_out), txt_q, txt_k, txt_v, img_q, img_k, img_v)


# --- Autograd: a fallthrough (no backward; see ops/modulation.py) -----------------------------------
# joint_qkv_cat hands its outputs out behind a node whose backward raises; joint_qkv_cat_out rebases
# the history of what it wrote onto such a node (a leaf that requires grad is refused before the write).

for _op in ("joint_qkv_cat", "joint_qkv_cat_out"):
    torch.library.impl(f"{_NS}::{_op}", "Autograd")(torch.library.fallthrough_kernel)


# --- fake: shapes only ------------------------------------------------------------------------------

@torch.library.register_fake(f"{_NS}::joint_qkv_cat")
def _joint_qkv_cat_fake(txt_q, txt_k, txt_v, img_q, img_k, img_v):
    B, Lt, Li, H, D = _check_joint_inputs("joint_qkv_cat", txt_q, txt_k, txt_v, img_q, img_k, img_v,
                                          devices=True)
    refuse_grad("joint_qkv_cat", TRACING, *zip(_IN_NAMES, (txt_q, txt_k, txt_v, img_q, img_k, img_v)))
    return tuple(_alloc_joint(t, Lt + Li) for t in (txt_q, txt_k, txt_v))


@torch.library.register_fake(f"{_NS}::joint_qkv_cat_out")
def _joint_qkv_cat_out_fake(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out):
    _check_joint_qkv_cat_out(txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out)
    refuse_grad("joint_qkv_cat_out", TRACING, *zip(_IN_NAMES + _OUT_NAMES,
                                                   (txt_q, txt_k, txt_v, img_q, img_k, img_v, q_out, k_out, v_out)))


# --- public Python API ------------------------------------------------------------------------------

def joint_qkv_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v, out=None):
    """(q, k, v) joint [B, Lt + Li, H, D] = cat([txt, img], dim=1) of each, in one launch. Inputs
    [B, L, H, D] with any batch/token/head strides (e.g. V a chunk of packed QKV). ``out``: a
    (q_out, k_out, v_out) triple of caller-given buffers to write into (returned)."""
    if out is None:
        return torch.ops.fused_dit.joint_qkv_cat.default(txt_q, txt_k, txt_v, img_q, img_k, img_v)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        fail("joint_qkv_cat", f"'out' must be a (q_out, k_out, v_out) triple, got a {got}")
    torch.ops.fused_dit.joint_qkv_cat_out.default(txt_q, txt_k, txt_v, img_q, img_k, img_v, *out)
    return tuple(out)
