#!/usr/bin/env bash
# One-shot GPU validation for a machine with an NVIDIA GPU, torch (CUDA build) and nvcc already installed
# (e.g. the H100 image: torch 2.11+cu130, Python 3.12, no optuna). Each step fits in one 10-minute device call;
# issue them back to back so the machine stays warm and the build is reused:
#
#   bash scripts/gpu_validate.sh build-test       # build the CUDA kernels (PANTHER_CUDA=1), smoke run, cuda tests
#   bash scripts/gpu_validate.sh sanitize         # the smoke run under compute-sanitizer memcheck and racecheck
#   bash scripts/gpu_validate.sh bench-linear     # bf16 linear-op tables, kept-t backward gain (issue #3)
#   bash scripts/gpu_validate.sh bench-attention  # bf16 Performer vs SDPA tables (issue #4)
#   bash scripts/gpu_validate.sh bench-conv       # bf16 conv tables (issue #5)
#   bash scripts/gpu_validate.sh bench-linalg     # rsvd, cqrrpt, lstsq, FWHT tables (issue #6)
#   bash scripts/gpu_validate.sh bench-overhead   # per-call host cost of the linear/attention ops on CUDA
#   bash scripts/gpu_validate.sh bench-policy     # min_speedup's choices re-timed: linear >= 1.0x, conv >= 1.5x (#3, #5)
#   bash scripts/gpu_validate.sh bench-cpu-linalg # cqrrpt vs SciPy's pivoted QR on the host's cores (issue #6)
#
# Several steps may be named in one call (`bash scripts/gpu_validate.sh bench-linear bench-conv`); the build runs
# once. Outputs go to $OUT (the device tool's folder) or ./gpu_results, with a gzipped copy of the built extension
# (_C.abi3.so.gz). A later call on a fresh machine can skip the build: unpack that copy to panther_fx/_C.abi3.so,
# carry it, and set PANTHER_PREBUILT=1 (only valid while csrc/ is unchanged and the torch version is the same).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
PY="${PYTHON:-python3}"  # the image's torch lives in its python3
export PYTHONUNBUFFERED=1 PANTHER_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

build() {
  # The toolkit first: a wrong CUDA_HOME should fail in seconds, not after the pip log.
  command -v nvcc > /dev/null && nvcc --version | tail -1
  $PY -c "import torch; from torch.utils.cpp_extension import CUDA_HOME; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'CUDA_HOME', CUDA_HOME, torch.cuda.get_device_name(0))"
  # --no-deps: the image already has torch, numpy, tabulate, tqdm, safetensors, transformers.
  if [[ "${PANTHER_PREBUILT:-0}" == 1 ]]; then
    # metadata and entry points only; the carried panther_fx/_C.abi3.so is the extension
    PANTHER_BUILD_EXT=0 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
      || { tail -50 "$out/build.log"; exit 1; }
  else
    $PY -m pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
    # the C++ runtime must be torch's shared one (setup.py)
    readelf -d panther_fx/_C.abi3.so | grep -q 'libstdc++' || echo "WARNING: _C.abi3.so does not link libstdc++.so"
    gzip -c panther_fx/_C.abi3.so > "$out/_C.abi3.so.gz"
  fi
  $PY -c "import panther_fx, json; print(json.dumps(panther_fx.kernel_info(), indent=1))" | tee "$out/kernel_info.json"
}

sanitize() {  # sanitize TOOL: the smoke run under compute-sanitizer, instrumenting only the panther kernels
  local filter=()
  compute-sanitizer --help | grep -q -- "--kernel-name" && filter=(--kernel-name kns=panther)
  # Without the caching allocator, an out-of-bounds access leaves its cudaMalloc'd block instead of landing in
  # a neighbouring tensor of the same segment, where memcheck cannot see it.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" ${filter[@]+"${filter[@]}"} --print-limit 50 --error-exitcode 9 \
    $PY scripts/cuda_smoke.py > "$out/$1.log" 2>&1 && echo "$1: clean" || echo "$1: FAILED (exit $?), see $1.log"
  tail -25 "$out/$1.log"
}

run_step() {
case "$1" in
  build-test)
    # every native CUDA kernel once against the CPU (seconds): the first signal, before the full cuda tests
    $PY scripts/cuda_smoke.py 2>&1 | tee "$out/cuda_smoke.log" || true
    $PY -c "import pytest_timeout" 2> /dev/null && pytest_timeout=(--timeout=240)
    $PY -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors -rfEs --durations=15 \
      ${pytest_timeout[@]+"${pytest_timeout[@]}"} 2>&1 | tee "$out/cuda_tests.log"
    ;;
  sanitize)
    sanitize memcheck
    sanitize racecheck
    ;;
  bench-linear)
    $PY benchmarks/linear.py --device cuda --dtype bfloat16 --tokens 1,16,64,256,1024,4096,32768 \
      --sizes 1024,4096,8192,8192x2048 --ranks 32,128,512 2>&1 | tee "$out/linear_bf16.md"
    $PY benchmarks/linear_kept_t.py --device cuda --dtype bfloat16 2>&1 | tee "$out/linear_kept_t_bf16.md"
    ;;
  bench-attention)
    $PY benchmarks/attention.py --device cuda --dtype bfloat16 --dims 64 --features 256 \
      --methods sdpa,panther,plain --max-gib 40 2>&1 | tee "$out/attention_bf16.md"
    ;;
  bench-conv)
    # Activations up to 2^30 elements: the 9x9, C = 1024, 256² case alone (3.6e14 FLOP per forward) would
    # take most of the call.
    $PY benchmarks/conv.py --device cuda --dtype bfloat16 --sketch --max-elements 1073741824 2>&1 \
      | tee "$out/conv_bf16.md"
    ;;
  bench-linalg)
    $PY benchmarks/linalg.py --device cuda 2>&1 | tee "$out/linalg.md"
    ;;
  bench-overhead)
    $PY benchmarks/call_overhead.py --device cuda 2>&1 | tee "$out/call_overhead.md"
    ;;
  bench-policy)
    # A reduced grid: every case compiles twice (a few seconds each). Conv fractions 1/8 and 1/16 are the
    # shapes with >= 4x fewer parameters, which issue #5's target is about.
    $PY benchmarks/policy_speed.py --op linear --device cuda --dtype bfloat16 --min-speedup 1.0 \
      --tokens 1,16,64,256,4096,32768 --sizes 1024,4096,8192 --ranks 32,128 2>&1 | tee "$out/policy_linear_bf16.md"
    $PY benchmarks/policy_speed.py --op conv2d --device cuda --dtype bfloat16 --min-speedup 1.5 \
      --image-sizes 32,64,128 --fractions 0.125,0.0625 2>&1 | tee "$out/policy_conv_bf16.md"
    ;;
  bench-cpu-linalg)
    threads=$(nproc)
    OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
      $PY benchmarks/linalg.py --device cpu --threads "$threads" --only cqrrpt 2>&1 | tee "$out/cpu_cqrrpt.md"
    ;;
  *)
    echo "usage: bash scripts/gpu_validate.sh build-test|sanitize|bench-linear|bench-attention|bench-conv|bench-linalg|bench-overhead|bench-policy|bench-cpu-linalg" >&2
    exit 2
    ;;
esac
}

[[ $# -gt 0 ]] || { run_step usage; }
for step in "$@"; do
  case "$step" in build-test|sanitize|bench-linear|bench-attention|bench-conv|bench-linalg|bench-overhead|bench-policy|bench-cpu-linalg) ;;
    *) run_step "$step" ;; esac
done
build
pytest_timeout=()
for step in "$@"; do
  echo "=== $step"
  run_step "$step" || echo "=== $step failed (exit $?)"
done
