"""Optional packages: what to install when a command needs one that is missing."""
from __future__ import annotations

# top-level import name -> the install line that brings it
INSTALL = {
    "diffusers": 'pip install "diffusers>=0.42.1"  (or, from the source tree: '
                 'pip install --no-build-isolation ".[diffusers]")',
    "flashinfer": "pip install flashinfer-python",
    "fa3_fwd_interface": "pip install fa3-fwd",
    "triton": "pip install triton",
}


def missing_message(err: ModuleNotFoundError, what: str) -> str | None:
    """One line naming the install line for a missing optional package; None for anything else."""
    top = (err.name or "").split(".")[0]
    if top not in INSTALL:
        return None
    return f"{what} needs the optional package '{top}', which is not installed: {INSTALL[top]}"
