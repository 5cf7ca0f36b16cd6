"""Checkpoints (carve_jax.train.checkpoint): round trip, keep-last-K, and every error path.

A corrupt, missing or config-mismatched checkpoint raises a clear `CheckpointError` subclass and
deletes nothing; the latest step that fails verification (state, data or meta differ from the
digest written after them, or no digest) falls back to the newest one that verifies; a NaN state is
never saved; keep-last-K never deletes the newest verified step; a save that fails half-way leaves
the last good step restorable; a step is never written twice. Every kind of corruption of every
file is tried in test_faults.py. The exact-resume test (a training run SIGKILLed after a checkpoint, resumed,
reproducing the uninterrupted run's losses bit for bit) lives in test_train.py with the loop.
"""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from carve_jax.train import distributed as dist
from carve_jax.train import checkpoint as ckmod
from carve_jax.train import step as st
from carve_jax.train.checkpoint import (CheckpointCorruptError, CheckpointError, Checkpointer,
                                        CheckpointMismatchError, CheckpointNotFoundError, abstract_like)
from carve_jax.train.config import TrainConfig


class Toy(nnx.Module):
  def __init__(self, d=8, *, rngs):
    self.embed = nnx.Embed(16, d, rngs=rngs)
    self.lin = nnx.Linear(d, 16, rngs=rngs)

  def __call__(self, x):
    return self.lin(jnp.tanh(self.embed(x)))


def _state(d=8, seed=0):
  g, p, rest = nnx.split(Toy(d, rngs=nnx.Rngs(seed)), nnx.Param, ...)
  opt = optax.adamw(1e-2)
  mesh = dist.make_mesh()
  state = dist.replicate(mesh, st.init_state(p, opt, seed))
  step = st.make_train_step(g, rest, opt, mesh, donate=False)
  rng = np.random.default_rng(seed)
  batch = {k: rng.integers(0, 16, (4, 6)).astype(np.int32) for k in ("inputs", "targets")}
  state, _ = step(state, dist.global_batch(mesh, batch))  # non-trivial optimizer state
  return state, mesh


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _cfg_dict(**model):
  cfg = TrainConfig()
  return dataclasses.replace(cfg, model=cfg.model.replace(**model)).to_dict()


def test_round_trip_keep_last_and_iterator_state(tmp_path):
  state, mesh = _state()
  data_state = {"pos": np.int64(17), "perm": np.arange(3, dtype=np.int32), "blob": b"\x00\x01", "none": None}
  with Checkpointer(tmp_path, config=_cfg_dict(), every=2, keep=2) as ck:
    saved = [s for s in range(1, 8) if ck.save(s, state, data_state)]
    ck.wait()
    assert saved == [2, 4, 6]
    assert ck.all_steps() == [4, 6] and ck.latest_step() == 6
    restored, ds, meta = ck.restore(abstract_like(state, dist.replicated(mesh)))
    assert ck.save(6, state, data_state, force=True) is False  # an existing step is never rewritten
  assert _equal(restored, state) and type(restored) is st.TrainState
  assert int(ds["pos"]) == 17 and ds["blob"] == b"\x00\x01" and ds["none"] is None
  np.testing.assert_array_equal(ds["perm"], np.arange(3))
  assert meta["step"] == 6 and meta["config"]["model"]["d_model"] == TrainConfig().model.d_model


def test_missing_directory_and_step(tmp_path):
  state, mesh = _state()
  with pytest.raises(CheckpointNotFoundError, match="does not exist"):
    Checkpointer(tmp_path / "nowhere", read_only=True)
  with Checkpointer(tmp_path, every=1) as ck:
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint under"):
      ck.restore(abstract_like(state))
    ck.save(3, state)
    ck.wait()
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint step 5 .*steps there: \[3\]"):
      ck.restore(abstract_like(state), step=5)


def test_config_mismatch_is_refused_and_nothing_deleted(tmp_path):
  state, _ = _state()
  with Checkpointer(tmp_path, config=_cfg_dict(), every=1) as ck:
    ck.save(1, state)
  with Checkpointer(tmp_path, config=_cfg_dict(d_model=32, n_heads=2), every=1) as other:
    with pytest.raises(CheckpointMismatchError, match=r"model\.d_model: checkpoint has 64, this run has 32"):
      other.restore(abstract_like(state))
    assert other.all_steps() == [1]


def test_shape_mismatch_is_refused(tmp_path):
  state, _ = _state(d=8)
  with Checkpointer(tmp_path, every=1) as ck:
    ck.save(1, state)
  bigger, _ = _state(d=12)
  with Checkpointer(tmp_path, every=1) as ck:
    with pytest.raises(CheckpointMismatchError, match=r"params\['embed'\]\['embedding'\].*has float32\[16, 8\], this model has float32\[16, 12\]"):
      ck.restore(abstract_like(bigger))


@pytest.mark.parametrize("what", ["state", "meta", "data"])
def test_corrupt_checkpoint_gives_clear_error_and_falls_back(tmp_path, what):
  state, _ = _state()
  with Checkpointer(tmp_path, config=_cfg_dict(), every=1) as ck:
    ck.save(1, state, {"pos": 1})
    ck.save(2, state, {"pos": 2})
  victims = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "2" / what) for f in fs
             if f != "commit_success.txt"]
  assert victims
  for v in victims:
    with open(v, "r+b") as fh:
      size = max(os.path.getsize(v), 16)
      fh.write(b"\xde\xad\xbe\xef" * (size // 4))
  said = []
  with Checkpointer(tmp_path, config=_cfg_dict(), every=1, log=said.append) as ck:
    with pytest.raises(CheckpointCorruptError, match="step 2"):
      ck.restore(abstract_like(state), step=2)
    good, ds, meta = ck.restore(abstract_like(state))  # the latest fails: the newest that verifies
    assert ck.all_steps() == [1, 2]  # nothing deleted
  assert meta["step"] == 1 and ds == {"pos": 1} and _equal(good, state)
  assert len(said) == 1 and "checkpoint step 2" in said[0] and "falling back to step 1" in said[0]


def test_altered_state_fails_the_digest_naming_the_leaf(tmp_path):
  state, _ = _state()
  with Checkpointer(tmp_path, every=1) as ck:
    ck.save(1, state)
  path = tmp_path / "1" / "digest.json"
  digest = json.loads(path.read_text())
  leaf = next(k for k in digest["state"] if "opt_state" in k)
  digest["state"][leaf][0] ^= 1
  path.write_text(json.dumps(digest))
  with Checkpointer(tmp_path, every=1) as ck:
    with pytest.raises(CheckpointCorruptError, match=r"step 1 .*1 of \d+ state leaves differ .*first: " + re.escape(leaf)):
      ck.restore(abstract_like(state), step=1)
    with pytest.raises(CheckpointCorruptError, match=r"no checkpoint under .* verifies \(steps \[1\]\)"):
      ck.restore(abstract_like(state))


def test_digest_sees_one_flipped_bit_in_any_leaf():
  state, _ = _state()
  ref, _ = ckmod.state_digest(state)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  for i, x in enumerate(leaves):
    a = np.array(x)
    flat = a.reshape(-1).view(np.uint8)
    flat[rng.integers(flat.size)] ^= np.uint8(1 << int(rng.integers(8)))
    flipped = jax.device_put(a, x.sharding)  # same sharding: one compiled digest program for all
    changed, _ = ckmod.state_digest(jax.tree.unflatten(treedef, leaves[:i] + [flipped] + leaves[i + 1:]))
    assert [k for k in ref if ref[k] != changed[k]] == [list(ref)[i]]


def test_older_checkpoint_without_digest_is_checked_by_its_fingerprint(tmp_path):
  state, _ = _state()
  with Checkpointer(tmp_path, every=1) as ck:
    ck.save(1, state)
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["format"]
  meta["fingerprint"] = ckmod.fingerprint(state.params)
  meta_file.write_text(json.dumps(meta))
  (tmp_path / "1" / "digest.json").unlink()
  with Checkpointer(tmp_path, every=1) as ck:
    restored, _, _ = ck.restore(abstract_like(state))
    assert _equal(restored, state)
    meta["fingerprint"][0][0] += 1.0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match="fingerprint"):
      ck.restore(abstract_like(state), step=1)


def test_non_finite_state_is_never_saved(tmp_path):
  state, _ = _state()
  bad = state._replace(opt_state=jax.tree.map(
      lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x,
      state.opt_state))
  said = []
  with Checkpointer(tmp_path, every=1, log=said.append) as ck:
    assert ck.save(1, state)
    assert ck.save(2, bad) is False
    ck.wait()
    assert ck.all_steps() == [1]
  assert len(said) == 1 and "step 2: not saving" in said[0] and "opt_state" in said[0] and "last saved step is 1" in said[0]


def test_keep_last_never_deletes_the_newest_verified_step(tmp_path, monkeypatch):
  """keep=1, and step 2's save dies after orbax finalised it but before its digest was written."""
  state, _ = _state()
  with Checkpointer(tmp_path, every=1, keep=1) as ck:
    ck.save(1, state, {"pos": 1})
  real = ckmod._write_atomic
  monkeypatch.setattr(ckmod, "_write_atomic", lambda *a: (_ for _ in ()).throw(OSError("killed (simulated)")))
  ck = Checkpointer(tmp_path, every=1, keep=1)
  ck.save(2, state, {"pos": 2})
  with pytest.raises(CheckpointError, match="killed"):
    ck.wait()
  ck.close()
  monkeypatch.setattr(ckmod, "_write_atomic", real)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # step 1 survives
  said = []
  with Checkpointer(tmp_path, every=1, keep=1, log=said.append) as ck:
    _, ds, meta = ck.restore(abstract_like(state), quarantine=True)
    assert meta["step"] == 1 and ds == {"pos": 1}
    assert "no digest.json" in said[0] and "moved checkpoint step 2" in said[1]
    assert ck.all_steps() == [1]
    ck.save(2, state, {"pos": 2})  # the step number is free again
    ck.save(3, state, {"pos": 3})
  assert sorted(os.listdir(tmp_path)) == ["2.corrupt", "3"]


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
  state, _ = _state()
  ck = Checkpointer(tmp_path, every=1, keep=1)  # keep=1: the riskiest setting
  ck.save(1, state, {"pos": 1})
  ck.wait()

  async def broken(self, x, directory):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", broken)
  with pytest.raises(CheckpointError, match="disk full"):
    ck.save(2, jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state), {"pos": 2})
    ck.wait()
  monkeypatch.undo()
  try:
    ck.close()
  except CheckpointError:
    pass
  # The half-written step never got its final name; its temporary folder is ignored.
  assert not (tmp_path / "2").exists() and any(n.startswith("2.") and "tmp" in n for n in os.listdir(tmp_path))
  with Checkpointer(tmp_path, every=1, keep=1) as again:
    assert again.all_steps() == [1]
    restored, ds, _ = again.restore(abstract_like(state))
  assert _equal(restored, state) and ds == {"pos": 1}


def test_only_unfinished_saves_mean_no_checkpoint(tmp_path, monkeypatch):
  """A run killed between its first checkpoint's data and digest starts over instead of being stuck."""
  state, _ = _state()
  monkeypatch.setattr(ckmod, "_write_atomic", lambda *a: (_ for _ in ()).throw(OSError("killed (simulated)")))
  ck = Checkpointer(tmp_path, every=1)
  ck.save(1, state)
  with pytest.raises(CheckpointError, match="killed"):
    ck.wait()
  ck.close()
  monkeypatch.undo()
  with Checkpointer(tmp_path, every=1, log=lambda m: None) as ck:
    with pytest.raises(CheckpointNotFoundError, match=r"no finished checkpoint .*steps \[1\] did not finish"):
      ck.restore(abstract_like(state), quarantine=True)
    assert ck.all_steps() == [] and os.path.isdir(tmp_path / "1.corrupt")
