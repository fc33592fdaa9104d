"""Low-overhead relaunch of already-compiled Triton kernels.

``kernel[grid](*args, **meta)`` re-derives Triton's specialization of every argument, rebuilds the
cache key and walks several Python layers on each call: tens of microseconds of host time on a
busy host, which a DiT block pays about ten times per layer. :func:`launch` pays that cost once per
distinct *exact* argument signature and afterwards calls the compiled kernel's launcher directly.

Why it is safe: the cache key is a superset of what Triton specializes on. Tensors contribute
their dtype and whether ``data_ptr() % 16 == 0`` (Triton's only pointer specialization); ints
contribute their exact value (Triton only looks at ``== 1``, ``% 16 == 0`` and the int32/int64
range); floats their type; constexprs and launch options their exact values; plus the current
device. A hit therefore always names a kernel that Triton itself compiled for arguments with the
same specialization. Anything unusual takes Triton's own path: the interpreter
(``TRITON_INTERPRET=1``), a launch hook (e.g. proton), or ``FUSED_DIT_FAST_LAUNCH=0``.
"""
from __future__ import annotations

import os

import torch

try:  # triton >= 3.2
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton: always take Triton's own path
    _knobs = None
try:
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover
    _JITFunction = ()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: Triton's is a ConstexprFunction, ~10 us per call on a slow host."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (same values, 0 for 0), without its call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def two_segments(C: int):
    """(BLOCK_A, BLOCK_B, MASK_B): a row of C lanes that is not a power of two held as two
    power-of-two register segments, BLOCK_A the largest power of two below C and BLOCK_B the rest's
    tile (masked unless the rest is a power of two); None where C is a power of two."""
    tile = next_power_of_2(C)
    if C < 2 or tile == C:
        return None
    a = tile // 2
    b = next_power_of_2(C - a)
    return a, b, b != C - a


def row_segments(C: int, min_tile: int | None = None):
    """The two-segment row a whole-row kernel picks by default: where one power-of-two tile would
    mask more than a quarter of its lanes (C 5120 = 4096 + 1024; C 1536, 3072, 6144: one tile), or,
    with ``min_tile``, would be that many lanes or more. H100, bf16 (docs/performance.md): at C 5120
    the two-segment row takes 0.86x the time of one tile in ``norm_scale_shift`` and 0.91x in
    ``qk_norm_rope_across_heads``; at C 6144 0.93x in ``norm_scale_shift`` (which passes
    ``min_tile=8192``) but 1.04x in ``qk_norm_rope_across_heads``; at C 3072 and 1536 one tile is
    as fast or faster in both."""
    tile = next_power_of_2(C)
    wide = min_tile is not None and tile >= min_tile
    return two_segments(C) if 4 * (tile - C) > tile or wide else None


_MAX_ENTRIES = 512  # per kernel; exact int values (L, strides) make a handful per model shape
_ENABLED = os.environ.get("FUSED_DIT_FAST_LAUNCH", "1") != "0" and _knobs is not None


def enabled() -> bool:
    return _ENABLED


def set_enabled(flag: bool) -> bool:
    """Turn the fast path on/off at runtime (for A/B timing); returns the previous setting."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(flag) and _knobs is not None
    return prev


def _hooks_active() -> bool:
    # triton >= 3.4 keeps hooks in a (possibly empty) HookChain; older ones use None or a callable
    h = _knobs.runtime.launch_enter_hook
    if h is None:
        return False
    calls = getattr(h, "calls", None)
    return True if calls is None else bool(calls)


def _args_key(args) -> tuple:
    """One entry per argument: a tensor's (dtype, 16-byte aligned), ``float`` for a float, an int's
    or bool's exact value. One comprehension, no Python call per argument: the dual-stream and
    joint q/k kernels take 40-60 arguments, and this key is built on every launch."""
    T = torch.Tensor
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, T) else (float if isinstance(a, float) else a)
                  for a in args])


def _arg_key(a):
    return _args_key((a,))[0]


class _Entry:
    __slots__ = ("run", "function", "packed_metadata")

    def __init__(self, ck):
        self.run = ck.run  # property: loads the module and creates the launcher on first use
        self.function = ck.function
        self.packed_metadata = ck.packed_metadata


# torch.cuda.current_device() minus its lazy-init check (a CUDA tensor is being launched on)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_caches: dict = {}
stats = {"fast": 0, "slow": 0}


def launch(fn, grid, args: tuple, constexprs: tuple, options: dict):
    """Launch ``fn[grid](*args, **dict(zip(names, constexprs)), **options)``.

    ``args`` are the kernel's runtime arguments and ``constexprs`` the values of its trailing
    constexpr parameters, both in signature order; ``options`` are launch options (num_warps ...).
    """
    fast = _ENABLED and isinstance(fn, _JITFunction) and not _hooks_active()
    if not fast:
        stats["slow"] += 1
        names = _constexpr_names(fn)
        return fn[grid](*args, **dict(zip(names, constexprs)), **options)
    dev = _current_device()
    key = (dev, grid, _args_key(args), constexprs, tuple(options.items()))
    cache = _caches.get(fn)
    if cache is None:
        cache = _caches[fn] = {}
    entry = cache.get(key)
    if entry is None:
        stats["slow"] += 1
        names = _constexpr_names(fn)
        ck = fn[grid](*args, **dict(zip(names, constexprs)), **options)
        if len(cache) >= _MAX_ENTRIES:
            cache.clear()
        cache[key] = _Entry(ck)
        return ck
    stats["fast"] += 1
    g = grid + (1,) * (3 - len(grid))
    entry.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(dev), entry.function,
              entry.packed_metadata, None, None, None, *args, *constexprs)
    return None


_names: dict = {}


def _constexpr_names(fn) -> tuple:
    names = _names.get(fn)
    if names is None:
        params = getattr(fn, "params", None)
        if params is None:  # interpreter: inspect the wrapped function's signature
            import inspect
            sig = inspect.signature(fn.fn)
            ann = [p.annotation for p in sig.parameters.values()]
            names = tuple(n for n, a in zip(sig.parameters, ann) if "constexpr" in str(a))
        else:
            names = tuple(p.name for p in params if p.is_constexpr)
            flags = [p.is_constexpr for p in params]
            # the fast path appends constexprs after the runtime args: they must be trailing
            if flags != sorted(flags):
                raise TypeError(f"{fn.__name__}: constexpr parameters must come last for launch()")
        _names[fn] = names
    return names


def clear_cache() -> None:
    _caches.clear()
    stats.update(fast=0, slow=0)


__all__ = ["launch", "enabled", "set_enabled", "clear_cache", "stats", "cdiv", "next_power_of_2", "two_segments",
           "row_segments"]
