#!/usr/bin/env bash
# Build .sglang-gpu/ (git-ignored): what the SGLang test tier needs on the GPU machine and the image
# there lacks, as one archive to carry. Run HERE (it downloads); on the GPU machine run
# tools/sglang_gpu_run.sh (no network there).
#
#   bash tools/sglang_gpu_pack.sh            # -> .sglang-gpu/{site.tar.xz,MANIFEST.txt}, prints the size
#   SGLANG_GPU_PACK=/some/dir bash tools/sglang_gpu_pack.sh
#
# Contents: sglang==0.5.23 (cp312 wheel) and the light runtime dependencies that importing
# `sglang.multimodal_gen...qwen_image` needs (tools/sglang_env.sh LIGHT_DEPS, pins from sglang's own
# Requires-Dist; unpinned ones at the versions the CPU tier is tested with), MINUS what the GPU
# image already has (device README "Python packages already there": numpy, requests, packaging,
# pillow, tqdm, aiohttp, pyyaml, einops, sentencepiece 0.2.2, imageio, transformers 5.17.0,
# huggingface-hub, safetensors, tokenizers, torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0,
# pytest ...). Never torch, triton, torchvision or nvidia-*: the image's CUDA builds must be used.
# The wheels are installed here with `pip install --target --platform ... --python-version 3.12
# --no-deps --no-compile` into a staging tree (so *.data/ and RECORD are right), which is packed
# as site.tar.xz (about half the size of the wheels). MANIFEST.txt lists each wheel and sha256.
#
# transformers: sglang 0.5.23 pins 5.19.0; the image has 5.17.0, with which sglang imports and the
# CPU tier passes (checked with the image's versions, see docs/sglang.md). To pack 5.19.0 anyway
# (+12.6 MB of wheel): SGLANG_GPU_WITH_TRANSFORMERS=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${SGLANG_GPU_PACK:-$ROOT/.sglang-gpu}"
PY="${PYTHON:-python3}"
PYVER="3.12"   # the GPU image's Python (3.12.3)
LIMIT_MIB=60   # what the device call may carry for this pack

PKGS=(
  "sglang==0.5.23"
  # sglang's own pins
  "addict==2.4.0" "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" "diffusers==0.37.0"
  "cache-dit==1.5.1"
  # unpinned by sglang: the versions tools/sglang_env.sh resolved (CPU tier green with them)
  "orjson==3.13.0" "pybase64==1.5.1" "starlette==1.10.0" "msgspec==0.22.0" "pyzmq==27.3.0"
  "pydantic==2.14.3" "pydantic_core==2.50.4" "annotated-types==0.8.0"
  "ipython==9.18.1" "traitlets==5.16.1" "dill==0.4.1" "gguf==0.19.0"
  # imported by compressed-tensors (loguru) / needed by pydantic 2.14 (typing-inspection>=0.4.2;
  # the image has typing-inspection, version unknown: 15 kB, so packed to be sure)
  "loguru==0.7.3" "typing-inspection==0.4.5"
)
if [[ "${SGLANG_GPU_WITH_TRANSFORMERS:-0}" == "1" ]]; then
  PKGS+=("transformers==5.19.0")
fi
FORBIDDEN_RE='^(torch|triton|torchvision|torchaudio|nvidia[-_].*|cuda[-_].*|sglang[-_]kernel|sgl[-_]kernel|flashinfer.*)$'

PLATFORM_ARGS=(--only-binary=:all: --python-version "$PYVER" --implementation cp)
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux_2_5 manylinux1; do
  PLATFORM_ARGS+=(--platform "${tag}_x86_64")
done
PLATFORM_ARGS+=(--platform any)

STAMP_VALUE="py$PYVER ${PKGS[*]}"
if [[ -f "$OUTDIR/site.tar.xz" && -f "$OUTDIR/.stamp" && "$(cat "$OUTDIR/.stamp")" == "$STAMP_VALUE" ]]; then
  echo "sglang_gpu_pack: $OUTDIR is up to date"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "sglang_gpu_pack: downloading ${#PKGS[@]} wheels for CPython $PYVER manylinux x86_64"
  "$PY" -m pip download -q --no-deps --disable-pip-version-check "${PLATFORM_ARGS[@]}" \
    -d "$work/whl" "${PKGS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

  # exactly one wheel per requested package, nothing forbidden
  n_whl=$(find "$work/whl" -name '*.whl' | wc -l)
  if [[ "$n_whl" -ne "${#PKGS[@]}" ]]; then
    echo "sglang_gpu_pack: expected ${#PKGS[@]} wheels, got $n_whl:" >&2; ls "$work/whl" >&2; exit 1
  fi
  for w in "$work"/whl/*.whl; do
    name="$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')"
    if [[ "$name" =~ $FORBIDDEN_RE ]]; then echo "sglang_gpu_pack: refusing $w" >&2; exit 1; fi
  done

  echo "sglang_gpu_pack: installing into a staging tree (no deps, no compile, target CPython $PYVER)"
  "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
    "${PLATFORM_ARGS[@]}" --target "$work/site" "$work"/whl/*.whl \
    2> >(grep -v "is ignored: it is neither" >&2)
  rm -rf "$work/site/bin"  # console scripts with this machine's interpreter path: not used
  for d in torch triton torchvision sgl_kernel; do
    if [[ -e "$work/site/$d" ]]; then echo "sglang_gpu_pack: $d/ ended up in the pack" >&2; exit 1; fi
  done

  mkdir -p "$OUTDIR"
  rm -f "$OUTDIR/site.tar.xz" "$OUTDIR/MANIFEST.txt" "$OUTDIR/.stamp"
  echo "sglang_gpu_pack: compressing (xz -6, a minute or so)"
  tar -C "$work/site" --owner=0 --group=0 -cf - . | xz -T0 -6 > "$OUTDIR/site.tar.xz.part"
  mv "$OUTDIR/site.tar.xz.part" "$OUTDIR/site.tar.xz"
  {
    echo "# sglang GPU pack for CPython $PYVER manylinux x86_64, built $(date -u +%FT%TZ) by tools/sglang_gpu_pack.sh"
    echo "# wheel  sha256  bytes"
    for w in "$work"/whl/*.whl; do
      echo "$(basename "$w")  $(sha256sum "$w" | cut -d' ' -f1)  $(stat -c %s "$w")"
    done
  } > "$OUTDIR/MANIFEST.txt"
  echo "$STAMP_VALUE" > "$OUTDIR/.stamp"
fi

bytes=$(du -cb "$OUTDIR"/site.tar.xz "$OUTDIR"/MANIFEST.txt "$OUTDIR"/.stamp | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "sglang_gpu_pack: $OUTDIR holds $mib MiB ($bytes bytes) for the carry list (limit for this pack: $LIMIT_MIB MiB)"
grep -v '^#' "$OUTDIR/MANIFEST.txt" | awk '{ printf "  %-90s %8.1f kB\n", $1, $3 / 1024 }'
if awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN { exit !(b > l * 1048576) }'; then
  echo "sglang_gpu_pack: TOO LARGE for one device call" >&2; exit 1
fi
