"""FP8 attention: e4m3 q, k, v with one fp32 descale per (batch, head), and attention on them.

Schemas live in ``fused_dit_ops._schemas``; semantics in :mod:`fused_dit_ops.reference`
(``joint_qk_norm_rope_fp8``, ``attention_fp8``).

- ``joint_qk_norm_rope_fp8(q, k, v, txt_len, ...)``: the joint QK RMSNorm + RoPE of
  ``joint_qk_norm_rope_`` (same arguments, plus v) written as new contiguous e4m3 tensors
  [B, N, H, D] with descales fp32 [B, H] (value ~= e4m3 * descale[b, h]). q and k use a static scale
  that needs no pass over the data: after an RMSNorm with weight w every rotated pair of a head has
  norm <= sqrt(D) * max|w| (the normalised row has rms 1; RoPE keeps pair norms), so
  ``scale = sqrt(D) * max|w| (both streams) * (1 + 2^-6) / 448`` never saturates (the margin covers
  diffusers' 16-bit roundings). v (the projection output, unbounded) uses its amax over the tokens
  and head_dim of each (batch, head): a reduction kernel over v, then the cast in the q/k kernel.
  Inputs are read through their strides (column views of the joint projection) and not modified.
- ``quantize_fp8_heads(x)``: x [B, N, H, D] as e4m3 with a descale per (batch, head) from its amax
  (a reduction kernel, then the cast): q, k and v where the QK norm is not per head (Wan);
- ``attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)``:
  softmax(q k^T * scale) v of the dequantised inputs. CUDA: FlashAttention-3's FP8 forward (fa3-fwd
  or flash_attn_3; sm90), which returns bfloat16 and also rounds the softmax probabilities to e4m3 for
  the PV product; without it the CUDA implementation raises ``AttentionBackendError`` with the reason
  (see :func:`fp8_attention_unavailable_reason`). CPU: the reference (dequantise, fp32 math).
  Descales are [B, Hkv] (FA3's layout: the q descale is per kv head too).

Both ops need head_dim a multiple of 16 (FA3's FP8 kernels) and at most 256.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import attention_dispatch as dispatch
from .. import reference as ref
from .._validation import (TRACING, check_heads, check_last_dim_contiguous, check_like, check_one_device,
                           check_same_heads, check_tensor, fail, no_backward, refuse_grad)
from .fp8 import _check_fp8_device
from .rope import _check_norm_rope_params

_NS = "fused_dit"
FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def _check_head_dim(op, name, D):
    if D % 16 or D > MAX_HEAD_DIM:
        fail(op, f"'{name}' head_dim must be a multiple of 16 and <= {MAX_HEAD_DIM} (FlashAttention-3's FP8 "
                 f"kernels), got {D}")


# --- validators ------------------------------------------------------------------------------------

def _check_joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps):
    op = "joint_qk_norm_rope_fp8"
    check_one_device(op, ("q", q), ("k", k), ("v", v), ("txt_q_weight", wqt), ("txt_k_weight", wkt),
                     ("img_q_weight", wqi), ("img_k_weight", wki), ("txt_cos_sin", txt_cos_sin),
                     ("img_cos_sin", img_cos_sin))
    check_heads(op, "q", q, ndim=4)
    check_same_heads(op, "k", k, "q", q, seq_dim=None)
    check_same_heads(op, "v", v, "q", q, seq_dim=None)
    _check_fp8_device(op, "q", q)
    B, N, H, D = q.shape
    _check_head_dim(op, "q", D)
    if not 0 <= txt_len <= N:
        fail(op, f"'txt_len' must be in [0, N] = [0, {N}], got {txt_len}")
    _check_norm_rope_params(op, D, txt_len, N - txt_len, q, (wqt, wkt, wqi, wki), txt_cos_sin, img_cos_sin, eps)


def _check_quantize_fp8_heads(x):
    op = "quantize_fp8_heads"
    check_heads(op, "x", x, ndim=4)
    _check_fp8_device(op, "x", x)
    _check_head_dim(op, "x", x.shape[-1])


def _check_descale(op, name, d, B, Hkv, ref_name, ref_t):
    check_tensor(op, name, d, ndim=2, dtypes=(torch.float32,))
    check_like(op, name, d, ref_name, ref_t, dtype=False)
    if tuple(d.shape) != (B, Hkv):
        fail(op, f"'{name}' must be fp32 [B, Hkv] = [{B}, {Hkv}] (one descale per batch and kv head), got "
                 f"{list(d.shape)}")


def _check_attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype):
    op = "attention_fp8"
    check_one_device(op, ("q", q), ("k", k), ("v", v), ("q_descale", q_descale), ("k_descale", k_descale),
                     ("v_descale", v_descale))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4, dtypes=(FP8,))
        check_last_dim_contiguous(op, name, t)
    check_like(op, "k", k, "q", q)
    check_like(op, "v", v, "q", q)
    B, Sq, H, D = q.shape
    Bk, Sk, Hkv, Dk = k.shape
    if Bk != B:
        fail(op, f"'k' batch size must equal q's B={B}, got k of shape {list(k.shape)}")
    if Dk != D:
        fail(op, f"'k' head_dim must equal q's D={D}, got k of shape {list(k.shape)}")
    if Hkv == 0 and H != 0 or Hkv != 0 and H % Hkv:
        fail(op, f"'k' heads Hkv must divide q's heads H={H} (GQA), got Hkv={Hkv}")
    if v.shape != k.shape:
        fail(op, f"'v' must have the shape of 'k' {list(k.shape)} ([B, Sk, Hkv, D]), got {list(v.shape)}")
    _check_head_dim(op, "q", D)
    _check_fp8_device(op, "q", q)
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        _check_descale(op, name, d, B, Hkv, "q", q)
    if causal and Sq != Sk:
        fail(op, f"'causal'=True needs Sq == Sk, got Sq={Sq}, Sk={Sk}")
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        fail(op, f"'softmax_scale' must be a finite number > 0 or None, got {softmax_scale}")
    if out_dtype not in OUT_DTYPES:
        fail(op, f"'out_dtype' must be one of ({', '.join(map(_dt, OUT_DTYPES))}), got {out_dtype}")
    if q.device.type == "cuda" and out_dtype != torch.bfloat16:
        fail(op, f"'out_dtype' must be bfloat16 on CUDA (FlashAttention-3's FP8 forward returns bfloat16), "
                 f"got {_dt(out_dtype)}")


# --- FlashAttention-3 FP8 --------------------------------------------------------------------------

def _fa3_fp8_built(modname: str) -> bool:
    """Does this FA3 build have its FP8 kernels (fa3-fwd and upstream record FLASHATTENTION_DISABLE_FP8)?"""
    cfg_name = "fa3_fwd_config" if modname == "fa3_fwd_interface" else "flash_attn_config"
    cfg, _ = dispatch._import(cfg_name)
    try:
        flags = (getattr(cfg, "CONFIG", {}) or {}).get("build_flags", {}) if cfg else {}
        return not flags.get("FLASHATTENTION_DISABLE_FP8", False)
    except Exception:  # noqa: BLE001  (an odd config: assume the default build, which has FP8)
        return True


def fp8_attention_unavailable_reason(device=None, caps: dispatch.Capabilities | None = None) -> str | None:
    """Why ``attention_fp8`` cannot run on CUDA ``device`` (None: FlashAttention-3 with FP8 kernels is
    importable and the GPU is sm90). ``caps``: a capability table instead of probing (tests)."""
    caps = caps if caps is not None else dispatch.runtime_capabilities(device or "cuda")
    if caps.device_type != "cuda":
        return f"FP8 attention runs FlashAttention-3 on CUDA (device {caps.device_type})"
    if caps.device_error:
        return caps.device_error
    if caps.fa3 is None:
        return f"FlashAttention-3 is not importable ({caps.why_missing('fa3')})"
    sm = caps.sm or (0, 0)
    if sm[0] != 9:
        return f"FlashAttention-3 needs sm90 (Hopper), got sm{sm[0]}{sm[1]}"
    if not _fa3_fp8_built(caps.fa3):
        return f"this FlashAttention-3 build ({caps.fa3}) has no FP8 kernels (FLASHATTENTION_DISABLE_FP8)"
    return None


@functools.lru_cache(maxsize=None)
def _reason_for(device_type: str, index):
    return fp8_attention_unavailable_reason(torch.device(device_type, index) if index is not None else device_type)


_FA3_DESCALE_OP: dict = {}


def _fa3_fp8_op(mod):
    """fa3-fwd's registered forward op when its schema takes the descales, else None."""
    key = id(mod)
    if key not in _FA3_DESCALE_OP:
        op = dispatch._fa3_raw_forward(mod)
        try:
            names = {a.name for a in op._schema.arguments} if op is not None else set()
        except Exception:  # noqa: BLE001
            names = set()
        _FA3_DESCALE_OP[key] = op if {"q_descale", "k_descale", "v_descale"} <= names else None
    return _FA3_DESCALE_OP[key]


def attention_fp8_cuda_unchecked(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                                 out_dtype=torch.bfloat16):
    """FlashAttention-3's FP8 forward on checked inputs (raises AttentionBackendError without it)."""
    dev = q.device
    why = _reason_for(dev.type, dev.index)  # CUDA tensors carry their device index
    if why is not None:
        raise dispatch.AttentionBackendError(f"fused_dit.attention_fp8: {why}; run attention in bfloat16 "
                                             f"(patch(..., attention_precision='bf16'))")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=out_dtype, device=dev)
    if k.shape[1] == 0:
        return torch.zeros(q.shape, dtype=out_dtype, device=dev)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mod = dispatch._fa3_module()
    op = _fa3_fp8_op(mod)
    if op is not None:
        out = op(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, softmax_scale=scale,
                 is_causal=causal, num_splits=1)[0]
    else:
        out = mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, q_descale=q_descale,
                                  k_descale=k_descale, v_descale=v_descale)
        out = out[0] if isinstance(out, tuple) else out
    return out if out.is_contiguous() else out.contiguous()


def _grad(op, out, *inputs):
    return no_backward(op, out, *inputs) if torch.is_grad_enabled() else out


@torch.library.impl(f"{_NS}::joint_qk_norm_rope_fp8", "CUDA")
def _joint_qk_norm_rope_fp8_cuda(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                                 interleaved=True):
    from ..kernels import attention_fp8 as ka
    _check_joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    out = ka.joint_qk_norm_rope_fp8(q, k, v, txt_len, (wqt, wkt, wqi, wki), (txt_cos_sin, img_cos_sin), eps,
                                    interleaved)
    return _grad("joint_qk_norm_rope_fp8", out, q, k, v, wqt, wkt, wqi, wki)


@torch.library.impl(f"{_NS}::quantize_fp8_heads", "CUDA")
def _quantize_fp8_heads_cuda(x):
    from ..kernels import attention_fp8 as ka
    _check_quantize_fp8_heads(x)
    return _grad("quantize_fp8_heads", ka.quantize_heads(x), x)


@torch.library.impl(f"{_NS}::attention_fp8", "CUDA")
def _attention_fp8_cuda(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                        out_dtype=torch.bfloat16):
    _check_attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)
    with torch.no_grad():
        out = attention_fp8_cuda_unchecked(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal,
                                           out_dtype)
    return _grad("attention_fp8", out, q_descale, k_descale, v_descale)


# --- CPU: the reference ----------------------------------------------------------------------------

@torch.library.impl(f"{_NS}::joint_qk_norm_rope_fp8", "CPU")
def _joint_qk_norm_rope_fp8_cpu(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                                interleaved=True):
    _check_joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    out = ref.joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps,
                                     interleaved)
    return _grad("joint_qk_norm_rope_fp8", out, q, k, v, wqt, wkt, wqi, wki)


@torch.library.impl(f"{_NS}::quantize_fp8_heads", "CPU")
def _quantize_fp8_heads_cpu(x):
    _check_quantize_fp8_heads(x)
    return _grad("quantize_fp8_heads", ref.quantize_fp8_heads(x), x)


@torch.library.impl(f"{_NS}::attention_fp8", "CPU")
def _attention_fp8_cpu(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                       out_dtype=torch.bfloat16):
    _check_attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)
    if q.numel() == 0:
        out = torch.empty(q.shape, dtype=out_dtype)
    elif k.shape[1] == 0:
        out = torch.zeros(q.shape, dtype=out_dtype)
    else:
        out = ref.attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)
    return _grad("attention_fp8", out, q_descale, k_descale, v_descale)


OPS = ("joint_qk_norm_rope_fp8", "attention_fp8", "quantize_fp8_heads")

# no backward (see ops/modulation.py): the dispatcher skips the Autograd key
for _op in OPS:
    torch.library.impl(f"{_NS}::{_op}", "Autograd")(torch.library.fallthrough_kernel)


# --- fake (torch.compile / meta) ---------------------------------------------------------------------

@torch.library.register_fake(f"{_NS}::joint_qk_norm_rope_fp8")
def _joint_qk_norm_rope_fp8_fake(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps=1e-6,
                                 interleaved=True):
    _check_joint_qk_norm_rope_fp8(q, k, v, txt_len, wqt, wkt, wqi, wki, txt_cos_sin, img_cos_sin, eps)
    refuse_grad("joint_qk_norm_rope_fp8", TRACING, ("q", q), ("k", k), ("v", v), ("txt_q_weight", wqt),
                ("txt_k_weight", wkt), ("img_q_weight", wqi), ("img_k_weight", wki))
    B, N, H, D = q.shape
    vals = [torch.empty((B, N, H, D), dtype=FP8, device=q.device) for _ in range(3)]
    return (*vals, *[torch.empty((B, H), dtype=torch.float32, device=q.device) for _ in range(3)])


@torch.library.register_fake(f"{_NS}::quantize_fp8_heads")
def _quantize_fp8_heads_fake(x):
    _check_quantize_fp8_heads(x)
    refuse_grad("quantize_fp8_heads", TRACING, ("x", x))
    B, N, H, D = x.shape
    return (torch.empty((B, N, H, D), dtype=FP8, device=x.device),
            torch.empty((B, H), dtype=torch.float32, device=x.device))


@torch.library.register_fake(f"{_NS}::attention_fp8")
def _attention_fp8_fake(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                        out_dtype=torch.bfloat16):
    _check_attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, out_dtype)
    refuse_grad("attention_fp8", TRACING, ("q_descale", q_descale), ("k_descale", k_descale),
                ("v_descale", v_descale))
    return torch.empty(q.shape, dtype=out_dtype, device=q.device)


# --- public Python API -------------------------------------------------------------------------------

def joint_qk_norm_rope_fp8(q, k, v, txt_len, txt_q_weight, txt_k_weight, img_q_weight, img_k_weight,
                           txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    """(q8, k8, v8, q_descale, k_descale, v_descale): joint q, k [B, N, H, D] through the QK RMSNorm +
    RoPE of :func:`~fused_dit_ops.ops.rope.joint_qk_norm_rope_` (rows < txt_len: the text weights and
    table), and v, as new contiguous float8_e4m3fn tensors with fp32 descales [B, H] (FlashAttention-3's
    layout). q / k: a static scale from the RMSNorm weights (no pass over the data; never saturates);
    v: its per-(batch, head) amax / 448. q, k, v are not modified."""
    txt_len = txt_len if isinstance(txt_len, torch.SymInt) else int(txt_len)
    return torch.ops.fused_dit.joint_qk_norm_rope_fp8.default(q, k, v, txt_len, txt_q_weight, txt_k_weight,
                                                             img_q_weight, img_k_weight, txt_cos_sin, img_cos_sin,
                                                             eps, interleaved)


def attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                  out_dtype=torch.bfloat16):
    """softmax(q k^T * scale) v of e4m3 q [B, Sq, H, D], k / v [B, Sk, Hkv, D] with fp32 descales
    [B, Hkv] (value = e4m3 * descale) -> [B, Sq, H, D] in ``out_dtype`` (bfloat16 on CUDA).
    CUDA: FlashAttention-3's FP8 forward (sm90); CPU: the reference (dequantise, fp32 math)."""
    return torch.ops.fused_dit.attention_fp8.default(q, k, v, q_descale, k_descale, v_descale, softmax_scale,
                                                    causal, out_dtype)


def quantize_fp8_heads(x):
    """(x8, descale): x [B, N, H, D] as a new contiguous float8_e4m3fn tensor with one fp32 descale per
    (batch, head) ([B, H], FlashAttention-3's layout): its amax over the tokens and head_dim / 448 (1 for
    an all-zero head; +inf for a head holding a NaN, so that every dequantised value of it is NaN).
    The q, k and v of :func:`attention_fp8` where the QK norm is not per head (Wan's norm across all
    heads). x is not modified."""
    return torch.ops.fused_dit.quantize_fp8_heads.default(x)
