#!/usr/bin/env bash
# GPU test and benchmark driver: build, `env`, `check`, the test tiers, compute-sanitizer and the
# benchmarks on a CUDA machine, one step after another. Logs and JSON results go to $OUT.
#
#   bash scripts/gpu_run.sh                                  # build test sanitize bench-modulation
#   bash scripts/gpu_run.sh build test-gpu-only bench-block  # any steps, in order
#   OUT=/tmp/gpu-out BENCH_ARGS="--rounds 3" bash scripts/gpu_run.sh bench-block
#
# Steps: build (pip install -e with the CUDA extension required, then `env`; the CMake build and
# the sdist are built in the background and reported at the end), check, test (every tier, then
# the Triton interpreter tier), test-gpu-only (`-m gpu`, TEST_K=<expr> narrows it), test-patch
# (the diffusers-patch GPU tests with their measured errors), test-triton-only (GPU tests of the
# C++ ops with FUSED_DIT_DISABLE_C=1), sanitize (compute-sanitizer memcheck of every kernel launch,
# scripts/sanitize_kernels.py), profile, demo (DEMO_ARGS), bench-<name> (BENCH_ARGS; names:
# `python -m fused_dit_ops bench`).
#
# Environment: OUT (default /tmp/out); FUSED_DIT_GIT_COMMIT names the commit recorded in the
# benchmark JSON when the tree's .git is missing or not the checkout's (the JSON's source_digest,
# a hash of the files that ran, is recorded either way). For a machine without a package index,
# site-packages archives in .devdeps/*.tar.xz (e.g. diffusers, accelerate) are unpacked and put on
# PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FUSED_DIT_BENCH_DIR="$OUT"
for archive in .devdeps/*.tar.xz; do
  [ -f "$archive" ] || continue
  site=/tmp/site-$(basename "$archive" .tar.xz)
  mkdir -p "$site" && tar -xJf "$archive" -C "$site" && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-build test sanitize bench-modulation}
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
for step in $steps; do
  case $step in
  build)
    stamp build
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "nvcc: $(which nvcc || echo missing) CUDA_HOME=${CUDA_HOME:-unset}"
    [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
    FUSED_DIT_BUILD_CUDA=1 MAX_JOBS=8 python -m pip install -e . --no-build-isolation --no-deps -v 2>&1 | grep -E "fused-dit-ops|rror|Successfully|ninja:" | tail -15
    python -m fused_dit_ops env | tee "$OUT/env.txt"
    # CMake build of the same sources, and the sdist route, in the background
    ( cmake -S . -B /tmp/build-cmake -G Ninja -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')" >/tmp/cmake.log 2>&1 \
      && cmake --build /tmp/build-cmake >>/tmp/cmake.log 2>&1 && echo CMAKE_OK >>/tmp/cmake.log || echo CMAKE_FAIL >>/tmp/cmake.log ) &
    ( python -m build --sdist --no-isolation -o /tmp/dist >/tmp/sdist.log 2>&1 \
      && python -m pip wheel --no-build-isolation --no-deps -w /tmp/wheel /tmp/dist/*.tar.gz >>/tmp/sdist.log 2>&1 \
      && python -m zipfile -l /tmp/wheel/*.whl | grep -E "_C|csrc" | head -20 >>/tmp/sdist.log && echo SDIST_OK >>/tmp/sdist.log || echo SDIST_FAIL >>/tmp/sdist.log ) &
    ;;
  test-patch)
    stamp "diffusers patch GPU tests (measured errors)"
    python -m pytest -q -s -m gpu tests/test_diffusers_patch.py -p no:cacheprovider 2>&1 | grep -v "^\s*$" | tail -40 | tee "$OUT/test-patch.txt"
    ;;
  test-gpu-only)
    stamp "gpu tests: ${TEST_K:-all}"
    python -m pytest -q -s -m gpu tests ${TEST_K:+-k "$TEST_K"} -p no:cacheprovider -rfE 2>&1 | grep -E "rel|err|PASS|FAIL|passed|failed|Error" | tail -40 | tee "$OUT/test-gpu.txt"
    ;;
  profile) wait; stamp profile; python -m fused_dit_ops profile --a stock --b patched --png "$OUT/profile-block.png" --json "$OUT/profile-block.json" 2>&1 | tee "$OUT/profile.txt" ;;
  demo) stamp demo; python -m fused_dit_ops demo --out "$OUT" ${DEMO_ARGS:-} 2>&1 | tee "$OUT/demo.txt" ;;
  check) stamp check; python -m fused_dit_ops check 2>&1 | tee "$OUT/check.txt" ;;
  test)
    stamp test
    python -m pytest -q tests -p no:cacheprovider -rfE 2>&1 > "$OUT/pytest.txt"; tail -30 "$OUT/pytest.txt"
    TRITON_INTERPRET=1 python -m pytest -q -m interpret tests -p no:cacheprovider 2>&1 | tail -3
    ;;
  test-triton-only)
    stamp "tests with FUSED_DIT_DISABLE_C=1"
    FUSED_DIT_DISABLE_C=1 python -m pytest -q -x tests -k "gpu and gate_residual" -p no:cacheprovider 2>&1 | tail -3
    ;;
  sanitize)
    stamp sanitize
    compute-sanitizer --tool memcheck --print-limit 20 python scripts/sanitize_kernels.py 2>&1 | tail -25 | tee "$OUT/sanitizer.txt"
    ;;
  bench-*)
    # the build step's CMake/sdist jobs run in the background: an eager benchmark shares the host
    # CPUs with them (eager launch time is host time), so let them finish first
    wait
    stamp "$step"
    python -m fused_dit_ops bench "${step#bench-}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$step.txt"
    ;;
  *) echo "unknown step $step" ;;
  esac
done
wait
stamp "cmake: $(tail -1 /tmp/cmake.log 2>/dev/null); sdist: $(tail -1 /tmp/sdist.log 2>/dev/null)"
grep -E "error|Error" /tmp/cmake.log 2>/dev/null | head -5
grep -E "_C|SDIST|rror" /tmp/sdist.log 2>/dev/null | head -8
ls /tmp/build-cmake/*.so 2>/dev/null
