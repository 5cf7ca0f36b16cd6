"""Checkpoints of a training run with orbax's `CheckpointManager`.

A checkpoint at step s is the folder `<dir>/<s>/` with three items:
  state/  the `TrainState` (params, optimizer state, step, RNG, skipped count), orbax PyTree format;
  data/   the training data iterator's `get_state()` (JSON, written by process 0: every process's
          iterator is at the same position, e.g. {"next_index": 812}, since all step in lockstep);
  meta/   JSON: the run's `TrainConfig`, the step, a fingerprint of the params, library versions.

Safety (what "nothing good is ever overwritten" rests on):
- orbax writes each step into a temporary folder and renames it into place only once every item
  is complete (and, for async saves, finalised in the background); an interrupted or failed save
  leaves at most a temporary folder, which `all_steps()` ignores. A step that already exists is
  never written again (orbax raises `StepAlreadyExistsError`).
- Old steps are deleted only after a newer one is finalised (keep the last `keep`).
- On restore the config stored in `meta` is compared with the run's (`config.RUN_IDENTITY`
  fields): a mismatch raises `CheckpointMismatchError` listing the differences; a missing step
  raises `CheckpointNotFoundError` naming the steps there are; unreadable or altered files raise
  `CheckpointCorruptError`. The params are verified against the saved fingerprint (the float64
  sum and sum of squares of every leaf). Nothing is deleted on any error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from carve_jax.train import config as cfglib

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
  """Base class of the checkpoint errors below."""


class CheckpointNotFoundError(CheckpointError):
  """The directory or the requested step does not exist."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's files cannot be read or don't match what was saved."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a run with a different configuration."""


@jax.jit
def _leaf_sums(tree):
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
          for x in jax.tree.leaves(tree)]


def fingerprint(params) -> list[list[float]]:
  """[[sum, sum of squares] per leaf] of a params pytree: a cheap check that restored == saved."""
  return [[float(a), float(b)] for a, b in (np.asarray(s, np.float64) for s in jax.device_get(_leaf_sums(params)))]


def _fingerprints_match(a, b, rtol=1e-5) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * (np.abs(b) + 1e-6)))


def _versions() -> dict:
  import flax
  import optax
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "orbax": getattr(ocp, "__version__", "?")}


class Checkpointer:
  """Saves and restores (TrainState, data-iterator state) for one run directory.

  Args:
    directory: the run's checkpoint folder (created if absent unless `read_only`).
    config: the run's `TrainConfig` as a dict (stored with each step and checked on restore);
      None skips the check (e.g. `carve-eval` reading any checkpoint).
    every: save every this many steps (`save(..., force=True)` saves regardless).
    keep: keep the last this many steps.
    async_save: write in a background thread (the step returns as soon as device arrays are copied).
    read_only: never write or delete (evaluation, generation).
  """

  def __init__(self, directory: str, *, config: dict | None = None, every: int = 1000, keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
    self.config = config
    with _quiet_absl() if read_only else contextlib.nullcontext():  # orbax notes every read-only open
      opts = ocp.CheckpointManagerOptions(
          save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
          preservation_policy=ocp.checkpoint_managers.LatestN(keep),
          enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
          cleanup_tmp_directories=not read_only)
      self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)

  # --------------------------------------------------------------------------------- queries
  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mgr.should_save(step)

  # ------------------------------------------------------------------------------------ save
  def save(self, step: int, state, data_state: Any = None, *, force: bool = False,
           extra_meta: dict | None = None) -> bool:
    """Starts saving `state` (a TrainState) and the iterator state as step `step`.

    Returns whether a save was started. Raises CheckpointError if a previous async save failed.
    """
    if not force and not self._mgr.should_save(step):
      return False
    if step in self._mgr.all_steps():
      return False  # already saved (e.g. the final step coincides with a periodic one)
    self.check_for_errors()
    meta = {"step": int(step), "config": self.config, "fingerprint": fingerprint(state.params),
            "layout": layout(state), "time": time.time(), "versions": _versions(), **(extra_meta or {})}
    data_json = _to_json(data_state)
    try:
      return self._mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_json),
          meta=ocp.args.JsonSave(meta)), force=True)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      return False

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; raises CheckpointError if one failed."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # orbax re-raises the background thread's error here
      raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {e}") from e

  def check_for_errors(self) -> None:
    try:
      self._mgr.check_for_errors()
    except Exception as e:
      raise CheckpointError(f"a background checkpoint save under {self.directory} failed: {e}") from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------------------------- restore
  def read_meta(self, step: int) -> dict:
    """The JSON metadata of one step (config, fingerprint, versions)."""
    self._require(step)
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = out["meta"]
    except Exception as e:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: cannot read its "
                                   f"metadata ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or "fingerprint" not in meta:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: metadata is "
                                   f"incomplete (got {type(meta).__name__})")
    return meta

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores (state, data_state, meta) of `step` (default: the latest) into `abstract_state`'s
    structure, shapes, dtypes and shardings (e.g. `jax.eval_shape` of the initial state with
    `.sharding` set).

    Raises CheckpointNotFoundError, CheckpointMismatchError or CheckpointCorruptError.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    meta = self.read_meta(step)
    if self.config is not None and meta.get("config") is not None:
      diff = cfglib.identity_diff(meta["config"], self.config)
      if diff:
        raise CheckpointMismatchError(
            f"checkpoint step {step} under {self.directory} was written by a run with a different "
            "configuration:\n  " + "\n  ".join(diff) +
            "\nUse the same settings to resume, or a new --ckpt_dir / --out_dir for a new run.")
    if "layout" in meta:
      diff = _layout_diff(meta["layout"], layout(abstract_state))
      if diff:
        raise CheckpointMismatchError(
            f"checkpoint step {step} under {self.directory} holds a differently shaped state than this "
            "model's:\n  " + "\n  ".join(diff[:10]) + ("\n  ..." if len(diff) > 10 else ""))
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory} cannot be restored "
                                   f"({type(e).__name__}: {e}). Other steps there: "
                                   f"{[s for s in self.all_steps() if s != step]} (--restore_step)") from e
    state = out["state"]
    _check_structure(abstract_state, state, step, self.directory)
    if not _fingerprints_match(fingerprint(state.params), meta["fingerprint"]):
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: restored parameters "
                                   "do not match the fingerprint saved with them")
    return state, _from_json(out["data"]), meta

  def _require(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointNotFoundError(f"no checkpoint step {step} under {self.directory}; steps there: {steps}")


@contextlib.contextmanager
def _quiet_absl():
  log = logging.getLogger("absl")
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def layout(tree) -> dict[str, str]:
  """{leaf path: "dtype[shape]"} of a pytree of arrays or ShapeDtypeStructs."""
  return {jax.tree_util.keystr(p): f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _layout_diff(saved: dict, current: dict) -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
    if a != b:
      out.append(f"{k}: checkpoint has {a}, this model has {b}")
  return out


def _check_structure(abstract, restored, step, directory) -> None:
  a_leaves, a_def = jax.tree.flatten(abstract)
  r_leaves, r_def = jax.tree.flatten(restored)
  if a_def != r_def:
    raise CheckpointMismatchError(f"checkpoint step {step} under {directory}: its state tree differs from "
                                  f"this model's ({r_def.num_leaves} vs {a_def.num_leaves} leaves)")
  for i, (a, r) in enumerate(zip(a_leaves, r_leaves)):
    if tuple(a.shape) != tuple(r.shape) or a.dtype != r.dtype:
      raise CheckpointMismatchError(
          f"checkpoint step {step} under {directory}: leaf {i} is {r.dtype}{list(r.shape)}, "
          f"this model expects {a.dtype}{list(a.shape)}")


def _to_json(x):
  """Iterator states may hold numpy scalars/arrays or bytes; make them JSON."""
  if x is None or isinstance(x, (bool, int, float, str)):
    return {"__none__": True} if x is None else x
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
  if isinstance(x, bytes):
    return {"__bytes__": x.hex()}
  raise TypeError(f"data iterator state holds a {type(x).__name__}, which cannot be stored as JSON")


def _from_json(x):
  if isinstance(x, dict):
    if x.get("__none__") is True and len(x) == 1:
      return None
    if "__ndarray__" in x:
      return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    if "__bytes__" in x:
      return bytes.fromhex(x["__bytes__"])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


def abstract_like(state, sharding=None):
  """ShapeDtypeStructs (with the given sharding, or each leaf's own) of a pytree of arrays."""
  def one(x):
    sh = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  return jax.tree.map(one, state)
