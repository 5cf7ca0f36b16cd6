"""`carve-train` / `python -m carve_jax.train`: train (or resume) a language model.

    carve-train --preset demo --steps 300 --out_dir runs/demo
    carve-train --model carve --d_model 512 --n_layers 12 --n_heads 8 --steps 2000 \\
      --batch_size 64 --seq_len 1024 --compute_dtype bfloat16 --out_dir runs/carve-50m
    carve-train --config runs/demo/config.json --steps 600     # start from a saved config

Every field of `TrainConfig` and its sections is a flag (`--help` lists them). Running the same
command again resumes from the latest checkpoint in `<out_dir>/checkpoints` (or `--ckpt_dir`).
"""

from __future__ import annotations

import json
import sys

from carve_jax.train.config import parse_train_args


def main(argv=None) -> int:
  cfg = parse_train_args(argv, prog="carve-train", description=__doc__.splitlines()[0])
  from carve_jax.train.loop import format_summary, train
  summary = train(cfg)
  if summary["processes"] == 1 or __import__("jax").process_index() == 0:
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "state"}, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
