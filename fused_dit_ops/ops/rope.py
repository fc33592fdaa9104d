"""RoPE and the joint QK norm + RoPE path (the plain copy ``joint_qkv_cat`` is in ``qkv_cat.py``): validation, CUDA (FlashInfer / Triton / C++), CPU (reference), fake.

Ops (schemas in ``fused_dit_ops._schemas``):

- ``rope(q!, k!, cos_sin_cache, positions=None, interleaved=True, backend=None) -> ()``: in place.
  CUDA backend: FlashInfer ``apply_rope_with_cos_sin_cache_inplace`` (is_neox = not interleaved)
  when importable and it can take the input, else our Triton kernel. Choice: ``backend`` argument,
  else env ``FUSED_DIT_ROPE_BACKEND`` (auto | flashinfer | triton), else auto. A forced backend that
  cannot take the input raises with the reason, on any device (both run CUDA tensors only: forced on
  CPU tensors, they raise; an unknown value raises everywhere).
- ``qk_norm_rope_cat(...)`` / ``qk_norm_rope_cat_out(...)``: per-stream RMSNorm of q and k over
  head_dim (diffusers roundings) -> RoPE (table row l for token l) -> joint q/k/v, one launch.
- ``joint_qk_norm_rope_(q!, k!, txt_len, ...)``: the same norm + RoPE in place on an already-joint
  [B, N, H, D] buffer (rows < txt_len: text weights and table; the rest: image ones), one launch.

Positions: CPU positions are range-checked against the table; device positions are not (that would
sync): the Triton kernel clamps them into the table, FlashInfer reads them unchecked.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import reference as ref
from .._validation import (TRACING, check_cos_sin_cache, check_head_weight, check_heads, check_like,
                           check_one_device, check_positions, check_same_heads, fail, no_backward,
                           no_backward_inplace, refuse_grad, refuse_leaf_inplace)
# the joint-input checks are shared with the copy op joint_qkv_cat, which lives in qkv_cat.py
from .qkv_cat import _CAT_CPP, _CAT_OUT_CPP, _alloc_joint, _check_joint_inputs, _check_outs  # noqa: F401

_NS = "fused_dit"
ROPE_BACKENDS = ("auto", "flashinfer", "triton")
ROPE_BACKEND_ENV = "FUSED_DIT_ROPE_BACKEND"
FLASHINFER_HEAD_DIMS = (64, 128, 256, 512)


# --- validators ---------------------------------------------------------------------------------

def _check_rope(q, k, cache, positions, interleaved, backend):
    op = "rope"
    check_one_device(op, ("q", q), ("k", k), ("cos_sin_cache", cache), ("positions", positions))
    if torch.is_grad_enabled():
        refuse_leaf_inplace(op, ("q", q), ("k", k))
    check_heads(op, "q", q)
    check_heads(op, "k", k)
    if k.dim() != q.dim():
        fail(op, f"'q' is {q.dim()}-D {list(q.shape)} but 'k' is {k.dim()}-D {list(k.shape)}; q and k must "
                 f"both be [B, L, H, D] or both [L, H, D]")
    check_like(op, "k", k, "q", q)
    if k.shape[:-2] != q.shape[:-2] or k.shape[-2] != q.shape[-2] or k.shape[-1] != q.shape[-1]:
        fail(op, f"'k' must have the shape of 'q' {list(q.shape)} (same tokens, heads and head_dim), "
                 f"got {list(k.shape)}")
    D = q.shape[-1]
    if D % 2 != 0:
        fail(op, f"head_dim (last dim of 'q') must be even, got {D}")
    L = q.shape[-3]
    B = q.shape[0] if q.dim() == 4 else None
    check_cos_sin_cache(op, "cos_sin_cache", cache, D, q)
    check_positions(op, positions, B, L, cache.shape[0], q)
    if backend is not None and backend not in ROPE_BACKENDS:
        fail(op, f"'backend' must be one of {ROPE_BACKENDS} or None, got {backend!r}")
    _check_backend_device(q, backend)


def _check_norm_rope_params(op, D, Lt, Li, ref_t, weights, txt_cos_sin, img_cos_sin, eps):
    if D % 2 != 0:
        fail(op, f"head_dim must be even, got {D}")
    names = ("txt_q_weight", "txt_k_weight", "img_q_weight", "img_k_weight")
    for name, w in zip(names, weights):
        check_head_weight(op, name, w, D, ref_t)
    # the kernel applies diffusers' RMSNorm rounding (to the weight's dtype) once for all four
    if len({w.dtype for w in weights}) != 1:
        fail(op, "the four RMSNorm weights must share one dtype, got "
                 + ", ".join(f"'{n}' {str(w.dtype).replace('torch.', '')}" for n, w in zip(names, weights)))
    Rt = check_cos_sin_cache(op, "txt_cos_sin", txt_cos_sin, D, ref_t, min_rows=Lt)
    Ri = check_cos_sin_cache(op, "img_cos_sin", img_cos_sin, D, ref_t, min_rows=Li)
    if Rt != Ri:
        fail(op, f"'txt_cos_sin' and 'img_cos_sin' must have the same width R, got {Rt} and {Ri}")
    if not eps > 0:
        fail(op, f"'eps' must be > 0, got {eps}")


def _check_qk_norm_rope_cat(op, txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                            txt_cos_sin, img_cos_sin, eps, outs=None):
    check_one_device(op, ("txt_q", txt_q), ("txt_k", txt_k), ("txt_v", txt_v), ("img_q", img_q), ("img_k", img_k),
                     ("img_v", img_v), ("txt_q_weight", wqt), ("txt_k_weight", wkt), ("img_q_weight", wqi),
                     ("img_k_weight", wki), ("txt_cos_sin", txt_cos_sin), ("img_cos_sin", img_cos_sin),
                     *zip(("q_out", "k_out", "v_out"), outs or ()))
    if outs is not None and torch.is_grad_enabled():
        refuse_leaf_inplace(op, *zip(("q_out", "k_out", "v_out"), outs))
    B, Lt, Li, H, D = _check_joint_inputs(op, txt_q, txt_k, txt_v, img_q, img_k, img_v)
    _check_norm_rope_params(op, D, Lt, Li, txt_q, (wqt, wkt, wqi, wki), txt_cos_sin, img_cos_sin, eps)
    if outs is not None:
        _check_outs(op, outs, B, Lt + Li, H, D, txt_q)
    return B, Lt, Li, H, D


def _check_joint_qk_norm_rope(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps):
    op = "joint_qk_norm_rope_"
    check_one_device(op, ("q", q), ("k", k), ("txt_q_weight", wqt), ("txt_k_weight", wkt), ("img_q_weight", wqi),
                     ("img_k_weight", wki), ("txt_cos_sin", txt_cos_sin), ("img_cos_sin", img_cos_sin))
    if torch.is_grad_enabled():
        refuse_leaf_inplace(op, ("q", q), ("k", k))
    check_heads(op, "q", q, ndim=4)
    check_same_heads(op, "k", k, "q", q, seq_dim=None)
    B, N, H, D = q.shape
    if not 0 <= txt_len <= N:
        fail(op, f"'txt_len' must be in [0, N] = [0, {N}], got {txt_len}")
    _check_norm_rope_params(op, D, txt_len, N - txt_len, q, (wqt, wkt, wqi, wki), txt_cos_sin,
                            img_cos_sin, eps)


# --- RoPE backend choice -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def flashinfer_status() -> tuple[bool, str]:
    """(importable, why not / version)."""
    try:
        import flashinfer  # noqa: F401
        from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace  # noqa: F401
        return True, getattr(flashinfer, "__version__", "version unknown")
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def requested_rope_backend(backend: str | None = None) -> str:
    b = backend if backend is not None else os.environ.get(ROPE_BACKEND_ENV, "auto") or "auto"
    if b not in ROPE_BACKENDS:
        fail("rope", f"backend {b!r} (from {'the argument' if backend is not None else '$' + ROPE_BACKEND_ENV}) "
                     f"must be one of {ROPE_BACKENDS}")
    return b


def _check_backend_device(q, backend) -> None:
    """The requested backend (argument, else $FUSED_DIT_ROPE_BACKEND) is a known one, and a forced
    one can serve q's device: FlashInfer and the Triton kernel run CUDA tensors only (a meta or fake
    tensor of any device passes: shapes only)."""
    req = requested_rope_backend(backend)
    if req != "auto" and q.device.type not in ("cuda", "meta"):
        how = ("pass backend=None or 'auto'" if backend is not None
               else f"unset ${ROPE_BACKEND_ENV} or set it to 'auto'")
        fail("rope", f"backend {req!r} (from {'the argument' if backend is not None else '$' + ROPE_BACKEND_ENV}) "
                     f"cannot serve {q.device.type} tensors: it runs CUDA tensors only (on {q.device.type} the "
                     f"reference implementation runs); {how}")


def _as_flat(t: torch.Tensor):
    """[B, L, H, D] or [L, H, D] -> (nnz, H, D) view with free token/head strides, or None."""
    if t.dim() == 3:
        return t
    B, L, H, D = t.shape
    if B == 1:
        return t[0]
    if t.stride(0) == L * t.stride(1):
        return t.view(B * L, H, D)
    return None


def flashinfer_unusable_reason(q, k, cache, interleaved=True) -> str | None:
    ok, why = flashinfer_status()
    if not ok:
        return f"flashinfer is not importable ({why})"
    if not q.is_cuda:
        return "flashinfer needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flashinfer takes bf16/fp16 q/k only, got {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] not in FLASHINFER_HEAD_DIMS:
        return f"flashinfer takes head_dim in {FLASHINFER_HEAD_DIMS}, got {q.shape[-1]}"
    if cache.stride(0) != cache.shape[1] or cache.stride(1) != 1:
        return "flashinfer needs a contiguous cos_sin_cache"
    for name, t in (("q", q), ("k", k)):
        if _as_flat(t) is None:
            return (f"'{name}' [B, L, H, D] has a batch stride that is not L * token stride; flashinfer "
                    f"takes (nnz, H, D) rows only")
    return None


def choose_rope_backend(q, k, cache, interleaved=True, backend=None) -> tuple[str, str]:
    """(backend actually used on CUDA: 'flashinfer' | 'triton', why)."""
    req = requested_rope_backend(backend)
    if req == "triton":
        return "triton", "requested"
    why = flashinfer_unusable_reason(q, k, cache, interleaved)
    if req == "flashinfer":
        if why is not None:
            fail("rope", f"backend 'flashinfer' was requested but cannot take this input: {why}; use "
                         f"backend='triton' or 'auto'")
        return "flashinfer", "requested"
    if why is None:
        return "flashinfer", "auto: flashinfer available and takes the input"
    return "triton", f"auto: {why}"


_POS_CACHE: dict = {}


def _flat_positions(positions, B, L, device):
    if positions is None:
        key = (device, B, L)
        p = _POS_CACHE.get(key)
        if p is None:
            p = torch.arange(L, device=device, dtype=torch.int64).repeat(B)
            if not torch.cuda.is_current_stream_capturing():
                _POS_CACHE[key] = p
        return p
    if positions.dim() == 2:
        return positions.reshape(-1)
    return positions if B == 1 else positions.repeat(B)


def _rope_flashinfer(q, k, cache, positions, interleaved):
    from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace
    B = q.shape[0] if q.dim() == 4 else 1
    L, H, D = q.shape[-3:]
    qf, kf = _as_flat(q), _as_flat(k)
    pos = _flat_positions(positions, B, L, q.device)
    apply_rope_with_cos_sin_cache_inplace(positions=pos, query=qf, key=kf, head_size=D,
                                          cos_sin_cache=cache, is_neox=not interleaved)


def _rope_triton(q, k, cache, positions, interleaved):
    from ..kernels import rope as kr
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    kr.rope_(q, k, cache, positions, interleaved)


# --- CUDA ---------------------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::rope", "CUDA")
def _rope_cuda(q, k, cos_sin_cache, positions=None, interleaved=True, backend=None):
    _check_rope(q, k, cos_sin_cache, positions, interleaved, backend)
    if q.numel() == 0:
        return
    name, _ = choose_rope_backend(q, k, cos_sin_cache, interleaved, backend)
    if name == "flashinfer":
        _rope_flashinfer(q, k, cos_sin_cache, positions, interleaved)
    else:
        _rope_triton(q, k, cos_sin_cache, positions, interleaved)
    if torch.is_grad_enabled():
        no_backward_inplace("rope", (q, k), cos_sin_cache)


@torch.library.impl(f"{_NS}::qk_norm_rope_cat", "CUDA")
def _qk_norm_rope_cat_cuda(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                           txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    from ..kernels import rope as kr
    B, Lt, Li, H, D = _check_qk_norm_rope_cat("qk_norm_rope_cat", txt_q, txt_k, txt_v, img_q, img_k,
                                              img_v, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    outs = tuple(_alloc_joint(t, Lt + Li) for t in (txt_q, txt_k, txt_v))
    kr.qk_norm_rope_cat_out((txt_q, txt_k, txt_v), (img_q, img_k, img_v), outs, (wqt, wkt, wqi, wki),
                            (txt_cos_sin, img_cos_sin), eps, interleaved)
    return (no_backward("qk_norm_rope_cat", outs, txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki)
            if torch.is_grad_enabled() else outs)


@torch.library.impl(f"{_NS}::qk_norm_rope_cat_out", "CUDA")
def _qk_norm_rope_cat_out_cuda(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                               txt_cos_sin, img_cos_sin, q_out, k_out, v_out, eps=1e-6, interleaved=True):
    from ..kernels import rope as kr
    _check_qk_norm_rope_cat("qk_norm_rope_cat_out", txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt,
                            wqi, wki, txt_cos_sin, img_cos_sin, eps, outs=(q_out, k_out, v_out))
    kr.qk_norm_rope_cat_out((txt_q, txt_k, txt_v), (img_q, img_k, img_v), (q_out, k_out, v_out),
                            (wqt, wkt, wqi, wki), (txt_cos_sin, img_cos_sin), eps, interleaved)
    if torch.is_grad_enabled():
        no_backward_inplace("qk_norm_rope_cat_out", (q_out, k_out, v_out), txt_q, txt_k, txt_v, img_q, img_k, img_v,
                            wqt, wkt, wqi, wki)


@torch.library.impl(f"{_NS}::joint_qk_norm_rope_", "CUDA")
def _joint_qk_norm_rope_cuda(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                             interleaved=True):
    from ..kernels import rope as kr
    _check_joint_qk_norm_rope(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    kr.joint_qk_norm_rope_(q, k, txt_len, (wqt, wkt, wqi, wki), (txt_cos_sin, img_cos_sin), eps, interleaved)
    if torch.is_grad_enabled():
        no_backward_inplace("joint_qk_norm_rope_", (q, k), wqt, wkt, wqi, wki)


# --- CPU: the reference ---------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::rope", "CPU")
def _rope_cpu(q, k, cos_sin_cache, positions=None, interleaved=True, backend=None):
    _check_rope(q, k, cos_sin_cache, positions, interleaved, backend)
    qo, ko = ref.rope(q, k, cos_sin_cache, positions, interleaved)
    q.copy_(qo)
    k.copy_(ko)
    if torch.is_grad_enabled():
        no_backward_inplace("rope", (q, k), cos_sin_cache)


@torch.library.impl(f"{_NS}::qk_norm_rope_cat", "CPU")
def _qk_norm_rope_cat_cpu(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                          txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    _check_qk_norm_rope_cat("qk_norm_rope_cat", txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi,
                            wki, txt_cos_sin, img_cos_sin, eps)
    outs = ref.qk_norm_rope_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                                txt_cos_sin, img_cos_sin, eps, interleaved)
    return (no_backward("qk_norm_rope_cat", outs, txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki)
            if torch.is_grad_enabled() else outs)


@torch.library.impl(f"{_NS}::qk_norm_rope_cat_out", "CPU")
def _qk_norm_rope_cat_out_cpu(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                              txt_cos_sin, img_cos_sin, q_out, k_out, v_out, eps=1e-6, interleaved=True):
    _check_qk_norm_rope_cat("qk_norm_rope_cat_out", txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt,
                            wqi, wki, txt_cos_sin, img_cos_sin, eps, outs=(q_out, k_out, v_out))
    for o, r in zip((q_out, k_out, v_out),
                    ref.qk_norm_rope_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                                         txt_cos_sin, img_cos_sin, eps, interleaved)):
        o.copy_(r)
    if torch.is_grad_enabled():
        no_backward_inplace("qk_norm_rope_cat_out", (q_out, k_out, v_out), txt_q, txt_k, txt_v, img_q, img_k, img_v,
                            wqt, wkt, wqi, wki)


@torch.library.impl(f"{_NS}::joint_qk_norm_rope_", "CPU")
def _joint_qk_norm_rope_cpu(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                            interleaved=True):
    _check_joint_qk_norm_rope(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    for x, wt, wi in ((q, wqt, wqi), (k, wkt, wki)):
        t = ref.qk_norm_rope(x[:, :txt_len], wt, txt_cos_sin, eps, interleaved)
        i = ref.qk_norm_rope(x[:, txt_len:], wi, img_cos_sin, eps, interleaved)
        x[:, :txt_len].copy_(t)
        x[:, txt_len:].copy_(i)
    if torch.is_grad_enabled():
        no_backward_inplace("joint_qk_norm_rope_", (q, k), wqt, wkt, wqi, wki)


# --- Autograd: a fallthrough (no backward; see ops/modulation.py) -----------------------------------
# qk_norm_rope_cat hands its outputs out behind a node whose backward raises; the in-place ops rebase
# the history of what they wrote onto such a node (a leaf that requires grad is refused before the write).

for _op in ("rope", "qk_norm_rope_cat", "qk_norm_rope_cat_out", "joint_qk_norm_rope_"):
    torch.library.impl(f"{_NS}::{_op}", "Autograd")(torch.library.fallthrough_kernel)


# --- fake: shapes only ------------------------------------------------------------------------------

@torch.library.register_fake(f"{_NS}::rope")
def _rope_fake(q, k, cos_sin_cache, positions=None, interleaved=True, backend=None):
    _check_rope(q, k, cos_sin_cache, positions, interleaved, backend)
    refuse_grad("rope", TRACING, ("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache))


@torch.library.register_fake(f"{_NS}::qk_norm_rope_cat")
def _qk_norm_rope_cat_fake(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                           txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    B, Lt, Li, H, D = _check_qk_norm_rope_cat("qk_norm_rope_cat", txt_q, txt_k, txt_v, img_q, img_k, img_v,
                                              wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    refuse_grad("qk_norm_rope_cat", TRACING, ("txt_q", txt_q), ("txt_k", txt_k), ("txt_v", txt_v), ("img_q", img_q),
                ("img_k", img_k), ("img_v", img_v), ("txt_q_weight", wqt), ("txt_k_weight", wkt),
                ("img_q_weight", wqi), ("img_k_weight", wki))
    return tuple(_alloc_joint(t, Lt + Li) for t in (txt_q, txt_k, txt_v))


@torch.library.register_fake(f"{_NS}::qk_norm_rope_cat_out")
def _qk_norm_rope_cat_out_fake(txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt, wqi, wki,
                               txt_cos_sin, img_cos_sin, q_out, k_out, v_out, eps=1e-6, interleaved=True):
    _check_qk_norm_rope_cat("qk_norm_rope_cat_out", txt_q, txt_k, txt_v, img_q, img_k, img_v, wqt, wkt,
                            wqi, wki, txt_cos_sin, img_cos_sin, eps, outs=(q_out, k_out, v_out))
    refuse_grad("qk_norm_rope_cat_out", TRACING, ("txt_q", txt_q), ("txt_k", txt_k), ("txt_v", txt_v),
                ("img_q", img_q), ("img_k", img_k), ("img_v", img_v), ("txt_q_weight", wqt), ("txt_k_weight", wkt),
                ("img_q_weight", wqi), ("img_k_weight", wki), ("q_out", q_out), ("k_out", k_out), ("v_out", v_out))


@torch.library.register_fake(f"{_NS}::joint_qk_norm_rope_")
def _joint_qk_norm_rope_fake(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                             interleaved=True):
    _check_joint_qk_norm_rope(q, k, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    refuse_grad("joint_qk_norm_rope_", TRACING, ("q", q), ("k", k), ("txt_q_weight", wqt), ("txt_k_weight", wkt),
                ("img_q_weight", wqi), ("img_k_weight", wki))


# --- public Python API ------------------------------------------------------------------------------

def rope(q, k, cos_sin_cache, positions=None, interleaved=True, backend=None):
    """RoPE in place on q and k ([B, L, H, D] or [L, H, D], last dim contiguous, other strides free:
    row slices of a larger buffer work). ``cos_sin_cache`` fp32 [P, R] (cos of R/2 frequencies, then
    sin; the first R <= D dims rotate); ``positions`` [L] or [B, L] int32/int64 (default arange(L));
    ``interleaved``: pairs (2i, 2i+1) (Qwen, Flux), else half-split (i, i + R/2). CUDA backend:
    ``backend`` / env FUSED_DIT_ROPE_BACKEND (auto | flashinfer | triton; forcing one on CPU tensors
    raises). Returns (q, k)."""
    torch.ops.fused_dit.rope.default(q, k, cos_sin_cache, positions, interleaved, backend)
    return q, k


def qk_norm_rope_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_q_weight, txt_k_weight,
                     img_q_weight, img_k_weight, txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True,
                     out=None):
    """Joint (q, k, v) [B, Lt + Li, H, D] of the Qwen/Flux double-stream attention, in one launch:
    for each stream, q and k get RMSNorm over head_dim (learned [D] weight, ``eps``; diffusers
    ``RMSNorm`` roundings: fp32 normalise, round to the weight dtype when 16-bit, times weight,
    round) then RoPE with the stream's per-token table (row l for token l; fp32 [>= L, R]);
    q, k, v are written at their joint offsets (text rows first). Replaces RMSNorm x4, RoPE x4
    and the three cats of diffusers' ``QwenDoubleStreamAttnProcessor2_0``. Inputs: any batch/token/
    head strides, last dim contiguous. ``out``: caller-given (q_out, k_out, v_out) to write into."""
    args = (txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_q_weight, txt_k_weight, img_q_weight,
            img_k_weight, txt_cos_sin, img_cos_sin)
    if out is None:
        return torch.ops.fused_dit.qk_norm_rope_cat.default(*args, eps, interleaved)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        fail("qk_norm_rope_cat", f"'out' must be a (q_out, k_out, v_out) triple, got a {got}")
    torch.ops.fused_dit.qk_norm_rope_cat_out.default(*args, *out, eps, interleaved)
    return tuple(out)


def joint_qk_norm_rope_(q, k, txt_len, txt_q_weight, txt_k_weight, img_q_weight, img_k_weight,
                        txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    """In place on joint q, k [B, N, H, D] (e.g. filled by the Q/K projections writing straight into
    row slices): rows < txt_len get the text RMSNorm weight and table (row t), rows >= txt_len the
    image ones (row l - txt_len). One launch. Returns (q, k)."""
    # a SymInt (a traced length) stays symbolic: int() would specialise the graph on its value
    txt_len = txt_len if isinstance(txt_len, torch.SymInt) else int(txt_len)
    torch.ops.fused_dit.joint_qk_norm_rope_.default(q, k, txt_len, txt_q_weight, txt_k_weight,
                                                    img_q_weight, img_k_weight, txt_cos_sin, img_cos_sin,
                                                    eps, interleaved)
    return q, k


def warmup_rope(device=None, dtype=torch.bfloat16, head_dim=128, interleaved=True, backend=None) -> str:
    """Compile the RoPE kernels of the chosen backend for ``device`` (FlashInfer JIT-compiles on its
    first call, ~1 min; Triton compiles per specialisation) so that a later CUDA-graph capture does
    not compile. Returns the backend chosen. No-op ('cpu') without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    device = torch.device(device or "cuda")
    q = torch.randn(2, 4, 2, head_dim, device=device, dtype=dtype)
    k = torch.randn_like(q)
    cache = torch.randn(4, head_dim, device=device, dtype=torch.float32)
    name, _ = choose_rope_backend(q, k, cache, interleaved, backend)
    rope(q, k, cache, interleaved=interleaved, backend=name)
    if name != "triton":
        rope(q, k, cache, interleaved=interleaved, backend="triton")
    torch.cuda.synchronize(device)
    return name


def rope_backend_report() -> list[tuple[str, str]]:
    """Rows for ``python -m fused_dit_ops env``."""
    req = os.environ.get(ROPE_BACKEND_ENV, "auto") or "auto"
    ok, why = flashinfer_status()
    if req == "triton":
        auto = "triton (forced)"
    elif ok:
        auto = ("flashinfer for bf16/fp16 CUDA q/k with head_dim in (64, 128, 256, 512) and (nnz, H, D)-"
                "viewable rows; Triton otherwise")
    else:
        auto = f"triton (flashinfer not importable: {why})"
    if req == "flashinfer" and not ok:
        auto = f"flashinfer forced but not importable ({why}): rope on CUDA will raise"
    cat = "C++ (fused_dit_ops._C)" if _CAT_CPP is not None else "Triton (no _C)"
    return [(f"{ROPE_BACKEND_ENV}", req), ("rope CUDA backend", auto), ("joint_qkv_cat CUDA", cat),
            ("qk_norm_rope_cat CUDA", "Triton (one launch)")]

