"""Build script: pure Python everywhere; also builds fused_dit_ops._C (CUDA) where it can.

The CUDA extension is built when the installed torch has CUDA and nvcc is found.
FUSED_DIT_BUILD_CUDA=0 skips it; FUSED_DIT_BUILD_CUDA=1 makes it mandatory (a missing toolchain or
a failed compile is an error). By default a failed build warns, names the cause and the fix, and the
install goes on without ``_C`` (the Triton kernels serve every CUDA op).

The C++ standard is the one the installed torch's headers require (C++17 up to torch 2.13, C++20
from 2.14). Target architectures come from FUSED_DIT_CUDA_ARCH_LIST (default "90a"; e.g.
"90a;100a"). Sources: csrc/SOURCES.txt, the same list CMakeLists.txt reads.

What happened is written to fused_dit_ops/_build_status.json, which ``python -m fused_dit_ops env``
reads to say why ``_C`` is missing.
"""
import json
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
STATUS_NAME = "_build_status.json"
FIX_HINT = ("To see the compiler output, reinstall with `pip install -v --no-build-isolation .`; "
            "check that nvcc's CUDA major version matches torch's (torch {torch}, CUDA {torch_cuda}, "
            "CUDA_HOME {cuda_home}) and that the host compiler supports C++{cxx_standard}. "
            "FUSED_DIT_BUILD_CUDA=1 makes a failed build an error, FUSED_DIT_BUILD_CUDA=0 skips it.")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _sources():
    lines = (ROOT / "csrc" / "SOURCES.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _flag():
    flag = os.environ.get("FUSED_DIT_BUILD_CUDA", "auto").strip().lower()
    if flag not in _TRUE + _FALSE + ("auto", ""):
        raise SystemExit(f"FUSED_DIT_BUILD_CUDA must be 0, 1 or unset (auto), got {flag!r}")
    return "1" if flag in _TRUE else "0" if flag in _FALSE else "auto"


def torch_cxx_standard(include_dir):
    """The C++ standard the installed torch's headers demand (17 or 20), read from ATen/ATen.h."""
    try:
        text = (Path(include_dir) / "ATen" / "ATen.h").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"__cplusplus\s*<\s*(\d{4})(\d{2})L", text)
    if not m:
        return None
    year = int(m.group(1))
    return {2014: 14, 2017: 17, 2020: 20, 2023: 23}.get(year, 17 if year < 2020 else 20)


def _write_status(status, *dirs):
    """Record what the build did, for `python -m fused_dit_ops env` (source tree and build tree)."""
    text = json.dumps(status, indent=1) + "\n"
    for d in dirs:
        try:
            p = Path(d) / "fused_dit_ops"
            if p.is_dir():
                (p / STATUS_NAME).write_text(text)
        except OSError:
            pass


def _cuda_home_from_nvcc():
    """Point CUDA_HOME at the toolkit when nvcc on PATH is a wrapper outside it.

    torch guesses CUDA_HOME as the parent of nvcc's folder; for a wrapper script in /usr/local/bin
    that is /usr/local, which holds neither the CUDA headers nor libcudart. nvcc itself knows its
    toolkit (`TOP` in its dry-run output).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = Path(nvcc).resolve().parent.parent
    if (guess / "include" / "cuda_runtime.h").exists():
        return None
    import subprocess
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.M)
    if not m:
        return None
    top = Path(m.group(1).strip()).resolve()
    if (top / "include" / "cuda_runtime.h").exists():
        os.environ["CUDA_HOME"] = str(top)
        return str(top)
    return None


def _plan():
    """(build?, status dict): what to do, decided before compiling anything."""
    flag = _flag()
    status = {"flag": flag, "built": False, "python": sys.version.split()[0]}
    if flag == "0":
        status["reason"] = "skipped: FUSED_DIT_BUILD_CUDA=0 at install time"
        return False, status
    cuda_home = _cuda_home_from_nvcc()  # before torch.utils.cpp_extension reads CUDA_HOME
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:
        reason = (f"torch was not importable at install time ({e}); install torch first and "
                  "build with --no-build-isolation")
        if flag == "1":
            raise SystemExit(f"FUSED_DIT_BUILD_CUDA=1 but {reason}")
        status["reason"] = "skipped: " + reason
        return False, status
    status["torch"] = torch.__version__
    status["torch_cuda"] = torch.version.cuda
    status["cuda_home"] = CUDA_HOME
    if cuda_home:
        print(f"fused-dit-ops: CUDA_HOME={cuda_home} (from nvcc; set CUDA_HOME to override)")
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None and shutil.which("nvcc") is None:
        reason = "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset)"
    if reason:
        if flag == "1":
            raise SystemExit(f"FUSED_DIT_BUILD_CUDA=1 but {reason}")
        status["reason"] = "skipped: " + reason
        return False, status
    status["reason"] = "build started but did not finish"
    return True, status


def _ext_modules():
    want, status = _plan()
    _write_status(status, ROOT)
    if not want:
        print(f"fused-dit-ops: not building the CUDA extension ({status['reason']}); "
              "the Triton kernels serve every CUDA op")
        return [], {}
    import torch.utils.cpp_extension as cpp
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    std = torch_cxx_standard(cpp.include_paths()[0])
    std_flags = [f"-std=c++{std}"] if std else []  # None: leave it to torch's own default
    status["cxx_standard"] = std
    archs = os.environ.get("FUSED_DIT_CUDA_ARCH_LIST", "90a").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    status["archs"] = [a for a in archs if a.strip()]
    ext = CUDAExtension(
        name="fused_dit_ops._C",
        sources=_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", *std_flags], "nvcc": ["-O3", *std_flags, *gencode]},
    )

    class OptionalBuildExtension(BuildExtension):
        """A failed compile fails the install only under FUSED_DIT_BUILD_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (any compiler/ninja failure)
                cause = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                if status["flag"] == "1":
                    raise
                status["reason"] = f"build failed: {cause}"
                status["fix"] = FIX_HINT.format(**status)
                _write_status(status, ROOT, self.build_lib)
                self.extensions = []
                print("\n" + "=" * 78 + "\nfused-dit-ops WARNING: the optional CUDA extension "
                      f"fused_dit_ops._C did not build ({cause}). The install goes on without it: "
                      "the Triton kernels serve every CUDA op.\n" + FIX_HINT.format(**status)
                      + "\n" + "=" * 78 + "\n", file=sys.stderr)
                return
            status["built"] = True
            status["reason"] = "built"
            _write_status(status, ROOT, self.build_lib)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
# Build under .build/, not build/: a build/ folder in the project root shadows the `build` package
# (`python -m build --sdist`).
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"build": {"build_base": ".build"}})
