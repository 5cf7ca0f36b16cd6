#!/usr/bin/env bash
# One device call on the GPU machine: the kernel benchmark (FLA in its own process first, then the
# JAX side), the per-kernel probe, an ncu profile of one launch of each kernel, and the GPU-only
# kernel tests. Logs and results land in $OUT (default /tmp/kernel_check).
# Needs in .peers/ (git-ignored, carried): fla_bench.py, fla_autotune_h200.tgz, fla_core-0.6.0 wheel.
#   STEPS=bench,probe,ncu,tests bash experiments/gpu_kernel_check.sh [bench-s] [test-s] [bench args...]
# STEPS picks and orders the steps (bench, probe, ncu, mosaic, tests; default: bench,tests); TESTS (default: every gpu test) is a
# pytest -k expression over TEST_FILES (default tests/test_pallas_kernels.py); PROBE_S / NCU_S / MOSAIC_S are those steps' time limits (default 260 / 150 / 240 s; the whole probe at B2 T8192 needs ~250 s: it builds every intermediate first); FLA=0
# leaves the FLA rows out of the benchmark; PROBE_ARGS go to kernel_probe.py (e.g. "--B 2 --T 8192"); NCU_KERNELS
# (regex, default every kernel but carve_state: ncu hangs on it, v6 and v7 in NOTES) and NCU_SECTIONS (default: speed of light, occupancy, launch, warp states)
# pick what ncu profiles.
set -uo pipefail
OUT=${OUT:-/tmp/kernel_check}
mkdir -p "$OUT"
BENCH_S=${1:-330}
TEST_S=${2:-200}
shift 2 2>/dev/null || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps a caller's site folder (carried wheels: tyro)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peers/fla_core-*.whl
# The experiments' flags need tyro (not on the GPU image): carry .whl/ with tyro 1.0.16, docstring-parser
# 0.18.0, typeguard 4.6.1 and typing-extensions 4.16.0 (README, "Pallas kernels").
if ls .whl/tyro-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/wh .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/wh
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files" | tee -a "$OUT/gpu.txt"
IFS=, read -ra steps <<< "${STEPS:-bench,tests}"
for step in "${steps[@]}"; do
  echo "== $step $(date -u +%T)"
  case $step in
    bench) fla=(--fla-bench .peers/fla_bench.py --fla-seed .peers/fla_autotune_h200.tgz --fla-path /tmp/site)
           [ "${FLA:-1}" = 0 ] && fla=()
           timeout "$BENCH_S" python3 -m experiments.bench_kernel --out "$OUT/bench_kernel" "${fla[@]}" "$@" \
             2>&1 | tee "$OUT/bench.log" ;;
    probe) timeout "${PROBE_S:-260}" python3 -m experiments.kernel_probe --out "$OUT/probe.json" ${PROBE_ARGS:-} 2>&1 \
             | grep -v -i warn | tee "$OUT/probe.log" ;;
    ncu) sections=()
         for sec in ${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats}; do sections+=(--section "$sec"); done
         timeout "${NCU_S:-150}" ncu --clock-control none --target-processes all \
           --kernel-name regex:"${NCU_KERNELS:-gated_delta}" "${sections[@]}" \
           python3 -m experiments.kernel_probe --once ${PROBE_ARGS:-} > "$OUT/ncu.txt" 2>&1; tail -c 6000 "$OUT/ncu.txt" ;;
    mosaic) # the Mosaic GPU state loop (NOTES v8, v9): the per-step probe, the loop's profiler trace, then the loop (the default) with stand-ins against the Triton one
            export MOSAIC_GPU_DUMP_PTXAS=1
            { timeout "${MOSAIC_S:-240}" python3 -m experiments.mosaic_step_probe --out "$OUT/step.json"
              timeout "${MOSAIC_S:-240}" python3 -m experiments.mosaic_step_probe --trace-loop "$OUT/trace" \
                --out "$OUT/trace_regions.json"
              timeout "${MOSAIC_S:-240}" python3 -m experiments.kernel_probe --B 2 --T 8192 --carve-only \
                --variants base,noinv,mosaic_1pass --carve-configs carve_state_kernel=triton --out "$OUT/mosaic_probe.json"
            } 2>&1 | grep -v -i warn | tee "$OUT/mosaic.log"
            unset MOSAIC_GPU_DUMP_PTXAS ;;
    tests) timeout "$TEST_S" python3 -m pytest -v -s -m gpu ${TEST_FILES:-tests/test_pallas_kernels.py} -p no:cacheprovider \
             -k "${TESTS:-gpu}" 2>&1 | tee "$OUT/gpu_tests.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "== done $(date -u +%T)"
