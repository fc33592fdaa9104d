"""Loads the compiled CUDA extension ``fused_dit_ops._C`` when it was built and can load.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL(fused_dit, CUDA, ...)`` registrations. It must be
imported after ``_schemas`` (the schemas are declared once, in Python). Set
``FUSED_DIT_DISABLE_C=1`` to skip it (the Triton kernels then serve every CUDA op).
"""
from __future__ import annotations

import os

import torch

from . import _schemas  # noqa: F401  (schemas first)

C_LOADED = False
C_ERROR: str | None = None

if os.environ.get("FUSED_DIT_DISABLE_C", "0") not in ("", "0"):
    C_ERROR = "disabled by FUSED_DIT_DISABLE_C"
else:
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        C_ERROR = "not built (no CUDA toolkit or CUDA torch at install time; Triton serves CUDA ops)"
    else:
        try:
            from . import _C  # noqa: F401
            C_LOADED = True
        except ImportError as e:  # e.g. built against another torch
            C_ERROR = f"{type(e).__name__}: {e}"


def has_cuda_kernel(op: str) -> bool:
    """True when a CUDA kernel for fused_dit::<op> is registered (by _C)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_schemas.qualname(op), "CUDA")
