#!/usr/bin/env bash
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 CC=/usr/bin/gcc CXX=/usr/bin/g++ PETS_COMMIT=$1
s=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - s )) s"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/runtime/test_gpu_graphs.py > $OUT/rt.log 2>&1; echo "rt rc=$? $(tail -1 $OUT/rt.log)  $(( $(date +%s) - s )) s"
timeout 280 python3 -m bench.throughput --kinds mix_dense,lora_r8 --tasks 32,128 --shapes 64x128 --iters 20 --budget 1 --out $OUT > $OUT/tp.log 2>&1; echo "tp rc=$? $(( $(date +%s) - s )) s"
tail -25 $OUT/tp.log
