#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/cuda/*.cu) with nvcc for sm_90, when nvcc exists.
# Nothing runs on a GPU here: this only proves the kernels build.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found; skipping the CUDA compile check."
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
sources=(csrc/cuda/*.cu)
for src in "${sources[@]}"; do
  "$NVCC" -arch=sm_90 -std=c++17 -O3 -Icsrc/include -c "$src" -o "$out/$(basename "$src" .cu).o"
  echo "check_cuda: $src compiles for sm_90"
done
echo "check_cuda: ${#sources[@]} CUDA source(s) OK"
