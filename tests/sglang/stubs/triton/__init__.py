"""TEST-ONLY import stub of triton (see tests/sglang/stubs/_permissive.py)."""
import sys as _sys
import os as _os

_here = _os.path.dirname(_os.path.dirname(__file__))
if _here not in _sys.path:  # at the END: this directory must never shadow a real package
    _sys.path.append(_here)
from _permissive import StubModule, _Kernel, _Anything, install  # noqa: E402

__version__ = "3.6.0"
__stub__ = True


def _deco(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return _Kernel(args[0])
    return lambda fn: _Kernel(fn)


jit = autotune = heuristics = _deco


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class Config(_Anything):
    pass


class _Language(StubModule):
    pass


def _populate(m):
    if m.__name__ == "triton.language":
        m.dtype = type("dtype", (), {"__module__": "triton.language"})
        m.constexpr = type("constexpr", (_Anything,), {"__module__": "triton.language"})
    if m.__name__ == "triton.runtime.jit":
        m.JITFunction = type("JITFunction", (), {})
    if m.__name__ == "triton.runtime":
        m.jit = __import__("triton.runtime.jit", fromlist=["x"])


install("triton", _populate)
import triton.language as language  # noqa: E402,F401
import triton.runtime as runtime  # noqa: E402,F401
import triton.language as tl  # noqa: E402,F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name[:1].isupper():
        cls = type(name, (_Anything,), {"__module__": "triton"})
        globals()[name] = cls
        return cls
    return _Anything()
