#!/usr/bin/env bash
# One GPU-machine call: scripts/gpu_test.sh (build, gpu tests, memcheck), the op probe, then a bench subset.
# Usage: scripts/gpu_session.sh "BENCH ARGS" [BENCH_TIMEOUT_S]
set -uo pipefail
OUT=${OUT:-gpu-logs}
timeout 330 scripts/gpu_test.sh
echo "== op times"; timeout 90 python3 scripts/op_times.py 2>&1 | tail -20 | tee "$OUT/op_times.txt"
echo "== bench $1"
timeout "${2:-240}" python3 -m bench.throughput $1 --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench.txt"
