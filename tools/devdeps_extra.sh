#!/usr/bin/env bash
# Packs accelerate and its two compiled dependencies (psutil, pyyaml; wheels for the GPU machine's
# Python 3.12) into .devdeps/extra.tar.xz, next to ../shared/tools/device-deps.sh's deps.tar.xz.
# The offloading tests use accelerate; tools/gpu_session.sh unpacks it after the other deps (the
# machine's own huggingface_hub and safetensors are used).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
python -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$tmp/wheels" accelerate==1.15.0 psutil pyyaml
mkdir -p "$tmp/site" .devdeps
for w in "$tmp"/wheels/*.whl; do python -m zipfile -e "$w" "$tmp/site/"; done
tar -cJf .devdeps/extra.tar.xz -C "$tmp/site" .
rm -rf "$tmp"
ls -la .devdeps/extra.tar.xz
