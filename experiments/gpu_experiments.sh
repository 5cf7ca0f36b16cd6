#!/usr/bin/env bash
# Issue 5's GPU experiments, as one script for one or two device calls on one H200 or H100; results under $OUT.
# Needs, carried (git-ignored): .whl/ (grain, array_record, portpicker, importlib_resources, and for the
# flags tyro 1.0.16, docstring-parser 0.18.0, typeguard 4.6.1, typing-extensions 4.16.0: wheels for
# Python 3.12; the GPU image has jax, flax, optax, chex, orbax) and .data/exp (byte export:
# python -m carve_jax.data export --size full --tokenizer byte --max-mb 6 --out .data/exp).
#   ONLY=lm_compare,content_block_sweep BUDGET=470 bash experiments/gpu_experiments.sh  # 297 s on the H200 (call 4)
#   ONLY=mqar,needle BUDGET=555 bash experiments/gpu_experiments.sh                     # 501 s on the H200 (call 6)
#   BUDGET=500 bash experiments/gpu_experiments.sh   # all four; seconds until every experiment is stopped
#   EXTRA=--tiny THREADS=1 JAX_PLATFORMS=cpu PY=.venv/bin/python bash experiments/gpu_experiments.sh  # CPU, tiny sizes
# then: $OUT/results.tgz (refreshed every 20 s, so a cut call still returns what was written), $OUT/log.txt.
#
# Sizes. The H200 call of 2026-12-01 (experiments/results/archive/2026-12-01/gpu_run3_log.txt) measured the XLA chunk form
# at 146k-197k training tokens/s for every model here, small or not (d 128 x 2 layers MQAR: 146k; d 384
# x 4 layers LM: 184k-196k): a run's GPU time is its token count / ~170k. The sizes below are set from
# that: lm_compare 9 runs x 3.3M tokens (~20 s each), the G sweep 8 runs x 3.3M; MQAR 5 runs x 14.7M
# tokens (up to ~75 s each: 190k-380k tokens/s in call 6) and needle 5 runs x 24.6M tokens (~35 s each:
# it trains at 670k-1.56M tokens/s). All four do not fit one 9-minute call: use the two calls above. At these
# sizes needle (trained at 512 tokens) stays on its loss plateau for every mixer; trained at 128 tokens on a
# CPU, CARVE and GDN-2 leave it with one seed of three (experiments/results/needle/needle_cpu*.md): train short.
# (That call ran all four at once with MQAR at 24.6M tokens a mixer; MQAR's first model held the GPU
# for 168 s, and needle and most of the rest never got it.)
#
# Compilation ate the two H100 calls, so here:
#  * the experiments run as processes at once, so their models compile in parallel on the CPU cores,
#    and in each process every model's step compiles once, in background threads (5 + 3 + 3 + 2 = 13
#    for the 16 cores, in the order the models train), from the start (seeds reuse it:
#    carve_jax/train/batch_loop.py, `StepCache`); on the H200 each step compiled in 5-16 s;
#  * the timed training loops take turns on the GPU (CARVE_GPU_LOCK, an exclusive file lock held for
#    each run's steps and evaluations), so tokens/s are measured with the GPU to one process; a
#    process of higher CARVE_GPU_PRIORITY that is waiting or setting up its next run goes first:
#    lm_compare > mqar > needle > G sweep;
#  * the XLA chunk form (impl=chunk) everywhere: it compiles faster than the Pallas kernels, and the
#    kernels were being rewritten; GEMM autotuning off (the same for every model);
#  * every experiment writes its results after each model, and is stopped at the budget's end.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_experiments}
RES="$OUT/results"
mkdir -p "$RES"
BUDGET=${BUDGET:-420}
T0=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"
export CARVE_GPU_LOCK=/tmp/carve_gpu.lock
rm -f "$CARVE_GPU_LOCK"*
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
TOK=${TOKENS_DIR:-.data/exp}
PY=${PY:-python3}
snapshot() { tar czf "$OUT/results.tgz.tmp" -C "$RES" . 2>/dev/null && mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
( while sleep 20; do snapshot; done ) &  # partial results come back even if the call is cut
SNAP=$!
run() {  # run NAME PRIORITY COMPILE_THREADS CMD...   (in the background; stopped at the budget's end)
  local name=$1 prio=$2 threads=${THREADS:-$3}; shift 3
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  echo "== $name start $(date -u +%T) (priority $prio, $threads compile threads, ${left}s left)"
  ( CARVE_GPU_PRIORITY=$prio CARVE_COMPILE_THREADS=$threads timeout -k 5 "$left" "$@" --out_dir "$RES" ${EXTRA:-} > "$RES/$name.log" 2>&1
    echo "== $name rc=$? $(date -u +%T) after $(( $(date +%s) - T0 ))s" ) &
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  # lm_compare: the H100 call's size (8.3M params, 200 steps x 32 x 512 bytes), all five mixers, 3 seeds CARVE/GDN-2.
  run lm_compare 3 5 "$PY" -m experiments.lm_compare --tokens_dir "$TOK" --impl chunk --steps 200 --d_model 384 \
    --n_layers 4 --n_heads 6 --batch_size 32 --seq_len 512 --eval_every 50 --seeds 3 --other_seeds 1
  # mqar: 800 steps x 64 rows left every recurrent mixer on the loss plateau (call 5, 2026-12-01); call 3's
  # CARVE left it after ~700 steps x 128 rows. 1800 steps x 64 rows, ~78 s a mixer at ~190k tokens/s.
  run mqar 2 3 "$PY" -m experiments.mqar --impl chunk --vocab_size 512 --train_len 128 --train_pairs 8,16,32 \
    --eval_grid 128:8,128:16,128:32,256:32,256:64,512:64 --steps 1800 --batch_size 64 --d_model 128 --n_layers 2 \
    --n_heads 2 --lr 3e-3
  # needle: 400 steps left every mixer on the loss plateau (call 5); 1500 steps, ~40 s a mixer at ~600k tokens/s.
  # It gets the GPU after mqar (priority), so the budget may cut its last mixers.
  # needle: trained at 512 tokens on the three probes plus a training-only multi-query task (8 needles, all
  # queried: denser supervision than one answer a row), probed at 512 (trained length) to 8192.
  run needle 1 3 "$PY" -m experiments.needle --tokens_dir "$TOK" --impl chunk --train_len 512 \
    --eval_lens 512,1024,2048,4096,8192 --n_needles 4 --train_needles 8 --width 1 \
    --train_tasks single,multikey,multivalue,multiquery --steps 1500 --batch_size 32 --d_model 128 --n_layers 2 \
    --n_heads 2 --lr 3e-3
  run content_block_sweep 0 2 "$PY" -m experiments.content_block_sweep --train --tokens_dir "$TOK" --impl chunk \
    --train_Gs 16,32,64,128 --train_seeds 2 --steps 200 --batch_size 32 --seq_len 512 --d_model 256 --n_layers 4 \
    --n_heads 4 --no_random --Gs 4,16,64,256 --T 512 --B 1 --tag _gpu
  wait
  echo "== all done after $(( $(date +%s) - T0 ))s"
  for f in "$RES"/*.log; do echo "---- $f"; grep -v -e "^WARNING" -e "^I0000" -e "^W0000" "$f" | tail -60; done
} 2>&1 | tee "$OUT/log.txt"
kill "$SNAP" 2>/dev/null
cp "$OUT/log.txt" "$RES/gpu_log.txt"
snapshot
