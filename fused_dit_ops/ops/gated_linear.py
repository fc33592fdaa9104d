"""``linear_gate_residual``: a projection and its gated residual as one GEMM.

out = residual + gate_sel * (x @ weight^T + bias) — a DiT block's ``to_out`` / ``fc2`` followed by
its gated residual (diffusers: ``hidden_states + gate * proj(x)``). On CUDA with the C++ extension
the gate, the bias and the residual ride in cuBLASLt's epilogue (csrc/linear_gate_residual.cu), so
the projection output is never stored and re-read. The zero_cond_t index arrives as host-side
split points, ``index_split[b]`` = the number of leading index-0 rows of sample b (diffusers builds
the index as ``[0] * prod(target) + [1] * rest``): one matmul per (sample, segment), no sync.

Schema in ``fused_dit_ops._schemas``; validation (metadata only) runs first in every impl.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from .._extension import has_cuda_kernel
from .._validation import (check_activation, check_last_dim_contiguous, check_like, check_param, check_tensor,
                           check_vector, fail)

_NS = "fused_dit"
_OP = "linear_gate_residual"


def _check(x, weight, bias, residual, gate, index_split):
    B, L, K = check_activation(_OP, "x", x)
    check_tensor(_OP, "weight", weight, ndim=2)
    check_like(_OP, "weight", weight, "x", x)
    if weight.shape[1] != K:
        fail(_OP, f"'weight' must be [N, K] with K = {K} (the last dim of 'x'), got {list(weight.shape)}")
    N = weight.shape[0]
    if N % 8 != 0:
        fail(_OP, f"'weight' rows N (output features) must be a multiple of 8, got N={N}")
    check_last_dim_contiguous(_OP, "weight", weight)
    check_vector(_OP, "bias", bias, N, "x", x)
    check_tensor(_OP, "residual", residual, ndim=3)
    check_like(_OP, "residual", residual, "x", x)
    if tuple(residual.shape) != (B, L, N):
        fail(_OP, f"'residual' must be [B, L, N] = [{B}, {L}, {N}] (from 'x' and 'weight'), got "
                  f"{list(residual.shape)}")
    check_last_dim_contiguous(_OP, "residual", residual)
    if index_split is not None:
        split = list(index_split)
        if len(split) != B:
            fail(_OP, f"'index_split' must have B = {B} entries (leading index-0 rows per sample), got {len(split)}")
        bad = [s for s in split if not 0 <= int(s) <= L]
        if bad:
            fail(_OP, f"'index_split' entries must lie in [0, L] = [0, {L}], got {bad}")
    check_param(_OP, "gate", gate, B, N, index_split is not None, "residual", residual, index_name="index_split")


def _segments(B, L, index_split):
    """(sample, gate row, first row, rows) of every gate segment."""
    if index_split is None:
        return [(b, b, 0, L) for b in range(B)]
    out = []
    for b, s in enumerate(index_split):
        if s > 0:
            out.append((b, b, 0, int(s)))
        if s < L:
            out.append((b, B + b, int(s), L - int(s)))
    return out


def _composite(x, weight, bias, residual, gate, index_split):
    """GEMM, then one fused elementwise pass per segment (addcmul: fp32 math, one rounding)."""
    y = F.linear(x, weight, bias)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    for b, g, r0, n in _segments(x.shape[0], x.shape[1], index_split):
        torch.addcmul(residual[b, r0:r0 + n], y[b, r0:r0 + n], gate[g], out=out[b, r0:r0 + n])
    return out


if not has_cuda_kernel(_OP):
    # fused_dit_ops._C is not built here: GEMM + addcmul serve CUDA (correct, one pass more).
    @torch.library.impl(f"{_NS}::{_OP}", "CUDA")
    def _linear_gate_residual_cuda(x, weight, bias, residual, gate, index_split=None):
        _check(x, weight, bias, residual, gate, index_split)
        return _composite(x, weight, bias, residual, gate, index_split)


@torch.library.impl(f"{_NS}::{_OP}", "CPU")
def _linear_gate_residual_cpu(x, weight, bias, residual, gate, index_split=None):
    _check(x, weight, bias, residual, gate, index_split)
    return ref.linear_gate_residual(x, weight, bias, residual, gate, index_split)


@torch.library.register_fake(f"{_NS}::{_OP}")
def _linear_gate_residual_fake(x, weight, bias, residual, gate, index_split=None):
    _check(x, weight, bias, residual, gate, index_split)
    return residual.new_empty(residual.shape)


def linear_gate_residual(x, weight, bias, residual, gate, index_split=None):
    """residual + gate_sel * (x @ weight^T + bias) in one GEMM on CUDA (cuBLASLt epilogue).

    ``x`` [B, L, K]; ``weight`` [N, K] and ``bias`` [N] or None (an ``nn.Linear``'s); ``residual``
    [B, L, N]; ``gate`` [B, N], or [2B, N] with ``index_split``: a list of B ints, sample b's rows
    [0, index_split[b]) use gate[b] and the rest gate[B + b] (the zero_cond_t index; build the list
    with :func:`index_split_from_index`, once, or from the image shapes). Returns a new tensor.
    """
    return torch.ops.fused_dit.linear_gate_residual.default(x, weight, bias, residual, gate,
                                                            None if index_split is None else list(index_split))


def index_split_from_index(index: torch.Tensor) -> list[int] | None:
    """[B] split points of a zero_cond_t index [B, L] whose rows are 0...0 1...1, or None when some
    row is not of that form. Reads the index (a device sync): call it once per index, not per layer."""
    if index.dim() != 2:
        raise ValueError(f"index must be [B, L], got shape {list(index.shape)}")
    nz = index != 0
    split = (~nz).sum(dim=1)
    L = index.shape[1]
    expect = torch.arange(L, device=index.device).unsqueeze(0) >= split.unsqueeze(1)
    ok = torch.equal(nz, expect)
    return [int(s) for s in split.tolist()] if ok else None
