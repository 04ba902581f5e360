#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/cuda/*.cu, and tests/csrc/attn_math_device.cu: the shared
# math header from device code) with nvcc for sm_90, when nvcc exists,
# and the op's host registration (csrc/cuda/*.cpp) against the installed torch's headers
# (a CPU torch ships c10/cuda's headers but not the one its CMake generates: a stand-in
# is written for the check). Nothing runs on a GPU here: this only proves they build.
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
# The shared math header used from device code (tests/csrc: a check, not part of engine._C).
"$NVCC" -arch=sm_90 -std=c++17 -O3 -Icsrc/include -c tests/csrc/attn_math_device.cu -o "$out/attn_math_device.o"
echo "check_cuda: csrc/include/loom/attn_math.h compiles as device code (tests/csrc/attn_math_device.cu)"
TORCH_INC=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
CUDA_INC=
for d in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$NVCC")")/include" /usr/local/cuda/include; do
  if [[ -f "$d/cuda_runtime.h" ]]; then CUDA_INC=$d; break; fi
done
if [[ -z "$TORCH_INC" || -z "$CUDA_INC" ]]; then
  echo "check_cuda: torch or the CUDA headers not found; skipping the host-side check."
  exit 0
fi
mkdir -p "$out/stub/c10/cuda/impl"
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
hosts=(csrc/cuda/*.cpp)
for src in "${hosts[@]}"; do
  ${CXX:-g++} -std=c++20 -fsyntax-only -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$out/stub" \
    -I"$CUDA_INC" -Icsrc/include -Icsrc "$src"
  echo "check_cuda: $src compiles against torch's headers"
done
