"""`carve-export` and `carve-import`: a run's Orbax checkpoint to a Hugging Face folder and back.

    carve-export --ckpt_dir runs/gdn2/checkpoints --out hf/gdn2            # latest step
    carve-import --hf_dir hf/gdn2 --out_dir runs/gdn2-imported            # -> runs/gdn2-imported/checkpoints/<step>
    carve-eval --ckpt_dir runs/gdn2-imported/checkpoints                   # every carve-* tool reads the import

The folder is FLA 0.6.0's layout (`carve_jax.interop.fla_layout`, docs/INTEROP.md). The imported
checkpoint holds the parameters, a fresh optimizer state and a TrainConfig whose model is the folder's
(tokenizer from the folder's "carve_jax" entry, else --tokenizer); its step is the exported step (0 for
a foreign folder), so training can continue from it with `carve-train --out_dir <out_dir>` and the same
model flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Literal

from carve_jax.interop.fla_layout import InteropError


@dataclasses.dataclass(frozen=True)
class ExportFlags:
  """A run's checkpoint to a Hugging Face folder (`carve-export`).

  Attributes:
    ckpt_dir: a run's checkpoint folder (<out_dir>/checkpoints).
    out: the Hugging Face folder to write (must not exist or be empty).
    step: checkpoint step (default: latest).
  """
  ckpt_dir: str
  out: str
  step: int | None = None


@dataclasses.dataclass(frozen=True)
class ImportFlags:
  """A Hugging Face folder to a run's checkpoint (`carve-import`).

  Attributes:
    hf_dir: a Hugging Face folder (config.json + model.safetensors).
    out_dir: run folder to create; the checkpoint goes to <out_dir>/checkpoints.
    tokenizer: tokenizer of the run (default: the folder's carve_jax entry, else byte for vocab 256,
      gpt2 otherwise).
  """
  hf_dir: str
  out_dir: str
  tokenizer: Literal["byte", "gpt2"] | None = None


def _parse(cls, argv, prog: str):
  from carve_jax.train import flags
  argv = sys.argv[1:] if argv is None else list(argv)
  return flags.cli(cls, flags.normalise_argv(argv), prog=prog, description=cls.__doc__.splitlines()[0])


def export_main(argv=None) -> int:
  prog = "carve-export"
  args = _parse(ExportFlags, argv, prog)
  from carve_jax.data.tokenizer import get_tokenizer
  from carve_jax.interop.hf_folder import save_hf
  from carve_jax.train import distributed as dist
  from carve_jax.train.eval import load_trained
  from carve_jax.train.flags import usage_error
  import jax
  cfg, model, step = load_trained(args.ckpt_dir, args.step, mesh=dist.make_mesh(jax.local_devices()[:1]))
  tok = cfg.data.tokenizer
  try:
    out = save_hf(model, args.out, tokenizer=tok, eos_id=get_tokenizer(tok).eos_id, step=int(step))
  except InteropError as e:
    usage_error(prog, str(e))
  print(json.dumps({"ckpt_dir": args.ckpt_dir, "step": int(step), "out": out, "mixer": cfg.model.mixer}))
  return 0


def import_main(argv=None) -> int:
  prog = "carve-import"
  args = _parse(ImportFlags, argv, prog)
  from carve_jax.interop.hf_folder import load_hf
  from carve_jax.train.flags import usage_error
  try:
    model, conf = load_hf(args.hf_dir)
  except InteropError as e:
    usage_error(prog, str(e))
  entry = conf.get("carve_jax") or {}
  tok = args.tokenizer or entry.get("tokenizer") or ("byte" if model.cfg.vocab_size == 256 else "gpt2")
  step = int(entry.get("step") or 0)
  try:
    ckpt_dir = write_checkpoint(model, args.out_dir, tokenizer=tok, step=step)
  except InteropError as e:
    usage_error(prog, str(e))
  print(json.dumps({"hf_dir": args.hf_dir, "ckpt_dir": ckpt_dir, "step": step, "mixer": model.cfg.mixer,
                    "tokenizer": tok}))
  return 0


def write_checkpoint(model, out_dir: str, *, tokenizer: str, step: int = 0) -> str:
  """Saves `model` as step `step` of a new run under `out_dir`; returns the checkpoint folder."""
  import jax
  from flax import nnx
  from carve_jax.data.tokenizer import get_tokenizer
  from carve_jax.train.checkpoint import Checkpointer
  from carve_jax.train.config import DataConfig, TrainConfig
  from carve_jax.train.optim import make_optimizer
  from carve_jax.train.step import init_state
  vocab = get_tokenizer(tokenizer).vocab_size
  if vocab > model.cfg.vocab_size:
    raise InteropError(f"import: tokenizer {tokenizer!r} has {vocab} tokens, more than the model's vocab_size="
                       f"{model.cfg.vocab_size} (--tokenizer)")
  cfg = TrainConfig(model=model.cfg, data=DataConfig(tokenizer=tokenizer), out_dir=out_dir,
                    steps=max(1, step))
  ckpt_dir = cfg.checkpoint_dir
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise InteropError(f"import: {ckpt_dir} already exists and is not empty; nothing was written (choose a new "
                       "--out_dir)")
  params = nnx.state(model, nnx.Param)
  state = init_state(params, make_optimizer(cfg.optim, cfg.steps), cfg.seed)
  state = state._replace(step=jax.numpy.asarray(step, jax.numpy.int32))
  with Checkpointer(ckpt_dir, config=cfg.to_dict(), async_save=False) as ck:
    ck.save(step, state, None, force=True, extra_meta={"imported_from": "hf"})
  return os.path.abspath(ckpt_dir)


if __name__ == "__main__":
  sys.exit(export_main())
