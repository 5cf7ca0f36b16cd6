"""Training configuration: frozen dataclasses, their JSON form, and the resume identity check.

A run is described by one `TrainConfig` holding a `ModelConfig` (from `carve_jax.configs`), an
`OptimConfig`, a `DataConfig` and a `CheckpointConfig`. Field names are unique across sections, so
each is a flag of its own name (`carve_jax.train.flags`, `--help` shows these docstrings). Bad
values raise `ValueError` naming the field, what was expected and what was given (the CLI turns
that into a usage error).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from carve_jax import configs as model_configs
from carve_jax.configs import ModelConfig


def _check(cond: bool, cls: str, name: str, expected: str, got: Any) -> None:
  if not cond:
    raise ValueError(f"{cls}: field `{name}` must be {expected}, got {got!r}")


@dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay to `lr * min_lr_ratio`, global-norm clipping.

  Weight decay applies to weight matrices only (see `carve_jax.train.optim.decay_mask`).

  Attributes:
    lr: peak learning rate.
    min_lr_ratio: the cosine decays to lr * min_lr_ratio.
    warmup_steps: linear warmup from 0 to lr.
    b1: AdamW beta1.
    b2: AdamW beta2.
    eps: AdamW epsilon.
    weight_decay: decoupled weight decay (weight matrices only).
    clip_norm: global gradient-norm clip; 0 disables clipping.
  """
  lr: float = 3e-4
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    c = "OptimConfig"
    _check(self.lr > 0, c, "lr", "> 0", self.lr)
    _check(0 <= self.min_lr_ratio <= 1, c, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
    _check(self.warmup_steps >= 0, c, "warmup_steps", ">= 0", self.warmup_steps)
    _check(0 <= self.b1 < 1, c, "b1", "in [0, 1)", self.b1)
    _check(0 <= self.b2 < 1, c, "b2", "in [0, 1)", self.b2)
    _check(self.eps > 0, c, "eps", "> 0", self.eps)
    _check(self.weight_decay >= 0, c, "weight_decay", ">= 0", self.weight_decay)
    _check(self.clip_norm >= 0, c, "clip_norm", ">= 0 (0 disables)", self.clip_norm)


@dataclass(frozen=True)
class DataConfig:
  """Which corpus and tokenizer, and how batches are cut (see `carve_jax.data`).

  Attributes:
    corpus: "fixture" (bundled excerpt), "ci" (small) or "full" (docs/DATA.md).
    tokenizer: "byte" (vocab 256) or "gpt2" (vocab 50257).
    seq_len: tokens per training sequence.
    batch_size: GLOBAL sequences per optimizer step over all devices and hosts; each process reads
      batch_size / process_count rows of its own shard of the data.
    data_seed: seed of the batch order.
    data_root: where corpora are prepared (default: the data package's cache).
    tokens_dir: read pre-tokenised train/val arrays exported by `python -m carve_jax.data export`
      instead of preparing the corpus (machines without the corpus packages or network).
    reset_documents: batches carry per-token document ids (a new document at each EOS) and every
      layer of the model resets at a document start; False lets windows mix documents.
  """
  corpus: Literal["fixture", "ci", "full"] = "ci"
  tokenizer: Literal["byte", "gpt2"] = "byte"
  seq_len: int = 256
  batch_size: int = 16
  data_seed: int = 0
  data_root: str | None = None
  tokens_dir: str | None = None
  reset_documents: bool = True

  def __post_init__(self):
    c = "DataConfig"
    _check(isinstance(self.reset_documents, bool), c, "reset_documents", "a bool", self.reset_documents)
    _check(self.corpus in ("fixture", "ci", "full"), c, "corpus", "'fixture', 'ci' or 'full'", self.corpus)
    _check(self.tokenizer in ("byte", "gpt2"), c, "tokenizer", "'byte' or 'gpt2'", self.tokenizer)
    _check(self.seq_len >= 1, c, "seq_len", ">= 1", self.seq_len)
    _check(self.batch_size >= 1, c, "batch_size", ">= 1", self.batch_size)


@dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints: every `ckpt_every` steps (and at the end), keep the last `ckpt_keep`.

  Attributes:
    ckpt_dir: checkpoint folder; None = <out_dir>/checkpoints.
    ckpt_every: save every this many steps (and at the end).
    ckpt_keep: keep the newest this many checkpoints.
    ckpt_async: save in the background while training goes on.
    restore_step: the step to resume from; None = the newest that verifies.
  """
  ckpt_dir: str | None = None
  ckpt_every: int = 500
  ckpt_keep: int = 3
  ckpt_async: bool = True
  restore_step: int | None = None

  def __post_init__(self):
    c = "CheckpointConfig"
    _check(self.ckpt_every >= 1, c, "ckpt_every", ">= 1", self.ckpt_every)
    _check(self.ckpt_keep >= 1, c, "ckpt_keep", ">= 1", self.ckpt_keep)
    _check(self.restore_step is None or self.restore_step >= 0, c, "restore_step", ">= 0 or None",
           self.restore_step)


@dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    model: the model (`carve_jax.configs.ModelConfig`; --preset picks a named one).
    optim: optimizer and schedule.
    data: corpus, tokenizer and batches.
    ckpt: checkpoints.
    steps: optimizer steps in total (the cosine schedule spans them).
    grad_accum: micro-batches per step (each device's rows are split into this many).
    seed: seed of the parameter initialisation and the step RNG.
    log_every: log (and fetch metrics from the device) every this many steps.
    eval_every: validation every this many steps; 0 = only at the end.
    eval_batches: validation batches per evaluation.
    max_consecutive_skips: abort (keeping every checkpoint) after this many non-finite steps in a row.
    out_dir: run folder (config.json, metrics.jsonl, tb/, checkpoints/); one run at a time.
    distributed: call `jax.distributed.initialize()` first (multi-host; or env CARVE_DISTRIBUTED=1).
    progress: show a progress bar.
    time_limit_s: stop cleanly (checkpoint, evaluate) once this many seconds have passed; running the
      same command again resumes. None = no limit.
    compile_ahead: compile the train step in a background thread from the config's shapes while the data loads,
      the model is built and a checkpoint restored (`loop.step_compiled_ahead`); off: compile at the first step.
    compile_cache: jax's persistent compilation cache (`carve_jax.train.compile_cache`): "auto" (the folder in
      $CARVE_JAX_CACHE, else ~/.cache/carve_jax/xla), a folder, or "none". A rerun or resume of the same
      configuration then loads its compiled train step instead of compiling it again.
    init_on: where a fresh run draws its initial parameters and optimizer state before they are placed on the
      mesh: "device" (the accelerator), "host" (jax's CPU backend), or "auto" (host in a single process on an
      accelerator, else device). On the host, init's many small eager compiles do not queue behind the train
      step's compile on the accelerator's compiler (experiments/results/first_step/first_step_h100_v12.md).
      The host then holds the fresh state once (about 12 bytes a parameter with AdamW) before placing it.
      The parameters are drawn from the same seed either way; CPU and GPU may round a transcendental
      differently in the last bit.
  """
  model: ModelConfig = field(default_factory=lambda: model_configs.preset("tiny"))
  optim: OptimConfig = field(default_factory=OptimConfig)
  data: DataConfig = field(default_factory=DataConfig)
  ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
  steps: int = 1000
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  max_consecutive_skips: int = 20
  out_dir: str = "runs/default"
  distributed: bool = False
  progress: bool = True
  time_limit_s: float | None = None
  compile_ahead: bool = True
  compile_cache: str = "auto"
  init_on: Literal["auto", "device", "host"] = "auto"

  def __post_init__(self):
    c = "TrainConfig"
    _check(self.steps >= 1, c, "steps", ">= 1", self.steps)
    _check(self.grad_accum >= 1, c, "grad_accum", ">= 1", self.grad_accum)
    _check(self.log_every >= 1, c, "log_every", ">= 1", self.log_every)
    _check(self.eval_every >= 0, c, "eval_every", ">= 0 (0 disables)", self.eval_every)
    _check(self.init_on in ("auto", "device", "host"), c, "init_on", "'auto', 'device' or 'host'", self.init_on)
    _check(self.eval_batches >= 1, c, "eval_batches", ">= 1", self.eval_batches)
    _check(self.max_consecutive_skips >= 1, c, "max_consecutive_skips", ">= 1", self.max_consecutive_skips)
    _check(self.time_limit_s is None or self.time_limit_s > 0, c, "time_limit_s", "> 0 or None",
           self.time_limit_s)
    _check(self.data.batch_size % self.grad_accum == 0, c, "grad_accum",
           f"a divisor of data.batch_size={self.data.batch_size}", self.grad_accum)
    # Attention's RoPE and KV cache are sized for max_seq_len: a model trained longer could not generate.
    _check(self.model.mixer != "attention" or self.data.seq_len <= self.model.max_seq_len, c, "seq_len",
           f"<= model.max_seq_len={self.model.max_seq_len} for attention (raise --max_seq_len)", self.data.seq_len)

  @property
  def checkpoint_dir(self) -> str:
    return self.ckpt.ckpt_dir or f"{self.out_dir.rstrip('/')}/checkpoints"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    sections = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "ckpt": CheckpointConfig}
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name not in d:
        continue
      kw[f.name] = _build(sections[f.name], d[f.name]) if f.name in sections else d[f.name]
    return cls(**kw)

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)


def _build(cls, d: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


# Fields that change what a resumed run computes; a checkpoint whose config differs in any of
# them is refused (the rest, e.g. logging cadence or output paths, may change between runs).
RUN_IDENTITY = ("model", "optim", "data.corpus", "data.tokenizer", "data.seq_len", "data.batch_size",
                "data.data_seed", "data.reset_documents", "steps", "grad_accum", "seed")
# ...except these, which change how the same function is computed, not what (e.g. resume a GPU
# run that used the Pallas kernel on a CPU, or switch rematerialisation on to save memory).
IDENTITY_EXEMPT = ("model.impl", "model.remat", "model.remat_policy")


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def identity_diff(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between two configs (dicts) in the run-identity fields."""
  out = []
  saved = _with_defaults(saved)  # a field added after the checkpoint was written has its default there

  def walk(prefix, a, b):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(f"{prefix}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>"))
    elif _norm(a) != _norm(b) and prefix not in IDENTITY_EXEMPT:
      out.append(f"{prefix}: checkpoint has {a!r}, this run has {b!r}")

  for key in RUN_IDENTITY:
    walk(key, _get(saved, key), _get(current, key))
  return out


def mismatch_advice(diff: list[str]) -> str:
  """What to do about a refused resume (`identity_diff` lines), for the error message."""
  if any(d.startswith("steps:") for d in diff):
    return ("`--steps` is part of a run's identity (the learning-rate schedule spans it), so a finished run "
            "is not extended in place. To train for a different number of steps with the same settings, "
            "start a new run from the saved config: carve-train --config <out_dir>/config.json --steps N "
            "--out_dir <a new folder>.")
  return "Use the same settings to resume, or a new --out_dir (or --ckpt_dir) for a new run."


def _with_defaults(d: dict) -> dict:
  try:
    return TrainConfig.from_dict(d).to_dict()
  except (TypeError, ValueError):  # not a config this version can build: compare it as it is
    return d


def _norm(x):
  return list(x) if isinstance(x, tuple) else x


def check_before_loading(cfg: TrainConfig) -> None:
  """What can be checked before any data is read or downloaded; ValueError naming the flag."""
  from carve_jax.data.tokenizer import ByteTokenizer, GPT2Tokenizer  # class attributes: nothing is loaded
  need = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}[cfg.data.tokenizer]
  if cfg.model.vocab_size < need:
    raise ValueError(f"--vocab_size must be >= {need} for --tokenizer {cfg.data.tokenizer} (its vocabulary), "
                     f"got {cfg.model.vocab_size}")
  check_tokens_dir(cfg.data.tokens_dir)


def check_tokens_dir(d: str | None) -> None:
  """--tokens_dir must be an export folder (python -m carve_jax.data export) if given."""
  from carve_jax.data.pipeline import EXPORT_META
  if d is not None and not os.path.isfile(os.path.join(d, EXPORT_META)):
    raise ValueError(f"--tokens_dir {d}: " + ("no such folder" if not os.path.isdir(d) else "not an export "
                     f"folder (no {EXPORT_META})") + "; make one with python -m carve_jax.data export")
