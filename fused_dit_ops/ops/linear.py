"""Projections into joint buffers: validation, CUDA (cuBLAS GEMMs into the buffer), CPU (reference), fake.

Op (schema in ``fused_dit_ops._schemas``):

- ``joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases) -> out``: out is a new
  [B, Lt + Li, N] tensor whose rows [0, Lt) are ``txt @ cat(txt_weights).T + cat(txt_biases)`` and
  rows [Lt, Lt + Li) the same for ``img`` with its own weights (N = the sum of the weights' rows,
  equal per position in the two lists). It is the Q/K/V projection of a double-stream block (text
  and image streams with their own q/k/v Linears) written straight into the joint buffer whose
  column views are q, k, v: no cat, no copy.

CUDA: one GEMM per stream (and batch element), writing its row slice of the output in place, with
the bias in cuBLASLt's epilogue. The weights are used as they are when they are consecutive row
blocks of one storage (``fused_dit_ops.patch`` packs a block's q/k/v weights that way) and so are
the biases; otherwise they are concatenated first (one copy of the weights per call). Being one
opaque op, it keeps this under torch.compile, where ``addmm(out=<view of a buffer>)`` would be
functionalised into a copy.
"""
from __future__ import annotations

import torch

from .. import reference as ref
from .._validation import (TRACING, check_last_dim_contiguous, check_like, check_tensor, fail, no_backward,
                           refuse_grad)

_NS = "fused_dit"


def packed_rows(ts):
    """The [k*n, ...] view covering ``ts`` if they are consecutive contiguous row blocks of one
    storage (same shape and dtype), else None. Metadata only (no sync)."""
    ts = list(ts)
    if not ts or any(t is None for t in ts):
        return None
    t0 = ts[0]
    if len(ts) == 1:  # already one tensor (the patched block passes its packed views like this)
        return t0.detach() if t0.is_contiguous() else None
    step = t0.numel() * t0.element_size()
    p0 = t0.data_ptr()
    for j, t in enumerate(ts):
        if t.data_ptr() != p0 + j * step or not t.is_contiguous() or t.shape != t0.shape or t.dtype != t0.dtype:
            return None
    # consecutive addresses; the view must also stay inside t0's storage (else they are separate
    # allocations that happen to be adjacent)
    st = t0.untyped_storage()
    if p0 + len(ts) * step > st.data_ptr() + st.nbytes():
        return None
    shape = (len(ts) * t0.shape[0],) + tuple(t0.shape[1:])
    return t0.detach().as_strided(shape, t0.stride(), t0.storage_offset())


# --- validator ------------------------------------------------------------------------------------

def _check_joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """-> (B, Lt, Li, K, [N_j])."""
    op = "joint_linear"
    check_tensor(op, "txt", txt, ndim=3)
    check_tensor(op, "img", img, ndim=3)
    check_like(op, "img", img, "txt", txt)
    check_last_dim_contiguous(op, "txt", txt)
    check_last_dim_contiguous(op, "img", img)
    B, Lt, K = txt.shape
    if img.shape[0] != B or img.shape[2] != K:
        fail(op, f"'img' {list(img.shape)} and 'txt' {list(txt.shape)} must have the same batch B and "
                 f"features K (only the lengths may differ)")
    k = len(txt_weights)
    if k == 0:
        fail(op, "'txt_weights' must hold at least one [N, K] weight, got an empty list")
    for name, lst in (("img_weights", img_weights), ("txt_biases", txt_biases), ("img_biases", img_biases)):
        if len(lst) != k:
            fail(op, f"'{name}' must have one entry per 'txt_weights' entry ({k}), got {len(lst)}")
    ns = []
    for j in range(k):
        for stream, ws, bs, x in (("txt", txt_weights, txt_biases, txt), ("img", img_weights, img_biases, img)):
            w, b = ws[j], bs[j]
            check_tensor(op, f"{stream}_weights[{j}]", w, ndim=2)
            check_like(op, f"{stream}_weights[{j}]", w, stream, x)
            if w.shape[1] != K:
                fail(op, f"'{stream}_weights[{j}]' must be [N, K] with K = {K} (the last dim of '{stream}'), "
                         f"got {list(w.shape)}")
            if b is not None:
                check_tensor(op, f"{stream}_biases[{j}]", b, ndim=1)
                check_like(op, f"{stream}_biases[{j}]", b, stream, x)
                if b.shape[0] != w.shape[0]:
                    fail(op, f"'{stream}_biases[{j}]' must be [N] = [{w.shape[0]}] (the rows of "
                             f"'{stream}_weights[{j}]'), got {list(b.shape)}")
        if img_weights[j].shape[0] != txt_weights[j].shape[0]:
            fail(op, f"'img_weights[{j}]' has {img_weights[j].shape[0]} rows but 'txt_weights[{j}]' has "
                     f"{txt_weights[j].shape[0]}: the two streams share the output columns")
        ns.append(txt_weights[j].shape[0])
    return B, Lt, img.shape[1], K, ns


# --- CUDA -----------------------------------------------------------------------------------------

def _project_into(x, ws, bs, out, r0, r1):
    """out[:, r0:r1] = x @ cat(ws).T + cat(bs): one GEMM (bias in the cuBLASLt epilogue) per batch
    element, straight into the contiguous row slice."""
    w = packed_rows(ws)
    if w is None:
        # not packed: pack here (one copy of the weights, ~4% of the GEMM's time at Qwen dims).
        # GEMMs into strided column slices would be slower: torch runs them without the bias
        # epilogue, broadcasting each bias into the output first (bench qkv: 862 vs 730 us)
        w = torch.cat([t.detach() for t in ws], 0)  # forward-only op: addmm(out=) refuses grad inputs
    # the biases on their own: packed weights are never copied because the biases are not
    b = None
    if any(t is not None for t in bs):
        b = packed_rows(bs) if all(t is not None for t in bs) else None
        if b is None:  # a few KB
            b = torch.cat([t.detach() if t is not None else t_w.new_zeros(t_w.shape[0]) for t, t_w in zip(bs, ws)], 0)
    for i in range(x.shape[0]):
        if b is not None:
            torch.addmm(b, x[i], w.t(), out=out[i, r0:r1])
        else:
            torch.mm(x[i], w.t(), out=out[i, r0:r1])


def joint_linear_unchecked(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """The CUDA implementation without the input checks (any device that has addmm): for callers
    that built the inputs themselves and call it outside torch.compile, e.g. the patched diffusers
    block in eager mode, where the op's dispatch and checks would be host time and nothing else."""
    B, Lt, _ = txt.shape
    Li = img.shape[1]
    out = txt.new_empty((B, Lt + Li, sum(w.shape[0] for w in txt_weights)))
    if out.numel() == 0:
        return out
    if Lt:
        _project_into(txt, txt_weights, txt_biases, out, 0, Lt)
    if Li:
        _project_into(img, img_weights, img_biases, out, Lt, Lt + Li)
    return out


def _joint_linear_cuda(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """The CUDA implementation (any device that has addmm): the checks, the GEMMs, and with grad
    enabled the output behind a node whose backward raises."""
    _check_joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    if not torch.is_grad_enabled():
        return joint_linear_unchecked(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    with torch.no_grad():  # addmm(out=) refuses inputs that require grad while grad is enabled
        out = joint_linear_unchecked(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    return no_backward("joint_linear", out, txt, img, txt_weights, txt_biases, img_weights, img_biases)


torch.library.impl(f"{_NS}::joint_linear", "CUDA")(_joint_linear_cuda)


# --- CPU: the reference ---------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::joint_linear", "CPU")
def _joint_linear_cpu(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    _check_joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    out = ref.joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases).contiguous()
    return (no_backward("joint_linear", out, txt, img, txt_weights, txt_biases, img_weights, img_biases)
            if torch.is_grad_enabled() else out)


# --- Autograd: a fallthrough (no backward; see ops/modulation.py): the output comes out behind a node
# whose backward raises

torch.library.impl(f"{_NS}::joint_linear", "Autograd")(torch.library.fallthrough_kernel)


# --- fake (torch.compile) -------------------------------------------------------------------------

@torch.library.register_fake(f"{_NS}::joint_linear")
def _joint_linear_fake(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    B, Lt, Li, _, ns = _check_joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    refuse_grad("joint_linear", TRACING, ("txt", txt), ("img", img), ("txt_weights", txt_weights),
                ("txt_biases", txt_biases), ("img_weights", img_weights), ("img_biases", img_biases))
    return txt.new_empty((B, Lt + Li, sum(ns)))


# --- public Python API ----------------------------------------------------------------------------

def joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """[B, Lt + Li, N]: text rows ``txt @ cat(txt_weights).T + cat(txt_biases)``, then image rows
    with the image weights, in one new buffer (e.g. the joint q|k|v of a double-stream block, whose
    column views are q, k and v). ``txt`` [B, Lt, K], ``img`` [B, Li, K] (same B, K, dtype, device;
    last dim contiguous); each ``*_weights[j]`` [N_j, K] with the same N_j in both lists; each
    ``*_biases[j]`` [N_j] or None. On CUDA one GEMM per stream, straight into its rows; weights
    (and biases) that are not consecutive rows of one storage are concatenated first."""
    return torch.ops.fused_dit.joint_linear.default(txt, img, list(txt_weights), list(txt_biases),
                                                    list(img_weights), list(img_biases))
