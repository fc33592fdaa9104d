"""The ops' eager fast path: the one place that decides "CUDA eager: launch without dispatch".

Each function here has its op's name and positional signature. When :func:`fast` holds (CUDA
tensors, eager, grad mode off, no torch.compile tracing, no Python dispatch mode, no torch.profiler)
it runs the op's own input check (the validator its registered implementations run, so a bad
input gets the same ``FusedDitInputError``) and then the op's kernel launcher, skipping the
dispatcher (40-80 us of host time per op measured on H100 hosts; small images are bound by
host time). Otherwise it calls ``torch.ops.fused_dit.<op>``: what torch.compile traces, the CPU runs (the
references), and torch.profiler and dispatch modes see.

Two functions skip the check on the fast path, for buffers the caller built itself in the same
call: :func:`joint_linear_unchecked` (activations the modulation ops just wrote, weights the caller
packed) and :func:`attention_unchecked` (q, k, v views of the joint buffer ``joint_linear`` just
returned). Elsewhere they are checked (:func:`attention` runs the op's check, remembered as below,
then the backend ``attention_dispatch.select`` picks).

The checks run through :func:`_check`, which remembers the metadata signatures that passed: a
repeated call with the same shapes, strides, dtypes, devices and scalar arguments (every block of
a forward, every step) skips the validator. Sound because these validators read only that (with
grad mode off, which the fast path requires); a bad input never passes, so it is never remembered
and raises the op's own error every time.

The integrations (``fused_dit_ops.integrations``) call these; only this module and the ops'
registrations import ``fused_dit_ops.kernels`` (lazily: triton is needed on CUDA only).
"""
from __future__ import annotations

import torch

from .. import attention_dispatch as _attn
from . import attention as _attn_op
from . import linear as _linear
from . import modulation as _mod
from . import qk_norm_across_heads as _qkah
from . import gate_residual_norm as _grln
from . import rope as _rope
from . import swiglu as _swiglu

# resolved at import (the schemas are declared by then): dynamo cannot trace their lookup, and a
# compiled block may be the first caller (eager CUDA calls take the launchers)
_NSS = torch.ops.fused_dit.norm_scale_shift.default
_DNSS = torch.ops.fused_dit.dual_norm_scale_shift.default
_GRNS = torch.ops.fused_dit.gate_residual_norm_scale_shift.default
_DGRNS = torch.ops.fused_dit.dual_gate_residual_norm_scale_shift.default
_GR = torch.ops.fused_dit.gate_residual.default
_JQK = torch.ops.fused_dit.joint_qk_norm_rope_.default
_QKC = torch.ops.fused_dit.qk_norm_rope_cat.default
_ATTN = torch.ops.fused_dit.attention.default
_JL = torch.ops.fused_dit.joint_linear.default
_SWL = torch.ops.fused_dit.swiglu_linear.default
_QKAH = torch.ops.fused_dit.qk_norm_rope_across_heads.default
_GRLN = torch.ops.fused_dit.gate_residual_layer_norm.default


def fast(x: torch.Tensor) -> bool:
    """May ops on ``x`` skip dispatch? Eager CUDA inference only: grad mode off (the ops have no
    backward), not while torch.compile traces, no Python dispatch mode (FlopCounterMode, fake
    tensors) that must see each op, and not under torch.profiler (whose op names and shapes
    ``fused_dit_ops profile`` reads)."""
    return (not torch.compiler.is_compiling() and x.is_cuda and not torch.is_grad_enabled()
            and not torch._C._len_torch_dispatch_stack() and not torch.autograd._profiler_enabled())


# --- the checks, remembered per metadata signature -------------------------------------------------
# Host time: the validator of dual_gate_residual_norm_scale_shift (12 tensors) costs ~20 us of Python,
# its signature ~5 us. The validators used here read of their arguments only the type, and of tensors
# the shape, strides, dtype and device (rules on requires-grad run with grad mode on only, and then the
# signature is not used); a validator that reads more (tensor data, e.g. rope's CPU positions, or the
# environment) must not be called through _check.

_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_SCALAR_TYPES = (float, int, bool, str, type(None))
_PASSED: set = set()
_PASSED_MAX = 4096  # distinct signatures remembered (then forgotten at once): per-request shapes vary


def _signature(args):
    """What the validators read of ``args``, hashable; None where an argument is of another kind (a
    tensor subclass, a 0-dim tensor standing for a number, a SymInt, ...): then the check runs."""
    sig = []
    for a in args:
        ta = type(a)
        if ta in _TENSOR_TYPES:
            shape = a.shape
            if not shape:
                return None
            sig.append((shape, a.stride(), a.dtype, a.device))
        elif ta in _SCALAR_TYPES:
            sig.append((ta, a))
        else:
            return None
    return tuple(sig)


def _check(validator, *args) -> None:
    """``validator(*args)``, unless arguments of the same signature passed it before (grad mode off)."""
    if torch.is_grad_enabled():
        validator(*args)
        return
    sig = _signature(args)
    if sig is None:
        validator(*args)
        return
    key = (validator, sig)
    if key in _PASSED:
        return
    validator(*args)
    if len(_PASSED) >= _PASSED_MAX:
        _PASSED.clear()
    _PASSED.add(key)


def norm_scale_shift(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    if not fast(x):
        return _NSS(x, shift, scale, index, weight, bias, eps, norm)
    _check(_mod._check_norm_scale_shift, x, shift, scale, index, weight, bias, eps, norm)
    from ..kernels import modulation as km
    return km.norm_scale_shift(x, shift, scale, index, weight, bias, eps, norm)


def dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    if not fast(xa):
        return _DNSS(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    _check(_mod._check_dual_norm_scale_shift, xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    from ..kernels import modulation as km
    return km.dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)


def gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index=None, eps=1e-6):
    if not fast(residual):
        return _GRNS(residual, update, gate, shift, scale, index, eps)
    _check(_mod._check_gate_residual_norm_scale_shift, residual, update, gate, shift, scale, index, eps)
    from ..kernels import modulation as km
    return km.gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index, eps)


def dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    if not fast(ra):
        return _DGRNS(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    _check(_mod._check_dual_gate_residual_norm_scale_shift, ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib,
           eps_b)
    from ..kernels import modulation as km
    return km.dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)


def gate_residual(residual, update, gate, index=None):
    if not fast(residual):
        return _GR(residual, update, gate, index)
    _check(_mod._check_gate_residual, residual, update, gate, index)
    # the C++ kernel when built: CUDA tensors of one dtype (the fast path on CPU tensors is for tests)
    if _mod._GATE_RESIDUAL_CPP is not None and gate.dtype == residual.dtype and residual.is_cuda:
        return _mod._GATE_RESIDUAL_CPP(residual, update, gate, index)
    from ..kernels import modulation as km
    return km.gate_residual(residual, update, gate, index)


def joint_qk_norm_rope_(q, k, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps=1e-6, interleaved=True):
    if not fast(q):
        return _JQK(q, k, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps, interleaved)
    _check(_rope._check_joint_qk_norm_rope, q, k, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps)
    from ..kernels import rope as kr
    kr.joint_qk_norm_rope_(q, k, txt_len, (wqt, wkt, wqi, wki), (txt_tab, img_tab), eps, interleaved)


def gate_residual_layer_norm(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    if not fast(residual):
        return _GRLN(residual, update, gate, index, weight, bias, eps)
    _check(_grln._check, residual, update, gate, index, weight, bias, eps)
    from ..kernels import gate_residual_norm as kg
    return kg.gate_residual_layer_norm(residual, update, gate, index, weight, bias, eps)


def qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    if not fast(q):
        return _QKAH(q, k, q_weight, k_weight, cos_sin, heads, eps, interleaved)
    _check(_qkah._check, q, k, q_weight, k_weight, cos_sin, heads, eps)
    from ..kernels import qk_norm_across_heads as kq
    return kq.qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin, heads, eps, interleaved)


def qk_norm_rope_cat(*args):
    """q/k/v from module calls (not the caller's own buffers): the op, with its checks."""
    return _QKC(*args)


def attention(q, k, v, softmax_scale=None, causal=False, backend=None):
    """q, k, v of any origin: the op's checks, then the selected backend (the op itself off the fast
    path, and for the empty cases it handles)."""
    if not fast(q):
        return _ATTN(q, k, v, softmax_scale, causal, backend)
    _check(_attn_op._check_attention, q, k, v, softmax_scale, causal, backend)
    if q.numel() == 0 or k.shape[1] == 0:
        return _ATTN(q, k, v, softmax_scale, causal, backend)
    return _attn.run_backend(_attn.select(q, k, v, causal, backend), q, k, v, softmax_scale, causal)


def joint_linear_unchecked(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """``joint_linear`` on the caller's own inputs: unchecked on the fast path."""
    if not fast(txt):
        return _JL(txt, img, txt_weights, txt_biases, img_weights, img_biases)
    return _linear.joint_linear_unchecked(txt, img, txt_weights, txt_biases, img_weights, img_biases)


def attention_unchecked(q, k, v, softmax_scale=None, causal=False, backend=None):
    """``attention`` on views of the caller's own joint buffer: unchecked on the fast path."""
    if not fast(q):
        return _ATTN(q, k, v, softmax_scale, causal, backend)
    return _attn.run_backend(_attn.select(q, k, v, causal, backend), q, k, v, softmax_scale, causal)


# --- FP8: the quantising norm ops (checked) and the FP8 GEMMs on the caller's own buffers ----------

_F8 = None
_DNSS8 = torch.ops.fused_dit.dual_norm_scale_shift_fp8.default
_DGRNS8 = torch.ops.fused_dit.dual_gate_residual_norm_scale_shift_fp8.default
_Q8 = torch.ops.fused_dit.quantize_fp8.default
_L8 = torch.ops.fused_dit.fp8_linear.default
_JL8 = torch.ops.fused_dit.joint_fp8_linear.default


def _f8():
    global _F8
    if _F8 is None:
        from . import fp8
        _F8 = fp8
    return _F8


def dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer"):
    if not fast(xa):
        return _DNSS8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    _check(_f8()._check_dual_norm_scale_shift_fp8, xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)
    from ..kernels import fp8 as k8
    return k8.dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm)


def dual_gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b):
    if not fast(ra):
        return _DGRNS8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    _check(_f8()._check_dual_grns_fp8, ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)
    from ..kernels import fp8 as k8
    return k8.dual_gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b)


def quantize_fp8(x, bias=None, activation="none"):
    if not fast(x):
        return _Q8(x, bias, activation)
    _check(_f8()._check_quantize_fp8, x, bias, activation)
    from ..kernels import fp8 as k8
    return k8.quantize_rows(x, bias, activation == "gelu_tanh")


_NSS8 = torch.ops.fused_dit.norm_scale_shift_fp8.default
_GRNS8 = torch.ops.fused_dit.gate_residual_norm_scale_shift_fp8.default
_Q8C = torch.ops.fused_dit.quantize_fp8_cat.default
_GRLN8 = torch.ops.fused_dit.gate_residual_layer_norm_fp8.default


def norm_scale_shift_fp8(x, shift, scale, index=None, eps=1e-6, norm="layer"):
    if not fast(x):
        return _NSS8(x, shift, scale, index, eps, norm)
    _check(_f8()._check_norm_scale_shift_fp8, x, shift, scale, index, eps, norm)
    from ..kernels import fp8 as k8
    return k8.norm_scale_shift_fp8(x, shift, scale, index, eps, norm)


def gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index=None, eps=1e-6):
    if not fast(residual):
        return _GRNS8(residual, update, gate, shift, scale, index, eps)
    _check(_f8()._check_grns_fp8, residual, update, gate, shift, scale, index, eps)
    from ..kernels import fp8 as k8
    return k8.gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index, eps)


def quantize_fp8_cat(a, b, activation_b="none"):
    if not fast(b):
        return _Q8C(a, b, activation_b)
    _check(_f8()._check_quantize_fp8_cat, a, b, activation_b)
    from ..kernels import fp8 as k8
    return k8.quantize_cat(a, b, activation_b)


def gate_residual_layer_norm_fp8(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6):
    if not fast(residual):
        return _GRLN8(residual, update, gate, index, weight, bias, eps)
    _check(_f8()._check_grln_fp8, residual, update, gate, index, weight, bias, eps)
    from ..kernels import fp8 as k8
    return k8.gate_residual_layer_norm_fp8(residual, update, gate, index, weight, bias, eps)


def fp8_linear_unchecked(x, x_scale, weight, weight_scale, bias, out_dtype, activation="none", fast_accum=False):
    """``fp8_linear`` on activations the caller's quantising op just wrote and weights it quantised at
    patch time: unchecked on the fast path."""
    if not fast(x):
        return _L8(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)
    return _f8().fp8_linear_unchecked(x, x_scale, weight, weight_scale, bias, out_dtype, activation, fast_accum)


def joint_fp8_linear_unchecked(txt, txt_scale, img, img_scale, wt, wst, bt, wi, wsi, bi, out_dtype, fast_accum=False):
    """``joint_fp8_linear`` on the caller's own buffers: unchecked on the fast path."""
    if not fast(txt):
        return _JL8(txt, txt_scale, img, img_scale, wt, wst, bt, wi, wsi, bi, out_dtype, fast_accum)
    return _f8().joint_fp8_linear_unchecked(txt, txt_scale, img, img_scale, wt, wst, bt, wi, wsi, bi, out_dtype,
                                            fast_accum)


# --- FP8 attention: the quantising QK norm + RoPE (checked) and FA3 on its outputs -------------------

_A8 = None
_JQK8 = torch.ops.fused_dit.joint_qk_norm_rope_fp8.default
_ATT8 = torch.ops.fused_dit.attention_fp8.default


def _a8():
    global _A8
    if _A8 is None:
        from . import attention_fp8
        _A8 = attention_fp8
    return _A8


def joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps=1e-6, interleaved=True):
    if not fast(q):
        return _JQK8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps, interleaved)
    _check(_a8()._check_joint_qk_norm_rope_fp8, q, k, v, txt_len, wqt, wkt, wqi, wki, txt_tab, img_tab, eps)
    from ..kernels import attention_fp8 as ka
    return ka.joint_qk_norm_rope_fp8(q, k, v, txt_len, (wqt, wkt, wqi, wki), (txt_tab, img_tab), eps, interleaved)


_QH8 = torch.ops.fused_dit.quantize_fp8_heads.default


def quantize_fp8_heads(x):
    if not fast(x):
        return _QH8(x)
    _check(_a8()._check_quantize_fp8_heads, x)
    from ..kernels import attention_fp8 as ka
    return ka.quantize_heads(x)


def attention_fp8_unchecked(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                            out_dtype=torch.bfloat16):
    """``attention_fp8`` on the outputs ``joint_qk_norm_rope_fp8`` or ``quantize_fp8_heads`` just returned:
    unchecked on the fast path."""
    if not fast(q):
        return _ATT8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)
    return _a8().attention_fp8_cuda_unchecked(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal,
                                              out_dtype)


def swiglu_linear(x, weight, bias=None, backend=None):
    if not fast(x):
        return _SWL(x, weight, bias, backend)
    _check(_swiglu._check_swiglu_linear, x, weight, bias, backend)
    return _swiglu.swiglu_linear_cuda_unchecked(x, weight, bias, backend)
