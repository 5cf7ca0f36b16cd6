#!/usr/bin/env bash
# One device call: train the 50m CARVE LM (bf16, Pallas kernels) and then GDN-2 on one H100 through
# `carve-train`'s loop, reporting tokens/s and peak memory (issue 4's single-GPU run).
#
# Prepare here (the GPU machine has no network and no grain):
#   python -m carve_jax.data export --size full --tokenizer byte --max-mb 9 --out .data/train-gpu
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
#     tensorboardX==2.6.5 flax==0.12.10 optax==0.2.8 orbax-checkpoint==0.12.4 chex==0.1.92 \
#     tyro==1.0.16 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0   # the CLIs' flags
# then: run(carry=[".whl", ".data/train-gpu"], command="bash experiments/gpu_train.sh", timeout_s=420).
# Logs and metrics land in $OUT. Not yet run: the session that wrote it had no device time left.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, grain; from carve_jax.ops import pallas_available; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'pallas', pallas_available())"
} 2>&1 | tee "$OUT/env.txt"
run() {  # name timeout_s steps flags...
  local name=$1 limit=$2 steps=$3; shift 3
  timeout "$limit" python3 -m carve_jax.train --preset 50m --compute_dtype bfloat16 --tokens_dir .data/train-gpu \
    --seq_len 1024 --batch_size 32 --steps "$steps" --warmup_steps 20 --lr 1.5e-3 --log_every 10 --eval_every 0 \
    --eval_batches 4 --ckpt_every 100 --out_dir "/tmp/$name" --no-progress "$@" 2>&1 | grep -v "^WARNING:absl" > "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  tail -c 2500 "$OUT/$name.log"; echo "[$name] exit $rc"
  cp "/tmp/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null
  return "$rc"
}
SECONDS=0
if run carve 230 200 --mixer carve; then
  run gdn2 $((380 - SECONDS)) 120 --mixer gdn2
else
  run carve_chunk $((380 - SECONDS)) 100 --mixer carve --impl chunk
fi
echo "total ${SECONDS}s"
