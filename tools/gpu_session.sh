#!/usr/bin/env bash
# One GPU-machine session: deps, build (setup.py + CMake + sdist), env, check, tests, sanitizer,
# benchmarks. Logs and JSON go to $OUT. Usage (device tool, carry .devdeps):
#   FUSED_DIT_GIT_COMMIT=<sha> bash tools/gpu_session.sh [steps...]
# steps default: build test sanitize bench-modulation
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FUSED_DIT_BENCH_DIR="$OUT"
if [ -f .devdeps/deps.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devdeps/deps.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
fi
# accelerate (+ psutil, pyyaml) for the offloading tests: tools/devdeps_extra.sh packs them
if [ -f .devdeps/extra.tar.xz ]; then
  mkdir -p /tmp/site-extra && tar -xJf .devdeps/extra.tar.xz -C /tmp/site-extra && export PYTHONPATH=$PYTHONPATH:/tmp/site-extra
fi
steps=${*:-build test sanitize bench-modulation}
# the device's copy of .git can be stale: name the commit from the real checkout; the JSON's
# source_digest (a hash of the package files that ran) is recorded either way
[ -z "${FUSED_DIT_GIT_COMMIT:-}" ] && echo "gpu_session: FUSED_DIT_GIT_COMMIT unset; git here says $(git rev-parse --short HEAD 2>/dev/null || echo none), which may be stale" >&2
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
  overhead) stamp overhead; python tools/profile_overhead.py 2>&1 | tee "$OUT/overhead.txt" ;;
  sanitize)
    stamp sanitize
    compute-sanitizer --tool memcheck --print-limit 20 python tools/sanitize_kernels.py 2>&1 | tail -25 | tee "$OUT/sanitizer.txt"
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
