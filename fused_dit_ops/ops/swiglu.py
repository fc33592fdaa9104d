"""The SwiGLU MLP input projection: validation, CUDA (Triton), CPU (reference) and fake impls.

Op (schema in ``fused_dit_ops._schemas``):

- ``swiglu_linear(x, weight, bias=None, backend=None) -> out``: ``y = x @ weight.T + bias`` with
  ``weight`` [2F, K] (rows [0, F): the gate half, rows [F, 2F): the linear half), ``out =
  silu(y[..., :F]) * y[..., F:]`` as a new [.., F] tensor. It is diffusers' ``Flux2FeedForward``
  input projection followed by ``Flux2SwiGLU`` (and the MLP rows of a FLUX.2 single block's
  ``to_qkv_mlp_proj``), computed with one rounding.

CUDA backends: "cublas" (default): ``F.linear`` (cuBLAS), then a Triton elementwise kernel (one read
of [L, 2F], one write of [L, F]); "triton": a Triton GEMM whose epilogue applies the SwiGLU, so the
[L, 2F] pre-activation is never written. On an H100 at FLUX.2's shapes the cuBLAS GEMM's higher rate
outweighs the extra pass (``bench swiglu``: 0.96x against 0.91x of the Triton GEMM's time at 4608
tokens; docs/performance.md). CPU: the reference (fp32 math).
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._validation import (TRACING, check_last_dim_contiguous, check_like, check_one_device, check_tensor, fail,
                           no_backward, refuse_grad)

_NS = "fused_dit"
BACKENDS = ("triton", "cublas")


def _check_swiglu_linear(x, weight, bias, backend):
    """-> F (the output width)."""
    op = "swiglu_linear"
    check_one_device(op, ("x", x), ("weight", weight), ("bias", bias))
    check_tensor(op, "x", x, ndim=(2, 3))
    check_last_dim_contiguous(op, "x", x)
    check_tensor(op, "weight", weight, ndim=2)
    check_like(op, "weight", weight, "x", x)
    K = x.shape[-1]
    if weight.shape[1] != K:
        fail(op, f"'weight' must be [2F, K] with K = {K} (the last dim of 'x'), got {list(weight.shape)}")
    if weight.shape[0] % 2:
        fail(op, f"'weight' must have an even number of rows 2F (gate rows, then linear rows), got "
                 f"{weight.shape[0]}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        fail(op, f"'weight' must have contiguous rows (stride(1) == 1), got strides {tuple(weight.stride())}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_like(op, "bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            fail(op, f"'bias' must be [2F] = [{weight.shape[0]}] (the rows of 'weight'), got {list(bias.shape)}")
        check_last_dim_contiguous(op, "bias", bias)
    if backend is not None and backend not in BACKENDS:
        fail(op, f"'backend' must be None or one of {BACKENDS}, got {backend!r}")
    return weight.shape[0] // 2


# --- CUDA -------------------------------------------------------------------------------------------

def swiglu_linear_cuda_unchecked(x, weight, bias, backend=None):
    """The CUDA implementation without the checks (callers that validated or built the inputs)."""
    from ..kernels import swiglu as k
    if backend == "triton":
        return k.swiglu_linear(x, weight, bias)
    return k.swiglu_cublas(x, weight, bias)


@torch.library.impl(f"{_NS}::swiglu_linear", "CUDA")
def _swiglu_linear_cuda(x, weight, bias=None, backend=None):
    _check_swiglu_linear(x, weight, bias, backend)
    if not torch.is_grad_enabled():
        return swiglu_linear_cuda_unchecked(x, weight, bias, backend)
    with torch.no_grad():
        out = swiglu_linear_cuda_unchecked(x, weight, bias, backend)
    return no_backward("swiglu_linear", out, x, weight, bias)


# --- CPU: the reference -----------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::swiglu_linear", "CPU")
def _swiglu_linear_cpu(x, weight, bias=None, backend=None):
    _check_swiglu_linear(x, weight, bias, backend)
    with torch.no_grad():
        out = ref.swiglu_linear(x, weight, bias).contiguous()
    return no_backward("swiglu_linear", out, x, weight, bias) if torch.is_grad_enabled() else out


# no backward: the Autograd key falls through (see ops/modulation.py)
torch.library.impl(f"{_NS}::swiglu_linear", "Autograd")(torch.library.fallthrough_kernel)


# --- fake (torch.compile) ---------------------------------------------------------------------------

@torch.library.register_fake(f"{_NS}::swiglu_linear")
def _swiglu_linear_fake(x, weight, bias=None, backend=None):
    Fh = _check_swiglu_linear(x, weight, bias, backend)
    refuse_grad("swiglu_linear", TRACING, ("x", x), ("weight", weight), ("bias", bias))
    return x.new_empty((*x.shape[:-1], Fh))


# --- public Python API ------------------------------------------------------------------------------

def swiglu_linear(x, weight, bias=None, backend=None):
    """``silu(g) * u`` of ``[g | u] = x @ weight.T + bias`` as a new [.., F] tensor.

    ``x`` [L, K] or [B, L, K] (fp32/bf16/fp16, last dim contiguous); ``weight`` [2F, K] with the gate
    rows first (diffusers ``Flux2FeedForward.linear_in.weight``), rows contiguous; ``bias`` [2F] or
    None. ``backend`` (CUDA): None / "cublas" (cuBLAS GEMM, then an elementwise kernel; the default)
    or "triton" (a Triton GEMM with the SwiGLU in its epilogue)."""
    return torch.ops.fused_dit.swiglu_linear.default(x, weight, bias, backend)
