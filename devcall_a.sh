# device call A (issue 11 probe, issue 13 packed CARVE): GPU tests, CARVE state stand-ins, kernel bench
export CARVE_COMMIT=25cc3cc PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/wh .whl/*.whl 2>/dev/null; export PYTHONPATH=$PWD:/tmp/wh
echo "== tests $(date -u +%T)"
timeout 170 python3 -m pytest -q -s -m gpu tests/test_pallas_segments.py tests/test_pallas_kernels.py -p no:cacheprovider -k "packed and carve or compiled and carve and bfloat16" 2>&1 | grep -E "GPU max|passed|failed|Error|error" | tee $OUT/gpu_tests.log | tail -8
echo "== probe $(date -u +%T)"
timeout 110 python3 -m experiments.kernel_probe --B 2 --T 8192 --carve-only --reps 20 --variants base,treeinv,noinv,unrollinv --out $OUT/probe_carve_b2.json 2>&1 | grep -E "probe|Error"
echo "== bench $(date -u +%T)"
timeout 140 python3 -m experiments.bench_kernel --out $OUT/bench_kernel --reps 10 --impls pallas_carve,pallas_carve_packed 2>&1 | grep -vi warn | tail -14
echo "== done $(date -u +%T)"
