#!/usr/bin/env bash
# Run the SGLang test tier (tests/sglang) on the GPU machine, with the image's CUDA torch/triton.
#
#   On the GPU machine, from the repo root, with `.sglang-gpu` in the carry list (build it here first
#   with `bash tools/sglang_gpu_pack.sh`; no network is needed there):
#       bash tools/sglang_gpu_run.sh
#   Logs go to $OUT (the device call's output folder) when set, else /tmp/sglang-gpu-out:
#       sglang-gpu-run.log (everything below), junit-gpu.xml (-m gpu), junit-rest.xml (-m "not gpu").
#
# Steps: report the machine (python, torch, CUDA device, triton, nvcc); unpack .sglang-gpu/site.tar.xz
# into $SGLANG_GPU_SITE (default /tmp/sgl; sglang 0.5.23 + the light deps the image lacks, never
# torch/triton); write fused-dit-ops' dist-info there (its entry point, from pyproject.toml: no build,
# no _C needed: on CUDA the Triton kernels serve every op); PYTHONPATH = repo root, then the pack,
# then the image; probe every import the tests need and say which fail and why; then pytest:
# first the CUDA tests (-m gpu), then the rest (-m "not gpu", the CPU-tensor tests on SGLang's CUDA
# platform). The real triton and torchvision of the image are used: tests/sglang/conftest.py adds
# stubs only for what is missing (on CUDA: an import-only sgl_kernel, because sglang-kernel is not
# there; calling anything in it raises).
#
# Options (environment): SGLANG_GPU_TESTS=gpu (only the CUDA tests), PYTHON=python3,
# SGLANG_GPU_PACK=<dir with site.tar.xz>, SGLANG_GPU_SITE=/tmp/sgl, SGLANG_GPU_TIMEOUT=400 (seconds
# for the -m gpu pytest run), SGLANG_GPU_BUDGET=560 (seconds for the whole script: the rest run gets
# what is left, and is not started with under 60 s: a device call's command may run 600 s).
# Exit status: 0 when both pytest runs pass, 2 when the pack is missing or cannot be unpacked, else
# the first failing pytest status.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
PACK="${SGLANG_GPU_PACK:-$ROOT/.sglang-gpu}"
SITE="${SGLANG_GPU_SITE:-/tmp/sgl}"
LOGDIR="${OUT:-/tmp/sglang-gpu-out}"
SELECT="${SGLANG_GPU_TESTS:-all}"
GPU_TIMEOUT="${SGLANG_GPU_TIMEOUT:-400}"
BUDGET="${SGLANG_GPU_BUDGET:-560}"
mkdir -p "$LOGDIR"
exec > >(tee -a "$LOGDIR/sglang-gpu-run.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log and the caller get the last lines

say() { printf '\n=== %s\n' "$*"; }
T0=$(date +%s)

say "machine"
echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))  python: $(command -v "$PY")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
(nvcc --version 2>/dev/null | tail -n 2) || echo "nvcc: not on PATH"
"$PY" - <<'PY'
import sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda build", torch.version.cuda, "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as e:
    print("torch: FAILED", type(e).__name__, e)
try:
    import triton
    print("triton", triton.__version__, triton.__file__)
except Exception as e:
    print("triton: FAILED", type(e).__name__, e)
PY

say "pack"
if [[ ! -f "$PACK/site.tar.xz" ]]; then
  echo "FAILED: $PACK/site.tar.xz not found. Build it on the dev machine with"
  echo "        bash tools/sglang_gpu_pack.sh   and name .sglang-gpu in the device call's carry list."
  exit 2
fi
head -n 1 "$PACK/MANIFEST.txt" 2>/dev/null
rm -rf "$SITE" && mkdir -p "$SITE"
if ! tar -xJf "$PACK/site.tar.xz" -C "$SITE"; then
  echo "FAILED: could not unpack $PACK/site.tar.xz into $SITE"; exit 2
fi
for d in torch triton torchvision; do
  if [[ -e "$SITE/$d" ]]; then echo "FAILED: the pack holds $d/: it must not shadow the image's"; exit 2; fi
done
echo "unpacked into $SITE: $(du -sh "$SITE" | cut -f1), $(ls -d "$SITE"/*.dist-info | wc -l) distributions"

# fused-dit-ops' distribution metadata (its entry point in group sglang.multimodal_gen.plugins),
# from pyproject.toml; the package itself is imported from the repo tree.
"$PY" - "$ROOT" "$SITE" <<'PY' || { echo "FAILED: could not write fused-dit-ops metadata"; exit 2; }
import pathlib, sys, tomllib
root, site = map(pathlib.Path, sys.argv[1:3])
proj = tomllib.loads((root / "pyproject.toml").read_text())["project"]
d = site / f"fused_dit_ops-{proj['version']}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {proj['name']}\nVersion: {proj['version']}\n")
lines = []
for group, eps in proj.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{k} = {v}" for k, v in eps.items()]
    lines.append("")
(d / "entry_points.txt").write_text("\n".join(lines))
(d / "top_level.txt").write_text("fused_dit_ops\n")
(d / "INSTALLER").write_text("tools/sglang_gpu_run.sh\n")
(d / "RECORD").write_text("")
print(f"wrote {d.name}: entry points {proj.get('entry-points', {})}")
PY

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_COMPILE_DISABLE=1 PYTHONUNBUFFERED=1 FUSED_DIT_SGLANG_REQUIRED=1
export SGLANG_PLUGINS=""   # the tests enable the plugin by hand (or set it themselves)
unset FUSED_DIT_SGLANG

say "imports (each on its own; stubs as tests/sglang/conftest.py installs them)"
"$PY" - <<'PY'
import importlib, importlib.metadata as md, traceback

def probe(name, show=None):
    try:
        m = importlib.import_module(name)
        extra = show(m) if show else ""
        print(f"OK    {name} {extra}")
        return m
    except BaseException as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        print(f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}  [{where}]")
        return None

def ver(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"

probe("torch", lambda m: f"{m.__version__} cuda={m.cuda.is_available()}")
probe("triton", lambda m: f"{m.__version__} stub={getattr(m, '__stub__', False)}")
fdo = probe("fused_dit_ops", lambda m: f"{m.__file__}")
if fdo:
    from fused_dit_ops import _extension
    print(f"      _C loaded: {_extension.C_LOADED} ({_extension.C_ERROR or 'ok'})")
    try:
        from fused_dit_ops.ops.rope import flashinfer_status
        print(f"      flashinfer for rope: {flashinfer_status()}")
    except Exception as e:  # noqa: BLE001
        print(f"      rope backend report failed: {e}")
for dist in ("sglang", "transformers", "diffusers", "pydantic", "imageio", "sentencepiece", "huggingface-hub",
             "numpy", "torchvision", "apache-tvm-ffi", "cache-dit", "compressed-tensors", "sglang-kernel",
             "flashinfer-python", "fused-dit-ops"):
    print(f"      dist {dist}: {ver(dist)}")
conftest = probe("tests.sglang.conftest", lambda m: f"stubs={m.STUBBED or 'none'} cuda_platform={m.SGLANG_CUDA_PLATFORM}")
if conftest and "sgl_kernel" not in conftest.STUBBED and not conftest.SGLANG_CUDA_PLATFORM:
    print("      sgl_kernel: not needed (SGLang on its CPU platform here)")
else:
    probe("sgl_kernel", lambda m: "(import-only TEST STUB: calling into it raises)" if getattr(m, "__stub__", False)
          else "(real sglang-kernel)")
probe("torchvision", lambda m: f"{getattr(m, '__version__', '?')} stub={getattr(m, '__stub__', False)}")
probe("sglang", lambda m: getattr(m, "__version__", ""))
plat = probe("sglang.multimodal_gen.runtime.platforms",
             lambda m: f"current_platform={type(m.current_platform).__name__} is_cuda={m.current_platform.is_cuda()}")
for mod in ("sglang.multimodal_gen.runtime.layers.custom_op",
            "sglang.multimodal_gen.runtime.layers.fused_scale_shift_gate",
            "sglang.multimodal_gen.runtime.layers.layernorm",
            "sglang.multimodal_gen.runtime.layers.elementwise",
            "sglang.kernels.ops.diffusion.common.fallback_torch",
            "sglang.kernels.ops.diffusion.modulate.scale_shift_triton",
            "sglang.kernels.ops.diffusion.rope.qwen_qkv_epilogue_jit",
            "sglang.multimodal_gen.runtime.layers.attention.backends.flash_attn",
            "sglang.multimodal_gen.runtime.layers.attention.backends.sdpa",
            "sglang.multimodal_gen.runtime.layers.attention.layer",
            "sglang.multimodal_gen.configs.models.dits.qwenimage",
            "sglang.multimodal_gen.configs.pipeline_configs.qwen_image",
            "sglang.multimodal_gen.runtime.models.dits.qwen_image",
            "sglang.multimodal_gen.runtime.platforms.plugins",
            "fused_dit_ops.integrations.sglang_plugin"):
    probe(mod)
eps = [f"{e.name} -> {e.value} ({e.dist.name if e.dist else '?'})"
       for e in md.entry_points(group="sglang.multimodal_gen.plugins")]
print(f"      entry points sglang.multimodal_gen.plugins: {eps or 'NONE'}")
PY

run_pytest() {  # name marker timeout
  local name="$1" marker="$2" limit="$3" rc
  say "pytest -m '$marker' ($name; limit ${limit}s)"
  local extra=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout=240); fi
  timeout -k 10 "$limit" "$PY" -m pytest tests/sglang -m "$marker" -v -rs -p no:cacheprovider \
    --junitxml="$LOGDIR/junit-$name.xml" -o junit_family=xunit1 "${extra[@]}"
  rc=$?
  [[ $rc -eq 124 ]] && echo "TIMED OUT after ${limit}s"
  return $rc
}

rc_gpu=0; rc_rest="not run"
run_pytest gpu gpu "$GPU_TIMEOUT"; rc_gpu=$?
if [[ "$SELECT" != "gpu" ]]; then
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left >= 60 )); then
    run_pytest rest "not gpu" "$left"; rc_rest=$?
  else
    rc_rest="not run (only ${left}s of the ${BUDGET}s budget left)"
  fi
fi

say "summary ($(( $(date +%s) - T0 )) s)"
"$PY" - "$LOGDIR" <<'PY'
import pathlib, sys, xml.etree.ElementTree as ET
for f in sorted(pathlib.Path(sys.argv[1]).glob("junit-*.xml")):
    try:
        root = ET.parse(f).getroot()
    except Exception as e:  # noqa: BLE001
        print(f"{f.name}: unreadable ({e})"); continue
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    print(f"{f.name}: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            print(f"  FAILED {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
PY
echo "SGLANG GPU RUN: pytest -m gpu rc=$rc_gpu, pytest -m 'not gpu' rc=$rc_rest; logs in $LOGDIR"
if [[ $rc_gpu -ne 0 ]]; then exit $rc_gpu; fi
if [[ "$rc_rest" =~ ^[0-9]+$ && "$rc_rest" -ne 0 ]]; then exit "$rc_rest"; fi
exit 0
