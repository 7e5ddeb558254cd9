#!/usr/bin/env bash
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 CC=/usr/bin/gcc CXX=/usr/bin/g++ PETS_COMMIT=$1
s=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - s )) s"
timeout 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_gpu_graphs.py tests/runtime/test_packing.py > $OUT/rt.log 2>&1; echo "rt rc=$? $(tail -1 $OUT/rt.log)  $(( $(date +%s) - s )) s"
timeout $(( 500 - ($(date +%s) - s) )) python3 -m bench.batching --tasks 32,128 --sigmas 1,8 --steady-queries 4096 --out $OUT > $OUT/batching.log 2>&1; echo "batching rc=$? $(( $(date +%s) - s )) s"
tail -30 $OUT/batching.log
