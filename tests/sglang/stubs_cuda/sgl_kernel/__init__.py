"""TEST-ONLY import stub of ``sgl_kernel`` (the ``sglang-kernel`` wheel: ~380 MB, CUDA-only).

On a CUDA platform SGLang 0.5.23 imports it at module level, e.g. ``runtime/layers/layernorm.py``:
``if _is_cuda: from sgl_kernel import fused_add_rmsnorm, rmsnorm``; without it none of the layers we
hook can even be imported. tests/sglang/conftest.py puts ``stubs_cuda/`` at the END of sys.path only
when SGLang takes its CUDA branches and no real ``sgl_kernel`` is installed (so a real one wins).

Importing works (any submodule, any name); CALLING anything raises :class:`SglKernelMissing`, whose
message names the function. A test that meets it ran an SGLang path that needs sglang-kernel: such
paths cannot run without sglang-kernel and the CUDA tests are written to avoid them.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+test-stub"
__stub__ = True


class SglKernelMissing(RuntimeError):
    """An SGLang code path called into sgl_kernel, which is only an import stub here."""


class _MissingMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{cls.__module__}.{cls.__name__}.{name}")


class _MissingClass(metaclass=_MissingMeta):
    """CamelCase names become real classes (isinstance / annotations at import time work)."""

    def __init__(self, *args, **kwargs):
        raise SglKernelMissing(f"sgl_kernel stub: cannot build {type(self).__module__}.{type(self).__name__} "
                               "(sglang-kernel is not installed)")


class _Missing:
    """A name from sgl_kernel: attribute chains resolve (import-time constants), calls raise."""

    def __init__(self, qualname):
        self._qualname = qualname
        self.__name__ = qualname.rsplit(".", 1)[-1]

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._qualname}.{name}")

    def __call__(self, *args, **kwargs):
        raise SglKernelMissing(f"sgl_kernel stub: {self._qualname}() was called, but sglang-kernel is not "
                               "installed here: this SGLang CUDA path cannot run on this machine")

    def __repr__(self):
        return f"<sgl_kernel stub {self._qualname}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            val = type(name, (_MissingClass,), {"__module__": self.__name__})
        else:
            val = _Missing(f"{self.__name__}.{name}")
        setattr(self, name, val)
        return val


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every ``sgl_kernel.<sub>`` module (only while this stub is the sgl_kernel in use)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + ".") and sys.modules.get(__name__) is _this:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        m.__stub__ = True
        return m

    def exec_module(self, module):
        pass


_this = sys.modules[__name__]
_this.__class__ = _StubModule  # module-level names resolve through _StubModule.__getattr__
if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
