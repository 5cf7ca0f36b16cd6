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
  run lm_compare 170 python3 experiments/lm_compare.py --tokens_dir "$TOK" --steps 200 --d_model 384 --n_layers 4 \
    --n_heads 6 --batch_size 32 --seq_len 512 --eval_every 50
  run efficiency 150 python3 experiments/efficiency.py --batch 1 --seq_len 2048 --steps 6 --warmup 2 --worker_timeout 70
  run mqar 70 python3 experiments/mqar.py --steps 600
  run needle 80 python3 experiments/needle.py --tokens_dir "$TOK" --steps 300
  run content_block_sweep 75 python3 experiments/content_block_sweep.py --train --tokens_dir "$TOK" --steps 150 \
    --no_random --Gs 2,4,8,16,32,64,128,256 --T 1024 --B 2 --tag _gpu
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/results.tgz" -C "$RES" .
