#!/usr/bin/env bash
# On the GPU machine (see README, "GPU machine"): build the CUDA kernels, run the gpu-marked tests, then the kernel
# tests under compute-sanitizer memcheck. Logs go to $OUT (or ./gpu-logs). Usage: scripts/gpu_test.sh [pytest -k expr]
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
      ["lora_delta", "linear_delta", "bias_delta", "scale", "layer_norm", "segmented_linear", "sparse_delta",
       "embedding_delta", "adapter"]))
PY
python3 -m pytest -q -m gpu -x -p no:cacheprovider tests ${1:+-k "$1"} 2>&1 | tail -25 | tee "$OUT/pytest-gpu.log"
# memcheck over the kernel tests (a subset of the parameter grid keeps it within minutes)
compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  python3 -m pytest -q -x -p no:cacheprovider tests/custom_ops/test_gpu_ops.py -k "uniform or zipf or bert or bitwise or depend or checks" \
  >"$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? ($(grep -c "Invalid\|ERROR SUMMARY" "$OUT/memcheck.log") error lines)"; tail -5 "$OUT/memcheck.log"
echo "total: $(( $(date +%s) - start )) s"
