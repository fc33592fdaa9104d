"""Input checks shared by every implementation of an op (CUDA, CPU and fake).

They read metadata only (dtype, device, shape, strides, data_ptr alignment where the kernel
needs it), never data, so they are safe under FakeTensor and CUDA-graph capture. Each message
names the op, the argument, the constraint and what was received.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class FusedDitInputError(ValueError):
    """Raised when an op's input violates its contract (before any kernel launch)."""


def fail(op: str, msg: str) -> None:
    raise FusedDitInputError(f"fused_dit.{op}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(op: str, name: str, t, *, ndim: int | tuple[int, ...] | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            fail(op, f"'{name}' must be {want}, got {t.dim()}-D tensor of shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, f"'{name}' must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor,
               *, dtype: bool = True) -> None:
    if t.device != ref.device:
        fail(op, f"'{name}' is on {t.device} but '{ref_name}' is on {ref.device}; all tensors must "
                 f"be on one device")
    if dtype and t.dtype != ref.dtype:
        fail(op, f"'{name}' has dtype {str(t.dtype).replace('torch.', '')} but '{ref_name}' has "
                 f"{str(ref.dtype).replace('torch.', '')}; they must match")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, f"'{name}' must have a contiguous last dimension (stride(-1) == 1), got strides "
                 f"{tuple(t.stride())}; pass a view whose last dim is contiguous or call "
                 f".contiguous() on it yourself")


def check_activation(op: str, name: str, x: torch.Tensor) -> tuple[int, int, int]:
    """[B, L, C] activation: float dtype, last dim contiguous, C a multiple of 8."""
    check_tensor(op, name, x, ndim=3)
    check_last_dim_contiguous(op, name, x)
    B, L, C = x.shape
    if C % 8 != 0:
        fail(op, f"'{name}' last dimension C must be a multiple of 8, got C={C}")
    return B, L, C


def check_same_activation(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(op, name, t, ndim=3)
    check_like(op, name, t, ref_name, ref)
    if t.shape != ref.shape:
        fail(op, f"'{name}' must have the shape of '{ref_name}' {_shape(ref)}, got {_shape(t)}")
    check_last_dim_contiguous(op, name, t)


def check_index(op: str, index, B: int, L: int, ref_name: str, ref: torch.Tensor) -> None:
    if index is None:
        return
    check_tensor(op, "index", index, ndim=2, dtypes=INDEX_DTYPES)
    if index.device != ref.device:
        fail(op, f"'index' is on {index.device} but '{ref_name}' is on {ref.device}")
    if tuple(index.shape) != (B, L):
        fail(op, f"'index' must have shape [B, L] = [{B}, {L}] (from '{ref_name}'), got {_shape(index)}")


def check_param(op: str, name: str, p, B: int, C: int, has_index: bool, ref_name: str,
                ref: torch.Tensor) -> None:
    """Modulation parameter: [B, C] without index, [2B, C] with one; row stride free."""
    check_tensor(op, name, p, ndim=2)
    check_like(op, name, p, ref_name, ref)
    rows = 2 * B if has_index else B
    if tuple(p.shape) != (rows, C):
        if has_index:
            why = (f"with 'index' given it must be [2B, C] = [{rows}, {C}] (rows [0, B) are set 0, "
                   f"[B, 2B) set 1)")
        else:
            why = (f"without 'index' it must be [B, C] = [{rows}, {C}]"
                   + ("; a [2B, C] parameter needs an 'index'" if tuple(p.shape) == (2 * B, C) else ""))
        fail(op, f"'{name}' has shape {_shape(p)}; {why}")
    check_last_dim_contiguous(op, name, p)


def check_vector(op: str, name: str, v, C: int, ref_name: str, ref: torch.Tensor) -> None:
    if v is None:
        return
    check_tensor(op, name, v, ndim=1)
    check_like(op, name, v, ref_name, ref)
    if v.shape[0] != C:
        fail(op, f"'{name}' must have shape [C] = [{C}], got {_shape(v)}")
    check_last_dim_contiguous(op, name, v)
