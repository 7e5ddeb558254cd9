#!/usr/bin/env bash
# On the GPU machine (see README, "On the GPU machine"): build the CUDA kernels, run the gpu-marked tests (the op
# kernels, then the runtime and graphs), then the op tests under compute-sanitizer memcheck. Each part has its own
# time limit and log in $OUT (or ./gpu-logs), so one slow part does not lose the others' results.
# Usage: scripts/gpu_test.sh [pytest -k expr]
set -uo pipefail
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CC=/usr/bin/gcc CXX=/usr/bin/g++
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 - <<'PY'
import torch, pets_compiler  # noqa: F401
print(torch.cuda.get_device_name(), torch.__version__)
print("CUDA kernels:", all(torch._C._dispatch_has_kernel_for_dispatch_key(f"pets::{n}", "CUDA") for n in
      ["lora_delta", "linear_delta", "bias_delta", "scale", "gelu_delta", "row_delta", "layer_norm",
       "segmented_linear", "sparse_delta", "embedding_delta", "adapter"]))
PY
part() {  # name, time limit, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q --maxfail=5 -p no:cacheprovider "$@" ${K:+-k "$K"} >"$OUT/$name.log" 2>&1
  echo "$name: rc=$? $(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -1)"
}
K=${1:-}
part ops-gpu 150 -m gpu tests/custom_ops
part runtime-gpu 360 -m gpu tests --ignore=tests/custom_ops
# memcheck over the kernel tests (a subset of the parameter grid keeps it within a few minutes)
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  python3 -m pytest -q -p no:cacheprovider tests/custom_ops/test_gpu_ops.py -k "uniform or zipf or bert or bitwise or depend or checks or splits" \
  >"$OUT/memcheck.log" 2>&1
echo "memcheck: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) $(grep -E '(passed|failed)' "$OUT/memcheck.log" | tail -1)"
echo "total: $(( $(date +%s) - start )) s"
