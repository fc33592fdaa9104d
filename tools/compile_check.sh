#!/usr/bin/env bash
# Compile-checks csrc/*.cu for sm_90a against the installed torch headers, without linking.
# Works on a CPU-only machine with nvcc and a CPU torch (stubs the one generated CUDA header the
# CPU wheel lacks; FUSED_DIT_EXTRA_INCLUDE adds a dir with cublasLt.h/cusparse.h where nvcc lacks them). Usage: tools/compile_check.sh [file.cu ...]   (default: every .cu in SOURCES)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ti=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"include"))')
pyi=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["include"])')
stub=$(mktemp -d); trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"; : > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
files=("$@")
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(grep -v '^#' "$root/csrc/SOURCES.txt" | grep '\.cu$' | sed "s|^|$root/|")
for f in "${files[@]}"; do
  echo "nvcc sm_90a: $f"
  nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Xptxas -v -I"$root/csrc" -I"$stub" -I"$ti" \
    -I"$ti/torch/csrc/api/include" -I"$pyi" ${FUSED_DIT_EXTRA_INCLUDE:+-I"$FUSED_DIT_EXTRA_INCLUDE"} -c "$f" -o "$stub/out.o" 2>&1 \
    | grep -E "error|registers|spill|stack frame" || true
done
