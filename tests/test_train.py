"""Training (carve_jax.train): CLI flags, optimizer, the data-parallel step, the loop, exact resume.

- Data-parallel: one step of the CARVE LM on 8 fake CPU devices (with and without gradient
  accumulation, and with the Pallas kernel in interpret mode on 2) gives the same parameters as
  on one device for the same global batch.
- A NaN/Inf step is skipped: parameters and optimizer state unchanged, counted, the next applies.
- Exact resume: a run SIGKILLed after its step-3 checkpoint and resumed reproduces the loss of
  every step of the uninterrupted run bit for bit (same data order, same RNG, same updates).
- A short run lowers the loss; the CLI entry points parse overrides and reject bad ones clearly.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from carve_jax.configs import preset
from carve_jax.train import distributed as dist
from carve_jax.train import optim
from carve_jax.train import step as st
from carve_jax.train.config import OptimConfig, TrainConfig
from carve_jax.train.flags import parse_train_args
from carve_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest CARVE LM that still has two content blocks per sequence.
SMALL = dict(n_layers=1, d_model=32, n_heads=2, content_block=16, chunk_size=16)


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


# ------------------------------------------------------------------------------------------ CLI
def test_cli_overrides_parse():
  cfg = parse_train_args(["--model", "gdn2", "--d_model", "512", "--n_heads", "8", "--steps", "2000",
                          "--lr", "1e-3", "--seq_len", "512", "--batch_size", "32", "--no-ckpt_async",
                          "--ckpt_every", "100", "--head_dim", "none", "--time_limit_s", "60"])
  assert (cfg.model.mixer, cfg.model.d_model, cfg.model.n_heads, cfg.model.head_dim) == ("gdn2", 512, 8, None)
  assert (cfg.steps, cfg.optim.lr, cfg.data.seq_len, cfg.data.batch_size) == (2000, 1e-3, 512, 32)
  assert cfg.ckpt.ckpt_async is False and cfg.ckpt.ckpt_every == 100 and cfg.time_limit_s == 60.0
  p = parse_train_args(["--preset", "50m", "--mixer", "kda", "--compute_dtype", "bfloat16"])
  assert (p.model.d_model, p.model.n_layers, p.model.mixer, p.model.compute_dtype) == (512, 12, "kda", "bfloat16")
  assert p.model.vocab_size == 256  # follows the byte tokenizer
  assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def _plain(err: str) -> str:
  """stderr without tyro's box drawing, whitespace collapsed (its boxes wrap long lines)."""
  return " ".join(re.sub(r"-{3,}|[│╭╮╰╯─]", " ", err).split())


@pytest.mark.parametrize("argv, message", [
    (["--d_modle", "512"], "Unrecognized options: --d_modle, 512 Perhaps you meant: --d_model INT"),
    (["--d_model", "big"], "Error parsing --d_model: invalid literal for int() with base 10: 'big'"),
    (["--model", "mamba"], "invalid choice 'mamba' for argument '--mixer'"),
    (["--d_model", "100", "--n_heads", "3"], "ModelConfig: field `n_heads` must be a divisor of d_model=100"),
    (["--lr", "-1"], "OptimConfig: field `lr` must be > 0, got -1.0"),
    (["--batch_size", "6", "--grad_accum", "4"], "TrainConfig: field `grad_accum` must be a divisor of "
                                                 "data.batch_size=6, got 4"),
    (["--corpus", "wiki"], "invalid choice 'wiki' for argument '--corpus'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge' (choose from 1.3b, 20m"),
    # issue 16: named flags, and refused before any data is read or downloaded
    (["--config", "/nonexistent/config.json"], "--config /nonexistent/config.json: cannot read it (No such file"),
    (["--tokens_dir", "/nonexistent/export"], "--tokens_dir /nonexistent/export: no such folder"),
    (["--tokenizer", "gpt2", "--vocab_size", "256"], "--vocab_size must be >= 50257 for --tokenizer gpt2"),
    (["--model", "attention", "--seq_len", "512"], "field `seq_len` must be <= model.max_seq_len=256 for attention"),
])
def test_cli_bad_overrides_exit_with_usage_error(capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    parse_train_args(argv)
  assert e.value.code == 2
  assert message in _plain(capsys.readouterr().err)


def test_cli_preset_then_overrides_flat_and_dotted():
  """--preset sets the model, model flags (flat, dotted or hyphenated) override it, other presets' fields stay."""
  p = preset("demo")
  cfg = parse_train_args(["--preset", "demo", "--n_layers", "3", "--model.content_block=32", "--chunk-size", "32",
                          "--data.seq_len", "64", "--no-reset_documents", "--attention_window", "none"])
  assert (cfg.model.n_layers, cfg.model.content_block, cfg.model.chunk_size) == (3, 32, 32)
  assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.mixer) == (p.d_model, p.n_heads, p.mixer)
  assert cfg.data.seq_len == 64 and cfg.data.reset_documents is False and cfg.model.attention_window is None
  # a flag after the preset wins; without --preset the --config file's model is the base
  assert parse_train_args(["--preset", "50m", "--d_model", "256", "--n_heads", "4"]).model.d_model == 256


def test_cli_config_file_then_overrides(tmp_path):
  saved = parse_train_args(["--preset", "tiny", "--d_model", "32", "--lr", "1e-2", "--steps", "7"])
  (tmp_path / "config.json").write_text(saved.to_json())
  cfg = parse_train_args(["--config", str(tmp_path / "config.json"), "--steps", "9"])
  assert cfg == dataclasses.replace(saved, steps=9)
  assert parse_train_args(["--config", str(tmp_path / "config.json"), "--preset", "demo"]).model == preset("demo")


def test_cli_help_lists_flags_with_their_docstrings(capsys):
  with pytest.raises(SystemExit) as e:
    parse_train_args(["--help"])
  out = _plain(capsys.readouterr().out)
  assert e.value.code == 0
  for text in ("--preset", "--config", "--d_model INT", "--lr FLOAT peak learning rate.",
               "--ckpt_async, --no_ckpt_async", "--time_limit_s {none}|FLOAT stop cleanly"):
    assert text in out, text


def test_eval_and_generate_cli_errors(tmp_path, capsys):
  from carve_jax.train import cli
  from carve_jax.train import eval as ev
  from carve_jax.train import generate as gen
  for main, prog in ((ev.main, "carve-eval"), (gen.main, "carve-generate")):
    assert main(["--ckpt_dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"{prog}: error: checkpoint directory {tmp_path / 'none'} does not exist"
    assert main(["--ckpt_dir", str(tmp_path), "--restore_step", "3"]) == 1  # --step's alias, named in errors
    assert "no checkpoint step 3 under" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ev.main(["--ckpt_dir", str(tmp_path), "--eval_batches", "0"])
  assert "--eval_batches must be >= 1" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ev.main(["--ckpt_dir", str(tmp_path), "--tokens_dir", str(tmp_path / "nope")])
  assert f"--tokens_dir {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
  (tmp_path / "file").write_text("")
  assert cli.main(["--out_dir", str(tmp_path / "file" / "run"), "--no-progress"]) == 1  # not a folder
  assert f"--out_dir {tmp_path / 'file' / 'run'}: cannot create or write it" in capsys.readouterr().err


def test_demo_gpu_without_a_gpu_is_a_usage_error(capsys):
  from carve_jax import demo
  if jax.default_backend() == "gpu":
    pytest.skip("this machine has a GPU")
  with pytest.raises(SystemExit) as e:
    demo.main(["--gpu"])
  assert e.value.code == 2 and "--gpu needs a CUDA GPU, but JAX sees only cpu devices" in capsys.readouterr().err


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
  from carve_jax.train.metrics import truncate_jsonl
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "spl')  # a line cut short by a kill
  assert truncate_jsonl(str(path), 3) == 3
  assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
  assert truncate_jsonl(str(path), 3) == 0 and truncate_jsonl(str(tmp_path / "absent.jsonl"), 0) == 0


def test_time_limit_keeps_room_for_the_final_evaluation():
  from carve_jax.train.loop import _eval_reserve_s
  assert _eval_reserve_s(4.0, 0.1, 30.0, 8) == 4.0  # measured: the last evaluation's time
  assert _eval_reserve_s(None, 0.5, 30.0, 8) == 8 * 0.5 + 15.0  # estimated: batches x step + half the compile
  assert _eval_reserve_s(None, None, None, 8) == 0.0


# ------------------------------------------------------------------------------------ optimizer
def test_weight_decay_mask_and_schedule():
  from carve_jax.model import abstract_model
  params = nnx.state(abstract_model(preset("tiny")), nnx.Param)
  d = optim.describe_mask(params)
  no = " ".join(d["no_decay"])
  for name in ("a_log", "dt_bias", "gamma", "embedding", "norm/weight", "bias"):
    assert name in no, name
  assert all(x.endswith(("kernel", "weight")) and "norm" not in x for x in d["decay"])
  assert any("q_proj" in x for x in d["decay"]) and any("mlp/up_proj" in x for x in d["decay"])
  sched = optim.lr_schedule(OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), 110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------ step
class Toy(nnx.Module):
  def __init__(self, *, rngs):
    self.lin = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)


def _mse(model, batch, rng):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def test_nan_step_is_skipped_and_counted():
  g, p, rest = nnx.split(Toy(rngs=nnx.Rngs(0)), nnx.Param, ...)
  opt = optax.adamw(1e-2)
  mesh = dist.make_mesh()
  state = dist.replicate(mesh, st.init_state(p, opt, 0))
  step = st.make_train_step(g, rest, opt, mesh, loss_fn=_mse, donate=False)
  good = {"x": np.ones((2, 4), np.float32), "y": np.zeros((2, 3), np.float32)}
  for bad_value in (np.nan, np.inf):
    bad = dict(good, y=np.full((2, 3), bad_value, np.float32))
    new, m = step(state, dist.global_batch(mesh, bad))
    assert not bool(m["finite"]) and int(m["skipped"]) == int(state.skipped) + 1
    assert int(new.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = new
  after, m = step(state, dist.global_batch(mesh, good))
  assert bool(m["finite"]) and int(after.skipped) == 2
  assert not np.array_equal(np.asarray(after.params["lin"]["kernel"][...]),
                            np.asarray(state.params["lin"]["kernel"][...]))


DP_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, numpy as np, optax
  from flax import nnx
  from carve_jax.configs import preset
  from carve_jax.model import LM
  from carve_jax.train import distributed as dist, step as st
  assert jax.device_count() == 8, jax.devices()
  cfg = preset("tiny", **json.loads(sys.argv[1]))
  g, p, rest = nnx.split(LM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  opt = optax.sgd(1.0)  # update = -gradient: compares the averaged gradients themselves
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (8, 32)).astype(np.int32) for k in ("inputs", "targets")}
  # The Pallas kernel (interpret mode on CPU) under shard_map: the GPU path's composition.
  g_pallas, _, rest_pallas = nnx.split(LM(cfg.replace(impl="pallas"), rngs=nnx.Rngs(0)), nnx.Param, ...)
  out = {}
  for n_dev, accum, impl in ((1, 1, "chunk"), (8, 1, "chunk"), (4, 2, "chunk"), (2, 1, "pallas")):
    mesh = dist.make_mesh(jax.devices()[:n_dev])
    state = dist.replicate(mesh, st.init_state(jax.tree.map(np.asarray, p), opt, 0))
    graph, other = (g, rest) if impl == "chunk" else (g_pallas, rest_pallas)
    step = st.make_train_step(graph, other, opt, mesh, grad_accum=accum)
    state, m = step(state, dist.global_batch(mesh, batch))
    out[(n_dev, accum)] = ([np.asarray(x) for x in jax.tree.leaves(state.params)], float(m["loss"]),
                           float(m["grad_norm"]))
  ref, loss, gnorm = out[(1, 1)]
  for key, (leaves, l, gn) in out.items():
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, ref))
    delta = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, [np.asarray(x) for x in jax.tree.leaves(p)]))
    print(json.dumps({"devices": key[0], "accum": key[1], "max_param_diff": err, "update": delta,
                      "loss_diff": abs(l - loss), "gnorm_diff": abs(gn - gnorm)}))
""")


def test_data_parallel_8_devices_matches_one_device():
  r = subprocess.run([sys.executable, "-c", DP_SCRIPT, json.dumps(SMALL)], capture_output=True, text=True,
                     timeout=600, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert [(x["devices"], x["accum"]) for x in rows] == [(1, 1), (8, 1), (4, 2), (2, 1)]
  for x in rows:
    assert x["update"] > 1e-2  # the step really moved the parameters
    assert x["max_param_diff"] < 1e-6 * x["update"] + 1e-7 and x["loss_diff"] < 1e-5 and x["gnorm_diff"] < 1e-5, x


# ------------------------------------------------------------------------------------------ loop
def _run_cfg(out_dir, steps=8):
  return parse_train_args([
      "--preset", "tiny", *[f"--{k}={v}" for k, v in SMALL.items()], "--corpus", "fixture",
      "--seq_len", "32", "--batch_size", "4", "--steps", str(steps), "--lr", "1e-2", "--warmup_steps", "2",
      "--ckpt_every", "3", "--log_every", "1", "--eval_every", "0", "--eval_batches", "1",
      "--out_dir", str(out_dir), "--no-progress"])


KILL_SCRIPT = textwrap.dedent("""
  import json, os, signal, sys, time
  import jax
  jax.config.update("jax_compilation_cache_dir", sys.argv[2])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from carve_jax.train.config import TrainConfig
  from carve_jax.train.loop import train
  cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))

  def on_step(step, rec):
    if step == 5:  # die hard once the step-3 checkpoint is on disk (step 4, 5 done, unsaved)
      deadline = time.time() + 60
      while not os.path.isfile(os.path.join(cfg.checkpoint_dir, "3", "digest.json")) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)

  train(cfg, on_step=on_step)
""")


def _losses(out_dir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == "train"}


def test_killed_run_resumes_exactly_and_training_lowers_loss(tmp_path, xla_cache):
  from carve_jax.train.checkpoint import Checkpointer
  from carve_jax.train.loop import train
  full = train(_run_cfg(tmp_path / "full"))
  ref = _losses(tmp_path / "full")
  assert sorted(ref) == list(range(1, 9)) and full["skipped_steps"] == 0
  assert np.mean([ref[7], ref[8]]) < ref[1] - 0.3, ref  # a short run lowers the loss
  assert full["val_loss"] < ref[1]

  cfg = _run_cfg(tmp_path / "killed")
  r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.to_json(), xla_cache], capture_output=True,
                     text=True, timeout=600, env=_env())
  assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL
  killed = _losses(tmp_path / "killed")
  assert sorted(killed) == [1, 2, 3, 4, 5] and all(killed[s] == ref[s] for s in killed)
  assert 3 in Checkpointer(cfg.checkpoint_dir, read_only=True).all_steps()

  resumed = train(cfg)
  assert resumed["resumed_from"] == 3 and resumed["steps"] == 8
  after = _losses(tmp_path / "killed")  # the resumed run appends steps 4..8
  for s in range(1, 9):
    assert after[s] == ref[s], (s, after[s], ref[s])  # bit for bit
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s["state"].params)]
  for a, b in zip(leaves(resumed), leaves(full)):
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_config(tmp_path, xla_cache):
  from carve_jax.train.checkpoint import CheckpointMismatchError
  from carve_jax.train.loop import train
  cfg = _run_cfg(tmp_path)  # the same programs as above: compiled once (cache)
  train(cfg)
  other = cfg.replace(optim=cfg.optim.__class__(lr=5e-3, warmup_steps=2))
  with pytest.raises(CheckpointMismatchError, match=r"optim\.lr: checkpoint has 0\.01, this run has 0\.005"):
    train(other)


def test_diverging_run_stops_and_keeps_its_checkpoints(tmp_path, xla_cache):
  from carve_jax.train.checkpoint import Checkpointer
  from carve_jax.train.loop import TrainingDivergedError, train
  cfg = _run_cfg(tmp_path).replace(max_consecutive_skips=3)
  cfg = cfg.replace(model=cfg.model.replace(impl="recurrent"), ckpt=cfg.ckpt.__class__(ckpt_every=2))

  def nan_loss(model, batch, rng):
    return st.lm_loss(model, batch, rng) * jnp.nan

  with pytest.raises(TrainingDivergedError, match=r"3 consecutive steps up to step 3 .* are kept \(latest: 2\)"):
    train(cfg, loss_fn=nan_loss)
  assert Checkpointer(cfg.checkpoint_dir, read_only=True).all_steps() == [2]
  train_recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert [(r["step"], r["finite"], r["skipped"]) for r in train_recs] == [(1, False, 1), (2, False, 2), (3, False, 3)]


@pytest.mark.slow
def test_demo_and_eval_generate_entry_points(tmp_path, xla_cache):
  """The README demo end to end at a tiny size, then carve-eval and carve-generate on its checkpoint."""
  out = tmp_path / "demo"
  argv = ["--preset", "tiny", "--n_layers", "1", "--impl", "recurrent", "--corpus", "fixture", "--seq_len", "32",
          "--batch_size", "4", "--steps", "4", "--eval_every", "0", "--eval_batches", "1", "--ckpt_every", "2",
          "--sample_tokens", "16", "--out_dir", str(out), "--no-progress"]
  r = subprocess.run([sys.executable, "-m", "carve_jax.demo", *argv], capture_output=True, text=True, timeout=900,
                     env=_env(CARVE_JAX_CACHE=xla_cache))
  assert r.returncode == 0, r.stderr[-3000:]
  for stage in ("[1/6] data", "[4/6] validation perplexity", "[5/6] sample", "[6/6] summary", "val ppl"):
    assert stage in r.stdout, (stage, r.stdout[-2000:])
  from carve_jax.train import eval as ev
  from carve_jax.train import generate as gen
  ckpt = str(out / "checkpoints")
  assert ev.main(["--ckpt_dir", ckpt, "--eval_batches", "1"]) == 0
  assert gen.main(["--ckpt_dir", ckpt, "--prompt", "The ", "--max_new_tokens", "8", "--json"]) == 0


MULTIHOST_SCRIPT = textwrap.dedent("""
  import json, sys
  from carve_jax.train.config import TrainConfig
  from carve_jax.train.loop import train
  s = train(TrainConfig.from_dict(json.loads(sys.argv[1])))
  print("SUMMARY", json.dumps({"processes": s["processes"], "devices": s["devices"], "steps": s["steps"]}))
""")


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """2 processes x 2 CPU devices (jax.distributed over localhost) reproduce a 1-process run's losses."""
  import socket
  from carve_jax.data import load_tokens, num_windows, prepare_corpus
  train_tokens = load_tokens(prepare_corpus("fixture"), "byte", "train")
  seq_len = next(t for t in range(32, 64) if num_windows(len(train_tokens), t) % 2 == 0)  # same windows for 1 or 2 shards
  cfg = _run_cfg(tmp_path / "multi", steps=4).replace(eval_batches=1)
  cfg = cfg.replace(data=cfg.data.__class__(corpus="fixture", seq_len=seq_len, batch_size=4))
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, cfg.to_json()], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(CARVE_DISTRIBUTED="1", CARVE_COORDINATOR=f"localhost:{port}",
                                     CARVE_NUM_PROCESSES="2", CARVE_PROCESS_ID=str(i),
                                     XLA_FLAGS="--xla_force_host_platform_device_count=2")) for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert 'SUMMARY {"processes": 2, "devices": 4, "steps": 4}' in out
  from carve_jax.train.loop import train
  single = train(cfg.replace(out_dir=str(tmp_path / "single")))
  multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert sorted(multi) == sorted(one) == [1, 2, 3, 4]
  for s in one:
    assert abs(multi[s] - one[s]) < 1e-5 * abs(one[s]), (s, multi[s], one[s])
  assert single["steps"] == 4


# ------------------------------------------------------------------------------------ compile cache
def test_compile_cache_settings(tmp_path, monkeypatch):
  from carve_jax.train import compile_cache as cc
  monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
  assert cc.resolve("auto") == str(tmp_path / "env")
  assert cc.resolve(str(tmp_path / "x")) == str(tmp_path / "x")
  assert cc.resolve("~/y") == os.path.expanduser("~/y")
  assert cc.resolve("none") is None and cc.resolve("off") is None and cc.resolve(None) is None
  monkeypatch.delenv(cc.ENV)
  assert cc.resolve("auto") == os.path.expanduser(cc.DEFAULT_DIR)
  old = jax.config.jax_compilation_cache_dir
  try:  # "auto" keeps a cache the process already has; a folder or "none" replaces it
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert cc.enable("auto") == str(tmp_path / "mine")
    assert cc.enable(str(tmp_path / "z")) == str(tmp_path / "z") == jax.config.jax_compilation_cache_dir
    assert cc.enable("none") is None and jax.config.jax_compilation_cache_dir is None
  finally:
    cc.enable(old or "none")


COMPILE_CACHE_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  from carve_jax.train.config import TrainConfig
  from carve_jax.train.loop import train
  hits = []
  jax.monitoring.register_event_listener(lambda e, **_: hits.append(e) if e.endswith("cache_hits") else None)
  cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
  summary = train(cfg)
  print("RESULT", json.dumps({"hits": len(hits), "dir": jax.config.jax_compilation_cache_dir}))
""")


def test_compile_cache_second_run_loads_the_step(tmp_path):
  """carve-train's default cache: a second run of the same configuration (a new process, a new out_dir) loads
  its train step from the folder the first one wrote."""
  cache = tmp_path / "xla"

  def run(name, setting):
    cfg = _run_cfg(tmp_path / name, steps=1).replace(compile_cache=setting)
    r = subprocess.run([sys.executable, "-c", COMPILE_CACHE_SCRIPT, cfg.to_json()], capture_output=True,
                       text=True, timeout=600, env=_env(CARVE_JAX_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ")[-1])

  first = run("a", "auto")
  assert first["dir"] == str(cache) and any(cache.iterdir())
  second = run("b", "auto")
  assert second["hits"] >= 1, second
