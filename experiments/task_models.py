"""One small model per mixer trained on a synthetic task (MQAR, needle) and scored once trained."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from carve_jax.configs import MIXERS, ModelConfig
from carve_jax.train.batch_loop import StepCache, short_optim, train_on_batches
from experiments.flags import CommonFlags
from experiments.gpu_lock import GpuLock


@dataclasses.dataclass(frozen=True)
class TaskModelFlags(CommonFlags):
  """Flags of the synthetic-task experiments (one small model per mixer).

  Attributes:
    mixers: comma-separated mixers, one model each.
    d_model: model width.
    n_layers: blocks.
    n_heads: heads.
    lr: peak learning rate.
    seed: data and initialisation seed.
  """
  mixers: str = ",".join(MIXERS)
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 2
  lr: float = 3e-3
  seed: int = 0


def compile_threads() -> int:
  """Background compile threads (env CARVE_COMPILE_THREADS, default 6)."""
  return int(os.environ.get("CARVE_COMPILE_THREADS", "6"))


def train_task_models(task: str, mixers: list[str], config: Callable[[str], ModelConfig],
                      batch_fn: Callable[[int], dict], *, steps: int, seed: int, lr: float,
                      accuracy: Callable, on_run: Callable[[list[dict]], object], digits: int = 3) -> list[dict]:
  """Train one model per mixer (every step compiles in the background first) and return one record
  each: params, final accuracy dict, throughput, timings, loss curve. on_run(runs) is called after
  each model (partial results survive a time limit)."""
  cache, lock, optim = StepCache(compile_threads()), GpuLock.from_env(), short_optim(steps, lr=lr)
  for mixer in mixers:
    cache.precompile(config(mixer), batch_fn(0), optim, steps)
  runs = []
  for mixer in mixers:
    print(f"[{task}] {mixer}", flush=True)
    r = train_on_batches(config(mixer), batch_fn, steps=steps, seed=seed, optim=optim, cache=cache, log_every=20,
                         final_fn=accuracy, warm_fn=accuracy, lock=lock)
    print("  " + "  ".join(f"{k}={v:.{digits}f}" for k, v in r.final.items()), flush=True)
    runs.append({"mixer": mixer, "params": r.params_count, "accuracy": r.final, "tokens_per_s": r.tokens_per_s,
                 "compile_s": r.compile_s, "compile_wait_s": r.compile_wait_s, "gpu_wait_s": r.lock_wait_s,
                 "train_s": r.train_s, "final_train_loss": r.history[-1]["loss"],
                 "train_curve": [(h["step"], h["loss"]) for h in r.history if "loss" in h]})
    on_run(runs)
  return runs
