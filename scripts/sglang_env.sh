#!/usr/bin/env bash
# Create (idempotently) the optional SGLang test environment used by `make test-sglang`.
#
#   bash scripts/sglang_env.sh            # creates .venv-sglang (git-ignored) in the repo root
#   SGLANG_VENV=/some/dir bash scripts/sglang_env.sh
#
# Contents: torch 2.13.0 (as pip resolves it; the tier runs on the CPU), sglang==0.5.23 installed with
# --no-deps (it declares torch==2.14.1, which we do not want: a 3 GB CUDA build), the light
# runtime dependencies that `sglang.multimodal_gen` needs to import (pins follow sglang's own
# Requires-Dist), pytest, and fused-dit-ops itself (editable, no deps, no build isolation).
# triton and torchvision are NOT installed: tests/sglang/stubs provides import-only stand-ins
# (test-only; never shipped).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SGLANG_VENV:-$ROOT/.venv-sglang}"
PY_BASE="${PYTHON:-python3}"
SGLANG_VERSION="0.5.23"
TORCH_VERSION="2.13.0"
STAMP_VALUE="sglang=$SGLANG_VERSION torch=$TORCH_VERSION deps=v1"
STAMP="$VENV/.fused_dit_sglang_env"

LIGHT_DEPS=(
  numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq
  tqdm IPython aiohttp "addict==2.4.0" pyyaml einops "apache-tvm-ffi==0.1.11" "transformers==5.19.0"
  dill "sentencepiece==0.2.1" "compressed-tensors==0.18.0" gguf "imageio==2.36.0" "diffusers==0.37.0"
  "cache-dit==1.5.1" pytest "setuptools>=64,<80" wheel
)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_VALUE" ]] \
   && "$VENV/bin/python" -c "import importlib.metadata as m, torch, pytest; m.version('sglang')" 2>/dev/null; then
  echo "sglang_env: $VENV is ready ($STAMP_VALUE)"
else
  echo "sglang_env: creating $VENV"
  [[ -x "$VENV/bin/python" ]] || "$PY_BASE" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q)
  # 1. torch first, alone: resolving the rest without it would pull CUDA torch + nvidia-* (~3 GB).
  "${PIP[@]}" "torch==$TORCH_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
  # 2. sglang without its dependency list (pins torch==2.14.1).
  "${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
  # 3. what `import sglang.multimodal_gen...qwen_image` actually needs; torch stays 2.13.0.
  "${PIP[@]}" "${LIGHT_DEPS[@]}" "torch==$TORCH_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$STAMP_VALUE" > "$STAMP"
fi

# fused-dit-ops itself: editable, so the entry point (sglang.multimodal_gen.plugins) is in the
# venv's metadata. Re-run every time (cheap) so pyproject edits are picked up.
FUSED_DIT_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q \
  --no-build-isolation --no-deps -e "$ROOT"
# (sglang itself is not imported here: it needs the test-only triton/torchvision stubs.)
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
eps = [e.name for e in md.entry_points(group="sglang.multimodal_gen.plugins")]
print(f"sglang_env: sglang {md.version('sglang')}, torch {torch.__version__}, plugins {eps}")
PY
