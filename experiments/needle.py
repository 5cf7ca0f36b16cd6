"""RULER-style retrieval probes: single needle, multi-key, multi-value (`experiments/tasks/needle.py`).

One small model per mixer is trained on a mixture of the three tasks at `--train_len` tokens,
with real corpus text as the haystack (byte tokens; needles use tokens above 255), then scored at
each context length of `--eval_lens` (longer than trained: length generalisation, as RULER
probes a model past its training length). A row counts as right when every answer token is
the argmax (teacher forcing; equal to greedy decoding of the whole answer).

    python -m experiments.needle --tiny                                 # CPU, < 60 s
    python -m experiments.needle --tokens_dir .data/exp                 # GPU (gpu_experiments.sh)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from carve_jax import ops
from carve_jax.configs import ModelConfig
from experiments import flags, report, runtime
from experiments.scoring import masked_accuracy
from experiments.task_models import TaskModelFlags, train_task_models
from experiments.tasks.needle import TASKS, VOCAB_SIZE, needle_batch
from experiments.windows import load_stream


@dataclasses.dataclass(frozen=True)
class NeedleFlags(TaskModelFlags):
  """Flags of the needle experiment.

  Attributes:
    tokens_dir: byte export folder for the haystack (default: fixture corpus).
    train_len: training context length.
    eval_lens: comma-separated context lengths of the evaluation.
    n_needles: needles of the multi-key / multi-value probes.
    width: tokens per key and per value.
    train_tasks: training mixture, from single, multikey, multivalue, multiquery (multiquery: denser supervision, training only).
    train_needles: needles per training row of multikey/multivalue/multiquery (default: --n_needles).
    steps: training steps per model.
    batch_size: rows per batch.
    eval_rows: rows per (task, length).
  """
  tokens_dir: str | None = None
  train_len: int = 1024
  eval_lens: str = "1024,2048,4096,8192"
  n_needles: int = 4
  width: int = 2
  train_tasks: str = ",".join(TASKS)
  train_needles: int | None = None
  steps: int = 400
  batch_size: int = 16
  eval_rows: int = 32


TINY = dict(train_len=64, eval_lens="64,128", n_needles=2, width=1, train_needles=None, steps=10, batch_size=8,
            d_model=32, n_layers=1, eval_rows=8)


def main(argv=None) -> dict:
  args = flags.parse(NeedleFlags, argv, prog="python -m experiments.needle", description=__doc__, tiny=TINY)
  runtime.setup()
  impl = ops.resolve_impl(args.impl)
  train, src = load_stream(args.tokens_dir, "train")
  val, _ = load_stream(args.tokens_dir, "val")
  lens = [int(x) for x in args.eval_lens.split(",")]
  kw = dict(n_needles=args.n_needles, width=args.width)
  eval_sets = {(task, T): needle_batch(np.random.default_rng([20_000 + args.seed, T, i]), batch_size=args.eval_rows,
                                       seq_len=T, tasks=(task,), stream=val, **kw)
               for i, task in enumerate(TASKS) for T in lens}

  train_tasks = tuple(args.train_tasks.split(","))
  train_kw = dict(n_needles=args.train_needles or args.n_needles, width=args.width)

  def batch_fn(step: int) -> dict:
    return needle_batch(np.random.default_rng([args.seed, step]), batch_size=args.batch_size, seq_len=args.train_len,
                        tasks=train_tasks, stream=train, **train_kw)

  def config(mixer):
    cb = 64 if args.train_len >= 64 else 16
    return ModelConfig(mixer=mixer, vocab_size=VOCAB_SIZE, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, content_block=cb, chunk_size=cb, mlp_multiple=32, max_seq_len=max(lens),
                       compute_dtype="bfloat16" if runtime.on_gpu() else "float32", impl=impl)

  def accuracy(model):
    acc = {}
    for (task, T), b in eval_sets.items():
      bs = [{k: v[i:i + 8] for k, v in b.items()} for i in range(0, args.eval_rows, 8)] if T >= 4096 else [b]
      acc[f"{task}@{T}"] = masked_accuracy(model, bs, per_row=True)
    return acc

  name = "needle" + args.tag
  runs = train_task_models("needle", args.mixers.split(","), config, batch_fn, steps=args.steps, seed=args.seed,
                             lr=args.lr, accuracy=accuracy, digits=2,
                             on_run=lambda runs: _write(name, args, impl, src, lens, runs))
  return _write(name, args, impl, src, lens, runs)


def _write(name, args, impl, src, lens, runs) -> dict:
  payload = {"experiment": "needle", "tiny": args.tiny, "impl": impl, "haystack": src,
             "task": {"train_len": args.train_len, "eval_lens": lens, "n_needles": args.n_needles, "width": args.width,
                      "eval_rows": args.eval_rows, "tasks": list(TASKS), "train_tasks": args.train_tasks.split(","),
                      "train_needles": args.train_needles or args.n_needles},
             "model": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads},
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "runs": runs}
  cols = [f"{t}@{T}" for t in TASKS for T in lens]
  rows = [[r["mixer"], r["params"]["total"]] + [r["accuracy"][c] for c in cols] for r in runs]
  md = (f"Needle probes; one model per mixer (d_model {args.d_model}, {args.n_layers} layers, seed {args.seed}) "
        f"trained {args.steps} steps x {args.batch_size} rows of {args.train_len} tokens on a uniform mixture of "
        f"{{{args.train_tasks}}} ({args.train_needles or args.n_needles} needles per training row of the many-needle "
        f"tasks), probed with {args.n_needles} needles for multi-key/multi-value; keys and values of {args.width} "
        f"tokens; haystack: {src}. Exact-match accuracy over {args.eval_rows} held-out rows per cell "
        f"(validation text as haystack). impl={impl}.\n\n" + report.md_table(["mixer", "params"] + cols, rows))
  plt = report.plt()
  fig, axs = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.6), sharey=True)
  for ax, task in zip(axs, TASKS):
    for r in runs:
      ax.plot(lens, [r["accuracy"][f"{task}@{T}"] for T in lens], marker="o", label=r["mixer"])
    ax.axvline(args.train_len, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="context length", title=task, ylim=(-0.02, 1.02))
  axs[0].set_ylabel("exact-match accuracy")
  axs[-1].legend(fontsize=8)
  fig.suptitle(f"needle ({'tiny, CPU' if args.tiny else 'GPU'}), trained at {args.train_len} (dotted)")
  report.write_results(name, args.out_dir or report.results_dir("needle"), payload, md, fig)
  plt.close(fig)
  return payload


if __name__ == "__main__":
  main()
