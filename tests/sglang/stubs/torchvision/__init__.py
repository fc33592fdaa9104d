"""TEST-ONLY import stub of torchvision (see tests/sglang/stubs/_permissive.py)."""
import sys as _sys
import os as _os

_here = _os.path.dirname(_os.path.dirname(__file__))
if _here not in _sys.path:  # at the END: this directory must never shadow a real package
    _sys.path.append(_here)
from _permissive import _Anything, install  # noqa: E402

__version__ = "0.29.1"
__stub__ = True
install("torchvision")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name[:1].isupper():
        cls = type(name, (_Anything,), {"__module__": "torchvision"})
        globals()[name] = cls
        return cls
    return _Anything()
