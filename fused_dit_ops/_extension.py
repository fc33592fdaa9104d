"""Loads the compiled CUDA extension ``fused_dit_ops._C`` when it was built and can load.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL(fused_dit, CUDA, ...)`` registrations. It must be
imported after ``_schemas`` (the schemas are declared once, in Python). Set
``FUSED_DIT_DISABLE_C=1`` to skip it (the Triton kernels then serve every CUDA op).
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from . import _schemas  # noqa: F401  (schemas first)

C_LOADED = False
C_ERROR: str | None = None


def _read_build_status() -> dict:
    """What setup.py recorded about building ``_C`` (empty when installed some other way)."""
    path = os.path.join(os.path.dirname(__file__), "_build_status.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


BUILD_STATUS = _read_build_status()


def _not_built_reason() -> str:
    st = BUILD_STATUS
    tail = "; the Triton kernels serve every CUDA op"
    if not st:
        return "not built (no build record: installed without running setup.py)" + tail
    reason = st.get("reason", "unknown")
    if st.get("built"):
        return f"built at install time (torch {st.get('torch')}) but the module is not found" + tail
    if st.get("fix"):
        reason += ". " + st["fix"]
    if reason.startswith("skipped: FUSED_DIT_BUILD_CUDA=0"):
        reason += "; reinstall without it (or with FUSED_DIT_BUILD_CUDA=1) to build"
    return f"not built ({reason})" + tail

if os.environ.get("FUSED_DIT_DISABLE_C", "0") not in ("", "0"):
    C_ERROR = "disabled by FUSED_DIT_DISABLE_C"
else:
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        C_ERROR = _not_built_reason()
        if BUILD_STATUS.get("reason", "").startswith("build failed") and torch.cuda.is_available():
            warnings.warn(f"fused_dit_ops._C is missing: {C_ERROR}", RuntimeWarning, stacklevel=2)
    else:
        try:
            from . import _C  # noqa: F401
            C_LOADED = True
        except ImportError as e:  # e.g. built against another torch
            C_ERROR = f"{type(e).__name__}: {e}"


def has_cuda_kernel(op: str) -> bool:
    """True when a CUDA kernel for fused_dit::<op> is registered (by _C)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_schemas.qualname(op), "CUDA")
