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
    """Raised when an op's input violates its contract (before any kernel launch).

    Under ``torch.compile`` the check runs while tracing, and torch re-raises it wrapped in its own
    ``torch._dynamo.exc.TorchRuntimeError`` (the message text is kept): ``except FusedDitInputError``
    does not catch that. :meth:`find` gets the original from the exception chain."""

    @staticmethod
    def find(exc: BaseException | None) -> "FusedDitInputError | None":
        """``exc`` itself, or the FusedDitInputError that caused it (``__cause__`` / ``__context__``
        chain, as torch.compile raises it), or None."""
        seen = set()
        while exc is not None and id(exc) not in seen:
            if isinstance(exc, FusedDitInputError):
                return exc
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__
        return None


def fail(op: str, msg: str) -> None:
    raise FusedDitInputError(f"fused_dit.{op}: {msg}")


# --- autograd: the ops are inference-only (no backward) ---------------------------------------------
# The implementations test ``torch.is_grad_enabled()`` first (one C call), so a call under no_grad or
# inference_mode pays nothing more. With grad enabled and an input that requires grad, an op hands its
# outputs out behind a node whose backward raises, naming the op: the new tensors it returns, or the
# tensors it wrote in place (their history rebased, as an in-place torch op does).

_NO_BACKWARD = ("has no backward (the fused_dit ops are for inference): call it under torch.no_grad() or "
                "torch.inference_mode(); fused_dit_ops.patch(model) runs the stock modules where autograd records")


def _requires_grad(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


class _NoBackward(torch.autograd.Function):
    """Identity on the op's outputs; its backward raises. Inputs: op name, number of outputs, the
    outputs, then the op's tensor inputs (so that autograd links the node to them)."""

    @staticmethod
    def forward(ctx, op, n, *tensors):
        ctx.op = op
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"fused_dit.{ctx.op} {_NO_BACKWARD}")


def no_backward(op: str, out, *inputs):
    """``out`` (a tensor or a tuple of them) of ``op`` computed from ``inputs`` (tensors, lists of
    tensors, anything else is skipped). Call it only with grad enabled: when an input requires grad
    the outputs come back attached to a node whose backward raises, naming the op."""
    if not _requires_grad(inputs):
        return out
    single = isinstance(out, torch.Tensor)
    outs = (out,) if single else tuple(out)
    ins = []
    for a in inputs:
        if isinstance(a, torch.Tensor):
            ins.append(a)
        elif isinstance(a, (list, tuple)):
            ins += [t for t in a if isinstance(t, torch.Tensor)]
    res = _NoBackward.apply(op, len(outs), *outs, *ins)
    return res[0] if single else tuple(res)


class _NoBackwardInplace(torch.autograd.Function):
    """Marks one tensor the op wrote in place as written by a node whose backward raises. Inputs: op
    name, the written tensor, then the op's other tensor inputs."""

    @staticmethod
    def forward(ctx, op, t, *tensors):
        ctx.op = op
        ctx.mark_dirty(t)
        return t

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"fused_dit.{ctx.op} {_NO_BACKWARD}")


def no_backward_inplace(op: str, written, *inputs) -> None:
    """After ``op`` wrote the tensors ``written`` in place (call it only with grad enabled): when one of
    them or of ``inputs`` requires grad, each written tensor's history ends in a node whose backward
    raises, naming the op (the caller's tensors themselves, views included)."""
    if not _requires_grad(tuple(written) + inputs):
        return
    flat = []
    for a in inputs:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            flat += [t for t in a if isinstance(t, torch.Tensor)]
    for t in written:
        _NoBackwardInplace.apply(op, t, *[u for u in list(written) + flat if u is not t])


def refuse_leaf_inplace(op: str, *named) -> None:
    """Autograd's own rule for an in-place write, said before the launch: no written tensor may be a
    leaf that requires grad, or a view of one. Call it only with grad enabled."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            base = t._base if t._base is not None else t
            if base.is_leaf:
                fail(op, f"'{name}' is a leaf tensor that requires grad{'' if base is t else ' (a view of one)'}, "
                         f"and this op writes it in place, which autograd does not allow; the op {_NO_BACKWARD}")


TRACING = ("torch.compile is tracing this op (a compiled graph cannot raise at .backward() through it, so "
           "it refuses inputs that require grad while grad is enabled)")


def refuse_grad(op: str, why: str, *named) -> None:
    """With grad enabled, no ``(name, tensor)`` may require grad (every op's fake while torch.compile
    traces it: ``TRACING``)."""
    if torch.is_grad_enabled():
        for name, t in named:
            if _requires_grad((t,)):
                fail(op, f"'{name}' requires grad, but {why}; the op {_NO_BACKWARD}")


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


def _names(names) -> str:
    q = [f"'{n}'" for n in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def check_one_device(op: str, *named) -> None:
    """Every tensor among ``(name, value)`` pairs on one device (non-tensors are skipped: their own
    check names them). On a mismatch the message names the odd one(s) out: the tensors that are not
    on the device most of the others share, whichever argument comes first."""
    tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
    if len(tensors) < 2:
        return
    d0 = tensors[0][1].device
    if all(t.device == d0 for _, t in tensors[1:]):
        return
    counts: dict = {}
    for _, t in tensors:
        counts[t.device] = counts.get(t.device, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:  # no majority: list them all
        fail(op, "all tensors must be on one device, got "
                 + ", ".join(f"'{n}' on {t.device}" for n, t in tensors))
    common = ranked[0][0]
    odd = [(n, t) for n, t in tensors if t.device != common]
    rest = [n for n, t in tensors if t.device == common]
    where = ", ".join(sorted({str(t.device) for _, t in odd}))
    others = _names(rest) if len(rest) <= 5 else f"the other {len(rest)} tensors"
    fail(op, f"{_names(n for n, _ in odd)} {'is' if len(odd) == 1 else 'are'} on {where} but "
             f"{others} {'is' if len(rest) == 1 else 'are'} on {common}; all tensors must be on one device")


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


def check_index(op: str, index, B: int, L: int, ref_name: str, ref: torch.Tensor, name: str = "index") -> None:
    if index is None:
        return
    check_tensor(op, name, index, ndim=2, dtypes=INDEX_DTYPES)
    if index.device != ref.device:
        fail(op, f"'{name}' is on {index.device} but '{ref_name}' is on {ref.device}")
    if tuple(index.shape) != (B, L):
        fail(op, f"'{name}' must have shape [B, L] = [{B}, {L}] (from '{ref_name}'), got {_shape(index)}")


def check_param(op: str, name: str, p, B: int, C: int, has_index: bool, ref_name: str,
                ref: torch.Tensor, index_name: str = "index") -> None:
    """Modulation parameter: [B, C] without index, [2B, C] with one; row stride free. Its dtype is
    the activation's, or float32 for any activation dtype (fp32 modulation: the math is fp32 either
    way, and an fp32 parameter is used unrounded)."""
    check_tensor(op, name, p, ndim=2)
    check_like(op, name, p, ref_name, ref, dtype=False)
    if p.dtype not in (ref.dtype, torch.float32):
        fail(op, f"'{name}' has dtype {str(p.dtype).replace('torch.', '')} but '{ref_name}' has "
                 f"{str(ref.dtype).replace('torch.', '')}; parameters must have the activation's dtype or float32")
    rows = 2 * B if has_index else B
    if tuple(p.shape) != (rows, C):
        if has_index:
            why = (f"with '{index_name}' given it must be [2B, C] = [{rows}, {C}] (rows [0, B) are set 0, "
                   f"[B, 2B) set 1)")
        else:
            why = (f"without '{index_name}' it must be [B, C] = [{rows}, {C}]"
                   + (f"; a [2B, C] parameter needs an '{index_name}'" if tuple(p.shape) == (2 * B, C) else ""))
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


# --- RoPE and the joint QKV path ---------------------------------------------------------

def check_heads(op: str, name: str, t, *, ndim=(3, 4)) -> tuple[int, ...]:
    """q/k/v head tensor: [B, L, H, D] (or [L, H, D] where allowed), float, last dim contiguous."""
    check_tensor(op, name, t, ndim=ndim)
    check_last_dim_contiguous(op, name, t)
    return tuple(t.shape)


def check_same_heads(op: str, name: str, t, ref_name: str, ref: torch.Tensor, *, seq_dim: int | None = 1) -> None:
    """t has ref's dtype, device, dims and shape except (optionally) the token dim ``seq_dim``."""
    check_heads(op, name, t, ndim=ref.dim())
    check_like(op, name, t, ref_name, ref)
    want = list(ref.shape)
    got = list(t.shape)
    if seq_dim is not None:
        want[seq_dim] = got[seq_dim]
    if got != want:
        what = "batch, heads and head_dim" if seq_dim is not None else "shape"
        fail(op, f"'{name}' must have the {what} of '{ref_name}' {_shape(ref)}, got {_shape(t)}")


def check_cos_sin_cache(op: str, name: str, cache, D: int, ref: torch.Tensor, min_rows: int | None = None) -> int:
    """fp32 [P, R] table, R even, 0 < R <= D, last dim contiguous, on ref's device. Returns R."""
    if not isinstance(cache, torch.Tensor):
        fail(op, f"'{name}' must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype != torch.float32:
        fail(op, f"'{name}' must be float32 (cos of R/2 frequencies, then sin), got "
                 f"{str(cache.dtype).replace('torch.', '')}; build it with fused_dit_ops.cos_sin_from_complex "
                 f"or call .float() on it")
    if cache.dim() != 2:
        fail(op, f"'{name}' must be 2-D [P, R], got {cache.dim()}-D tensor of shape {_shape(cache)}")
    if cache.device != ref.device:
        fail(op, f"'{name}' is on {cache.device} but the activations are on {ref.device}")
    R = cache.shape[1]
    if R == 0 or R % 2 != 0:
        fail(op, f"'{name}' width R (cos|sin of R/2 frequencies) must be even and > 0, got R={R}")
    if R > D:
        fail(op, f"'{name}' width R={R} must be <= head_dim D={D} (only the first R dims rotate)")
    check_last_dim_contiguous(op, name, cache)
    if min_rows is not None and cache.shape[0] < min_rows:
        fail(op, f"'{name}' has {cache.shape[0]} rows but the stream has {min_rows} tokens; a per-token "
                 f"table needs one row per token")
    return R


def check_positions(op: str, positions, B: int | None, L: int, n_rows: int, ref: torch.Tensor) -> None:
    """int32/int64 [L] or [B, L] on ref's device. Values are checked against the table only for
    CPU tensors (a device check would sync); kernels clamp device positions into the table."""
    if positions is None:
        if L > n_rows:
            fail(op, f"'positions' default to arange(L) with L={L}, but 'cos_sin_cache' has only "
                     f"{n_rows} rows")
        return
    check_tensor(op, "positions", positions, ndim=(1, 2), dtypes=INDEX_DTYPES)
    if positions.device != ref.device:
        fail(op, f"'positions' is on {positions.device} but 'q' is on {ref.device}")
    ok = (positions.dim() == 1 and positions.shape[0] == L) or \
         (positions.dim() == 2 and positions.shape[1] == L and positions.shape[0] == (B or 1))
    if not ok:
        fail(op, f"'positions' must be [L] = [{L}]" + (f" or [B, L] = [{B}, {L}]" if B else "")
             + f", got {_shape(positions)}")
    if positions.device.type == "cpu" and not isinstance(positions, torch._subclasses.FakeTensor) \
            and positions.numel() > 0:
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= n_rows:
            fail(op, f"'positions' must lie in [0, {n_rows}) (rows of 'cos_sin_cache'), got values in "
                     f"[{lo}, {hi}]")


def check_head_weight(op: str, name: str, w, D: int, ref: torch.Tensor) -> None:
    """RMSNorm weight [D]: float dtype, on ref's device, contiguous."""
    check_tensor(op, name, w, ndim=1)
    if w.device != ref.device:
        fail(op, f"'{name}' is on {w.device} but the activations are on {ref.device}")
    if w.shape[0] != D:
        fail(op, f"'{name}' must have shape [head_dim] = [{D}], got {_shape(w)}")
    if w.stride(0) != 1 and D > 1:
        fail(op, f"'{name}' must be contiguous, got stride {w.stride(0)}")
