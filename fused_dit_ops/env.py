"""``python -m fused_dit_ops env``: what this install can do, and why not where it can't."""
from __future__ import annotations

import importlib
import platform

import torch

# name -> (import name, what it is for)
OPTIONAL_PACKAGES = {
    "triton": ("triton", "Triton kernels (CUDA)"),
    "flashinfer": ("flashinfer", "RoPE backend"),
    "fa3-fwd": ("fa3_fwd_interface", "FlashAttention-3 (Hopper) attention backend"),
    "flash_attn_3": ("flash_attn_interface", "FlashAttention-3 upstream attention backend"),
    "flash-attn-4": ("flash_attn.cute", "FlashAttention-4 (CuTe DSL) attention backend"),
    "flash_attn": ("flash_attn", "FlashAttention-2 attention backend"),
    "diffusers": ("diffusers", "diffusers integration"),
}


def _probe(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
        return f"yes ({getattr(m, '__version__', 'version unknown')})"
    except Exception as e:  # noqa: BLE001  (report any import failure, it is the point)
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def sections() -> list[tuple[str, list[tuple[str, str]]]]:
    import fused_dit_ops
    from . import _extension
    from ._schemas import SCHEMAS, qualname

    ver = [("fused_dit_ops", fused_dit_ops.__version__), ("python", platform.python_version()),
           ("torch", torch.__version__), ("torch CUDA", str(torch.version.cuda))]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        ver.append(("GPU", f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                           f"{p.total_memory / 2**30:.0f} GiB)"))
    else:
        ver.append(("GPU", "none (torch.cuda.is_available() is False)"))
    ext = [("fused_dit_ops._C", "loaded" if _extension.C_LOADED else f"not loaded: {_extension.C_ERROR}")]
    impls = []
    from ._schemas import PRIVATE_CPP
    for name in SCHEMAS:
        if name.startswith("_"):
            continue  # the private C++ entry points, reported with their public op
        private = PRIVATE_CPP.get(name)
        if private is not None and _extension.C_LOADED and _is_cpp(private):
            cuda = "C++ (checks in Python)"
        else:
            cuda = "C++" if _extension.C_LOADED and _is_cpp(name) else "Triton/Python"
        has = torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), "CUDA")
        impls.append((name, f"CUDA: {cuda if has else 'none'}; CPU: reference"))
    opt = [(k, _probe(mod) + f"  [{why}]") for k, (mod, why) in OPTIONAL_PACKAGES.items()]
    from .ops.rope import rope_backend_report
    return [("versions", ver), ("compiled extension", ext), ("ops", impls),
            ("RoPE / joint QKV backends", rope_backend_report()), ("optional packages", opt),
            *_attention_sections()]


def _attention_sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """fused_dit.attention backends for the Qwen-Image head config (24 x 128), bf16 and fp16."""
    from .attention_dispatch import attention_backends
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        try:
            rows = [(b.name, f"yes  [{b.impl}]" if b.available else f"no: {b.reason}")
                    for b in attention_backends(dtype=dtype)]
        except Exception as e:  # noqa: BLE001  (the report must not crash on a broken backend)
            rows = [("error", f"{type(e).__name__}: {e}")]
        name = str(dtype).replace("torch.", "")
        out.append((f"attention backends ({name}, 24 heads x 128, preference order)", rows))
    try:
        from .ops.attention_fp8 import fp8_attention_unavailable_reason
        why = fp8_attention_unavailable_reason() if torch.cuda.is_available() else "no CUDA device"
        fa = "yes (FlashAttention-3 FP8 forward)" if why is None else f"no: {why}"
    except Exception as e:  # noqa: BLE001
        fa = f"error: {type(e).__name__}: {e}"
    out.append(("FP8 attention (attention_fp8, patch(attention_precision='fp8'))", [("CUDA", fa),
                                                                                   ("CPU", "reference")]))
    return out


def _is_cpp(op: str) -> bool:
    # A kernel registered from C++ reports a C++ debug string, a Python one mentions python.
    try:
        s = torch._C._dispatch_dump(f"fused_dit::{op}")
    except Exception:  # noqa: BLE001
        return False
    for line in s.splitlines():
        if line.startswith("CUDA"):
            return ".cu" in line or ".cpp" in line
    return False


def report() -> str:
    out = []
    for title, rows in sections():
        out.append(f"{title}:")
        w = max((len(k) for k, _ in rows), default=0)
        out += [f"  {k.ljust(w)}  {v}" for k, v in rows]
    return "\n".join(out)
