"""Build script: pure Python everywhere; also builds fused_dit_ops._C (CUDA) where it can.

The CUDA extension is built when torch has CUDA and nvcc is found, unless FUSED_DIT_BUILD_CUDA=0
(FUSED_DIT_BUILD_CUDA=1 makes a missing toolchain an error). Target architectures come from
FUSED_DIT_CUDA_ARCH_LIST (default "90a"; e.g. "90a;100a"). Sources: csrc/SOURCES.txt, the same
list CMakeLists.txt reads.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _sources():
    lines = (ROOT / "csrc" / "SOURCES.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _want_cuda():
    flag = os.environ.get("FUSED_DIT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False, None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if flag in ("1", "true", "yes"):
            raise RuntimeError("FUSED_DIT_BUILD_CUDA=1 but torch is not importable at build time; "
                               "install torch first and build with --no-build-isolation")
        return False, "torch not importable at build time"
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None and shutil.which("nvcc") is None:
        reason = "nvcc / CUDA_HOME not found"
    if reason and flag in ("1", "true", "yes"):
        raise RuntimeError(f"FUSED_DIT_BUILD_CUDA=1 but {reason}")
    return reason is None, reason


def _ext_modules():
    want, reason = _want_cuda()
    if not want:
        if reason:
            print(f"fused-dit-ops: not building the CUDA extension ({reason}); CPU/Triton paths only")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("FUSED_DIT_CUDA_ARCH_LIST", "90a").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    ext = CUDAExtension(
        name="fused_dit_ops._C",
        sources=_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
