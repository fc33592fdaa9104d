"""Make diffusers models run their attention through ``torch.ops.fused_dit.attention``.

Two entry points:

- :class:`FusedQwenDoubleStreamAttnProcessor` + :func:`use_fused_attention`: an attention
  processor for Qwen-Image(-Edit) double-stream blocks with the call signature and semantics of
  diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (0.42): per-stream q/k/v projections, QK
  RMSNorm, RoPE, joint ``[text, image]`` attention, split, output projections. The joint
  attention is our op when there is no text mask (B=1 inference); with an
  ``encoder_hidden_states_mask`` or a context-parallel config it falls back to diffusers'
  ``dispatch_attention_fn`` and counts it (``processor.fallbacks``, logged once).
- :func:`enable_diffusers_flash3_with_fa3_fwd`: opt-in; lets diffusers' own ``_flash_3``
  attention backend (``model.set_attention_backend("_flash_3")``) run with the PyPI ``fa3-fwd``
  wheel (module ``fa3_fwd_interface``) when upstream ``flash_attn_interface`` is not installed.
  It points ``diffusers.models.attention_dispatch.flash_attn_3_func`` (and the varlen one) at
  fa3-fwd's functions, which have the same API, and sets ``_CAN_USE_FLASH_ATTN_3``. Both are
  module globals read at call time. bf16 only (fa3-fwd 0.0.3 has no fp16 kernels).
  :func:`disable_diffusers_flash3_with_fa3_fwd` restores the previous values.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class FusedQwenDoubleStreamAttnProcessor:
    """Drop-in for ``QwenDoubleStreamAttnProcessor2_0`` with the joint attention on our op.

    ``backend``: None (automatic; the env var / context manager still apply) or a backend name
    passed to the op. Keeps ``_attention_backend`` / ``_parallel_config`` (diffusers sets them)
    for the fallback path.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.fallbacks = 0

    def _stream_qkv(self, attn, x, projections, norms, freqs):
        """q, k, v of one stream as [B, L, heads, head_dim] (QK norm and RoPE applied)."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (proj(x).unflatten(-1, (-1, head_dim)) for proj in projections)
        norm_q, norm_k = norms
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        if freqs is not None:
            q = apply_rotary_emb_qwen(q, freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, freqs, use_real=False)
        return q, k, v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} takes no attention_mask; pass "
                             f"encoder_hidden_states_mask and the joint mask is built from it")
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        iq, ik, iv = self._stream_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                                      (attn.norm_q, attn.norm_k), img_freqs)
        tq, tk, tv = self._stream_qkv(attn, encoder_hidden_states,
                                      (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                      (attn.norm_added_q, attn.norm_added_k), txt_freqs)
        # Joint sequence: text first, then image.
        q, k, v = torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1)

        if encoder_hidden_states_mask is None and self._parallel_config is None:
            out = torch.ops.fused_dit.attention.default(q, k, v, None, False, self.backend)
        else:
            out = self._fallback(q, k, v, hidden_states, encoder_hidden_states_mask)
        out = out.flatten(2, 3).to(q.dtype)

        n_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, n_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(out[:, :n_txt].contiguous())
        return img_out, txt_out

    def _fallback(self, q, k, v, hidden_states, txt_mask):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        self.fallbacks += 1
        if self.fallbacks == 1:
            why = "a text mask (encoder_hidden_states_mask)" if txt_mask is not None else \
                "a context-parallel config"
            log.warning("FusedQwenDoubleStreamAttnProcessor: %s was given; this and later such calls "
                        "use diffusers' dispatch_attention_fn instead of fused_dit.attention", why)
        mask = None
        if txt_mask is not None:
            B, n_img = hidden_states.shape[:2]
            img_mask = torch.ones(B, n_img, dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([txt_mask, img_mask], dim=1)[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)


def use_fused_attention(model, backend: str | None = None) -> int:
    """Set :class:`FusedQwenDoubleStreamAttnProcessor` on every module of ``model`` whose processor
    is a ``QwenDoubleStreamAttnProcessor2_0``; returns how many were replaced.

    Carries over the old processor's ``_attention_backend`` and ``_parallel_config``.
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
    n = 0
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, FusedQwenDoubleStreamAttnProcessor):
            proc.backend = backend
            n += 1
        elif isinstance(proc, QwenDoubleStreamAttnProcessor2_0) and hasattr(module, "set_processor"):
            new = FusedQwenDoubleStreamAttnProcessor(backend)
            new._attention_backend = getattr(proc, "_attention_backend", None)
            new._parallel_config = getattr(proc, "_parallel_config", None)
            module.set_processor(new)
            n += 1
    return n


# --- diffusers' own _flash_3 backend on fa3-fwd ------------------------------------------------

_SAVED: dict | None = None


def enable_diffusers_flash3_with_fa3_fwd() -> bool:
    """Let diffusers' ``_flash_3`` backend run on ``fa3_fwd_interface`` (opt-in, reversible).

    Returns False (nothing changed) when diffusers already has an importable upstream FA3,
    True when it now uses fa3-fwd. Raises ImportError if ``fa3_fwd_interface`` is missing.
    Then ``model.set_attention_backend("_flash_3")`` or ``attention_backend("_flash_3")`` works.
    """
    global _SAVED
    from diffusers.models import attention_dispatch as ad
    if ad._CAN_USE_FLASH_ATTN_3 and ad.flash_attn_3_func is not None and _SAVED is None:
        return False
    try:
        import fa3_fwd_interface as fa3
    except Exception as e:  # noqa: BLE001
        raise ImportError(f"enable_diffusers_flash3_with_fa3_fwd: fa3_fwd_interface (PyPI fa3-fwd) is not "
                          f"importable: {type(e).__name__}: {e}") from e
    if _SAVED is None:
        _SAVED = {n: getattr(ad, n) for n in ("flash_attn_3_func", "flash_attn_3_varlen_func",
                                              "_CAN_USE_FLASH_ATTN_3")}
    ad.flash_attn_3_func = fa3.flash_attn_func
    ad.flash_attn_3_varlen_func = fa3.flash_attn_varlen_func
    ad._CAN_USE_FLASH_ATTN_3 = True
    return True


def disable_diffusers_flash3_with_fa3_fwd() -> None:
    """Undo :func:`enable_diffusers_flash3_with_fa3_fwd`."""
    global _SAVED
    if _SAVED is None:
        return
    from diffusers.models import attention_dispatch as ad
    for n, val in _SAVED.items():
        setattr(ad, n, val)
    _SAVED = None
