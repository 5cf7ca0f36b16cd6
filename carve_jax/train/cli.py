"""`carve-train` / `python -m carve_jax.train`: train (or resume) a language model.

    carve-train --preset demo --steps 300 --out_dir runs/demo          # CPU, minutes
    carve-train --model carve --d_model 512 --n_layers 12 --n_heads 8 --steps 2000 \\
      --batch_size 64 --seq_len 1024 --compute_dtype bfloat16 --out_dir runs/carve-50m   # a GPU command
    carve-train --config runs/demo/config.json --steps 600 --out_dir runs/demo-600
                                              # a new run with a saved run's settings, trained for 600 steps

Every field of `TrainConfig` and its sections is a flag of its own name (`--help` lists them;
`--model.d_model` works too, `carve_jax.train.flags`); model flags override
`--preset` (default: `tiny`, d_model 64 and 2 layers, or the `--config` file's model). Running the
same command again resumes from the latest checkpoint that verifies in `<out_dir>/checkpoints` (or
`--ckpt_dir`); run again once finished, it reports the run and trains nothing. `--steps` is part of
a run (the learning-rate schedule spans it): a finished run is not extended in place; the
`--config ... --out_dir NEW` line above starts a new run with more steps instead.
One run per `--out_dir` at a time (`<out_dir>/run.lock`).
"""

from __future__ import annotations

import json
import sys

from carve_jax.train.flags import parse_train_args


def main(argv=None) -> int:
  cfg = parse_train_args(argv, prog="carve-train", description=__doc__)
  from carve_jax.train.checkpoint import CheckpointError
  from carve_jax.train.loop import TrainingDivergedError, format_summary, train
  from carve_jax.train.runlock import RunDirError, RunLockedError
  try:
    summary = train(cfg)
  except (CheckpointError, RunLockedError, RunDirError, TrainingDivergedError) as e:
    print(f"carve-train: error: {e}", file=sys.stderr)
    return 1
  if summary["processes"] == 1 or __import__("jax").process_index() == 0:
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "state"}, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
