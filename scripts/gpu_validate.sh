#!/usr/bin/env bash
# One-shot GPU validation for a machine with an NVIDIA GPU, torch (CUDA build) and nvcc already installed
# (e.g. the H100 image: torch 2.11+cu130, Python 3.12). Each step fits in one 10-minute device call:
#
#   bash scripts/gpu_validate.sh build-test    # build the CUDA kernels (PANTHER_CUDA=1), smoke run, cuda tests
#   bash scripts/gpu_validate.sh sanitize      # the smoke run under compute-sanitizer memcheck and racecheck
#   bash scripts/gpu_validate.sh bench-linear  # bf16 linear-op tables (issue #3 targets)
#   bash scripts/gpu_validate.sh bench-other   # attention, conv, linalg tables (issues #4, #5, #6)
#
# Outputs go to $OUT (the device tool's folder) or ./gpu_results. The build is incremental, so later steps on
# the same machine reuse it; on a fresh machine every step builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PANTHER_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

build() {
  # --no-deps: the image already has torch, numpy, tabulate, tqdm, safetensors, transformers.
  python -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
  python -c "import panther_fx, json; print(json.dumps(panther_fx.kernel_info(), indent=1))" | tee "$out/kernel_info.json"
}

case "${1:-}" in
  build-test)
    build
    # every native CUDA kernel once against the CPU (seconds): the first signal, before the full cuda tests
    python scripts/cuda_smoke.py 2>&1 | tee "$out/cuda_smoke.log" || true
    python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
    ;;
  sanitize)
    build
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 9 python scripts/cuda_smoke.py > "$out/$tool.log" 2>&1 \
        && echo "$tool: clean" || echo "$tool: FAILED (exit $?), see $tool.log"
      tail -25 "$out/$tool.log"
    done
    ;;
  bench-linear)
    build
    python benchmarks/linear.py --device cuda --dtype bfloat16 --tokens 1,16,64,256,1024,4096,32768 \
      --sizes 1024,4096,8192,8192x2048 --ranks 32,128,512 2>&1 | tee "$out/linear_bf16.md"
    ;;
  bench-other)
    build
    python benchmarks/attention.py --device cuda --dtype bfloat16 --dims 64 --features 256 \
      --methods sdpa,panther,plain --max-gib 40 2>&1 | tee "$out/attention_bf16.md"
    python benchmarks/conv.py --device cuda --dtype bfloat16 2>&1 | tee "$out/conv_bf16.md"
    python benchmarks/linalg.py --device cuda 2>&1 | tee "$out/linalg.md"
    ;;
  *)
    echo "usage: bash scripts/gpu_validate.sh build-test|sanitize|bench-linear|bench-other" >&2
    exit 2
    ;;
esac
