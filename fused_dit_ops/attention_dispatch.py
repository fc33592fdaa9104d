"""Backend registry, capability probing and selection for ``torch.ops.fused_dit.attention``.

Backends, in order of preference (the automatic choice is the first one that can run):

========== =====================================================================================
name       what runs
========== =====================================================================================
fa3        FlashAttention-3, fixed-length (non-varlen) ``flash_attn_func``: upstream
           ``flash_attn_interface`` (dist ``flash_attn_3``) or ``fa3_fwd_interface`` (PyPI
           ``fa3-fwd``, bf16/fp8 only: no fp16). sm90 only. For fa3-fwd without grad, its
           registered op ``torch.ops.fa3_fwd.fwd`` is called directly (same kernel and defaults).
fa4        FlashAttention-4 (``flash_attn.cute.flash_attn_func``, CuTe DSL, JIT per config);
           its ``(out, lse)`` return is normalised to ``out``. sm90 / sm100.
cudnn      cuDNN attention through SDPA (``SDPBackend.CUDNN_ATTENTION``).
fa2        FlashAttention-2: SDPA ``FLASH_ATTENTION`` (torch's built-in FA2), or the
           ``flash_attn`` 2.x package when SDPA's cannot run the inputs.
efficient  SDPA ``EFFICIENT_ATTENTION`` (memory-efficient / CUTLASS).
math       SDPA ``MATH`` (any device, any float dtype; the only backend on CPU).
========== =====================================================================================

Selection reads metadata only (device, dtype, shapes, strides, pointer alignment) and never
data, so it is sync-free and capture-safe; it is deterministic for given metadata and cached
per metadata key. Overrides, strongest first: the op's ``backend`` argument, the
:func:`attention_backend` context manager, the ``FUSED_DIT_ATTN_BACKEND`` environment variable
(``auto`` or empty = automatic). A forced backend that cannot run raises
:class:`AttentionBackendError`; the automatic path only fails when no backend can run (it never
does: ``math`` runs everything the op accepts).

Only fa3 (via fa3-fwd), cudnn, fa2 (SDPA) and efficient/math were meant to be exercised on
hardware; fa4, upstream FA3 and the ``flash_attn`` 2.x package are supported when importable
but were not run by this project.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from ._validation import FusedDitInputError

BACKENDS: tuple[str, ...] = ("fa3", "fa4", "cudnn", "fa2", "efficient", "math")
AUTO = "auto"
ENV_VAR = "FUSED_DIT_ATTN_BACKEND"

# fa3/fa4 head dims: multiples of 8 up to 256 (FA3 rounds up to its 64/96/128/192/256 kernels).
_FA_MAX_HEAD_DIM = 256
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AttentionBackendError(FusedDitInputError):
    """A forced attention backend cannot run the given inputs (or the name is unknown)."""


class AttentionFallbackWarning(UserWarning):
    """The automatic choice skipped an installed, preferred backend because of the inputs."""


# --- capabilities: what is installed / what the device is (probed once, or given by tests) ---

@dataclass(frozen=True)
class Capabilities:
    """Everything selection needs to know about the machine, separate from the inputs.

    ``runtime()`` probes the real machine; tests build these by hand (a capability table).
    """
    device_type: str = "cpu"                 # "cuda" or "cpu" (anything else: math only)
    sm: tuple[int, int] | None = None        # CUDA compute capability
    fa3: str | None = None                   # importable FA3 module name, None if none
    fa3_dtypes: frozenset = frozenset()      # dtypes that FA3 build has kernels for
    fa4: bool = False                        # flash_attn.cute importable
    flash_attn2: bool = False                # flash_attn 2.x package importable
    cudnn: bool = False                      # torch has cuDNN and a cuDNN SDPA backend
    sdpa_gqa: bool = True                    # F.scaled_dot_product_attention has enable_gqa
    missing: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (backend, why)
    device_error: str = ""                   # the device could not be probed: why (no CUDA backend then)

    def why_missing(self, name: str) -> str:
        return dict(self.missing).get(name, "not installed")


class Reason(NamedTuple):
    kind: str   # "package" | "device" | "arch" | "input" | "probe" (a capability probe raised)
    text: str


# Import probing (cached: imports are slow; failures are remembered with their message).
_FA3_MODULES = (("flash_attn_interface", "flash_attn_3"), ("fa3_fwd_interface", "fa3-fwd"))


@lru_cache(maxsize=None)
def _import(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # noqa: BLE001  (any import failure makes the backend unavailable)
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        return None, f"{type(e).__name__}: {msg}"


def _exc(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _has(m, attr: str) -> bool:
    try:  # a module's __getattr__ may raise anything
        return m is not None and hasattr(m, attr)
    except Exception:  # noqa: BLE001
        return False


def _fa3_module():
    for mod, _dist in _FA3_MODULES:
        m, _ = _import(mod)
        if _has(m, "flash_attn_func"):
            return m
    return None


def _fa3_dtypes(modname: str) -> frozenset:
    if modname == "fa3_fwd_interface":
        # fa3-fwd records its build flags; 0.0.3 disables FP16 (bf16 + fp8 only).
        cfg, _ = _import("fa3_fwd_config")
        try:
            flags = (getattr(cfg, "CONFIG", {}) or {}).get("build_flags", {}) if cfg else {}
            no_fp16 = flags.get("FLASHATTENTION_DISABLE_FP16", True)
        except Exception:  # noqa: BLE001  (an odd config: assume the 0.0.3 build, bf16 only)
            no_fp16 = True
        return frozenset({torch.bfloat16} if no_fp16 else {torch.bfloat16, torch.float16})
    return frozenset({torch.bfloat16, torch.float16})


def _fa4_module():
    m, _ = _import("flash_attn.cute")
    return m if _has(m, "flash_attn_func") else None


def _fa2_module():
    m, _ = _import("flash_attn")
    try:
        ver = str(getattr(m, "__version__", "")) if m is not None else ""
    except Exception:  # noqa: BLE001
        ver = ""
    return m if ver.startswith("2.") and _has(m, "flash_attn_func") else None


@lru_cache(maxsize=None)
def _runtime_caps(device_type: str, index: int | None) -> Capabilities:
    """Probe the machine. Never raises: a probe that raises leaves its backend unavailable with
    the exception as the reason (e.g. a CUDA build of torch on a machine without a driver)."""
    missing = []
    if device_type != "cuda":
        return Capabilities(device_type=device_type)
    try:
        sm = tuple(torch.cuda.get_device_capability(index))
    except Exception as e:  # noqa: BLE001
        return Capabilities(device_type="cuda", device_error=f"the CUDA device could not be probed "
                                                             f"(torch.cuda.get_device_capability raised {_exc(e)})")
    fa3 = fa4 = None
    try:
        fa3 = _fa3_module()
        if fa3 is None:
            why = "; ".join(f"{mod} ({dist}): {_import(mod)[1] or 'no flash_attn_func'}"
                            for mod, dist in _FA3_MODULES)
            missing.append(("fa3", f"not importable: {why}"))
    except Exception as e:  # noqa: BLE001
        missing.append(("fa3", f"probing it raised {_exc(e)}"))
    try:
        fa4 = _fa4_module()
        if fa4 is None:
            missing.append(("fa4", f"flash_attn.cute (flash-attn-4) not importable: "
                                   f"{_import('flash_attn.cute')[1] or 'no flash_attn_func'}"))
    except Exception as e:  # noqa: BLE001
        missing.append(("fa4", f"probing it raised {_exc(e)}"))
    try:
        cudnn = bool(torch.backends.cudnn.is_available()) and hasattr(torch.backends.cuda,
                                                                      "can_use_cudnn_attention")
        if not cudnn:
            missing.append(("cudnn", "torch has no cuDNN (torch.backends.cudnn.is_available() is False)"))
    except Exception as e:  # noqa: BLE001
        cudnn = False
        missing.append(("cudnn", f"torch.backends.cudnn.is_available() raised {_exc(e)}"))
    try:
        fa2 = _fa2_module() is not None
    except Exception:  # noqa: BLE001  (SDPA's FA2 still runs; only the package fallback is off)
        fa2 = False
    return Capabilities(
        device_type="cuda", sm=sm, fa3=fa3.__name__ if fa3 is not None else None,
        fa3_dtypes=_fa3_dtypes(fa3.__name__) if fa3 is not None else frozenset(),
        fa4=fa4 is not None, flash_attn2=fa2, cudnn=cudnn,
        sdpa_gqa=_sdpa_has_gqa(), missing=tuple(missing))


def _sdpa_has_gqa() -> bool:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def runtime_capabilities(device: torch.device | str | None = None) -> Capabilities:
    """The probed capabilities of ``device`` (default: cuda if available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda":
        try:
            index = torch.cuda.current_device()
        except Exception as e:  # noqa: BLE001  (no driver, or torch without CUDA: nothing but math)
            return Capabilities(device_type="cuda", device_error=f"the CUDA device could not be probed "
                                                                 f"(torch.cuda.current_device raised {_exc(e)})")
    return _runtime_caps(device.type, index)


# --- static rules: capability x (dtype, head_dim, gqa, causal) -> None or why not --------------

def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def static_reason(name: str, caps: Capabilities, dtype: torch.dtype, head_dim: int,
                  gqa: bool, causal: bool) -> Reason | None:
    """Why backend ``name`` cannot run inputs with this metadata on ``caps`` (None: it can)."""
    if name == "math":
        return None
    if caps.device_type != "cuda":
        return Reason("device", f"{name}: needs a CUDA device (got {caps.device_type})")
    if caps.device_error:
        return Reason("probe", f"{name}: {caps.device_error}")
    sm = caps.sm or (0, 0)
    smtxt = f"sm{sm[0]}{sm[1]}"
    if name == "fa3":
        if caps.fa3 is None:
            return Reason("package", f"fa3: {caps.why_missing('fa3')}")
        if sm[0] != 9:
            return Reason("arch", f"fa3: needs sm90 (got {smtxt})")
        if dtype not in caps.fa3_dtypes:
            if dtype == torch.float16 and caps.fa3 == "fa3_fwd_interface":
                return Reason("input", "fa3: fp16 not built in fa3-fwd (bf16/fp8 only)")
            have = "/".join(_dt(d) for d in sorted(caps.fa3_dtypes, key=str))
            return Reason("input", f"fa3: dtype {_dt(dtype)} not supported ({caps.fa3} has {have})")
    elif name == "fa4":
        if not caps.fa4:
            return Reason("package", f"fa4: {caps.why_missing('fa4')}")
        if sm[0] not in (9, 10):
            return Reason("arch", f"fa4: needs sm90 or sm100 (got {smtxt})")
        if dtype not in _LOW_PRECISION:
            return Reason("input", f"fa4: dtype {_dt(dtype)} not supported (fp16/bf16 only)")
        if sm[0] == 10 and head_dim > 128 and head_dim != 192:
            return Reason("input", f"fa4: head_dim {head_dim} not supported on {smtxt} (<= 128 or 192)")
    elif name == "cudnn":
        if not caps.cudnn:
            return Reason("package", f"cudnn: {caps.why_missing('cudnn')}")
        if sm < (8, 0):
            return Reason("arch", f"cudnn: needs sm80 or newer (got {smtxt})")
        if dtype not in _LOW_PRECISION:
            return Reason("input", f"cudnn: dtype {_dt(dtype)} not supported (fp16/bf16 only)")
        if head_dim > 256 or head_dim % 8:
            return Reason("input", f"cudnn: head_dim {head_dim} not supported (multiple of 8, <= 256)")
    elif name == "fa2":
        if sm < (8, 0):
            return Reason("arch", f"fa2: needs sm80 or newer (got {smtxt})")
        if dtype not in _LOW_PRECISION:
            return Reason("input", f"fa2: dtype {_dt(dtype)} not supported (fp16/bf16 only)")
        if head_dim > 256:
            return Reason("input", f"fa2: head_dim {head_dim} not supported (<= 256)")
    elif name == "efficient":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return Reason("input", f"efficient: dtype {_dt(dtype)} not supported (fp16/bf16/fp32)")
    else:
        raise AttentionBackendError(f"fused_dit.attention: unknown backend {name!r}; choose from "
                                    f"{', '.join(BACKENDS)} or {AUTO!r}")
    if name in ("fa3", "fa4"):
        if head_dim % 8 or head_dim > _FA_MAX_HEAD_DIM:
            return Reason("input", f"{name}: head_dim {head_dim} not supported (multiple of 8, <= 256)")
    if gqa and name in ("cudnn", "fa2", "efficient") and not caps.sdpa_gqa:
        if name != "fa2" or not caps.flash_attn2:
            return Reason("input", f"{name}: GQA needs torch >= 2.5 (SDPA enable_gqa)")
    return None


def select_static(caps: Capabilities, dtype: torch.dtype, head_dim: int, gqa: bool = False,
                  causal: bool = False, forced: str | None = None) -> tuple[str, list[tuple[str, Reason]]]:
    """Pure selection over a capability table: (backend, [(skipped backend, reason), ...]).

    With ``forced`` set, returns it or raises AttentionBackendError naming why it cannot run.
    """
    if forced not in (None, AUTO):
        _check_name(forced)
        r = static_reason(forced, caps, dtype, head_dim, gqa, causal)
        if r is not None:
            raise AttentionBackendError(f"fused_dit.attention: backend {forced!r} was requested but "
                                        f"cannot run these inputs: {r.text}")
        return forced, []
    skipped = []
    for name in BACKENDS:
        r = static_reason(name, caps, dtype, head_dim, gqa, causal)
        if r is None:
            return name, skipped
        skipped.append((name, r))
    raise AssertionError("math accepts every input")  # pragma: no cover


def _check_name(name: str) -> None:
    if name not in BACKENDS and name != AUTO:
        raise AttentionBackendError(f"fused_dit.attention: unknown backend {name!r}; choose from "
                                    f"{', '.join(BACKENDS)} or {AUTO!r}")


# --- runtime rules: alignment and torch's own SDPA checks, on the real tensors ---------------

def _misaligned(*ts: torch.Tensor) -> bool:
    """FA3/FA4 load through TMA: base pointer and strides (except the last) 16-byte aligned."""
    for t in ts:
        es = t.element_size()
        if t.data_ptr() % 16:
            return True
        for s in t.stride()[:-1]:
            if (s * es) % 16:
                return True
    return False


_SDPA_CHECK = {"cudnn": "can_use_cudnn_attention", "fa2": "can_use_flash_attention",
               "efficient": "can_use_efficient_attention"}


def _sdpa_reason(name: str, q, k, v, causal: bool) -> Reason | None:
    """torch's own can_use_* check for an SDPA backend (metadata only), with its message."""
    fn = getattr(torch.backends.cuda, _SDPA_CHECK[name], None)
    if fn is None:
        return Reason("package", f"{name}: torch.backends.cuda.{_SDPA_CHECK[name]} missing")
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if gqa and not _sdpa_has_gqa():
        return Reason("input", f"{name}: GQA needs torch >= 2.5")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            ok = fn(torch.backends.cuda.SDPAParams(qt, kt, vt, None, 0.0, causal, gqa), True)
        except Exception as e:  # noqa: BLE001  (e.g. a CUDA build of torch without a driver)
            return Reason("probe", f"{name}: torch.backends.cuda.{_SDPA_CHECK[name]} raised {_exc(e)}; "
                                   f"treated as unavailable")
    if ok:
        return None
    msgs = "; ".join(str(w.message).strip() for w in rec)[:300]
    return Reason("input", f"{name}: torch SDPA refuses these inputs ({msgs or 'no reason given'})")


def runtime_reason(name: str, caps: Capabilities, q, k, v, causal: bool) -> Reason | None:
    """Static rules plus the checks that need the tensors themselves (still metadata only)."""
    gqa = q.shape[2] != k.shape[2]
    r = static_reason(name, caps, q.dtype, q.shape[-1], gqa, causal)
    if r is not None or caps.device_type != "cuda":
        return r
    if name in ("fa3", "fa4") and _misaligned(q, k, v):
        return Reason("input", f"{name}: inputs not 16-byte aligned (TMA needs aligned pointers "
                               f"and strides; strides q {tuple(q.stride())})")
    if name in _SDPA_CHECK:
        r = _sdpa_reason(name, q, k, v, causal)
        if r is not None and name == "fa2" and caps.flash_attn2 and _fa2_module() is not None:
            return None  # the flash_attn 2.x package runs it instead (see _run_fa2)
        return r
    return None


# --- runners: [B, S, H, D] in, [B, Sq, H, D] out ---------------------------------------------------

_SDP = {"cudnn": "CUDNN_ATTENTION", "fa2": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
        "math": "MATH"}


def _sdpa(sdp_name: str, q, k, v, scale, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = {}
    if gqa:
        if _sdpa_has_gqa():
            kw["enable_gqa"] = True
        else:  # documented fallback for torch < 2.5: materialise the shared K/V heads
            rep = q.shape[2] // k.shape[2]
            kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    with sdpa_kernel([getattr(SDPBackend, sdp_name)]):
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, **kw)
    return o.transpose(1, 2)


_FA3_RAW: dict = {}  # id(fa3 module) -> its registered forward op, or None


def _fa3_raw_forward(mod):
    """fa3-fwd's registered forward op (``torch.ops.fa3_fwd.fwd``), if its schema is the one we
    call, else None. ``flash_attn_func`` reaches the same op through an autograd.Function and a
    ``torch.library.custom_op`` wrapper that allocates two placeholder tensors per call, none of
    which an inference call needs: 95.5 against 27.9 us of host time per call on an H100 host
    (docs/performance.md)."""
    key = id(mod)
    if key not in _FA3_RAW:
        op = None
        if getattr(mod, "__name__", "") == "fa3_fwd_interface":
            try:
                cand = torch.ops.fa3_fwd.fwd.default
                names = [a.name for a in cand._schema.arguments]
                if (names[:3] == ["q", "k", "v"] and {"softmax_scale", "is_causal", "num_splits"} <= set(names)
                        and len(cand._schema.returns) == 4):
                    op = cand
            except Exception:  # noqa: BLE001  (not there, or its schema unreadable: flash_attn_func)
                op = None
        _FA3_RAW[key] = op
    return _FA3_RAW[key]


def _run_fa3(q, k, v, scale, causal):
    mod = _fa3_module()
    op = _fa3_raw_forward(mod)
    if (op is not None and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        # the same kernel with flash_attn_func's defaults (num_splits=1, scale 1/sqrt(head_dim))
        return op(q, k, v, softmax_scale=q.shape[-1] ** -0.5 if scale is None else scale, is_causal=causal,
                  num_splits=1)[0]
    out = mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def _run_fa4(q, k, v, scale, causal):
    out = _fa4_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)


_FA2_VIA_SDPA: dict = {}


def _run_fa2(q, k, v, scale, causal):
    key = (q.device, q.dtype, q.shape, k.shape, causal)
    via_sdpa = _FA2_VIA_SDPA.get(key)
    if via_sdpa is None:  # once per key: torch's check is too slow for every call
        via_sdpa = _FA2_VIA_SDPA[key] = (_fa2_module() is None
                                         or _sdpa_reason("fa2", q, k, v, causal) is None)
    if via_sdpa:
        return _sdpa("FLASH_ATTENTION", q, k, v, scale, causal)
    return _fa2_module().flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal)


RUNNERS: dict[str, Callable] = {
    "fa3": _run_fa3,
    "fa4": _run_fa4,
    "cudnn": lambda q, k, v, s, c: _sdpa("CUDNN_ATTENTION", q, k, v, s, c),
    "fa2": _run_fa2,
    "efficient": lambda q, k, v, s, c: _sdpa("EFFICIENT_ATTENTION", q, k, v, s, c),
    "math": lambda q, k, v, s, c: _sdpa("MATH", q, k, v, s, c),
}


def run_backend(name: str, q, k, v, softmax_scale=None, causal=False) -> torch.Tensor:
    """Call one backend directly (no selection, no checks); output [B, Sq, H, D] contiguous."""
    out = RUNNERS[name](q, k, v, softmax_scale, causal)
    return out if out.is_contiguous() else out.contiguous()


# --- overrides ------------------------------------------------------------------------------

_CTX: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_dit_attn_backend", default=None)


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Force a backend (or ``"auto"`` / None: automatic) for ``fused_dit.attention`` calls in the block.

    Read when the op runs (also inside a compiled graph, where the op is opaque).
    """
    if name is not None:
        _check_name(name)
    token = _CTX.set(name)
    try:
        yield
    finally:
        _CTX.reset(token)


def requested_backend(arg: str | None) -> tuple[str | None, str]:
    """(forced name or None for automatic, where it came from)."""
    if arg:
        return (None if arg == AUTO else arg), "argument"
    ctx = _CTX.get()
    if ctx:
        return (None if ctx == AUTO else ctx), "attention_backend() context"
    env = os.environ.get(ENV_VAR)
    if env:
        env = env.strip().lower()
        return (None if env == AUTO else env), f"${ENV_VAR}"
    return None, "automatic"


# --- the hot path: one dict lookup per call after the first ------------------------------------

_SELECTED: dict = {}
_WARNED: set = set()


def select(q, k, v, causal: bool, backend: str | None = None) -> str:
    """The backend that ``fused_dit.attention`` runs for these inputs (cached per metadata key)."""
    forced, source = requested_backend(backend)
    dev = q.device
    # strides and v's shape too: torch's SDPA can_use_* checks (cached below) read the layout
    key = (dev, q.dtype, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), causal, forced,
           dev.type == "cuda" and _misaligned(q, k, v))
    hit = _SELECTED.get(key)
    if hit is not None:
        if isinstance(hit, Exception):
            raise hit
        return hit
    caps = runtime_capabilities(dev)
    if forced is not None:
        try:
            _check_name(forced)
            r = runtime_reason(forced, caps, q, k, v, causal)
            if r is not None:
                raise AttentionBackendError(
                    f"fused_dit.attention: backend {forced!r} was requested ({source}) but cannot "
                    f"run these inputs (q {list(q.shape)} {_dt(q.dtype)}, k {list(k.shape)}, "
                    f"causal={causal}): {r.text}")
        except AttentionBackendError as e:
            _SELECTED[key] = e
            raise
        _SELECTED[key] = forced
        return forced
    skipped = []
    for name in BACKENDS:
        r = runtime_reason(name, caps, q, k, v, causal)
        if r is None:
            break
        skipped.append((name, r))
    else:  # pragma: no cover
        raise AssertionError("math accepts every input")
    said = [r.text for n, r in skipped if r.kind == "input"]
    if said and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"fused_dit.attention: using {name!r} for q {list(q.shape)} {_dt(q.dtype)}, "
                      f"k {list(k.shape)}; skipped: {'; '.join(said)}", AttentionFallbackWarning,
                      stacklevel=3)
    _SELECTED[key] = name
    return name


def explain(q, k, v, causal: bool = False, backend: str | None = None) -> dict:
    """What the op would do for these inputs: chosen backend and every backend's why-not."""
    caps = runtime_capabilities(q.device)
    rows = {}
    for name in BACKENDS:
        r = runtime_reason(name, caps, q, k, v, causal)
        rows[name] = "ok" if r is None else r.text
    try:
        chosen = select(q, k, v, causal, backend)
    except AttentionBackendError as e:
        chosen = f"error: {e}"
    return {"chosen": chosen, "backends": rows}


def clear_cache() -> None:
    """Forget cached selections and import probes (after installing a backend, in tests)."""
    _SELECTED.clear()
    _WARNED.clear()
    _FA2_VIA_SDPA.clear()
    _runtime_caps.cache_clear()
    _import.cache_clear()


# --- listing ------------------------------------------------------------------------------------

class BackendStatus(NamedTuple):
    name: str
    available: bool
    reason: str     # "" when available
    impl: str       # what would run


def _impl(name: str, caps: Capabilities) -> str:
    return {"fa3": f"{caps.fa3 or 'flash_attn_interface / fa3_fwd_interface'}.flash_attn_func",
            "fa4": "flash_attn.cute.flash_attn_func",
            "cudnn": "SDPA CUDNN_ATTENTION",
            "fa2": "SDPA FLASH_ATTENTION" + (" (or flash_attn 2.x)" if caps.flash_attn2 else ""),
            "efficient": "SDPA EFFICIENT_ATTENTION", "math": "SDPA MATH"}[name]


def attention_backends(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                       head_dim: int = 128, heads: int = 24, kv_heads: int | None = None,
                       causal: bool = False, seq_len: int = 256) -> list[BackendStatus]:
    """Every backend, whether it can run attention with this metadata here, and why not.

    Default metadata: the Qwen-Image joint attention (bf16, 24 heads x 128, no GQA, non-causal)
    on cuda if available, else cpu. On CUDA, torch's SDPA checks run on small empty tensors.
    Never raises for a backend: one whose probe raises is listed unavailable with the exception.
    """
    caps = runtime_capabilities(device)
    kv_heads = kv_heads or heads
    dev = torch.device(device) if device is not None else torch.device(caps.device_type)
    q = k = v = None
    device_error = caps.device_error
    if caps.device_type == "cuda" and not device_error:
        try:
            q, k, v = _probe_tensors(dev, dtype, seq_len, heads, kv_heads, head_dim)
        except Exception as e:  # noqa: BLE001
            device_error = f"no probe tensors could be made on {dev} ({_exc(e)})"
    out = []
    for name in BACKENDS:
        try:
            if device_error:
                # nothing can run on a device that cannot be probed, math included
                r = Reason("probe", f"{name}: {device_error}")
            elif q is not None:
                r = runtime_reason(name, caps, q, k, v, causal)
            else:
                r = static_reason(name, caps, dtype, head_dim, kv_heads != heads, causal)
        except Exception as e:  # noqa: BLE001
            r = Reason("probe", f"{name}: probing it raised {_exc(e)}")
        out.append(BackendStatus(name, r is None, "" if r is None else r.text, _impl(name, caps)))
    return out


def _probe_tensors(dev, dtype, seq_len, heads, kv_heads, head_dim):
    """Small uninitialised q, k, v for torch's SDPA checks (metadata only)."""
    q = torch.empty(1, seq_len, heads, head_dim, dtype=dtype, device=dev)
    k = torch.empty(1, seq_len, kv_heads, head_dim, dtype=dtype, device=dev)
    return q, k, torch.empty_like(k)


# --- warm-up (before CUDA-graph capture) ---------------------------------------------------------

def warmup_attention(seq_lens=(256,), heads: int = 24, head_dim: int = 128, kv_heads: int | None = None,
                     dtype: torch.dtype = torch.bfloat16, device=None, causal: bool = False,
                     batch: int = 1, backend: str | None = None) -> list[str]:
    """Run the chosen backend once per sequence length (imports, JIT compiles, cuDNN plans).

    Call before CUDA-graph capture with the head configuration the model uses. cuDNN builds a
    plan per shape, so pass the real sequence lengths to warm it fully; FA3/FA4 need one call per
    head configuration. Returns the backend chosen for each length.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kv_heads = kv_heads or heads
    chosen = []
    for n in seq_lens:
        q = torch.randn(batch, n, heads, head_dim, device=device).to(dtype)
        k = torch.randn(batch, n, kv_heads, head_dim, device=device).to(dtype)
        v = torch.randn(batch, n, kv_heads, head_dim, device=device).to(dtype)
        torch.ops.fused_dit.attention.default(q, k, v, None, causal, backend)
        chosen.append(select(q, k, v, causal, backend))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return chosen
