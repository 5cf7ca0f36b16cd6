"""RULER-style retrieval probes: single needle, multi-key, multi-value (`experiments/tasks/needle.py`).

One small model per mixer is trained on a mixture of the three tasks at `--train_len` tokens,
with real corpus text as the haystack (byte tokens; needles use tokens above 255), then scored at
each context length of `--eval_lens` (longer than trained: length generalisation, as RULER
probes a model past its training length). A row counts as right when every answer token is
the argmax (teacher forcing; equal to greedy decoding of the whole answer).

    python experiments/needle.py --tiny                                 # CPU, < 60 s
    python experiments/needle.py --tokens_dir .data/exp                 # GPU (gpu_experiments.sh)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from carve_jax.configs import ModelConfig  # noqa: E402
from experiments import common as C  # noqa: E402
from experiments.tasks.needle import TASKS, TRAIN_TASKS, VOCAB_SIZE, needle_batch  # noqa: E402


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  C.add_common_args(p)
  p.add_argument("--tokens_dir", default=None, help="byte export folder for the haystack (default: fixture corpus)")
  p.add_argument("--mixers", default=",".join(C.MIXERS))
  p.add_argument("--train_len", type=int, default=1024)
  p.add_argument("--eval_lens", default="1024,2048,4096,8192")
  p.add_argument("--n_needles", type=int, default=4)
  p.add_argument("--width", type=int, default=2, help="tokens per key and per value")
  p.add_argument("--train_tasks", default=",".join(TASKS),
                 help=f"training mixture, from {TRAIN_TASKS} (multiquery: denser supervision, training only)")
  p.add_argument("--train_needles", type=int, default=None,
                 help="needles per training row of multikey/multivalue/multiquery (default: --n_needles)")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--n_layers", type=int, default=2)
  p.add_argument("--n_heads", type=int, default=2)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--eval_rows", type=int, default=32, help="rows per (task, length)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.tiny:
    args.train_len, args.eval_lens, args.n_needles, args.width, args.train_needles = 64, "64,128", 2, 1, None
    args.steps, args.batch_size, args.d_model, args.n_layers, args.eval_rows = 10, 8, 32, 1, 8
  C.enable_compile_cache()
  impl = C.pick_impl(args.impl, args.tiny)
  train, src = C.load_stream(args.tokens_dir, "train")
  val, _ = C.load_stream(args.tokens_dir, "val")
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
                       compute_dtype="bfloat16" if C.on_gpu() else "float32", impl=impl)

  def accuracy(model):
    acc = {}
    for (task, T), b in eval_sets.items():
      bs = [{k: v[i:i + 8] for k, v in b.items()} for i in range(0, args.eval_rows, 8)] if T >= 4096 else [b]
      acc[f"{task}@{T}"] = C.masked_accuracy(model, bs, per_row=True)
    return acc

  name = "needle" + args.tag
  runs = C.train_task_models("needle", args.mixers.split(","), config, batch_fn, steps=args.steps, seed=args.seed,
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
        f"(validation text as haystack). impl={impl}.\n\n" + C.md_table(["mixer", "params"] + cols, rows))
  plt = C.plt()
  fig, axs = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.6), sharey=True)
  for ax, task in zip(axs, TASKS):
    for r in runs:
      ax.plot(lens, [r["accuracy"][f"{task}@{T}"] for T in lens], marker="o", label=r["mixer"])
    ax.axvline(args.train_len, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="context length", title=task, ylim=(-0.02, 1.02))
  axs[0].set_ylabel("exact-match accuracy")
  axs[-1].legend(fontsize=8)
  fig.suptitle(f"needle ({'tiny, CPU' if args.tiny else 'GPU'}), trained at {args.train_len} (dotted)")
  C.write_results(name, args.out_dir, payload, md, fig)
  plt.close(fig)
  return payload


if __name__ == "__main__":
  main()
