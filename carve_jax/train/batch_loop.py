"""A short training run on a batch function: no corpus, checkpoints or logs (the experiments' loop).

    cache = StepCache()
    r = train_on_batches(cfg, batch_fn, steps=200, seed=0, optim=short_optim(200, lr=3e-3), cache=cache)
    r.tokens_per_s, r.history, r.model()

`batch_fn(step) -> {"inputs": int32 [B, T], "targets": int32 [B, T][, "mask": float [B, T]]}`;
the loss is `masked_loss` (mean cross-entropy over positions with mask 1). AdamW steps are
`carve_jax.train.step.make_train_step`'s, throughput is `carve_jax.train.meter.ThroughputMeter`'s
(the steps after the first). Compiling, not training, dominates short runs, so a `StepCache`
compiles each model's step once (seeds reuse it: the step takes the whole state as input), and
`StepCache.precompile` compiles in a background thread (XLA releases the GIL) while another model
trains. `lock` (optional) is held around the timed steps, e.g. to have a shared GPU to oneself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.model import LM, param_count
from carve_jax.train import distributed as dist
from carve_jax.train.config import OptimConfig
from carve_jax.train.meter import ThroughputMeter
from carve_jax.train.optim import make_optimizer
from carve_jax.train.step import init_state, make_train_step


def masked_loss(model, batch: dict, rng=None) -> jax.Array:
  """Mean cross-entropy over positions with mask 1 (all positions without a "mask")."""
  del rng
  logits = model(batch["inputs"]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  if "mask" not in batch:
    return ce.mean()
  m = batch["mask"].astype(jnp.float32)
  return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


def short_optim(steps: int, *, lr: float = 3e-3, weight_decay: float = 0.1) -> OptimConfig:
  """AdamW for a short run: warmup over the first 10% of `steps`, cosine decay after."""
  return OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), weight_decay=weight_decay)


def compiled_memory(compiled) -> int | None:
  """Device bytes an XLA executable needs (arguments + outputs + temporaries - aliased)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return None


@dataclasses.dataclass
class TrainResult:
  """What `train_on_batches` returns. history: [{"step", "loss"} or {"step", "val_loss"}];
  params: the final nnx.State. compile_s: seconds XLA took to compile the step (0 when the cache
  had reported it already), compile_wait_s: seconds this call waited for it, lock_wait_s: seconds
  waited for `lock`; final: what `final_fn` returned."""
  cfg: ModelConfig
  params: object
  graphdef: object
  rest: object
  history: list
  params_count: dict
  tokens_per_step: int
  steps: int
  train_s: float
  compile_s: float
  tokens_per_s: float
  step_memory_bytes: int | None
  peak_memory_bytes: int | None
  compile_wait_s: float = 0.0
  lock_wait_s: float = 0.0
  final: object = None

  def model(self) -> LM:
    return nnx.merge(self.graphdef, self.params, self.rest)


def _setup(cfg: ModelConfig, optim: OptimConfig, steps: int, seed: int):
  mesh = dist.make_mesh()
  model = LM(cfg, rngs=nnx.Rngs(seed))
  counts = param_count(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = make_optimizer(optim, steps)
  state = dist.replicate(mesh, init_state(params, optimizer, seed))
  return mesh, graphdef, rest, optimizer, state, counts


def _timed_compile(lowered, label: str):
  t = time.time()
  compiled = lowered.compile()
  print(f"  [compiled {label} in {time.time() - t:.1f}s]", flush=True)
  return compiled, time.time() - t


class StepCache:
  """Compiled training steps, one per (model config, batch shapes and dtypes, optimizer, steps)."""

  def __init__(self, threads: int = 6):
    self.threads = threads
    self._steps: dict = {}  # key -> Future of (compiled executable, compile seconds)
    self._reported: set = set()  # keys whose compile time a TrainResult already reports
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  @staticmethod
  def key(cfg: ModelConfig, batch: dict, optim: OptimConfig, steps: int):
    shapes = tuple(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()))
    return cfg, shapes, optim, steps

  def precompile(self, cfg: ModelConfig, example_batch: dict, optim: OptimConfig, steps: int, *,
                 background: bool = True) -> concurrent.futures.Future:
    """Lowers the step of `LM(cfg)` for batches shaped like `example_batch` (in this thread) and
    compiles it (in a background thread when `background`); a no-op if it is cached."""
    key = self.key(cfg, example_batch, optim, steps)
    if key in self._steps:
      return self._steps[key]
    mesh, graphdef, rest, optimizer, state, _ = _setup(cfg, optim, steps, seed=0)
    t = time.time()
    lowered = make_train_step(graphdef, rest, optimizer, mesh, loss_fn=masked_loss).lower(
        state, dist.global_batch(mesh, example_batch))
    label = f"{cfg.mixer} G={cfg.content_block} d={cfg.d_model}x{cfg.n_layers}"
    print(f"  [lowered {label} in {time.time() - t:.1f}s]", flush=True)
    if background:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.threads)
      fut = self._pool.submit(_timed_compile, lowered, label)
    else:
      fut = concurrent.futures.Future()
      fut.set_result(_timed_compile(lowered, label))
    self._steps[key] = fut
    return fut

  def compiled(self, cfg: ModelConfig, batch: dict, optim: OptimConfig, steps: int):
    """(executable, compile seconds or 0 if reported before, seconds waited for it)."""
    t = time.time()
    compiled, compile_s = self.precompile(cfg, batch, optim, steps, background=False).result()
    key = self.key(cfg, batch, optim, steps)
    if key in self._reported:
      compile_s = 0.0
    self._reported.add(key)
    return compiled, compile_s, time.time() - t


class _NoLock:
  def announce(self) -> None:
    pass

  @contextlib.contextmanager
  def hold(self):
    yield 0.0


def train_on_batches(cfg: ModelConfig, batch_fn: Callable[[int], dict], *, steps: int, seed: int,
                     optim: OptimConfig | None = None, cache: StepCache | None = None,
                     eval_fn: Callable | None = None, eval_every: int = 0, log_every: int = 10,
                     verbose: bool = True, final_fn: Callable | None = None, warm_fn: Callable | None = None,
                     lock=None) -> TrainResult:
  """Trains `LM(cfg)` from seed `seed` for `steps` AdamW steps on `batch_fn(step)`.

  optim: default `short_optim(steps)`. eval_fn(model) -> float runs every `eval_every` steps and at
  the end (its time is not training time); final_fn(model) -> anything runs once on the trained
  model (`TrainResult.final`). Before the timed steps, the step is compiled (or taken from `cache`)
  and warm_fn(model) (default: eval_fn) runs on the initial model, so that the evaluation compiles
  outside them too. lock: an object with `announce()` (called once the step is compiled) and
  `hold()` (a context manager yielding the seconds waited), held around the timed steps.
  """
  optim = optim or short_optim(steps)
  cache = cache or StepCache()
  lock = lock or _NoLock()
  first = batch_fn(0)
  compiled, compile_s, compile_wait_s = cache.compiled(cfg, first, optim, steps)
  lock.announce()
  mesh, graphdef, rest, _, state, counts = _setup(cfg, optim, steps, seed)
  tokens_per_step = int(np.prod(first["inputs"].shape))
  warm = warm_fn if warm_fn is not None else eval_fn
  if warm is not None:
    warm(nnx.merge(graphdef, state.params, rest))
  history, pending, final = [], [], None
  meter = ThroughputMeter(tokens_per_step)

  def evaluate(step: int) -> None:
    val = float(eval_fn(nnx.merge(graphdef, state.params, rest)))
    history.append({"step": step, "val_loss": val})
    if verbose:
      print(f"  step {step:5d}  val {val:.4f}", flush=True)

  with lock.hold() as waited:
    for i in range(steps):
      state, metrics = compiled(state, dist.global_batch(mesh, first if i == 0 else batch_fn(i)))
      if i == 0:
        jax.block_until_ready(state.step)
        meter.start()
      else:
        meter.count()
      pending.append((i + 1, metrics["loss"]))
      if (i + 1) % log_every == 0 or i + 1 == steps:
        history.extend({"step": s, "loss": float(loss)} for s, loss in pending)  # a host sync
        pending.clear()
        meter.lap()
      if eval_fn is not None and eval_every and (i + 1) % eval_every == 0 and i + 1 != steps:
        jax.block_until_ready(state.step)
        meter.lap()
        evaluate(i + 1)
        meter.start()
    jax.block_until_ready(state.step)
    if eval_fn is not None:
      evaluate(steps)
    if final_fn is not None:
      final = final_fn(nnx.merge(graphdef, state.params, rest))
  return TrainResult(cfg=cfg, params=state.params, graphdef=graphdef, rest=rest, history=history,
                     params_count=counts, tokens_per_step=tokens_per_step, steps=steps, train_s=meter.seconds,
                     compile_s=compile_s, compile_wait_s=compile_wait_s, lock_wait_s=waited, final=final,
                     tokens_per_s=meter.tokens_per_s, step_memory_bytes=compiled_memory(compiled),
                     peak_memory_bytes=dist.peak_memory_bytes())
