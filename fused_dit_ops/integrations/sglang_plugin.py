"""SGLang diffusion plugin: route Qwen-Image(-Edit-2511) layers of ``sglang.multimodal_gen`` to our ops.

Targets ``sglang==0.5.23`` exactly (its ``multimodal_gen`` code moves fast; other versions are
refused by :func:`register` unless ``FUSED_DIT_SGLANG_ANY_VERSION=1``).

How it is switched on (it does nothing otherwise):

* through SGLang's plugin mechanism: the entry point ``fused_dit_ops`` in the group
  ``sglang.multimodal_gen.plugins`` (declared in our ``pyproject.toml``) is called by SGLang's
  ``load_plugins()``; it registers hooks only when ``FUSED_DIT_SGLANG=1``, or when
  ``FUSED_DIT_SGLANG`` is unset and ``SGLANG_PLUGINS`` names ``fused_dit_ops``.
  ``FUSED_DIT_SGLANG=0`` keeps it off even when named. SGLang then applies the hooks
  (``apply_plugin_hooks()``) before it builds the model.
* by hand, for users who build SGLang models themselves: :func:`enable` (registers and applies
  the hooks now; pass ``model=`` to rebind modules built before).

Every hook is an ``AROUND`` hook (``HookType.AROUND``) on SGLang's own function or method: it
keeps SGLang's signature and return convention, calls our op when it supports the input, and
otherwise *declines*: it calls SGLang's original code with the original arguments. Each call is
counted (:func:`stats`): handled, or declined with a reason.

Hooks (stats key -> target):

* ``ln_select01``: ``FusedLayerNormScaleShiftGateSelect01.forward_cuda`` -> ``norm_scale_shift``
  with the two parameter sets stacked [2B, C] and ``index``; the gate is selected with one
  ``torch.where``, as SGLang does, and remembered so that the next residual layer can fuse it.
* ``res_ln_select01``: ``FusedResidualLayerNormScaleShiftGateSelect01.forward_cuda`` ->
  ``gate_residual_norm_scale_shift`` when ``residual_gate`` is the gate our ``ln_select01`` hook
  returned for the same ``index`` (fused path, no affine norm); otherwise the residual add in
  torch plus ``norm_scale_shift`` (split path).
* ``norm_scale_shift``: ``LayerNormScaleShift.forward_cuda`` (text stream; image stream without
  index) -> ``norm_scale_shift``.
* ``res_norm_scale_shift``: ``ScaleResidualLayerNormScaleShift.forward_cuda`` ->
  ``gate_residual_norm_scale_shift`` (tensor gate [B, 1, C] or [B, C], no affine norm).
* ``qkv_epilogue``: ``try_fused_qwen_qkv_epilogue`` (QK RMSNorm + RoPE + joint [txt, img] write)
  -> a plain fp32-math RMSNorm written into the joint buffers, then ``fused_dit_ops.rope`` in
  place on the txt and img slices. (A fused ``qk_norm_rope_cat`` op is not routed yet.)
* ``qk_norm_rope``: ``apply_qk_norm_with_optional_rope`` (where the epilogue declines) -> the same
  RMSNorm + ``fused_dit_ops.rope``.
* ``attention``: ``FlashAttentionImpl.forward`` (the FA backend) -> ``fused_dit_ops.attention``.

The RoPE and attention ops are looked up on ``fused_dit_ops`` at call time; while they are
missing the hooks decline with reason ``"op unavailable"``.

SGLang binds ``CustomOp.forward_cuda`` per instance at construction (``_forward_method``): hooks
must be applied before the model is built (SGLang's plugin lifecycle does that), or call
:func:`rebind` on models built before.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter, defaultdict

import torch

logger = logging.getLogger(__name__)

PLUGIN_NAME = "fused_dit_ops"
SGLANG_VERSION = "0.5.23"
ENV_SWITCH = "FUSED_DIT_SGLANG"

_FSG = "sglang.multimodal_gen.runtime.layers.fused_scale_shift_gate"
_LN = "sglang.multimodal_gen.runtime.layers.layernorm"
TARGETS = {
    "ln_select01": f"{_FSG}.FusedLayerNormScaleShiftGateSelect01.forward_cuda",
    "res_ln_select01": f"{_FSG}.FusedResidualLayerNormScaleShiftGateSelect01.forward_cuda",
    "norm_scale_shift": f"{_LN}.LayerNormScaleShift.forward_cuda",
    "res_norm_scale_shift": f"{_LN}.ScaleResidualLayerNormScaleShift.forward_cuda",
    "qkv_epilogue": "sglang.kernels.ops.diffusion.rope.qwen_qkv_epilogue_jit.try_fused_qwen_qkv_epilogue",
    "qk_norm_rope": f"{_LN}.apply_qk_norm_with_optional_rope",
    "attention": "sglang.multimodal_gen.runtime.layers.attention.backends.flash_attn.FlashAttentionImpl.forward",
}
# CustomOp classes whose forward_cuda is hooked (for rebind()).
_CUSTOM_OP_CLASSES = ("ln_select01", "res_ln_select01", "norm_scale_shift", "res_norm_scale_shift")

OP_UNAVAILABLE = "op unavailable"

# --- state ------------------------------------------------------------------------------------------

_lock = threading.Lock()
_registered = False
_active = True  # hooks stay installed once applied; disable() makes them pass straight through
_handled: Counter = Counter()
_handled_by: dict = defaultdict(Counter)
_declined: dict = defaultdict(Counter)


def stats() -> dict:
    """Per hook: ``{"handled": n, "declined": {reason: n}, "paths": {path: n}}`` (all hooks listed)."""
    with _lock:
        return {name: {"handled": _handled[name], "declined": dict(_declined[name]),
                       "paths": dict(_handled_by[name])} for name in TARGETS}


def reset_stats() -> None:
    with _lock:
        _handled.clear()
        _handled_by.clear()
        _declined.clear()


def _count(name: str, path: str = "") -> None:
    with _lock:
        _handled[name] += 1
        if path:
            _handled_by[name][path] += 1


def _decline(name: str, reason: str) -> None:
    with _lock:
        _declined[name][reason] += 1


def _reason(e: Exception) -> str:
    # "fused_dit.<op>: <what>" -> keep it whole: it names the op and the constraint.
    return f"unsupported input: {e}"


# --- helpers ----------------------------------------------------------------------------------------

def _fdo():
    import fused_dit_ops
    return fused_dit_ops


def _op(name: str):
    return getattr(_fdo(), name, None)


def _input_error():
    return _fdo().FusedDitInputError


def _params_2d(p, B: int, C: int):
    """[B, C] or [B, 1, C] modulation parameter -> [B, C] view; None when it is anything else."""
    if not isinstance(p, torch.Tensor):
        return None
    if p.dim() == 3 and p.shape[1] == 1:
        p = p[:, 0]
    if p.dim() != 2 or tuple(p.shape) != (B, C):
        return None
    return p


def _index_for_op(index):
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        return index.to(torch.int32)
    return index


def _select_gate(gate0, gate1, index):
    """SGLang's gate: torch.where(index, gate1, gate0) broadcast to [B, L, C]."""
    idx = index.to(dtype=torch.bool).unsqueeze(-1)
    return torch.where(idx, gate1.unsqueeze(1), gate0.unsqueeze(1))


# Gates returned by the ln_select01 hook, so that res_ln_select01 can read [2B, C] parameters +
# index instead of the materialised [B, L, C] gate. Keyed by tensor identity (weak).
_gate_origin = None


def _gate_table():
    global _gate_origin
    if _gate_origin is None:
        from torch.utils.weak import WeakIdKeyDictionary
        _gate_origin = WeakIdKeyDictionary()
    return _gate_origin


def _version(t) -> int:
    """The version counter; -1 for an inference tensor (torch.inference_mode: none), matched by identity."""
    return -1 if t.is_inference() else t._version


def _remember_gate(gate, gate0, gate1, index):
    if torch.compiler.is_compiling():
        return
    _gate_table()[gate] = (gate0, gate1, index, _version(gate))


def _gate_params(residual_gate, index):
    """(gate [2B, C]) when residual_gate is a gate our ln_select01 hook made for this index."""
    if torch.compiler.is_compiling() or not isinstance(residual_gate, torch.Tensor):
        return None
    rec = _gate_table().get(residual_gate)
    if rec is None:
        return None
    gate0, gate1, idx, version = rec
    if idx is not index or _version(residual_gate) != version:
        return None
    return torch.cat([gate0, gate1], 0)


def _rms_norm(x, weight, eps):
    """SGLang RMSNorm.forward_native numerics: fp32 math, times weight in fp32, one rounding."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


# --- hooks (AROUND: hook(original, *args, **kwargs)) ---------------------------------------------------

def _ln_select01(original, self, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps):
    name = "ln_select01"
    if not _active:
        return original(self, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    fdo = _fdo()
    try:
        if x.dim() != 3 or not isinstance(index, torch.Tensor):
            raise fdo.FusedDitInputError("fused_dit.norm_scale_shift: x must be [B, L, C] with a tensor index")
        B, _, C = x.shape
        p = [_params_2d(t, B, C) for t in (scale0, shift0, gate0, scale1, shift1, gate1)]
        if any(t is None for t in p):
            raise fdo.FusedDitInputError("fused_dit.norm_scale_shift: select01 parameters must be [B, C]")
        scale0, shift0, gate0, scale1, shift1, gate1 = p
        y = fdo.norm_scale_shift(x, torch.cat([shift0, shift1], 0), torch.cat([scale0, scale1], 0),
                                 _index_for_op(index), weight, bias, float(eps), "layer")
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(self, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    gate = _select_gate(gate0, gate1, index)
    _remember_gate(gate, gate0, gate1, index)
    _count(name)
    return y, gate


def _res_ln_select01(original, self, x, residual, residual_gate, weight, bias, scale0, shift0, gate0,
                     scale1, shift1, gate1, index, eps):
    name = "res_ln_select01"
    args = (x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    if not _active:
        return original(self, *args)
    fdo = _fdo()
    try:
        if x.dim() != 3 or not isinstance(index, torch.Tensor) or not isinstance(residual_gate, torch.Tensor):
            raise fdo.FusedDitInputError(
                "fused_dit.gate_residual_norm_scale_shift: x must be [B, L, C], index and gate tensors")
        B, _, C = x.shape
        p = [_params_2d(t, B, C) for t in (scale0, shift0, gate0, scale1, shift1, gate1)]
        if any(t is None for t in p):
            raise fdo.FusedDitInputError("fused_dit.norm_scale_shift: select01 parameters must be [B, C]")
        scale0, shift0, gate0, scale1, shift1, gate1 = p
        shift = torch.cat([shift0, shift1], 0)
        scale = torch.cat([scale0, scale1], 0)
        op_index = _index_for_op(index)
        gparams = _gate_params(residual_gate, index) if weight is None and bias is None else None
        if gparams is not None:
            residual_out, y = fdo.gate_residual_norm_scale_shift(residual, x, gparams, shift, scale,
                                                                 op_index, float(eps))
            path = "fused"
        else:
            if residual_gate.shape != x.shape and residual_gate.dim() != 3:
                raise fdo.FusedDitInputError("fused_dit.norm_scale_shift: residual_gate must be 3-D")
            # fp32 math, one rounding (SGLang rounds the product, then the sum: <= 1 ulp apart).
            residual_out = (residual_gate.float() * x.float() + residual.float()).to(x.dtype)
            y = fdo.norm_scale_shift(residual_out, shift, scale, op_index, weight, bias, float(eps), "layer")
            path = "split"
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(self, *args)
    gate = _select_gate(gate0, gate1, index)
    _count(name, path)
    return y, residual_out, gate


def _norm_scale_shift(original, self, x, shift, scale):
    name = "norm_scale_shift"
    if not _active:
        return original(self, x, shift, scale)
    fdo = _fdo()
    try:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0:
            raise fdo.FusedDitInputError("fused_dit.norm_scale_shift: x must be a non-empty [B, L, C]")
        B, _, C = x.shape
        s, sc = _params_2d(shift, B, C), _params_2d(scale, B, C)
        if s is None or sc is None:
            raise fdo.FusedDitInputError(
                f"fused_dit.norm_scale_shift: shift/scale must be [B, C] or [B, 1, C] = [{B}, 1, {C}], got "
                f"{tuple(getattr(shift, 'shape', ()))} / {tuple(getattr(scale, 'shape', ()))}")
        y = fdo.norm_scale_shift(x, s, sc, None, getattr(self.norm, "weight", None),
                                 getattr(self.norm, "bias", None), float(self.eps), "layer")
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(self, x, shift, scale)
    _count(name)
    return y


def _res_norm_scale_shift(original, self, residual, x, gate, shift, scale):
    name = "res_norm_scale_shift"
    if not _active:
        return original(self, residual, x, gate, shift, scale)
    fdo = _fdo()
    try:
        if not isinstance(gate, torch.Tensor):
            raise fdo.FusedDitInputError(f"fused_dit.gate_residual_norm_scale_shift: int gate {gate!r}")
        if getattr(self.norm, "weight", None) is not None or getattr(self.norm, "bias", None) is not None:
            raise fdo.FusedDitInputError("fused_dit.gate_residual_norm_scale_shift: affine norm")
        if x.dim() != 3 or x.numel() == 0:
            raise fdo.FusedDitInputError("fused_dit.gate_residual_norm_scale_shift: x must be non-empty [B, L, C]")
        B, _, C = x.shape
        g, s, sc = (_params_2d(t, B, C) for t in (gate, shift, scale))
        if g is None or s is None or sc is None:
            raise fdo.FusedDitInputError(
                "fused_dit.gate_residual_norm_scale_shift: gate/shift/scale must be [B, C] or [B, 1, C]")
        residual_out, y = fdo.gate_residual_norm_scale_shift(residual, x, g, s, sc, None, float(self.eps))
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(self, residual, x, gate, shift, scale)
    _count(name)
    return y, residual_out


def _check_rope_cache(cache, L, D, device):
    return (isinstance(cache, torch.Tensor) and cache.dim() == 2 and cache.dtype == torch.float32
            and cache.device == device and cache.shape[0] >= L and cache.shape[1] % 2 == 0
            and 0 < cache.shape[1] <= D)


def _qkv_epilogue(original, img_q, img_k, img_v, txt_q, txt_k, txt_v, img_q_weight, img_k_weight,
                  txt_q_weight, txt_k_weight, img_cache, txt_cache, img_eps, txt_eps):
    name = "qkv_epilogue"
    args = (img_q, img_k, img_v, txt_q, txt_k, txt_v, img_q_weight, img_k_weight, txt_q_weight,
            txt_k_weight, img_cache, txt_cache, img_eps, txt_eps)
    if not _active:
        return original(*args)
    rope = _op("rope")
    if rope is None:
        _decline(name, OP_UNAVAILABLE)
        return original(*args)
    fdo = _fdo()
    try:
        ok = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in args[:6])
        if ok:
            B, Li, H, D = img_q.shape
            Lt = txt_q.shape[1]
            ok = (all(t.shape == img_q.shape for t in (img_k, img_v))
                  and all(t.shape == txt_q.shape for t in (txt_k, txt_v))
                  and txt_q.shape[0] == B and txt_q.shape[2:] == img_q.shape[2:]
                  and all(t.dtype == img_q.dtype and t.device == img_q.device for t in args[1:6])
                  and all(isinstance(w, torch.Tensor) and tuple(w.shape) == (D,)
                          for w in (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight))
                  and _check_rope_cache(img_cache, Li, D, img_q.device)
                  and _check_rope_cache(txt_cache, Lt, D, img_q.device))
        if not ok:
            raise fdo.FusedDitInputError("fused_dit.rope: qkv epilogue shapes/dtypes/caches not supported")
        jq = img_q.new_empty(B, Lt + Li, H, D)
        jk = torch.empty_like(jq)
        jv = torch.empty_like(jq)
        jq[:, :Lt] = _rms_norm(txt_q, txt_q_weight, txt_eps)
        jk[:, :Lt] = _rms_norm(txt_k, txt_k_weight, txt_eps)
        jq[:, Lt:] = _rms_norm(img_q, img_q_weight, img_eps)
        jk[:, Lt:] = _rms_norm(img_k, img_k_weight, img_eps)
        jv[:, :Lt] = txt_v
        jv[:, Lt:] = img_v
        rope(jq[:, :Lt], jk[:, :Lt], txt_cache, None, True)
        rope(jq[:, Lt:], jk[:, Lt:], img_cache, None, True)
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(*args)
    _count(name)
    return jq, jk, jv


def _qk_norm_rope(original, q, k, q_norm, k_norm, head_dim, cos_sin_cache=None, freqs_complex=None, *,
                  is_neox=False, positions=None, position_offset=0, allow_inplace=True,
                  allow_strided_qk=False):
    name = "qk_norm_rope"
    kw = dict(is_neox=is_neox, positions=positions, position_offset=position_offset,
              allow_inplace=allow_inplace, allow_strided_qk=allow_strided_qk)
    call = (q, k, q_norm, k_norm, head_dim, cos_sin_cache, freqs_complex)
    if not _active:
        return original(*call, **kw)
    if cos_sin_cache is None:
        _decline(name, "no cos_sin_cache (QK-norm only)")
        return original(*call, **kw)
    rope = _op("rope")
    if rope is None:
        _decline(name, OP_UNAVAILABLE)
        return original(*call, **kw)
    fdo = _fdo()
    try:
        ok = (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4
              and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1] == head_dim
              and k.dtype == q.dtype)
        for n in (q_norm, k_norm):
            ok = ok and (isinstance(getattr(n, "weight", None), torch.Tensor)
                         and tuple(n.weight.shape) == (head_dim,)
                         and isinstance(getattr(n, "variance_epsilon", None), float)
                         and getattr(n, "variance_size_override", None) is None
                         and not getattr(n, "cast_x_before_out_mul", False))
        ok = ok and _check_rope_cache(cos_sin_cache, 0, head_dim, q.device)
        if not ok:
            raise fdo.FusedDitInputError("fused_dit.rope: qk-norm/rope inputs not supported")
        B, L = q.shape[:2]
        if positions is not None:
            if positions.dim() != 1 or positions.numel() != B * L:
                raise fdo.FusedDitInputError("fused_dit.rope: positions must be 1-D of length B*L")
            pos = positions.to(device=q.device, dtype=torch.long).view(B, L)
        elif position_offset:
            pos = torch.arange(position_offset, position_offset + L, device=q.device)
        else:
            pos = None
        qn = _rms_norm(q, q_norm.weight, q_norm.variance_epsilon)
        kn = _rms_norm(k, k_norm.weight, k_norm.variance_epsilon)
        rope(qn, kn, cos_sin_cache, pos, not is_neox)
    except fdo.FusedDitInputError as e:
        _decline(name, _reason(e))
        return original(*call, **kw)
    _count(name)
    return qn, kn


def _attention(original, self, query, key, value, attn_metadata=None, *, return_softmax_lse=False):
    name = "attention"
    if not _active:
        return original(self, query, key, value, attn_metadata, return_softmax_lse=return_softmax_lse)
    attn = _op("attention")
    reason = None
    if attn is None:
        reason = OP_UNAVAILABLE
    elif return_softmax_lse:
        reason = "return_softmax_lse (ring attention)"
    else:
        try:
            if self._request_skip_softmax_threshold()[0]:
                reason = "skip-softmax requested"
        except Exception as e:  # noqa: BLE001  (no forward context etc.: let SGLang decide)
            reason = f"skip-softmax check failed: {type(e).__name__}"
    if reason is None and attn_metadata is not None:
        mq = getattr(attn_metadata, "max_seqlen_q", None)
        mk = getattr(attn_metadata, "max_seqlen_k", None)
        if (mq is not None and mq != query.shape[1]) or (mk is not None and mk != key.shape[1]):
            reason = "metadata max_seqlen differs from the tensors (varlen)"
    if reason is None:
        fdo = _fdo()
        try:
            out = attn(query, key, value, softmax_scale=self.softmax_scale, causal=bool(self.causal))
        except fdo.FusedDitInputError as e:
            reason = _reason(e)
    if reason is not None:
        _decline(name, reason)
        return original(self, query, key, value, attn_metadata, return_softmax_lse=return_softmax_lse)
    if attn_metadata is not None:  # as SGLang's forward does
        if getattr(attn_metadata, "max_seqlen_q", 0) is None:
            attn_metadata.max_seqlen_q = query.shape[1]
        if getattr(attn_metadata, "max_seqlen_k", 0) is None:
            attn_metadata.max_seqlen_k = key.shape[1]
    _count(name)
    return out


HOOKS = {
    "ln_select01": _ln_select01,
    "res_ln_select01": _res_ln_select01,
    "norm_scale_shift": _norm_scale_shift,
    "res_norm_scale_shift": _res_norm_scale_shift,
    "qkv_epilogue": _qkv_epilogue,
    "qk_norm_rope": _qk_norm_rope,
    "attention": _attention,
}


# --- switching on ---------------------------------------------------------------------------------------

def enabled_by_env() -> bool:
    """``FUSED_DIT_SGLANG`` (1/0) if set, else whether ``SGLANG_PLUGINS`` names ``fused_dit_ops``."""
    v = os.environ.get(ENV_SWITCH, "").strip().lower()
    if v:
        return v in ("1", "true", "yes", "on")
    names = {n.strip() for n in os.environ.get("SGLANG_PLUGINS", "").split(",")}
    return PLUGIN_NAME in names


def _check_version() -> None:
    import importlib.metadata as md
    try:
        v = md.version("sglang")
    except md.PackageNotFoundError:
        import sglang
        v = getattr(sglang, "__version__", "unknown")
    if v != SGLANG_VERSION and os.environ.get("FUSED_DIT_SGLANG_ANY_VERSION", "") != "1":
        raise RuntimeError(f"fused_dit_ops SGLang plugin targets sglang=={SGLANG_VERSION}, found {v}; "
                           f"set FUSED_DIT_SGLANG_ANY_VERSION=1 to try anyway")


def register() -> bool:
    """Register our AROUND hooks in SGLang's diffusion HookRegistry (once). Does not import targets."""
    global _registered, _active
    with _lock:
        if _registered:
            _active = True
            return False
        _check_version()
        from sglang.multimodal_gen.runtime.platforms.plugins import HookType, plugin_hook
        for name, target in TARGETS.items():
            plugin_hook(target, HookType.AROUND)(HOOKS[name])
        _registered = True
        _active = True
    logger.info("fused_dit_ops: registered %d SGLang hooks", len(TARGETS))
    return True


def sglang_plugin() -> None:
    """Entry point of the ``sglang.multimodal_gen.plugins`` group: registers only when enabled."""
    if not enabled_by_env():
        logger.info("fused_dit_ops SGLang plugin found but not enabled (set %s=1 or name %r in "
                    "SGLANG_PLUGINS)", ENV_SWITCH, PLUGIN_NAME)
        return
    register()


def is_applied(name: str) -> bool:
    """Whether the hook ``name`` is installed on its SGLang target right now."""
    import pkgutil
    obj_path, attr = TARGETS[name].rsplit(".", 1)
    fn = getattr(pkgutil.resolve_name(obj_path), attr)
    hook = HOOKS[name]
    while fn is not None:
        cell_fns = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
                    if callable(getattr(c, "cell_contents", None))]
        if hook in cell_fns:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def rebind(model) -> int:
    """Point modules built before the hooks were applied at the hooked ``forward_cuda``.

    Only modules dispatched to ``forward_cuda`` are touched (on other platforms SGLang never
    calls it). Returns how many modules were rebound.
    """
    import pkgutil
    classes = tuple(pkgutil.resolve_name(TARGETS[n].rsplit(".", 1)[0]) for n in _CUSTOM_OP_CLASSES)
    n = 0
    for m in model.modules():
        if isinstance(m, classes):
            fm = getattr(m, "_forward_method", None)
            if getattr(fm, "__self__", None) is m and getattr(fm, "__name__", "") == "forward_cuda":
                m._forward_method = m.forward_cuda
                n += 1
    return n


def enable(model=None) -> dict:
    """By hand: register and apply the hooks now (idempotent); ``model``: rebind its modules too.

    Returns :func:`stats`. Hooks are applied through SGLang's own ``HookRegistry``.
    """
    register()
    from sglang.multimodal_gen.runtime.platforms.plugins import HookRegistry
    HookRegistry.apply_hooks()
    missing = [n for n in TARGETS if not is_applied(n)]
    if missing:
        raise RuntimeError(f"fused_dit_ops: hooks not applied on {missing} (another registry state?)")
    if model is not None:
        rebind(model)
    return stats()


def disable() -> None:
    """Make every installed hook pass straight through to SGLang's code (hooks stay installed)."""
    global _active
    _active = False


def _reset_for_tests() -> None:
    """Forget registration (after ``HookRegistry.reset()``); installed wrappers stay on the classes."""
    global _registered, _active
    _registered = False
    _active = True
    reset_stats()
