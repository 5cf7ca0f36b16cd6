#!/usr/bin/env bash
# All experiments of issue 5 in ONE device call (about 9 minutes on one H100), results under $OUT.
# Needs, carried (git-ignored): .whl/ (flax, optax, chex, orbax, grain wheels: see docs/DATA.md) and
# .data/exp (byte export: python -m carve_jax.data export --size full --tokenizer byte --max-mb 6 --out .data/exp).
#   bash experiments/gpu_experiments.sh            # then: $OUT/results.tgz, $OUT/log.txt
# Each experiment has its own time limit; each writes partial results as it goes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_experiments}
RES="$OUT/results"
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# Compilation dominated the first run (49 s for a 4-layer LM step; the 1.3B step did not compile in 70 s):
# skip GEMM autotuning and Triton GEMM fusions (cuBLAS with heuristics). Same flags for every mixer.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
TOK=${TOKENS_DIR:-.data/exp}
run() {  # run NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s) $(date -u +%T)"
  timeout "$secs" "$@" --out_dir "$RES" 2>&1 | grep -v -e "^WARNING" -e "^I0000" | tee "$RES/$name.log"
  echo "== $name rc=${PIPESTATUS[0]} $(date -u +%T)"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  run lm_compare 165 python3 experiments/lm_compare.py --tokens_dir "$TOK" --steps 200 --d_model 384 --n_layers 4 \
    --n_heads 6 --batch_size 32 --seq_len 512 --eval_every 50
  # The 24-layer step does not compile within the call's budget: a 4-layer slice of the 1.3B config.
  run efficiency 190 python3 experiments/efficiency.py --batch 1 --seq_len 2048 --n_layers 4 --steps 6 --warmup 2 \
    --impl pallas --worker_timeout 90
  # Capability probes: the XLA chunk form (same function as the kernels, compiles faster).
  run needle 85 python3 experiments/needle.py --tokens_dir "$TOK" --steps 300 --impl chunk
  run mqar 75 python3 experiments/mqar.py --steps 600 --impl chunk --eval_grid 256:16,256:32,256:64,512:64,512:128
  run content_block_sweep 55 python3 experiments/content_block_sweep.py --train --tokens_dir "$TOK" --steps 150 \
    --train_Gs 16,64,128 --no_random --Gs 4,16,64,256 --T 512 --B 1 --tag _gpu
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/results.tgz" -C "$RES" .
