"""diffusers' own attention backends on the packages this project uses.

:func:`enable_diffusers_flash3_with_fa3_fwd`: opt-in; lets diffusers' own ``_flash_3``
  attention backend (``model.set_attention_backend("_flash_3")``) run with the PyPI ``fa3-fwd``
  wheel (module ``fa3_fwd_interface``) when upstream ``flash_attn_interface`` is not installed.
  It points ``diffusers.models.attention_dispatch.flash_attn_3_func`` (and the varlen one) at
  fa3-fwd's functions, which have the same API, and sets ``_CAN_USE_FLASH_ATTN_3``. Both are
  module globals read at call time. bf16 only (fa3-fwd 0.0.3 has no fp16 kernels).
  :func:`disable_diffusers_flash3_with_fa3_fwd` restores the previous values.
"""
from __future__ import annotations

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
