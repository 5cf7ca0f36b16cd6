#!/usr/bin/env bash
# One device call on the GPU machine: the GPU-only kernel tests, then the benchmark (FLA in its own
# process first, then the JAX side). Logs and results land in $OUT (default /tmp/kernel_check).
# Needs in .peers/ (git-ignored, carried): fla_bench.py, fla_autotune_h100.tgz, fla_core-0.6.0 wheel.
#   bash experiments/gpu_kernel_check.sh [bench-seconds] [test-seconds] [extra bench args...]
# TESTS (default: every gpu test) is a pytest -k expression selecting among them.
set -uo pipefail
OUT=${OUT:-/tmp/kernel_check}
mkdir -p "$OUT"
BENCH_S=${1:-330}
TEST_S=${2:-200}
shift 2 2>/dev/null || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peers/fla_core-*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== gpu tests $(date -u +%T)"
timeout "$TEST_S" python3 -m pytest -v -s -m gpu tests/test_pallas_kernels.py -p no:cacheprovider -k "${TESTS:-gpu}" \
  2>&1 | tee "$OUT/gpu_tests.log"
echo "== bench $(date -u +%T)"
timeout "$BENCH_S" python3 experiments/bench_kernel.py --out "$OUT/bench_kernel" \
  --fla-bench .peers/fla_bench.py --fla-seed .peers/fla_autotune_h100.tgz --fla-path /tmp/site "$@" \
  2>&1 | tee "$OUT/bench.log"
echo "== done $(date -u +%T)"
