"""``fused_dit.attention``: one op in front of FA3 / FA4 / cuDNN / FA2 / SDPA.

Layout [B, S, H, D] (diffusers / flash-attention): q [B, Sq, H, D], k and v [B, Sk, Hkv, D] with
Hkv dividing H; output contiguous [B, Sq, H, D] in q's dtype. Inputs need a contiguous last
dimension only (strided views, e.g. chunks of a packed QKV projection, are passed on without
copies where the backend takes them). Forward only (inference): there is no autograd formula.

CUDA and CPU implementations both go through ``attention_dispatch.select`` (metadata only,
cached) and run one backend; the fake implementation returns an empty contiguous tensor, so
the op is opaque to torch.compile (fullgraph) and its real output strides match the fake's.
"""
from __future__ import annotations

import math

import torch

from .. import attention_dispatch as dispatch
from .._validation import (TRACING, check_last_dim_contiguous, check_like, check_one_device, check_tensor, fail,
                           no_backward, refuse_grad)

_NS = "fused_dit"
_OP = "attention"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _shape(t) -> list:
    return list(t.shape)


def _check_attention(q, k, v, softmax_scale, causal, backend):
    check_one_device(_OP, ("q", q), ("k", k), ("v", v))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, ndim=4, dtypes=_DTYPES)
    check_like(_OP, "k", k, "q", q)
    check_like(_OP, "v", v, "q", q)
    B, Sq, H, D = q.shape
    Bk, Sk, Hkv, Dk = k.shape
    # k against q first, then v against k: the message names the argument that breaks the rule
    if Bk != B:
        fail(_OP, f"'k' batch size must equal q's B={B}, got k of shape {_shape(k)}")
    if Dk != D:
        fail(_OP, f"'k' head_dim must equal q's D={D}, got k of shape {_shape(k)}")
    if Hkv == 0 and H != 0 or Hkv != 0 and H % Hkv:
        fail(_OP, f"'k' heads Hkv must divide q's heads H={H} (GQA), got Hkv={Hkv}")
    if v.shape != k.shape:
        fail(_OP, f"'v' must have the shape of 'k' {_shape(k)} ([B, Sk, Hkv, D]), got {_shape(v)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(_OP, name, t)
    if causal and Sq != Sk:
        fail(_OP, f"'causal'=True needs Sq == Sk (backends align the mask differently otherwise), "
                  f"got Sq={Sq}, Sk={Sk}")
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        fail(_OP, f"'softmax_scale' must be a finite number > 0 or None, got {softmax_scale}")
    if backend is not None and backend not in dispatch.BACKENDS and backend != dispatch.AUTO:
        fail(_OP, f"'backend' must be one of {', '.join(dispatch.BACKENDS)}, {dispatch.AUTO!r} or "
                  f"None, got {backend!r}")


def _attention_impl(q, k, v, softmax_scale=None, causal=False, backend=None):
    _check_attention(q, k, v, softmax_scale, causal, backend)
    if q.numel() == 0:  # B, Sq, H or D is 0: nothing to compute (as every other op, no launch)
        out = q.new_empty(q.shape)
    elif k.shape[1] == 0:  # no keys: softmax over an empty set, zeros (what SDPA returns)
        out = q.new_zeros(q.shape)
    else:
        name = dispatch.select(q, k, v, causal, backend)
        out = dispatch.RUNNERS[name](q, k, v, softmax_scale, causal)
        # The fake says contiguous [B, Sq, H, D]: FA3/FA4 and SDPA's fused kernels already return
        # that (SDPA's [B, H, S, D] result is a transpose of a [B, S, H, D] buffer); math does not.
        out = out if out.is_contiguous() else out.contiguous()
    return no_backward(_OP, out, q, k, v) if torch.is_grad_enabled() else out


torch.library.impl(f"{_NS}::attention", "CUDA")(_attention_impl)
torch.library.impl(f"{_NS}::attention", "CPU")(_attention_impl)
# no backward: the Autograd key falls through (free), the implementation hands its output out behind
# a node whose backward raises (see ops/modulation.py)
torch.library.impl(f"{_NS}::attention", "Autograd")(torch.library.fallthrough_kernel)


@torch.library.register_fake(f"{_NS}::attention")
def _attention_fake(q, k, v, softmax_scale=None, causal=False, backend=None):
    _check_attention(q, k, v, softmax_scale, causal, backend)
    refuse_grad(_OP, TRACING, ("q", q), ("k", k), ("v", v))
    return q.new_empty(q.shape)


def attention(q, k, v, softmax_scale=None, causal=False, backend=None):
    """softmax(q k^T * scale) v for q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> [B, Sq, H, D].

    ``softmax_scale`` defaults to D**-0.5. ``backend``: one of ``fa3, fa4, cudnn, fa2,
    efficient, math`` to force one (raises if it cannot run the inputs), or None / "auto" for
    the automatic choice (also overridable with ``fused_dit_ops.attention_backend(...)`` or
    ``$FUSED_DIT_ATTN_BACKEND``). ``causal`` (Sq == Sk only) masks keys after the query.
    Empty inputs give an empty output (no keys, Sk == 0: zeros, as SDPA). No backward: with grad
    enabled and inputs that require grad, ``.backward()`` through the output raises.
    """
    return torch.ops.fused_dit.attention.default(q, k, v, softmax_scale, causal, backend)
