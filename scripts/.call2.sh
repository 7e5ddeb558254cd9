#!/usr/bin/env bash
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 CC=/usr/bin/gcc CXX=/usr/bin/g++ PETS_COMMIT=$1
s=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - s )) s"
timeout 100 python3 -m pytest -q -p no:cacheprovider --maxfail=5 -m gpu tests/custom_ops > $OUT/ops.log 2>&1; echo "ops rc=$? $(tail -1 $OUT/ops.log)  $(( $(date +%s) - s )) s"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_gpu_graphs.py -k "compiled or unmasked" > $OUT/rt.log 2>&1; echo "rt rc=$? $(tail -1 $OUT/rt.log)  $(( $(date +%s) - s )) s"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 python3 -m pytest -q -p no:cacheprovider tests/custom_ops/test_gpu_ops.py -k "adapter or gelu or row_delta" > $OUT/memcheck.log 2>&1
echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' $OUT/memcheck.log | tail -1) $(tail -1 $OUT/memcheck.log) $(( $(date +%s) - s )) s"
timeout 70 python3 -m bench.profile_runtime --kind mix_dense --tasks 32 --batch 64 --seq 128 > $OUT/profile.txt 2>&1; echo "profile rc=$? $(( $(date +%s) - s )) s"
timeout $(( 585 - ($(date +%s) - s) )) python3 -m bench.throughput --kinds mix_dense,lora_r8,pfeiffer,ia3,bitfit --tasks 32,128 --shapes 64x128 --iters 20 --budget 1 --out $OUT > $OUT/tp.log 2>&1; echo "tp rc=$? $(( $(date +%s) - s )) s"
tail -14 $OUT/tp.log
