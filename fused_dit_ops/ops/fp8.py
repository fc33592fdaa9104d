"""FP8 (float8_e4m3fn) ops: quantising norm + modulation variants, row quantisation, FP8 GEMMs.

Schemas live in ``fused_dit_ops._schemas``. Row-wise scaling throughout: an activation carries one
fp32 scale per token (``scale = amax(row) / 448``, 1 for an all-zero row), a weight one per output
channel; ``value ~= q * scale``. Semantics: :mod:`fused_dit_ops.reference` (``*_fp8``,
``quantize_fp8``, ``fp8_linear``).

- ``norm_scale_shift_fp8`` / ``dual_norm_scale_shift_fp8``: the modulated LayerNorm / RMSNorm of
  ``norm_scale_shift`` (no weight / bias), written as (values e4m3 [B, L, C], scales fp32 [B, L]);
- ``gate_residual_norm_scale_shift_fp8`` / ``dual_...``: the residual stream (activation dtype) and
  the quantised modulated LayerNorm of it;
- ``quantize_fp8(x, bias, activation)``: per-row quantisation of x [..., K] (+ bias, GELU-tanh);
- ``fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)``: the FP8 GEMM;
- ``joint_fp8_linear``: the two streams' projections (e.g. q|k|v) into one joint [B, Lt + Li, N] buffer.
- ``quantize_fp8_cat(a, b, activation_b)``: per-row quantisation of [a | act(b)] without the cat (a
  single-stream block's [attention | GELU-tanh or SwiGLU of the MLP] output-projection input);
- ``gate_residual_layer_norm_fp8``: ``gate_residual_layer_norm`` (gated residual + affine LayerNorm)
  with the normed output quantised (a Wan block's norm2 feeding the cross-attention q projection).

CUDA: Triton kernels (quantisation in the kernel that computes the row) and ``torch._scaled_mm``
with row-wise scales (needs compute capability 8.9+; out_dtype bfloat16). CPU: the reference.
C, K and N must be multiples of 16 (``torch._scaled_mm``).

``fast_accum`` (the two GEMM ops, default False) is ``torch._scaled_mm``'s ``use_fast_accum`` on
CUDA: on Hopper the tensor-core partial sums are then not promoted to fp32 at intervals along K
(faster, less accurate). The CPU reference accumulates in fp32 either way and ignores it.
"""
from __future__ import annotations

import functools

import torch

from .. import reference as ref
from .._validation import (TRACING, check_last_dim_contiguous, check_like, check_one_device, check_tensor, fail,
                           no_backward, refuse_grad)
from .modulation import (_GRNS_STREAM, _NORM_STREAM, _check_dual_streams, _check_gate_residual_norm_scale_shift,
                         _check_norm_scale_shift)

_NS = "fused_dit"
FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = ("none", "gelu_tanh")


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def _mult16(op, name, what, n):
    if n % 16:
        fail(op, f"'{name}' {what} must be a multiple of 16 for the FP8 GEMM (torch._scaled_mm), got {n}")


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _check_fp8_device(op, name, t):
    """float8_e4m3fn kernels and GEMMs need compute capability 8.9+ (Ada, Hopper and later)."""
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        cap = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
        if cap < (8, 9):
            fail(op, f"'{name}' is on {t.device} (compute capability {cap[0]}.{cap[1]}); float8_e4m3fn needs 8.9+ "
                     "(Ada, Hopper)")


def _check_activation_name(op, activation):
    if activation not in ACTIVATIONS:
        fail(op, f"'activation' must be one of {ACTIVATIONS}, got {activation!r}")


def _check_fast_accum(op, fast_accum):
    # through torch.ops the implementations get a bool already (the dispatcher casts an int or a float
    # and refuses a str with its own error): the Python wrappers run this check before dispatch
    if not isinstance(fast_accum, bool):
        fail(op, f"'fast_accum' must be a bool (True or False), got {type(fast_accum).__name__} {fast_accum!r}")


def _check_rows(op, name, t):
    """t [..., K] (>= 1-D, last dim contiguous) whose leading dims collapse into one strided run, i.e.
    ``t.view(-1, K)`` works (metadata only)."""
    check_last_dim_contiguous(op, name, t)
    lead = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    for (s0, st0), (s1, st1) in zip(lead, lead[1:]):
        if st0 != st1 * s1:
            fail(op, f"'{name}' {list(t.shape)} with strides {tuple(t.stride())}: its leading dims must "
                     f"collapse into one row dimension (t.view(-1, {t.shape[-1]}) must work)")


# --- validators ---------------------------------------------------------------------------------------

def _check_norm_scale_shift_fp8(x, shift, scale, index, eps, norm, op="norm_scale_shift_fp8", sfx=""):
    _check_norm_scale_shift(x, shift, scale, index, None, None, eps, norm, op, sfx)
    _check_fp8_device(op, "x" + sfx, x)
    _mult16(op, "x" + sfx, "channels C", x.shape[2])


def _check_dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm):
    op = "dual_norm_scale_shift_fp8"
    _check_dual_streams(op, _NORM_STREAM, (xa, sha, sca, ia, eps_a), (xb, shb, scb, ib, eps_b),
                        lambda x, sh, sc, i, eps, sfx: _check_norm_scale_shift_fp8(x, sh, sc, i, eps, norm, op, sfx))


def _check_grns_fp8(residual, update, gate, shift, scale, index, eps, op="gate_residual_norm_scale_shift_fp8",
                    sfx=""):
    _check_gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps, op, sfx)
    _check_fp8_device(op, "residual" + sfx, residual)
    _mult16(op, "residual" + sfx, "channels C", residual.shape[2])


def _check_dual_grns_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    op = "dual_gate_residual_norm_scale_shift_fp8"
    _check_dual_streams(op, _GRNS_STREAM, (ra, ua, ga, sha, sca, ia, eps_a), (rb, ub, gb, shb, scb, ib, eps_b),
                        lambda *stream: _check_grns_fp8(*stream[:-1], op, stream[-1]))


def _check_quantize_fp8(x, bias, activation):
    op = "quantize_fp8"
    check_one_device(op, ("x", x), ("bias", bias))
    check_tensor(op, "x", x)
    _check_fp8_device(op, "x", x)
    if x.dim() < 1:
        fail(op, "'x' must be at least 1-D [..., K], got a 0-D tensor")
    if x.dim() == 3:  # [B, L, K]: batch and token strides free
        check_last_dim_contiguous(op, "x", x)
    else:
        _check_rows(op, "x", x)
    K = x.shape[-1]
    _mult16(op, "x", "last dimension K", K)
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_last_dim_contiguous(op, "bias", bias)
        if bias.shape[0] != K:
            fail(op, f"'bias' must have shape [K] = [{K}] (the last dim of 'x'), got {list(bias.shape)}")
    _check_activation_name(op, activation)


CAT_ACTIVATIONS = ("none", "gelu_tanh", "swiglu")


def _check_quantize_fp8_cat(a, b, activation_b):
    op = "quantize_fp8_cat"
    check_one_device(op, ("a", a), ("b", b))
    check_tensor(op, "b", b, ndim=(2, 3))
    _check_fp8_device(op, "b", b)
    check_last_dim_contiguous(op, "b", b)
    Ka = 0
    if a is not None:
        check_tensor(op, "a", a, ndim=(2, 3))
        check_like(op, "b", b, "a", a)
        if b.dim() != a.dim() or tuple(b.shape[:-1]) != tuple(a.shape[:-1]):
            fail(op, f"'b' {list(b.shape)} must have the leading dims of 'a' {list(a.shape)} (one row per token in "
                     "each; only the last dims may differ)")
        check_last_dim_contiguous(op, "a", a)
        Ka = a.shape[-1]
    if activation_b not in CAT_ACTIVATIONS:
        fail(op, f"'activation_b' must be one of {CAT_ACTIVATIONS}, got {activation_b!r}")
    Kb = b.shape[-1]
    if activation_b == "swiglu" and Kb % 2:
        fail(op, f"'b' last dimension must be even for activation_b='swiglu' (gate | linear halves), got {Kb}")
    K = Ka + (Kb // 2 if activation_b == "swiglu" else Kb)
    if K % 16:
        fail(op, f"the output width K = {Ka} ('a') + {K - Ka} (activated 'b') must be a multiple of 16 for the "
                 f"FP8 GEMM (torch._scaled_mm), got {K}")
    return K


def _check_grln_fp8(residual, update, gate, index, weight, bias, eps):
    op = "gate_residual_layer_norm_fp8"
    from .gate_residual_norm import _check as _grln_check
    _grln_check(residual, update, gate, index, weight, bias, eps, op)
    _check_fp8_device(op, "residual", residual)
    _mult16(op, "residual", "channels C", residual.shape[2])


def _check_fp8_operand(op, x_name, x, s_name, s, rows_ndim=None):
    """An e4m3 operand [..., K] and its fp32 row scales [...] (contiguous)."""
    check_tensor(op, x_name, x, ndim=rows_ndim, dtypes=(FP8,))
    if x.dim() < 2:
        fail(op, f"'{x_name}' must be at least 2-D [..., K], got {x.dim()}-D")
    _check_rows(op, x_name, x)
    check_tensor(op, s_name, s, dtypes=(torch.float32,))
    check_like(op, s_name, s, x_name, x, dtype=False)
    if tuple(s.shape) != tuple(x.shape[:-1]):
        fail(op, f"'{s_name}' must have shape {list(x.shape[:-1])} (one fp32 scale per row of '{x_name}'), "
                 f"got {list(s.shape)}")
    if not s.is_contiguous():
        fail(op, f"'{s_name}' must be contiguous, got strides {tuple(s.stride())}")


def _check_fp8_weight(op, w_name, w, s_name, s, K, x_name, x):
    check_tensor(op, w_name, w, ndim=2, dtypes=(FP8,))
    check_like(op, w_name, w, x_name, x)
    if w.shape[1] != K:
        fail(op, f"'{w_name}' must be [N, K] with K = {K} (the last dim of '{x_name}'), got {list(w.shape)}")
    if not w.is_contiguous():
        fail(op, f"'{w_name}' must be contiguous [N, K] (row-major), got strides {tuple(w.stride())}")
    N = w.shape[0]
    _mult16(op, w_name, "rows N", N)
    check_tensor(op, s_name, s, ndim=1, dtypes=(torch.float32,))
    check_like(op, s_name, s, w_name, w, dtype=False)
    if s.shape[0] != N or not s.is_contiguous():
        fail(op, f"'{s_name}' must be a contiguous fp32 [N] = [{N}] (one scale per row of '{w_name}'), "
                 f"got {list(s.shape)} with strides {tuple(s.stride())}")
    return N


def _check_out_dtype(op, out_dtype, device):
    if out_dtype not in OUT_DTYPES:
        fail(op, f"'out_dtype' must be one of ({', '.join(map(_dt, OUT_DTYPES))}), got {out_dtype}")
    if device.type == "cuda" and out_dtype != torch.bfloat16:
        fail(op, f"'out_dtype' must be bfloat16 on CUDA (torch._scaled_mm with row-wise scales), got "
                 f"{_dt(out_dtype)}")


def _check_bias(op, name, b, N, out_dtype, ref_name, ref_t):
    if b is None:
        return
    check_tensor(op, name, b, ndim=1)
    check_like(op, name, b, ref_name, ref_t, dtype=False)
    if b.shape[0] != N or (N > 1 and b.stride(0) != 1):
        fail(op, f"'{name}' must be a contiguous [N] = [{N}], got {list(b.shape)} with strides {tuple(b.stride())}")
    if b.dtype != out_dtype:
        fail(op, f"'{name}' has dtype {_dt(b.dtype)} but 'out_dtype' is {_dt(out_dtype)}; they must match")


def _check_fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum=False):
    op = "fp8_linear"
    check_one_device(op, ("x", x), ("x_scale", x_scale), ("weight", weight), ("weight_scale", weight_scale),
                     ("bias", bias))
    _check_fp8_operand(op, "x", x, "x_scale", x_scale)
    _check_fp8_device(op, "x", x)
    K = x.shape[-1]
    _mult16(op, "x", "last dimension K", K)
    N = _check_fp8_weight(op, "weight", weight, "weight_scale", weight_scale, K, "x", x)
    _check_out_dtype(op, out_dtype, x.device)
    _check_bias(op, "bias", bias, N, out_dtype, "x", x)
    _check_activation_name(op, activation)
    _check_fast_accum(op, fast_accum)
    return N


def _check_joint_fp8_linear(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                            img_weight, img_weight_scale, img_bias, out_dtype, fast_accum=False):
    op = "joint_fp8_linear"
    check_one_device(op, ("txt", txt), ("txt_scale", txt_scale), ("img", img), ("img_scale", img_scale),
                     ("txt_weight", txt_weight), ("txt_weight_scale", txt_weight_scale), ("txt_bias", txt_bias),
                     ("img_weight", img_weight), ("img_weight_scale", img_weight_scale), ("img_bias", img_bias))
    _check_fp8_operand(op, "txt", txt, "txt_scale", txt_scale, rows_ndim=3)
    _check_fp8_operand(op, "img", img, "img_scale", img_scale, rows_ndim=3)
    _check_fp8_device(op, "txt", txt)
    B, Lt, K = txt.shape
    if img.shape[0] != B or img.shape[2] != K:
        fail(op, f"'img' {list(img.shape)} and 'txt' {list(txt.shape)} must have the same batch B and "
                 f"features K (only the lengths may differ)")
    _mult16(op, "txt", "last dimension K", K)
    N = _check_fp8_weight(op, "txt_weight", txt_weight, "txt_weight_scale", txt_weight_scale, K, "txt", txt)
    Ni = _check_fp8_weight(op, "img_weight", img_weight, "img_weight_scale", img_weight_scale, K, "img", img)
    if Ni != N:
        fail(op, f"'img_weight' has {Ni} rows but 'txt_weight' has {N}: the two streams share the output columns")
    _check_out_dtype(op, out_dtype, txt.device)
    _check_bias(op, "txt_bias", txt_bias, N, out_dtype, "txt", txt)
    _check_bias(op, "img_bias", img_bias, N, out_dtype, "img", img)
    _check_fast_accum(op, fast_accum)
    return B, Lt, img.shape[1], N


# --- CUDA ---------------------------------------------------------------------------------------------

def _scaled_mm_into(x2, xs, w, ws, bias, out_dtype, out=None, fast_accum=False):
    """x2 [M, K] e4m3 (row-major), xs [M] fp32, w [N, K] e4m3 (row-major), ws [N] fp32 ->
    [M, N] in out_dtype: torch._scaled_mm with row-wise scales (bias in its epilogue) and
    ``use_fast_accum=fast_accum``.

    cuBLAS's FP8 GEMM takes only sizes divisible by 16 (CUBLAS_STATUS_NOT_SUPPORTED otherwise). K
    and N are checked; a token count M that is not (a text length of 225, an odd image size) is
    padded with zero rows to the next multiple of 16: a copy of the e4m3 rows (1 byte per value)
    and a GEMM over at most 15 more rows, whose results are dropped.

    cuBLASLt also wants the scale vectors 16-byte aligned: the image rows' scales of one joint
    [text + image] quantisation start 4 x L_txt bytes in (900 for a text length of 225), so a
    misaligned scale view is copied (M floats)."""
    M, K = x2.shape
    pad = -M % 16
    if pad:
        xp = torch.zeros((M + pad, K), dtype=x2.dtype, device=x2.device)
        xp[:M].copy_(x2)
        sp = torch.ones(M + pad, dtype=xs.dtype, device=xs.device)
        sp[:M].copy_(xs)
        x2, xs = xp, sp
    elif xs.data_ptr() % 16:  # (the padded copy above is a new, aligned allocation)
        xs = xs.clone()
    kw = dict(scale_a=xs.view(-1, 1), scale_b=ws.view(1, -1), bias=bias, out_dtype=out_dtype,
              use_fast_accum=fast_accum)
    if not pad:
        if out is None:
            return torch._scaled_mm(x2, w.t(), **kw)
        return torch._scaled_mm(x2, w.t(), out=out, **kw)
    y = torch._scaled_mm(x2, w.t(), **kw)[:M]
    if out is None:
        return y
    return out.copy_(y)


def fp8_linear_unchecked(x, x_scale, weight, weight_scale, bias=None, out_dtype=torch.bfloat16, activation="none",
                         fast_accum=False):
    """The CUDA implementation without the checks (for callers that built the inputs themselves)."""
    K, N = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    if x.numel() == 0 or N == 0:
        out = torch.zeros((*lead, N), dtype=out_dtype, device=x.device)
        if bias is not None:
            out += bias
        return out
    y = _scaled_mm_into(x.view(-1, K), x_scale.reshape(-1), weight, weight_scale, bias, out_dtype,
                        fast_accum=fast_accum)
    if activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.view(*lead, N)


def joint_fp8_linear_unchecked(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                               img_weight, img_weight_scale, img_bias, out_dtype=torch.bfloat16, fast_accum=False):
    B, Lt, _ = txt.shape
    Li, N = img.shape[1], txt_weight.shape[0]
    out = torch.empty((B, Lt + Li, N), dtype=out_dtype, device=txt.device)
    for i in range(B):
        for x, s, w, ws, b, r0, r1 in ((txt, txt_scale, txt_weight, txt_weight_scale, txt_bias, 0, Lt),
                                       (img, img_scale, img_weight, img_weight_scale, img_bias, Lt, Lt + Li)):
            if r1 > r0 and N:
                _scaled_mm_into(x[i], s[i], w, ws, b, out_dtype, out=out[i, r0:r1], fast_accum=fast_accum)
    return out


def _grad(op, out, *inputs):
    return no_backward(op, out, *inputs) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::norm_scale_shift_fp8", "CUDA")
def _norm_scale_shift_fp8_cuda(x, shift, scale, index=None, eps=1e-6, norm="layer"):
    from ..kernels import fp8 as k
    _check_norm_scale_shift_fp8(x, shift, scale, index, eps, norm)
    return _grad("norm_scale_shift_fp8", k.norm_scale_shift_fp8(x, shift, scale, index, eps, norm), x, shift, scale)


@torch.library.impl(f"{_NS}::dual_norm_scale_shift_fp8", "CUDA")
def _dual_norm_scale_shift_fp8_cuda(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    from ..kernels import fp8 as k
    _check_dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    out = k.dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    return _grad("dual_norm_scale_shift_fp8", out, xa, sha, sca, xb, shb, scb)


@torch.library.impl(f"{_NS}::gate_residual_norm_scale_shift_fp8", "CUDA")
def _grns_fp8_cuda(residual, update, gate, shift, scale, index=None, eps=1e-6):
    from ..kernels import fp8 as k
    _check_grns_fp8(residual, update, gate, shift, scale, index, eps)
    out = k.gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index, eps)
    return _grad("gate_residual_norm_scale_shift_fp8", out, residual, update, gate, shift, scale)


@torch.library.impl(f"{_NS}::dual_gate_residual_norm_scale_shift_fp8", "CUDA")
def _dual_grns_fp8_cuda(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    from ..kernels import fp8 as k
    _check_dual_grns_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    out = k.dual_gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    return _grad("dual_gate_residual_norm_scale_shift_fp8", out, ra, ua, ga, sha, sca, rb, ub, gb, shb, scb)


@torch.library.impl(f"{_NS}::quantize_fp8", "CUDA")
def _quantize_fp8_cuda(x, bias=None, activation="none"):
    from ..kernels import fp8 as k
    _check_quantize_fp8(x, bias, activation)
    return _grad("quantize_fp8", k.quantize_rows(x, bias, activation == "gelu_tanh"), x, bias)


@torch.library.impl(f"{_NS}::fp8_linear", "CUDA")
def _fp8_linear_cuda(x, x_scale, weight, weight_scale, bias, out_dtype, activation="none", fast_accum=False):
    _check_fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)
    with torch.no_grad():
        out = fp8_linear_unchecked(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)
    return _grad("fp8_linear", out, x, x_scale, weight, weight_scale, bias)


@torch.library.impl(f"{_NS}::joint_fp8_linear", "CUDA")
def _joint_fp8_linear_cuda(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                           img_weight, img_weight_scale, img_bias, out_dtype, fast_accum=False):
    args = (txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias, img_weight,
            img_weight_scale, img_bias)
    _check_joint_fp8_linear(*args, out_dtype, fast_accum)
    with torch.no_grad():  # _scaled_mm(out=) refuses inputs that require grad while grad is enabled
        out = joint_fp8_linear_unchecked(*args, out_dtype, fast_accum)
    return _grad("joint_fp8_linear", out, *args)


@torch.library.impl(f"{_NS}::quantize_fp8_cat", "CUDA")
def _quantize_fp8_cat_cuda(a, b, activation_b="none"):
    from ..kernels import fp8 as k
    _check_quantize_fp8_cat(a, b, activation_b)
    return _grad("quantize_fp8_cat", k.quantize_cat(a, b, activation_b), a, b)


@torch.library.impl(f"{_NS}::gate_residual_layer_norm_fp8", "CUDA")
def _grln_fp8_cuda(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    from ..kernels import fp8 as k
    _check_grln_fp8(residual, update, gate, index, weight, bias, eps)
    out = k.gate_residual_layer_norm_fp8(residual, update, gate, index, weight, bias, eps)
    return _grad("gate_residual_layer_norm_fp8", out, residual, update, gate, weight, bias)


# --- CPU: the reference ---------------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::norm_scale_shift_fp8", "CPU")
def _norm_scale_shift_fp8_cpu(x, shift, scale, index=None, eps=1e-6, norm="layer"):
    _check_norm_scale_shift_fp8(x, shift, scale, index, eps, norm)
    return _grad("norm_scale_shift_fp8", ref.norm_scale_shift_fp8(x, shift, scale, index, eps, norm), x, shift, scale)


@torch.library.impl(f"{_NS}::dual_norm_scale_shift_fp8", "CPU")
def _dual_norm_scale_shift_fp8_cpu(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    _check_dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    out = (*ref.norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, norm), *ref.norm_scale_shift_fp8(xb, shb, scb, ib, eps_b,
                                                                                              norm))
    return _grad("dual_norm_scale_shift_fp8", out, xa, sha, sca, xb, shb, scb)


@torch.library.impl(f"{_NS}::gate_residual_norm_scale_shift_fp8", "CPU")
def _grns_fp8_cpu(residual, update, gate, shift, scale, index=None, eps=1e-6):
    _check_grns_fp8(residual, update, gate, shift, scale, index, eps)
    out = ref.gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index, eps)
    return _grad("gate_residual_norm_scale_shift_fp8", out, residual, update, gate, shift, scale)


@torch.library.impl(f"{_NS}::dual_gate_residual_norm_scale_shift_fp8", "CPU")
def _dual_grns_fp8_cpu(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    _check_dual_grns_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    out = (*ref.gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, eps_a),
           *ref.gate_residual_norm_scale_shift_fp8(rb, ub, gb, shb, scb, ib, eps_b))
    return _grad("dual_gate_residual_norm_scale_shift_fp8", out, ra, ua, ga, sha, sca, rb, ub, gb, shb, scb)


@torch.library.impl(f"{_NS}::quantize_fp8", "CPU")
def _quantize_fp8_cpu(x, bias=None, activation="none"):
    _check_quantize_fp8(x, bias, activation)
    return _grad("quantize_fp8", ref.quantize_fp8(x, bias, activation), x, bias)


@torch.library.impl(f"{_NS}::fp8_linear", "CPU")
def _fp8_linear_cpu(x, x_scale, weight, weight_scale, bias, out_dtype, activation="none", fast_accum=False):
    # the reference accumulates in fp32 whatever fast_accum says (checked, then ignored)
    _check_fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)
    out = ref.fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation)
    return _grad("fp8_linear", out, x, x_scale, weight, weight_scale, bias)


@torch.library.impl(f"{_NS}::joint_fp8_linear", "CPU")
def _joint_fp8_linear_cpu(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                          img_weight, img_weight_scale, img_bias, out_dtype, fast_accum=False):
    args = (txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias, img_weight,
            img_weight_scale, img_bias)
    _check_joint_fp8_linear(*args, out_dtype, fast_accum)  # fast_accum ignored: fp32 accumulation
    return _grad("joint_fp8_linear", ref.joint_fp8_linear(*args, out_dtype), *args)


@torch.library.impl(f"{_NS}::quantize_fp8_cat", "CPU")
def _quantize_fp8_cat_cpu(a, b, activation_b="none"):
    _check_quantize_fp8_cat(a, b, activation_b)
    return _grad("quantize_fp8_cat", ref.quantize_fp8_cat(a, b, activation_b), a, b)


@torch.library.impl(f"{_NS}::gate_residual_layer_norm_fp8", "CPU")
def _grln_fp8_cpu(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    _check_grln_fp8(residual, update, gate, index, weight, bias, eps)
    out = ref.gate_residual_layer_norm_fp8(residual, update, gate, index, weight, bias, eps)
    return _grad("gate_residual_layer_norm_fp8", out, residual, update, gate, weight, bias)


OPS = ("norm_scale_shift_fp8", "dual_norm_scale_shift_fp8", "gate_residual_norm_scale_shift_fp8",
       "dual_gate_residual_norm_scale_shift_fp8", "quantize_fp8", "fp8_linear", "joint_fp8_linear", "quantize_fp8_cat",
       "gate_residual_layer_norm_fp8")

# no backward (see ops/modulation.py): the dispatcher skips the Autograd key
for _op in OPS:
    torch.library.impl(f"{_NS}::{_op}", "Autograd")(torch.library.fallthrough_kernel)


# --- fake (torch.compile / meta) ------------------------------------------------------------------------

def _q(shape, dev):
    return torch.empty(shape, dtype=FP8, device=dev), torch.empty(shape[:-1], dtype=torch.float32, device=dev)


@torch.library.register_fake(f"{_NS}::norm_scale_shift_fp8")
def _norm_scale_shift_fp8_fake(x, shift, scale, index=None, eps=1e-6, norm="layer"):
    _check_norm_scale_shift_fp8(x, shift, scale, index, eps, norm)
    refuse_grad("norm_scale_shift_fp8", TRACING, ("x", x), ("shift", shift), ("scale", scale))
    return _q(x.shape, x.device)


@torch.library.register_fake(f"{_NS}::dual_norm_scale_shift_fp8")
def _dual_norm_scale_shift_fp8_fake(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    _check_dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    refuse_grad("dual_norm_scale_shift_fp8", TRACING, ("x_a", xa), ("shift_a", sha), ("scale_a", sca), ("x_b", xb),
                ("shift_b", shb), ("scale_b", scb))
    return (*_q(xa.shape, xa.device), *_q(xb.shape, xb.device))


@torch.library.register_fake(f"{_NS}::gate_residual_norm_scale_shift_fp8")
def _grns_fp8_fake(residual, update, gate, shift, scale, index=None, eps=1e-6):
    _check_grns_fp8(residual, update, gate, shift, scale, index, eps)
    refuse_grad("gate_residual_norm_scale_shift_fp8", TRACING, ("residual", residual), ("update", update),
                ("gate", gate), ("shift", shift), ("scale", scale))
    return (residual.new_empty(residual.shape), *_q(residual.shape, residual.device))


@torch.library.register_fake(f"{_NS}::dual_gate_residual_norm_scale_shift_fp8")
def _dual_grns_fp8_fake(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    _check_dual_grns_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    refuse_grad("dual_gate_residual_norm_scale_shift_fp8", TRACING, ("residual_a", ra), ("update_a", ua),
                ("gate_a", ga), ("shift_a", sha), ("scale_a", sca), ("residual_b", rb), ("update_b", ub),
                ("gate_b", gb), ("shift_b", shb), ("scale_b", scb))
    return (ra.new_empty(ra.shape), *_q(ra.shape, ra.device), rb.new_empty(rb.shape), *_q(rb.shape, rb.device))


@torch.library.register_fake(f"{_NS}::quantize_fp8")
def _quantize_fp8_fake(x, bias=None, activation="none"):
    _check_quantize_fp8(x, bias, activation)
    refuse_grad("quantize_fp8", TRACING, ("x", x), ("bias", bias))
    return _q(x.shape, x.device)


@torch.library.register_fake(f"{_NS}::fp8_linear")
def _fp8_linear_fake(x, x_scale, weight, weight_scale, bias, out_dtype, activation="none", fast_accum=False):
    N = _check_fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)
    refuse_grad("fp8_linear", TRACING, ("bias", bias))
    return torch.empty((*x.shape[:-1], N), dtype=out_dtype, device=x.device)


@torch.library.register_fake(f"{_NS}::joint_fp8_linear")
def _joint_fp8_linear_fake(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                           img_weight, img_weight_scale, img_bias, out_dtype, fast_accum=False):
    B, Lt, Li, N = _check_joint_fp8_linear(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                                           img_weight, img_weight_scale, img_bias, out_dtype, fast_accum)
    refuse_grad("joint_fp8_linear", TRACING, ("txt_bias", txt_bias), ("img_bias", img_bias))
    return torch.empty((B, Lt + Li, N), dtype=out_dtype, device=txt.device)


@torch.library.register_fake(f"{_NS}::quantize_fp8_cat")
def _quantize_fp8_cat_fake(a, b, activation_b="none"):
    K = _check_quantize_fp8_cat(a, b, activation_b)
    refuse_grad("quantize_fp8_cat", TRACING, ("a", a), ("b", b))
    return _q((*b.shape[:-1], K), b.device)


@torch.library.register_fake(f"{_NS}::gate_residual_layer_norm_fp8")
def _grln_fp8_fake(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    _check_grln_fp8(residual, update, gate, index, weight, bias, eps)
    refuse_grad("gate_residual_layer_norm_fp8", TRACING, ("residual", residual), ("update", update), ("gate", gate),
                ("weight", weight), ("bias", bias))
    return (residual.new_empty(residual.shape), *_q(residual.shape, residual.device))


# --- public Python API ----------------------------------------------------------------------------------

def norm_scale_shift_fp8(x, shift, scale, index=None, eps=1e-6, norm="layer"):
    """(q, q_scale): :func:`~fused_dit_ops.ops.modulation.norm_scale_shift` (no weight/bias) as
    float8_e4m3fn values [B, L, C] and one fp32 scale per token [B, L] (value ~= q * q_scale)."""
    return torch.ops.fused_dit.norm_scale_shift_fp8.default(x, shift, scale, index, eps, norm)


def dual_norm_scale_shift_fp8(x_a, shift_a, scale_a, index_a, eps_a, x_b, shift_b, scale_b, index_b, eps_b,
                              norm="layer"):
    """(q_a, q_scale_a, q_b, q_scale_b): :func:`norm_scale_shift_fp8` of two streams in one launch."""
    return torch.ops.fused_dit.dual_norm_scale_shift_fp8.default(x_a, shift_a, scale_a, index_a, eps_a, x_b, shift_b,
                                                                scale_b, index_b, eps_b, norm)


def gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index=None, eps=1e-6):
    """(residual_out, q, q_scale): residual_out = residual + gate_sel * update (residual's dtype); the
    modulated LayerNorm of residual_out as stored, as e4m3 values and per-token fp32 scales."""
    return torch.ops.fused_dit.gate_residual_norm_scale_shift_fp8.default(residual, update, gate, shift, scale,
                                                                         index, eps)


def dual_gate_residual_norm_scale_shift_fp8(residual_a, update_a, gate_a, shift_a, scale_a, index_a, eps_a,
                                            residual_b, update_b, gate_b, shift_b, scale_b, index_b, eps_b):
    """(residual_out_a, q_a, q_scale_a, residual_out_b, q_b, q_scale_b): two streams in one launch."""
    return torch.ops.fused_dit.dual_gate_residual_norm_scale_shift_fp8.default(
        residual_a, update_a, gate_a, shift_a, scale_a, index_a, eps_a,
        residual_b, update_b, gate_b, shift_b, scale_b, index_b, eps_b)


def quantize_fp8(x, bias=None, activation="none"):
    """(q, q_scale): per-row e4m3 quantisation of x [..., K] (+ bias [K], then GELU-tanh with
    ``activation="gelu_tanh"``), one pass."""
    return torch.ops.fused_dit.quantize_fp8.default(x, bias, activation)


def fp8_linear(x, x_scale, weight, weight_scale, bias=None, out_dtype=torch.bfloat16, activation="none",
               fast_accum=False):
    """act((x * x_scale) @ (weight * weight_scale).T + bias) in ``out_dtype``: x [..., K] e4m3 with
    x_scale fp32 [...]; weight [N, K] e4m3 with weight_scale fp32 [N] (see :func:`quantize_weight`);
    bias [N] in out_dtype or None. CUDA: ``torch._scaled_mm`` with row-wise scales (bfloat16 output)
    and ``use_fast_accum=fast_accum``; the CPU reference accumulates in fp32 and ignores ``fast_accum``."""
    _check_fast_accum("fp8_linear", fast_accum)
    return torch.ops.fused_dit.fp8_linear.default(x, x_scale, weight, weight_scale, bias, out_dtype, activation,
                                                 fast_accum)


def joint_fp8_linear(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias, img_weight,
                     img_weight_scale, img_bias, out_dtype=torch.bfloat16, fast_accum=False):
    """[B, Lt + Li, N]: the text stream's FP8 projection in rows [0, Lt), the image stream's (its own
    weight) in rows [Lt, Lt + Li) of one new buffer (on CUDA each GEMM writes its rows in place);
    ``fast_accum`` as in :func:`fp8_linear`."""
    _check_fast_accum("joint_fp8_linear", fast_accum)
    return torch.ops.fused_dit.joint_fp8_linear.default(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale,
                                                       txt_bias, img_weight, img_weight_scale, img_bias, out_dtype,
                                                       fast_accum)


def quantize_fp8_cat(a, b, activation_b="none"):
    """(q, q_scale): per-row e4m3 quantisation of ``[a | act(b)]`` without the cat (a [..., Ka], b
    [..., Kb] with the same leading dims; act "none", "gelu_tanh" or "swiglu": silu of b's first half
    times its second half), one scale per row over both parts; q [..., Ka + Kb'] contiguous. A
    single-stream block's output-projection input [attention | activated MLP] in one pass. ``a``
    None: act(b) alone (e.g. a SwiGLU MLP's second GEMM input)."""
    return torch.ops.fused_dit.quantize_fp8_cat.default(a, b, activation_b)


def gate_residual_layer_norm_fp8(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    """(residual_out, q, q_scale): :func:`~fused_dit_ops.ops.gate_residual_norm.gate_residual_layer_norm`
    with the affine LayerNorm of residual_out written as e4m3 values and per-token fp32 scales."""
    return torch.ops.fused_dit.gate_residual_layer_norm_fp8.default(residual, update, gate, index, weight, bias, eps)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor):
    """(w_q float8_e4m3fn [N, K], w_scale fp32 [N]) of a Linear weight [N, K]: per output channel,
    ``w_scale = amax(row) / 448``. Runs where the weight is (fp32 math, one-off at patch time)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    return ref.quantize_fp8_weight(weight)
