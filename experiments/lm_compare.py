"""CARVE vs GDN-2 vs KDA vs Gated DeltaNet vs Transformer as byte-level language models.

Same width, depth, data, token order per seed, optimizer and steps for every mixer; validation
loss (nats/byte; perplexity = exp) on fixed held-out windows of the real corpus (docs/DATA.md),
>= 3 seeds for CARVE and GDN-2 so their difference has an error bar (mean +- sample std over
seeds, and a Welch t statistic). Also parameters, XLA step memory, peak device memory, tokens/s.

    python -m experiments.lm_compare --tiny                              # CPU, < 60 s
    python -m experiments.lm_compare --tokens_dir .data/exp --steps 300  # GPU (experiments/gpu_experiments.sh)

Scale (stated in the results): the paper trains 1.3B-parameter models on 100B tokens; here a
GPU run has well under a minute per model, so models have ~10M parameters and see a few million
bytes, a small fraction of one epoch of the corpus.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from carve_jax import ops
from carve_jax.configs import MIXERS, ModelConfig
from carve_jax.train.batch_loop import StepCache, short_optim, train_on_batches
from experiments import flags, report, runtime
from experiments.gpu_lock import GpuLock
from experiments.scoring import make_loss_eval
from experiments.stats import mean_std
from experiments.task_models import compile_threads
from experiments.windows import DOCUMENT_RESETS, fixed_batches, load_stream, window_batches

CORPUS_TRAIN_BYTES = 113_435_798  # docs/DATA.md: the "full" corpus, byte tokenizer


@dataclasses.dataclass(frozen=True)
class LmCompareFlags(flags.CommonFlags):
  """Flags of the LM comparison.

  Attributes:
    tokens_dir: byte export folder (default: the committed fixture corpus).
    mixers: comma-separated mixers.
    seeds: seeds for carve and gdn2.
    other_seeds: seeds for kda, gdn, attention.
    steps: training steps per model.
    batch_size: rows per batch.
    seq_len: bytes per row.
    d_model: model width.
    n_layers: blocks.
    n_heads: heads.
    lr: peak learning rate.
    eval_every: validation every this many steps.
    eval_batches: fixed validation batches.
  """
  tokens_dir: str | None = None
  mixers: str = ",".join(MIXERS)
  seeds: int = 3
  other_seeds: int = 1
  steps: int = 300
  batch_size: int = 32
  seq_len: int = 512
  d_model: int = 384
  n_layers: int = 6
  n_heads: int = 6
  lr: float = 2e-3
  eval_every: int = 50
  eval_batches: int = 8


TINY = dict(steps=8, batch_size=4, seq_len=32, d_model=32, n_layers=1, n_heads=2, eval_every=4, eval_batches=1,
            seeds=2, other_seeds=1)


def model_config(args, mixer: str, impl: str) -> ModelConfig:
  cb = 64 if args.seq_len >= 64 else 16
  return ModelConfig(mixer=mixer, vocab_size=256, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     content_block=cb, chunk_size=min(64, cb), mlp_multiple=64, max_seq_len=args.seq_len,
                     compute_dtype="bfloat16" if runtime.on_gpu() else "float32", impl=impl)


def main(argv=None) -> dict:
  args = flags.parse(LmCompareFlags, argv, prog="python -m experiments.lm_compare", description=__doc__, tiny=TINY)
  runtime.setup()
  impl = ops.resolve_impl(args.impl)
  train, train_src = load_stream(args.tokens_dir, "train")
  val, _ = load_stream(args.tokens_dir, "val")
  val_batches = fixed_batches(val, seq_len=args.seq_len, batch_size=args.batch_size, n_batches=args.eval_batches)
  eval_fn = make_loss_eval(val_batches)
  mixers = args.mixers.split(",")
  runs = []
  name = "lm_compare" + args.tag
  # Every mixer's first seed comes first, then the extra seeds (cheap: their step is in the compile cache),
  # so a time limit cuts seeds, not mixers.
  order = [(m, s) for s in range(max(args.seeds, args.other_seeds)) for m in mixers
           if s < (args.seeds if m in ("carve", "gdn2") else args.other_seeds)]
  # Each mixer's step compiles once, in a background thread, all of them at the start; the seeds reuse it.
  cache, lock, optim = StepCache(compile_threads()), GpuLock.from_env(), short_optim(args.steps, lr=args.lr)
  for mixer in mixers:
    cache.precompile(model_config(args, mixer, impl),
                     window_batches(train, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)(0), optim,
                     args.steps)
  for mixer, seed in order:
    cfg = model_config(args, mixer, impl)
    print(f"[lm_compare] {mixer} seed {seed}", flush=True)
    r = train_on_batches(cfg, window_batches(train, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed),
                         steps=args.steps, seed=seed, optim=optim, cache=cache, eval_fn=eval_fn,
                         eval_every=args.eval_every, lock=lock)
    val_curve = [(h["step"], h["val_loss"]) for h in r.history if "val_loss" in h]
    runs.append({"mixer": mixer, "seed": seed, "params": r.params_count, "val_curve": val_curve,
                 "train_curve": [(h["step"], h["loss"]) for h in r.history if "loss" in h],
                 "final_val_loss": val_curve[-1][1], "final_val_ppl": math.exp(val_curve[-1][1]),
                 "tokens_per_s": r.tokens_per_s, "compile_s": r.compile_s, "compile_wait_s": r.compile_wait_s,
                 "gpu_wait_s": r.lock_wait_s, "train_s": r.train_s,
                 "step_memory_bytes": r.step_memory_bytes, "peak_memory_bytes_process": r.peak_memory_bytes})
    print(f"  final val {val_curve[-1][1]:.4f}  {r.tokens_per_s:,.0f} tok/s  compile {r.compile_s:.1f}s "
          f"(waited {r.compile_wait_s:.1f}s; GPU turn waited {r.lock_wait_s:.1f}s; {r.train_s:.1f}s timed)", flush=True)
    _write(name, args, impl, train_src, runs)  # partial results survive a timeout
  return _write(name, args, impl, train_src, runs)


def _write(name, args, impl, train_src, runs) -> dict:
  tokens = args.steps * args.batch_size * args.seq_len
  summary = {}
  for mixer in dict.fromkeys(r["mixer"] for r in runs):
    rs = [r for r in runs if r["mixer"] == mixer]
    m, s = mean_std(r["final_val_loss"] for r in rs)
    summary[mixer] = {"seeds": len(rs), "val_loss_mean": m, "val_loss_std": s, "val_ppl_mean": math.exp(m),
                      "params": rs[0]["params"]["total"], "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in rs])),
                      "step_memory_bytes": rs[0]["step_memory_bytes"]}
  diff = None
  if "carve" in summary and "gdn2" in summary and summary["carve"]["seeds"] > 1 and summary["gdn2"]["seeds"] > 1:
    a = [r["final_val_loss"] for r in runs if r["mixer"] == "carve"]
    b = [r["final_val_loss"] for r in runs if r["mixer"] == "gdn2"]
    d = float(np.mean(a) - np.mean(b))
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    diff = {"carve_minus_gdn2_val_loss": d, "stderr": se, "welch_t": d / se if se > 0 else float("nan"),
            "carve_minus_gdn2_ppl": math.exp(np.mean(a)) - math.exp(np.mean(b))}
  payload = {"experiment": "lm_compare", "tiny": args.tiny, "impl": impl, "data": train_src,
             "shape": {"batch_size": args.batch_size, "seq_len": args.seq_len, "d_model": args.d_model,
                       "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab": 256},
             "steps": args.steps, "lr": args.lr, "tokens_per_run": tokens,
             "epochs_of_full_corpus": tokens / CORPUS_TRAIN_BYTES, "summary": summary, "carve_vs_gdn2": diff,
             "document_resets": DOCUMENT_RESETS, "runs": runs}
  rows = [[k, v["seeds"], v["params"], f"{v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f}", v["val_ppl_mean"],
           f"{v['tokens_per_s_mean']:,.0f}", report.fmt_bytes(v["step_memory_bytes"])] for k, v in summary.items()]
  md = (f"Byte-level LMs, d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, batch "
        f"{args.batch_size} x {args.seq_len}, {args.steps} AdamW steps (lr {args.lr}, warmup 10%, cosine) = "
        f"{tokens:,} training bytes per run ({tokens / CORPUS_TRAIN_BYTES:.3f} epochs of the 113.4M-byte corpus; "
        f"windows sampled at random, seed = run seed). Data: {train_src}. Validation: {args.eval_batches} fixed "
        f"batches of held-out documents. impl={impl}. Document resets: {DOCUMENT_RESETS}.\n\n"
        + report.md_table(["mixer", "seeds", "params", "val loss (nats/byte) mean ± std", "val ppl", "tokens/s",
                      "XLA step memory"], rows))
  if diff:
    md += (f"\n\nCARVE − GDN-2 final validation loss: {diff['carve_minus_gdn2_val_loss']:+.4f} ± {diff['stderr']:.4f} "
           f"(std. error, Welch t = {diff['welch_t']:.2f}); perplexity difference {diff['carve_minus_gdn2_ppl']:+.4f}.")
  plt = report.plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  colors = dict(zip(MIXERS, ("C0", "C1", "C2", "C3", "C4")))
  for r in runs:
    s, v = zip(*r["val_curve"])
    ax[0].plot(s, v, color=colors.get(r["mixer"]), alpha=0.8, label=r["mixer"] if r["seed"] == 0 else None)
    s, v = zip(*r["train_curve"])
    ax[1].plot(s, v, color=colors.get(r["mixer"]), alpha=0.5, label=r["mixer"] if r["seed"] == 0 else None)
  ax[0].set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation")
  ax[1].set(xlabel="step", ylabel="training loss", title="training")
  for a in ax:
    a.legend()
  fig.suptitle(f"lm_compare ({'tiny, CPU' if args.tiny else 'GPU'}): {tokens:,} bytes per run")
  report.write_results(name, args.out_dir or report.results_dir("lm_compare"), payload, md, fig)
  plt.close(fig)
  return payload


if __name__ == "__main__":
  main()
