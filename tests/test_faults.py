"""Fault injection: runs killed with SIGKILL, corrupted checkpoint files, two runs on one out_dir, a
full disk. What must hold every time: no step is lost or logged twice, the resumed losses equal an
uninterrupted run's bit for bit, corruption is never silently used (a clear error naming the step,
then the newest step that verifies), and nothing good is deleted.

Counts (fixed seeds; printed with `pytest -s`): 3 SIGKILLs of a training run at random points (a
random step plus a random delay of up to 50 ms, so some land inside an async checkpoint save), 3
corruptions (truncate, 4 KiB of garbage, one flipped bit) of every kind of file of the latest
checkpoint of a small state (13 kinds, 39 in all), one corruption of a real run's optimizer state resumed through the
loop and `carve-eval`, two runs on one out_dir, a stale lock, and a disk that fills during a save
(RLIMIT_FSIZE). Data lost: none (asserted).

A tmpfs-backed full disk needs root or user namespaces (not on CI); RLIMIT_FSIZE makes every write
past the limit fail with EFBIG instead, which is what a full disk looks like to the writer.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from carve_jax.train import checkpoint as ckmod
from carve_jax.train import distributed as dist
from carve_jax.train import step as st
from carve_jax.train.checkpoint import CheckpointCorruptError, CheckpointError, Checkpointer, abstract_like
from carve_jax.train.flags import parse_train_args
from carve_jax.train.metrics import read_jsonl
from carve_jax.train.runlock import LOCK_NAME, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
COUNTS = {"runs_killed": 0, "corruptions_tried": 0, "corruptions_detected": 0, "harmless": 0, "steps_lost": 0}


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cfg(out_dir):
  """The smallest CARVE LM: 1 layer, d_model 16, 16-token windows, an async checkpoint every 2 steps."""
  return parse_train_args([
      "--preset", "tiny", "--n_layers", "1", "--d_model", "16", "--n_heads", "1", "--content_block", "8",
      "--chunk_size", "8", "--impl", "recurrent", "--corpus", "fixture", "--seq_len", "16", "--batch_size", "2",
      "--steps", str(STEPS), "--lr", "1e-2", "--warmup_steps", "2", "--ckpt_every", "2", "--ckpt_keep", "2",
      "--log_every", "1", "--eval_every", "0", "--eval_batches", "1", "--out_dir", str(out_dir), "--no-progress"])


def _losses(out_dir) -> dict[int, float]:
  recs = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == "train"]
  steps = [r["step"] for r in recs]
  assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
  return {r["step"]: r["loss"] for r in recs}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
  """An uninterrupted run: (its out_dir, its per-step losses, its final params)."""
  from carve_jax.train.loop import train
  out = tmp_path_factory.mktemp("reference")
  s = train(_cfg(out))
  assert s["steps"] == STEPS and s["skipped_steps"] == 0
  return out, _losses(out), _leaves(s["state"].params)


KILL_SCRIPT = textwrap.dedent("""
  import json, os, signal, sys, threading, time
  import jax
  jax.config.update("jax_compilation_cache_dir", sys.argv[2])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from carve_jax.train.config import TrainConfig
  from carve_jax.train.loop import train
  cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
  after, delay = int(sys.argv[3]), float(sys.argv[4])
  seen = []

  def die():
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)

  def on_step(step, rec):
    seen.append(step)
    if len(seen) == after:  # the loop goes on (into the next step, or a checkpoint save) until killed
      threading.Thread(target=die, daemon=True).start()

  train(cfg, on_step=on_step)
""")


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, xla_cache, reference, capsys):
  from carve_jax.train.loop import train
  _, ref, ref_params = reference
  cfg = _cfg(tmp_path / "killed")
  rng = np.random.default_rng(16)
  kills, takeovers = 0, 0
  for attempt in range(3):
    after, delay = int(rng.integers(2, 5)), float(rng.uniform(0.0, 0.05))
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.to_json(), xla_cache, str(after), str(delay)],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode in (-signal.SIGKILL, 0), r.stderr[-3000:]
    kills += r.returncode == -signal.SIGKILL
    takeovers += "taking over the stale lock" in r.stderr
    logged = _losses(tmp_path / "killed")
    assert all(logged[s] == ref[s] for s in logged), (attempt, logged)  # every logged loss is the reference's
  assert kills >= 2 and takeovers >= kills - 1  # every run after a kill found its dead predecessor's lock
  COUNTS["runs_killed"] += kills
  s = train(cfg)
  assert s["steps"] == STEPS and os.path.exists(tmp_path / "killed" / LOCK_NAME) is False
  after = _losses(tmp_path / "killed")
  assert sorted(after) == list(range(1, STEPS + 1))  # no step lost, none logged twice
  assert all(after[k] == ref[k] for k in ref), {k: (after[k], ref[k]) for k in ref if after[k] != ref[k]}
  for a, b in zip(_leaves(s["state"].params), ref_params):
    np.testing.assert_array_equal(a, b)
  COUNTS["steps_lost"] += STEPS - len(after)


# ------------------------------------------------------------------------------ corruption
class Toy(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Embed(16, 8, rngs=rngs)
    self.lin = nnx.Linear(8, 16, rngs=rngs)

  def __call__(self, x):
    return self.lin(jnp.tanh(self.embed(x)))


def _toy_states():
  g, p, rest = nnx.split(Toy(rngs=nnx.Rngs(0)), nnx.Param, ...)
  opt = optax.adamw(1e-2)
  mesh = dist.make_mesh()
  state = dist.replicate(mesh, st.init_state(p, opt, 0))
  step = st.make_train_step(g, rest, opt, mesh, donate=False)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):
    batch = {k: rng.integers(0, 16, (4, 6)).astype(np.int32) for k in ("inputs", "targets")}
    state, _ = step(state, dist.global_batch(mesh, batch))
    out.append(state)
  return out


def _corrupt(path: str, how: str, rng) -> None:
  size = os.path.getsize(path)
  if how == "truncate":
    os.truncate(path, size // 2)
  elif how == "garbage":
    with open(path, "r+b") as fh:
      fh.seek(int(rng.integers(0, max(size - 4096, 0) + 1)))
      fh.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  else:  # one flipped bit
    with open(path, "r+b") as fh:
      pos = int(rng.integers(0, max(size, 1)))
      fh.seek(pos)
      byte = fh.read(1) or b"\0"
      fh.seek(pos)
      fh.write(bytes([byte[0] ^ (1 << int(rng.integers(0, 8)))]))


def _kind(rel: str) -> str:
  """A checkpoint file's kind: its path with content-hash names collapsed (state/d/<hash> -> state/d/*)."""
  parts = rel.split("/")
  if len(parts[-1]) == 32 and all(c in "0123456789abcdef" for c in parts[-1]):
    parts[-1] = "*"
  return "*/commit_success.txt" if parts[-1] == "commit_success.txt" else "/".join(parts)


def test_every_corruption_of_every_kind_of_file_is_detected_or_harmless(tmp_path):
  """Each kind of file of the latest step x (truncate, 4 KiB of garbage, one flipped bit), on a file of
  that kind picked at random: restoring the latest step either gives back exactly what was saved (the
  damage was in bytes nothing reads: orbax's per-process OCDBT files, merged into state/d/ once
  the save is final, and the commit markers) or raises one clear line naming the step; the run then
  falls back to the previous step, which is intact. Damage to the data-iterator state, the metadata and the
  digest is always detected, and so is damage to the state's arrays (for each way of damaging)."""
  s1, s2 = _toy_states()
  pristine = tmp_path / "pristine"
  with Checkpointer(pristine, every=1) as ck:
    ck.save(1, s1, {"pos": 1})
    ck.save(2, s2, {"pos": 2})
  files = sorted(os.path.relpath(os.path.join(r, f), pristine / "2") for r, _, fs in os.walk(pristine / "2") for f in fs)
  kinds: dict[str, list[str]] = {}
  for f in files:
    kinds.setdefault(_kind(f), []).append(f)
  assert {"data/metadata", "meta/metadata", "digest.json", "state/_METADATA"} <= set(kinds), kinds
  rng = np.random.default_rng(7)
  abstract = abstract_like(s1)
  outcomes = {}
  for kind, members in sorted(kinds.items()):
    for how in ("truncate", "garbage", "bitflip"):
      f = members[int(rng.integers(len(members)))]
      work = tmp_path / "work"
      shutil.rmtree(work, ignore_errors=True)
      shutil.copytree(pristine, work)
      _corrupt(str(work / "2" / f), how, rng)
      said = []
      with Checkpointer(work, every=1, log=said.append) as ck:
        try:
          state, ds, meta = ck.restore(abstract, step=2)
        except CheckpointCorruptError as e:
          assert "checkpoint step 2" in str(e) and len(str(e).splitlines()) <= 2, str(e)  # one clear line
          outcomes[(kind, how)] = "detected"
          if kind in ("data/metadata", "state/d/*"):  # and the run would fall back to the intact step 1
            state, ds, meta = ck.restore(abstract)
            assert meta["step"] == 1 and ds == {"pos": 1} and _equal(state, s1), (f, how)
            assert len(said) == 1 and "falling back to step 1" in said[0]
        else:
          assert ds == {"pos": 2} and _equal(state, s2), (f, how)  # never a silently different state
          outcomes[(kind, how)] = "harmless"
        assert ck.all_steps() == [1, 2]  # nothing deleted
  for how in ("truncate", "garbage", "bitflip"):
    for kind in ("data/metadata", "meta/metadata", "digest.json"):
      assert outcomes[(kind, how)] == "detected", (kind, how)
    assert any(v == "detected" for (k, h), v in outcomes.items() if h == how and k.endswith("/d/*")), outcomes
  COUNTS["corruptions_tried"] += len(outcomes)
  COUNTS["corruptions_detected"] += sum(v == "detected" for v in outcomes.values())
  COUNTS["harmless"] += sum(v == "harmless" for v in outcomes.values())
  print("\ncorruptions:", json.dumps({f"{k} {h}": v for (k, h), v in sorted(outcomes.items())}, indent=0))


def test_corrupt_optimizer_state_of_a_real_run_falls_back_and_resumes_exactly(tmp_path, reference, capfd):
  """The issue's finding 1: garbage in the latest step's optimizer state. The run names the step,
  moves it aside, resumes from the previous step and reproduces the reference (no NaN); carve-eval
  on the damaged folder says one line and uses the good step."""
  from carve_jax.train import eval as ev
  from carve_jax.train.loop import train
  ref_dir, ref, ref_params = reference
  out = tmp_path / "run"
  shutil.copytree(ref_dir, out)
  ck_dir = out / "checkpoints"
  assert sorted(int(n) for n in os.listdir(ck_dir) if n.isdigit()) == [STEPS - 2, STEPS]
  state_dir = ck_dir / str(STEPS) / "state" / "d"  # the merged OCDBT database the arrays are read from
  biggest = max((os.path.join(state_dir, f) for f in os.listdir(state_dir)), key=os.path.getsize)
  _corrupt(biggest, "garbage", np.random.default_rng(3))
  capfd.readouterr()
  assert ev.main(["--ckpt_dir", str(ck_dir), "--eval_batches", "1"]) == 0
  err = capfd.readouterr().err
  assert f"checkpoint step {STEPS}" in err and f"falling back to step {STEPS - 2}" in err
  assert len(err.strip().splitlines()) <= 4, err  # no asyncio / TensorStore noise
  s = train(_cfg(out))
  err = capfd.readouterr().err
  assert f"moved checkpoint step {STEPS}" in err and os.path.isdir(ck_dir / f"{STEPS}.corrupt")
  assert s["resumed_from"] == STEPS - 2 and s["skipped_steps"] == 0 and s["steps"] == STEPS
  after = _losses(out)
  assert sorted(after) == list(range(1, STEPS + 1)) and all(after[k] == ref[k] for k in ref)
  for a, b in zip(_leaves(s["state"].params), ref_params):
    np.testing.assert_array_equal(a, b)
  COUNTS["corruptions_tried"] += 1
  COUNTS["corruptions_detected"] += 1


# ------------------------------------------------------------------------------ concurrency
HOLD_LOCK = textwrap.dedent("""
  import importlib.util, sys, time
  spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
  m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
  m.RunLock(sys.argv[2]).acquire()
  print("locked", flush=True)
  time.sleep(600)
""")


def test_second_run_on_a_live_out_dir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, reference, capfd):
  from carve_jax.train.loop import train
  _, ref, _ = reference
  out = tmp_path / "shared"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, os.path.join(REPO, "carve_jax/train/runlock.py"),
                             str(out)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=rf"--out_dir {out} is in use .*pid {holder.pid} on host"):
      train(_cfg(out))
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # the refused run wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  capfd.readouterr()
  s = train(_cfg(out))
  assert f"taking over the stale lock of pid {holder.pid}" in capfd.readouterr().err
  assert s["steps"] == STEPS and _losses(out) == ref and not os.path.exists(out / LOCK_NAME)


# ------------------------------------------------------------------------------ full disk
def test_full_disk_during_a_save_keeps_the_last_good_step(tmp_path):
  s1, s2 = _toy_states()
  with Checkpointer(tmp_path / "warm", every=1) as ck:  # compile the digest before the disk "fills"
    ck.save(1, s1)
  ck = Checkpointer(tmp_path / "ck", every=1, keep=1)
  ck.save(1, s1, {"pos": 1})
  ck.wait()
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
  try:
    with pytest.raises(CheckpointError, match="failed"):
      ck.save(2, s2, {"pos": 2})
      ck.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)
  try:
    ck.close()
  except CheckpointError:
    pass
  said = []
  with Checkpointer(tmp_path / "ck", every=1, keep=1, log=said.append) as again:
    state, ds, meta = again.restore(abstract_like(s1))
  assert meta["step"] == 1 and ds == {"pos": 1}
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(state), _leaves(s1)))
  COUNTS["corruptions_tried"] += 1
  COUNTS["corruptions_detected"] += 1


# ------------------------------------------------------------------------------ reruns and the CLI
def test_rerun_of_a_finished_run_and_extending_it(tmp_path, reference, capfd):
  """Run again once finished: nothing is trained, the summary has the logged loss and throughput
  (not NaN) and the log is unchanged. More --steps on the same out_dir is refused with the way that
  works, which is the command `carve-train --help` documents."""
  from carve_jax.train import cli
  from carve_jax.train.checkpoint import CheckpointMismatchError
  from carve_jax.train.loop import format_summary, train
  ref_dir, ref, _ = reference
  out = tmp_path / "done"
  shutil.copytree(ref_dir, out)
  before = (out / "metrics.jsonl").read_text()
  s = train(_cfg(out))
  assert s["steps"] == STEPS and s["train_loss"] == ref[STEPS] and np.isfinite(s["tokens_per_s"])
  assert "nan" not in format_summary(s)
  assert (out / "metrics.jsonl").read_text() == before
  assert f"already finished its {STEPS} steps" in capfd.readouterr().out
  with pytest.raises(CheckpointMismatchError, match=r"steps: checkpoint has 12, this run has 24(.|\n)*"
                     r"--config <out_dir>/config.json --steps N --out_dir <a new folder>"):
    train(_cfg(out).replace(steps=2 * STEPS))
  assert "carve-train --config runs/demo/config.json --steps 600 --out_dir runs/demo-600" in cli.__doc__
  new = parse_train_args(["--config", str(out / "config.json"), "--steps", "600", "--out_dir", str(tmp_path / "more")])
  assert new.steps == 600 and new.out_dir == str(tmp_path / "more")
  assert new.replace(steps=STEPS, out_dir=str(out)) == _cfg(out)  # the saved run's settings otherwise


def test_eval_batches_beyond_the_split_are_cut_with_a_message(reference, capfd):
  from carve_jax.train import eval as ev
  ref_dir, _, _ = reference
  assert ev.main(["--ckpt_dir", str(ref_dir / "checkpoints"), "--eval_batches", "100000"]) == 0
  out, err = capfd.readouterr()
  used = json.loads(out.strip().splitlines()[-1])["tokens"] // (2 * 16)
  assert f"--eval_batches 100000 is more than the {used} distinct batches of the val split: using {used}" in err
  assert 1 <= used < 100000


def test_time_limit_stops_early_enough_for_the_final_evaluation(tmp_path, reference, monkeypatch):
  """The loop stops once elapsed time + the final evaluation's estimate passes --time_limit_s: with
  a limit nothing reaches, an estimate above it stops the run after its first step (checkpointed)."""
  from carve_jax.train import loop
  _, ref, _ = reference
  monkeypatch.setattr(loop, "_eval_reserve_s", lambda *a: 1e9)
  s = loop.train(_cfg(tmp_path).replace(time_limit_s=1e6))
  assert s["steps"] == 1 and s["latest_checkpoint"] == 1 and _losses(tmp_path) == {1: ref[1]}
