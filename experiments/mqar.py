"""Multi-query associative recall (Zoology-style; generator in `experiments/tasks/mqar.py`).

One small model per mixer is trained on MQAR rows of length `--train_len` whose number of
key-value pairs is drawn per batch from `--train_pairs`; each model is then scored on a grid of
(sequence length, pairs), longer sequences than trained included (length generalisation).
Accuracy = fraction of query positions whose argmax is the value bound to the queried key.

    python -m experiments.mqar --tiny                 # CPU, < 60 s
    python -m experiments.mqar                        # GPU (experiments/gpu_experiments.sh)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from carve_jax import ops
from carve_jax.configs import ModelConfig
from experiments import flags, report, runtime
from experiments.scoring import masked_accuracy
from experiments.task_models import TaskModelFlags, train_task_models
from experiments.tasks.mqar import mqar_batch


@dataclasses.dataclass(frozen=True)
class MqarFlags(TaskModelFlags):
  """Flags of the MQAR experiment.

  Attributes:
    vocab_size: keys in [1, V/2), values in [V/2, V).
    train_len: training sequence length.
    train_pairs: comma-separated key-value pair counts, one drawn per training batch.
    eval_grid: comma-separated seq_len:pairs cells of the evaluation.
    steps: training steps per model.
    batch_size: rows per batch.
    eval_batches: held-out batches per cell.
  """
  vocab_size: int = 8192
  train_len: int = 256
  train_pairs: str = "8,16,32,64"
  eval_grid: str = "128:8,128:32,256:16,256:32,256:64,512:32,512:64,512:128"
  steps: int = 800
  batch_size: int = 64
  eval_batches: int = 4


TINY = dict(vocab_size=64, train_len=32, train_pairs="2,4,8", eval_grid="32:4,32:8,64:8", steps=20, batch_size=16,
            d_model=32, n_layers=1, eval_batches=1)


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def main(argv=None) -> dict:
  args = flags.parse(MqarFlags, argv, prog="python -m experiments.mqar", description=__doc__, tiny=TINY)
  runtime.setup()
  impl = ops.resolve_impl(args.impl)
  train_pairs = _ints(args.train_pairs)
  grid = [tuple(int(v) for v in x.split(":")) for x in args.eval_grid.split(",")]
  eval_sets = {f"{T}:{P}": [mqar_batch(np.random.default_rng([10_000 + args.seed, T, P, i]), batch_size=args.batch_size,
                                       seq_len=T, num_pairs=P, vocab_size=args.vocab_size)
                            for i in range(args.eval_batches)] for T, P in grid}

  def batch_fn(step: int) -> dict:
    rng = np.random.default_rng([args.seed, step])
    P = train_pairs[int(rng.integers(len(train_pairs)))]
    return mqar_batch(rng, batch_size=args.batch_size, seq_len=args.train_len, num_pairs=P, vocab_size=args.vocab_size)

  def config(mixer):
    cb = 64 if args.train_len >= 64 else 16
    return ModelConfig(mixer=mixer, vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, content_block=cb, chunk_size=cb, mlp_multiple=32,
                       max_seq_len=max(T for T, _ in grid), compute_dtype="bfloat16" if runtime.on_gpu() else "float32",
                       impl=impl)

  def accuracy(model):
    return {k: masked_accuracy(model, b) for k, b in eval_sets.items()}

  name = "mqar" + args.tag
  runs = train_task_models("mqar", args.mixers.split(","), config, batch_fn, steps=args.steps, seed=args.seed,
                             lr=args.lr, accuracy=accuracy, on_run=lambda runs: _write(name, args, impl, grid, runs))
  return _write(name, args, impl, grid, runs)


def _write(name, args, impl, grid, runs) -> dict:
  keys = [f"{T}:{P}" for T, P in grid]
  payload = {"experiment": "mqar", "tiny": args.tiny, "impl": impl,
             "task": {"vocab_size": args.vocab_size, "train_len": args.train_len, "train_pairs": args.train_pairs,
                      "eval_grid": keys, "eval_rows_per_cell": args.eval_batches * args.batch_size},
             "model": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads},
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "train_examples": args.steps * args.batch_size, "runs": runs}
  rows = [[r["mixer"], r["params"]["total"]] + [r["accuracy"][k] for k in keys] + [float(np.mean(list(r["accuracy"].values())))]
          for r in runs]
  md = (f"MQAR (Zoology-style), vocab {args.vocab_size}; one model per mixer (d_model {args.d_model}, "
        f"{args.n_layers} layers, {args.n_heads} heads, seed {args.seed}) trained {args.steps} steps x "
        f"{args.batch_size} rows of length {args.train_len} with pairs in {{{args.train_pairs}}} "
        f"({args.steps * args.batch_size:,} examples, each freshly generated); accuracy over "
        f"{args.eval_batches * args.batch_size} held-out rows per cell (columns: seq_len:pairs; lengths above "
        f"{args.train_len} test length generalisation). impl={impl}.\n\n"
        + report.md_table(["mixer", "params"] + keys + ["mean"], rows))
  plt = report.plt()
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) + 2), 4))
  w = 0.8 / max(len(runs), 1)
  for i, r in enumerate(runs):
    ax.bar(np.arange(len(keys)) + i * w, [r["accuracy"][k] for k in keys], w, label=r["mixer"])
  ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, keys, rotation=30)
  ax.set(ylabel="accuracy", xlabel="seq_len:pairs", ylim=(0, 1.02),
         title=f"MQAR ({'tiny, CPU' if args.tiny else 'GPU'}), trained at length {args.train_len}")
  ax.legend(fontsize=8)
  report.write_results(name, args.out_dir or report.results_dir("mqar"), payload, md, fig)
  plt.close(fig)
  return payload


if __name__ == "__main__":
  main()
