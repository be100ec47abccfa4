#!/usr/bin/env bash
# Compile-only check of csrc/cuda/*.cu (or the files given) with nvcc, for a machine without a GPU or a CUDA
# build of torch: catches build errors before a device session spends its minutes on them. Nothing is linked
# or run, so it says nothing about correctness. Flags as setup.py's CUDA build; arch sm_90 unless ARCH is set.
#
#   bash scripts/cuda_compile_check.sh                       # every CUDA source
#   bash scripts/cuda_compile_check.sh csrc/cuda/linear_cuda.cu
#   PTXAS_VERBOSE=1 bash scripts/cuda_compile_check.sh ...   # registers and spills per kernel
#
# A CPU wheel of torch ships the c10/cuda headers without the generated cuda_cmake_macros.h (written here to a
# temporary folder) and ATen/cuda includes cuSPARSE/cuBLAS headers that a bare toolkit may lack: point
# CUDA_EXTRA_INCLUDE at a folder that has them (e.g. the include/ of the pip package nvidia-cusparse).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc > /dev/null || { echo "nvcc not found" >&2; exit 2; }
torch_inc=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
extra=()
if [[ -n "${CUDA_EXTRA_INCLUDE:-}" ]]; then extra=(-I"$CUDA_EXTRA_INCLUDE"); fi
if [[ "${PTXAS_VERBOSE:-0}" == 1 ]]; then extra+=(-Xptxas -v); fi
arch="${ARCH:-90}"
status=0
for src in "${@:-csrc/cuda/*.cu}"; do
  for f in $src; do
    echo "== $f"
    nvcc -c "$f" -o "$stub/$(basename "$f").o" -I"$stub" "${extra[@]}" -I"$torch_inc" \
      -I"$torch_inc/torch/csrc/api/include" -I"$py_inc" -Icsrc -DPANTHER_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H \
      -DTORCH_EXTENSION_NAME=_C -O3 -std=c++17 -gencode "arch=compute_$arch,code=sm_$arch" \
      --expt-relaxed-constexpr -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
      -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC > "$stub/log" 2>&1 \
      || { grep -B2 -A3 "error" "$stub/log" | head -60; status=1; }
    grep -E "registers|spill" "$stub/log" || true  # PTXAS_VERBOSE=1 only
  done
done
exit $status
