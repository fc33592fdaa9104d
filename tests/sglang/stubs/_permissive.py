"""Import-only stand-ins for `triton` and `torchvision` (TEST-ONLY, never shipped).

SGLang 0.5.23 imports triton and torchvision at module level on paths our CPU tests never run.
Installing the real wheels costs ~1.3 GB; these modules satisfy the imports. Any attempt to
launch a "kernel" raises. Put this directory on sys.path only when the real package is missing.
"""
import importlib.abc
import importlib.machinery
import sys
import types


class StubLaunchError(RuntimeError):
    pass


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _Anything(metaclass=_Meta):
    """Class-level and instance-level attribute access returns another stub (real classes)."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __getitem__(self, item):
        return _Kernel(None)

    def __class_getitem__(cls, item):
        return cls


class _Kernel:
    def __init__(self, fn, *args, **kwargs):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "stub_kernel")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise StubLaunchError(f"triton stub: cannot launch {self.__name__} (no real triton here)")
        return launch

    def __call__(self, *args, **kwargs):
        raise StubLaunchError(f"triton stub: cannot call {self.__name__}")


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            cls = type(name, (_Anything,), {"__module__": self.__name__})
            setattr(self, name, cls)
            return cls
        val = _Anything()
        return val


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root, populate):
        self.root = root
        self.populate = populate

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.root or fullname.startswith(self.root + "."):
            if fullname == self.root:
                return None  # the package itself is a real directory on sys.path
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        self.populate(module)


def install(root, populate=lambda m: None):
    if not any(isinstance(f, StubFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.append(StubFinder(root, populate))
