"""`carve-eval`: perplexity of a checkpoint on the validation (or training) split.

    carve-eval --ckpt_dir runs/demo/checkpoints                  # latest step, val split
    carve-eval --ckpt_dir runs/demo/checkpoints --step 200 --eval_batches 50 --split train

    ppl = exp(mean next-token cross-entropy in nats) over `eval_batches` batches of the unshuffled
    split, each `batch_size x seq_len` tokens (the run's, unless overridden).

The model, tokenizer and data settings come from the config stored in the checkpoint. Without
`--step` the newest step that verifies is used (a newer one that fails is named). `--eval_batches`
larger than the split holds is cut to the split's distinct batches (said on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Annotated, Literal

import jax
import tyro
from flax import nnx

from carve_jax.model import LM
from carve_jax.train import distributed as dist
from carve_jax.train import flags
from carve_jax.train.checkpoint import (Checkpointer, CheckpointCorruptError, CheckpointError,
                                        CheckpointNotFoundError, abstract_like)
from carve_jax.train.config import TrainConfig, check_before_loading, check_tokens_dir
from carve_jax.train.optim import make_optimizer
from carve_jax.train.step import init_state


def load_trained(ckpt_dir: str, step: int | None = None, *, mesh=None):
  """(TrainConfig, LM with the checkpoint's parameters, step) from a run's checkpoint folder.

  step=None: the newest step that verifies. Raises CheckpointNotFoundError / CheckpointCorruptError
  with the path and the steps there.
  """
  ck = Checkpointer(ckpt_dir, read_only=True, step_flag="--step")
  try:
    meta = _newest_meta(ck) if step is None else ck.read_meta(step)
    cfg = TrainConfig.from_dict(meta["config"])
    mesh = mesh or dist.make_mesh()
    model = LM(cfg.model, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed), params)
    state, _, meta = ck.restore(abstract_like(abstract, dist.replicated(mesh)), step)
  finally:
    ck.close()
  return cfg, nnx.merge(graphdef, state.params, rest), meta["step"]


def _newest_meta(ck: Checkpointer) -> dict:
  """The metadata (config) of the newest step whose metadata reads; `restore` verifies the rest."""
  steps = ck.all_steps()
  if not steps:
    raise CheckpointNotFoundError(f"no checkpoint under {ck.directory}")
  for s in reversed(steps):
    try:
      return ck.read_meta(s)
    except CheckpointCorruptError as e:
      if s == steps[0]:
        raise
      ck.log(str(e))
  raise AssertionError("unreachable")


def perplexity(cfg: TrainConfig, model: LM, *, split: str = "val", n_batches: int | None = None, mesh=None,
               tokens=None) -> dict:
  """{"loss", "ppl", "tokens"} of `model` on `split` (see the module docstring)."""
  from carve_jax.train.loop import evaluate, load_tokens
  from carve_jax.train.step import make_eval_step
  if split not in ("val", "train"):
    raise ValueError(f"perplexity: argument `split` must be 'val' or 'train', got {split!r}")
  from carve_jax.data.pipeline import num_windows
  mesh = mesh or dist.make_mesh()
  n_batches = n_batches or cfg.eval_batches
  _, train_tokens, val_tokens = tokens if tokens is not None else load_tokens(cfg.data)
  local_bs = dist.process_batch_size(cfg.data.batch_size, mesh)
  split_tokens = val_tokens if split == "val" else train_tokens
  distinct = num_windows(len(split_tokens), cfg.data.seq_len, jax.process_count()) // local_bs
  if distinct < 1:
    raise ValueError(f"perplexity: the {split} split ({len(split_tokens):,} tokens) holds no batch of "
                     f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens (--batch_size, --seq_len)")
  if n_batches > distinct:
    print(f"--eval_batches {n_batches} is more than the {distinct} distinct batches of the {split} split: "
          f"using {distinct}", file=sys.stderr)
    n_batches = distinct
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  eval_fn = make_eval_step(graphdef, rest, mesh)
  loss = evaluate(eval_fn, dist.replicate(mesh, params), mesh, split_tokens, cfg.data, local_bs, n_batches)
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
          "tokens": n_batches * cfg.data.batch_size * cfg.data.seq_len}


@dataclasses.dataclass(frozen=True)
class EvalFlags:
  """Perplexity of a checkpoint (`carve-eval`).

  Attributes:
    ckpt_dir: a run's checkpoint folder (<out_dir>/checkpoints).
    step: checkpoint step (default: the latest that verifies).
    split: "val" or "train".
    eval_batches: batches to average over (default: the run's).
    batch_size: rows per batch (default: the run's).
    tokens_dir: pre-tokenised splits (python -m carve_jax.data export).
    data_root: where corpora are prepared (default: the run's).
    distributed: jax.distributed.initialize() first.
    tasks: lm-evaluation-harness tasks instead of perplexity (carve_jax.train.lm_eval_adapter;
      `carve-eval --ckpt_dir D --tasks piqa --help` lists its flags).
  """
  ckpt_dir: str
  step: Annotated[int | None, tyro.conf.arg(aliases=("--restore_step",))] = None
  split: Literal["val", "train"] = "val"
  eval_batches: int | None = None
  batch_size: int | None = None
  tokens_dir: str | None = None
  data_root: str | None = None
  distributed: bool = False
  tasks: str | None = None


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a == "--tasks" or a.startswith("--tasks=") for a in argv):  # lm-evaluation-harness tasks instead
    from carve_jax.train.lm_eval_adapter import main as tasks_main
    return tasks_main(argv)
  prog = "carve-eval"
  args = flags.cli(EvalFlags, flags.normalise_argv(argv), prog=prog,
                   description=__doc__.splitlines()[0])
  if args.eval_batches is not None and args.eval_batches < 1:
    flags.usage_error(prog, f"--eval_batches must be >= 1, got {args.eval_batches}")
  try:
    check_tokens_dir(args.tokens_dir)
  except ValueError as e:
    flags.usage_error(prog, str(e))
  dist.maybe_initialize(args.distributed)
  try:
    cfg, model, step = load_trained(args.ckpt_dir, args.step)
  except CheckpointError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1
  over = {k: getattr(args, k) for k in ("batch_size", "tokens_dir", "data_root") if getattr(args, k) is not None}
  try:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **over))
    check_before_loading(cfg)
    out = perplexity(cfg, model, split=args.split, n_batches=args.eval_batches)
  except ValueError as e:
    flags.usage_error(prog, str(e))
  print(json.dumps({"ckpt_dir": args.ckpt_dir, "step": step, "split": args.split, **out}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
