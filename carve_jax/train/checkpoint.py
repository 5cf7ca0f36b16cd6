"""Checkpoints of a training run with orbax's `CheckpointManager`, verified whole on restore.

A checkpoint at step s is the folder `<dir>/<s>/` with three orbax items and one digest file:
  state/       the `TrainState` (params, optimizer state, step, RNG, skipped count), orbax PyTree format;
  data/        the training data iterator's `get_state()` (JSON, written by process 0: every process's
               iterator is at the same position, e.g. {"next_index": 812}, since all step in lockstep);
  meta/        JSON: the run's `TrainConfig`, the step, the state's layout, library versions;
  digest.json  written by us AFTER orbax has finalised the three items: for every leaf of the state
               two wrapping uint32 sums of its bits, sum_i u_i (2i+1) and sum_i (u_i ^ 0x9E3779B9 i) (2i+1)^2
               (u = the leaf's raw bits as uint32, i = flat index; exact, so one flipped bit changes
               them), and the sha256 of the canonical JSON of `data` and `meta`.

Safety (what "nothing good is ever lost or overwritten" rests on):
- orbax writes each step into a temporary folder and renames it into place only once every item is
  complete; an interrupted save leaves at most a temporary folder, which `all_steps()` ignores. The
  digest is written (tmp file, fsync, rename) only after that, by a thread that watches the async
  save (or by `wait()`), so a step without a digest is one whose save did not finish: it does not
  verify (`CheckpointIncompleteError`; if no step is complete, there is no checkpoint). A step that
  exists is never written again.
- A state whose params or optimizer state hold a NaN/Inf is never saved (`save` returns False and
  says so).
- Keep-last-K is ours, not orbax's: old steps are deleted only after a newer step's digest is on
  disk, and only steps older than the K newest *verified* steps are deleted, so the newest verified
  step is never deleted.
- On restore: the config stored in `meta` is compared with the run's (`config.RUN_IDENTITY`): a
  mismatch raises `CheckpointMismatchError` listing the differences; a missing step raises
  `CheckpointNotFoundError` naming the steps there are; a step that cannot be read or whose state,
  data or meta differ from its digest raises `CheckpointCorruptError` naming the step and what
  failed. `restore()` without a step falls back to the newest step that verifies, saying so (and
  with `quarantine=True`, in a training run, moves the failed newer steps aside to `<s>.corrupt`
  so their step numbers can be saved again); it raises if none verifies. Nothing is deleted on an
  error. orbax's asyncio error logs of a broken file are silenced: one clear line instead.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from carve_jax.train import config as cfglib

ITEMS = ("state", "data", "meta")
DIGEST = "digest.json"
FORMAT = 2  # meta["format"]: 2 = verified by digest.json; absent = an older checkpoint (params fingerprint only)


class CheckpointError(RuntimeError):
  """Base class of the checkpoint errors below."""


class CheckpointNotFoundError(CheckpointError):
  """The directory or the requested step does not exist."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's files cannot be read or don't match what was saved."""


class CheckpointIncompleteError(CheckpointCorruptError):
  """A step has no digest: its save did not finish (the process died between data and digest)."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a run with a different configuration."""


def _bits(x) -> jax.Array:
  """The raw bits of an array as a flat uint32 vector (16/8-bit types widened, 64-bit split in two)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)


@jax.jit
def _digest_and_finite(tree):
  """([n_leaves, 2] uint32 bit sums, [n_leaves] bool all-finite) of a pytree of arrays (see module doc)."""
  sums, finite = [], []
  for x in jax.tree.leaves(tree):
    u = _bits(x)
    i = jnp.arange(u.size, dtype=jnp.uint32)
    odd = 2 * i + 1
    sums.append(jnp.stack([jnp.sum(u * odd, dtype=jnp.uint32),
                           jnp.sum((u ^ (i * jnp.uint32(0x9E3779B9))) * odd * odd, dtype=jnp.uint32)]))
    finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
  return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32), jnp.stack(finite) if finite else jnp.ones((0,), bool)


def state_digest(tree) -> tuple[dict[str, list[int]], list[str]]:
  """({leaf path: [sum1, sum2]}, [paths of float leaves holding a NaN/Inf]) of a pytree of arrays."""
  sums, finite = jax.device_get(_digest_and_finite(tree))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  return ({p: [int(a), int(b)] for p, (a, b) in zip(paths, np.asarray(sums))},
          [p for p, ok in zip(paths, np.asarray(finite)) if not ok])


def json_digest(obj) -> str:
  """sha256 of the canonical JSON (sorted keys) of `obj` after a JSON round trip."""
  return hashlib.sha256(json.dumps(json.loads(json.dumps(obj)), sort_keys=True).encode()).hexdigest()


def fingerprint(params) -> list[list[float]]:
  """[[sum, sum of squares] per leaf] of a params pytree: the check of checkpoints from before digests."""
  return [[float(np.sum(np.asarray(x, np.float64))), float(np.sum(np.square(np.asarray(x, np.float64))))]
          for x in jax.tree.leaves(jax.device_get(params))]


def _fingerprints_match(a, b, rtol=1e-5) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * (np.abs(b) + 1e-6)))


def _short(e: BaseException) -> str:
  """One line of an orbax/TensorStore error: the innermost cause, without the TensorStore spec dump."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).split("See full TensorStore details")[0].strip().splitlines()
  line = text[0] if text else ""
  return f"{type(e).__name__}: {line[:300]}"


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
    keep: keep the last this many verified steps (see the module docstring).
    async_save: write in a background thread (the step returns as soon as device arrays are copied).
    read_only: never write or delete (evaluation, generation).
    step_flag: the command-line flag that picks a step, named in error messages.
    log: where the fallback and skip messages go (default: print to stderr).
  """

  def __init__(self, directory: str, *, config: dict | None = None, every: int = 1000, keep: int = 3,
               async_save: bool = True, read_only: bool = False, step_flag: str = "--restore_step",
               log: Callable[[str], None] | None = None):
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
    self.config = config
    self.keep = keep
    self.read_only = read_only
    self.step_flag = step_flag
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self._pending: list[tuple[int, dict]] = []  # saves started whose digest is not written yet
    self._lock = threading.Lock()  # guards _pending / _verified against the digest watcher thread
    self._watcher: threading.Thread | None = None
    self._main = jax.process_index() == 0
    with _quiet_orbax():  # orbax notes every read-only open, and logs each unreadable metadata file
      opts = ocp.CheckpointManagerOptions(
          save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
          enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
          cleanup_tmp_directories=not read_only)  # no preservation policy: `_prune` deletes
      self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)
    # Steps with a digest, kept in memory so that every process prunes the same steps.
    self._verified = {s for s in self.all_steps() if self.has_digest(s)}

  # --------------------------------------------------------------------------------- queries
  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def has_digest(self, step: int) -> bool:
    return os.path.isfile(os.path.join(self.directory, str(step), DIGEST))

  def should_save(self, step: int) -> bool:
    return self._mgr.should_save(step)

  # ------------------------------------------------------------------------------------ save
  def save(self, step: int, state, data_state: Any = None, *, force: bool = False,
           extra_meta: dict | None = None) -> bool:
    """Starts saving `state` (a TrainState) and the iterator state as step `step`.

    Returns whether a save was started: not if the step exists, or if the params or optimizer
    state hold a NaN/Inf (said via `log`). Raises CheckpointError if a previous async save failed.
    """
    if not force and not self._mgr.should_save(step):
      return False
    if step in self._mgr.all_steps():
      return False  # already saved (e.g. the final step coincides with a periodic one)
    self.wait()  # the previous save's digest is written and old steps pruned before a new save starts
    sums, bad = state_digest(state)
    bad = [p for p in bad if p.startswith((".params", ".opt_state"))]
    if bad:
      self.log(f"step {step}: not saving a checkpoint, the state is not finite in {len(bad)} leaves "
               f"(first: {bad[0]}); the last saved step is {self.latest_step()}")
      return False
    meta = {"format": FORMAT, "step": int(step), "config": self.config, "layout": layout(state),
            "time": time.time(), "versions": _versions(), **(extra_meta or {})}
    data_json = _to_json(data_state)
    digest = {"format": FORMAT, "step": int(step), "state": sums, "data": json_digest(data_json),
              "meta": json_digest(meta)}
    with self._lock:
      try:
        started = self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_json),
            meta=ocp.args.JsonSave(meta)), force=True)
      except ocp.checkpoint_manager.StepAlreadyExistsError:
        return False
      if started:
        self._pending.append((int(step), digest))
    if started:
      if self._mgr.is_saving_in_progress():  # async: a thread writes the digest as soon as orbax is done
        self._watcher = threading.Thread(target=self._watch, name="carve-digest", daemon=True)
        self._watcher.start()
      else:
        self.wait()
    return started

  def _watch(self) -> None:
    try:
      while self._pending:
        if not self._mgr.is_saving_in_progress():
          self._write_finished_digests(block=False)
          return
        time.sleep(0.005)
    except Exception:  # noqa: BLE001 - what is still pending is written, or its error raised, by wait()
      return

  def _write_finished_digests(self, block: bool) -> None:
    """Writes the digest of every finalised pending save (waiting for them if `block`). A save that
    failed has no step folder: it is left to `wait()`, which raises orbax's error."""
    with self._lock:
      if not self._pending:
        return
      if block:
        self._mgr.wait_until_finished()
      elif self._mgr.is_saving_in_progress():
        return
      for step, digest in list(self._pending):
        folder = os.path.join(self.directory, str(step))
        if not block and not os.path.isdir(folder):
          continue
        if self._main:
          _write_atomic(os.path.join(folder, DIGEST), json.dumps(digest))
        self._verified.add(step)
        self._pending.remove((step, digest))

  def _prune(self) -> None:
    """Deletes the steps older than the `keep` newest verified ones (never the newest verified)."""
    if self.read_only:
      return
    steps = self.all_steps()
    verified = sorted(self._verified.intersection(steps))
    if len(verified) <= self.keep:
      return
    oldest_kept = verified[-self.keep]
    for s in steps:
      if s < oldest_kept:
        self._mgr.delete(s)
        self._verified.discard(s)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk with their digests, then prunes old steps.

    Raises CheckpointError if a save failed (nothing is deleted then)."""
    try:
      self._write_finished_digests(block=True)
    except Exception as e:  # orbax re-raises the background thread's error here
      with self._lock:
        self._pending.clear()
      raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {e}") from e
    self._prune()

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
    """The JSON metadata of one step (config, layout, versions), checked against its digest."""
    self._require(step)
    try:
      with _quiet_orbax():
        meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: cannot read its "
                                   f"metadata ({_short(e)})") from e
    if not isinstance(meta, dict) or "step" not in meta:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: metadata is "
                                   f"incomplete (got {type(meta).__name__})")
    if meta.get("format") == FORMAT and json_digest(meta) != self._digest(step)["meta"]:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: its metadata differs "
                                   "from the digest written with it")
    return meta

  def _digest(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), DIGEST)
    try:
      with open(path) as fh:
        digest = json.load(fh)
    except FileNotFoundError:
      raise CheckpointIncompleteError(f"checkpoint step {step} under {self.directory}: no {DIGEST} (its save "
                                      "did not finish)") from None
    except (OSError, ValueError) as e:
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: {DIGEST} is unreadable "
                                   f"({type(e).__name__}: {e})") from e
    if not isinstance(digest, dict) or digest.get("step") != step or not all(
        k in digest for k in ("state", "data", "meta")):
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory}: {DIGEST} is malformed")
    return digest

  def restore(self, abstract_state, step: int | None = None, *, quarantine: bool = False
              ) -> tuple[Any, Any, dict]:
    """Restores (state, data_state, meta) of `step` into `abstract_state`'s structure, shapes, dtypes
    and shardings (e.g. `jax.eval_shape` of the initial state with `.sharding` set).

    step=None: the newest step that verifies; each newer step that fails is reported via `log`
    (and moved aside to `<step>.corrupt` if `quarantine`). `meta["step"]` is the step restored.
    Raises CheckpointNotFoundError, CheckpointMismatchError or CheckpointCorruptError.
    """
    if step is not None:
      return self._restore_one(abstract_state, int(step))
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    failures = []
    for s in reversed(steps):
      try:
        out = self._restore_one(abstract_state, s)
      except CheckpointCorruptError as e:
        failures.append((s, e))
        older = [t for t in steps if t < s]
        self.log(f"{e}\n  -> " + (f"falling back to step {older[-1]}" if older else "no older step to fall back to"))
        continue
      if quarantine:
        for bad, _ in failures:
          self._quarantine(bad)
      return out
    if all(isinstance(e, CheckpointIncompleteError) for _, e in failures):  # only unfinished saves: none there
      if quarantine:
        for bad, _ in failures:
          self._quarantine(bad)
      raise CheckpointNotFoundError(f"no finished checkpoint under {self.directory} (the saves of steps "
                                    f"{[s for s, _ in failures]} did not finish)")
    raise CheckpointCorruptError(f"no checkpoint under {self.directory} verifies (steps {steps}); nothing was "
                                 "deleted. Use a new --out_dir / --ckpt_dir to start over.") from failures[0][1]

  def _quarantine(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    dst, n = f"{src}.corrupt", 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt{n}"
    if self._main:
      os.rename(src, dst)
    self._verified.discard(step)
    with _quiet_orbax():
      self._mgr.reload()
    self.log(f"moved checkpoint step {step}, which fails verification, to {dst}")

  def _restore_one(self, abstract_state, step: int) -> tuple[Any, Any, dict]:
    meta = self.read_meta(step)
    if self.config is not None and meta.get("config") is not None:
      diff = cfglib.identity_diff(meta["config"], self.config)
      if diff:
        raise CheckpointMismatchError(
            f"checkpoint step {step} under {self.directory} was written by a run with a different "
            "configuration:\n  " + "\n  ".join(diff) + "\n" + cfglib.mismatch_advice(diff))
    if "layout" in meta:
      diff = _layout_diff(meta["layout"], layout(abstract_state))
      if diff:
        raise CheckpointMismatchError(
            f"checkpoint step {step} under {self.directory} holds a differently shaped state than this "
            "model's:\n  " + "\n  ".join(diff[:10]) + ("\n  ..." if len(diff) > 10 else ""))
    digest = self._digest(step) if meta.get("format") == FORMAT else None
    try:
      with _quiet_orbax():
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointCorruptError(f"checkpoint step {step} under {self.directory} cannot be restored "
                                   f"({_short(e)}). Other steps there: {others} ({self.step_flag})") from e
    state = out["state"]
    _check_structure(abstract_state, state, step, self.directory)
    where = f"checkpoint step {step} under {self.directory}"
    if digest is None:  # an older checkpoint: only the params fingerprint was saved
      if "fingerprint" not in meta or not _fingerprints_match(fingerprint(state.params), meta["fingerprint"]):
        raise CheckpointCorruptError(f"{where}: restored parameters do not match the fingerprint saved with them")
    else:
      sums, _ = state_digest(state)
      bad = [p for p in sorted(set(sums) | set(digest["state"])) if sums.get(p) != digest["state"].get(p)]
      if bad:
        raise CheckpointCorruptError(f"{where}: {len(bad)} of {len(sums)} state leaves differ from the digest "
                                     f"saved with them (first: {bad[0]}). Other steps there: "
                                     f"{[s for s in self.all_steps() if s != step]} ({self.step_flag})")
      if json_digest(out["data"]) != digest["data"]:
        raise CheckpointCorruptError(f"{where}: the data-iterator state differs from the digest saved with it")
    return state, _from_json(out["data"]), meta

  def _require(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointNotFoundError(f"no checkpoint step {step} under {self.directory}; steps there: {steps} "
                                    f"({self.step_flag})")


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as fh:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)
  fd = os.open(os.path.dirname(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's and asyncio's error logs while reading a possibly broken checkpoint (a broken
  file otherwise prints every failed read's traceback); the caller raises one clear error instead."""
  logs = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax")]
  levels = [log.level for log in logs]
  for log in logs:
    log.setLevel(logging.CRITICAL)
  try:
    yield
  except BaseException:
    gc.collect()  # failed reads' unretrieved task exceptions are logged when collected: do it while quiet
    raise
  finally:
    for log, level in zip(logs, levels):
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
