"""The training loop's hot path (issue 12): flat state, packed metrics, one batch prefetched to the device,
arithmetic checkpoint decisions. Its logged losses must equal a plain step-by-step run of
`make_train_step` on the same batches (same seed, bit for bit)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax.train import distributed as dist
from carve_jax.train import step as st
from carve_jax.train.flags import parse_train_args
from carve_jax.train.metrics import read_jsonl

SMALL = dict(n_layers=1, d_model=32, n_heads=2, content_block=16, chunk_size=16, impl="recurrent")


def _cfg(out_dir, steps=6, **extra):
  argv = ["--preset", "tiny", *[f"--{k}={v}" for k, v in SMALL.items()], "--corpus", "fixture", "--seq_len", "16",
          "--batch_size", "4", "--steps", str(steps), "--lr", "1e-2", "--warmup_steps", "2", "--ckpt_every", "4",
          "--log_every", "3", "--eval_every", "0", "--eval_batches", "1", "--out_dir", str(out_dir), "--no-progress"]
  for k, v in extra.items():
    argv += [f"--{k}", str(v)]
  return parse_train_args(argv)


def _reference_losses(cfg, tokens):
  """The loop written the plain way: TrainState in, metrics dict out, one host sync per step."""
  from carve_jax.train.loop import batch_iterator, build_model
  from carve_jax.train.optim import lr_schedule, make_optimizer
  mesh = dist.make_mesh()
  graphdef, params, rest = nnx.split(build_model(cfg), nnx.Param, ...)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  state = dist.replicate(mesh, st.init_state(params, optimizer, cfg.seed))
  step = st.make_train_step(graphdef, rest, optimizer, mesh, schedule=lr_schedule(cfg.optim, cfg.steps))
  it = batch_iterator(tokens[1], cfg.data, dist.process_batch_size(cfg.data.batch_size, mesh))
  out = {}
  for i in range(cfg.steps):
    state, m = step(state, dist.global_batch(mesh, next(it)))
    out[i + 1] = (float(m["loss"]), float(m["grad_norm"]), float(m["lr"]))
  return out, state


def test_loop_logs_the_losses_of_a_plain_step_by_step_run(tmp_path, monkeypatch):
  """The loop's losses are a plain step-by-step run's, bit for bit, and every step ran the program compiled ahead
  (from the config's shapes, while the data loaded and the model was built)."""
  from carve_jax.train import loop
  from carve_jax.train.loop import load_tokens, train
  cfg = _cfg(tmp_path)
  assert cfg.data.reset_documents  # the batches carry segment_ids: `abstract_batch` must say so
  tokens = load_tokens(cfg.data)
  made, original = [], loop.step_compiled_ahead
  monkeypatch.setattr(loop, "step_compiled_ahead", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
  summary = train(cfg, tokens=tokens)
  assert len(made) == 1 and made[0].compiled is not None
  off = _cfg(tmp_path / "off", steps=1).replace(compile_ahead=False)  # --no-compile_ahead: at the first step
  made.clear()
  train(off, tokens=tokens)
  assert len(made) == 1 and made[0].compiled is None and made[0]._ahead is None
  recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  got = {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in recs if r["split"] == "train"}
  ref, ref_state = _reference_losses(cfg, tokens)
  assert sorted(got) == list(range(1, 7))
  for s in ref:
    assert got[s] == ref[s], (s, got[s], ref[s])  # bit for bit
  assert got[6][0] < got[1][0]  # not vacuous: the run trained
  for a, b in zip(jax.tree.leaves(summary["state"].params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  perf = [r for r in recs if r["split"] == "perf"]
  assert [r["step"] for r in perf] == [3, 6]
  assert all(r["tokens_per_s"] > 0 and r["host_ms_per_step"] > 0 for r in perf)
  # Checkpoints at the arithmetic points (4, and the end) with the data position after that step.
  from carve_jax.train.checkpoint import Checkpointer
  ck = Checkpointer(cfg.checkpoint_dir, read_only=True)
  assert ck.all_steps() == [4, 6]
  ck.close()


def test_flat_step_structure_check_and_metric_unpacking():
  """No compile: FlatTrainStep refuses a state of another structure; the packed vector unpacks by name."""
  from carve_jax.configs import preset
  from carve_jax.model import LM
  from carve_jax.train.config import OptimConfig
  from carve_jax.train.optim import make_optimizer
  mesh = dist.make_mesh()
  graphdef, params, rest = nnx.split(LM(preset("tiny", **SMALL), rngs=nnx.Rngs(0)), nnx.Param, ...)
  opt = make_optimizer(OptimConfig(), 10)
  state = st.init_state(params, opt, 0)
  flat = st.FlatTrainStep(graphdef, rest, opt, mesh, state)
  leaves = flat.flatten(state)
  assert len(leaves) == flat.treedef.num_leaves
  assert jax.tree.structure(flat.unflatten(leaves)) == jax.tree.structure(state)
  with pytest.raises(ValueError, match="`state`"):
    flat.flatten({"not": jnp.zeros(())})
  rec = st.unpack_metrics(np.asarray([2.5, 0.75, 0.0, 3.0, np.nan], np.float32))
  assert rec["loss"] == 2.5 and rec["grad_norm"] == 0.75 and rec["finite"] is False and rec["skipped"] == 3
  assert math.isnan(rec["lr"]) and list(rec) == list(st.METRICS)


def test_compile_ahead_program_is_used_only_for_the_arguments_it_was_compiled_for():
  """The program compiled ahead runs when the first call's arguments have its shapes, dtypes and shardings; for
  other arguments the jitted step runs instead (and gives the same result)."""
  from carve_jax.configs import preset
  from carve_jax.model import LM
  from carve_jax.train.config import OptimConfig
  from carve_jax.train.optim import make_optimizer
  mesh = dist.make_mesh()
  graphdef, params, rest = nnx.split(LM(preset("tiny", **SMALL), rngs=nnx.Rngs(0)), nnx.Param, ...)
  opt = make_optimizer(OptimConfig(), 10)
  state = dist.replicate(mesh, st.init_state(params, opt, 0))
  toks = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
  batch = dist.global_batch(mesh, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})
  sds = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  results = []
  for ahead_batch in (batch, {k: v[:2] for k, v in batch.items()}):  # the batch's shapes; half its rows
    flat = st.FlatTrainStep(graphdef, rest, opt, mesh, state, donate=False)
    leaves = flat.flatten(state)
    flat.compile_ahead(sds(leaves), sds(ahead_batch))
    out = flat(leaves, batch)
    results.append(out)
    assert (flat.compiled is not None) == (ahead_batch is batch)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_throughput_meter_counts_steps_after_the_first_between_syncs(monkeypatch):
  """tokens/s = tokens_per_step * timed steps / timed seconds; paused time (evaluation) is left out."""
  from carve_jax.train import meter as meter_mod
  clock = iter([10.0, 12.0, 13.0, 20.0, 23.0])  # start, lap, start (after a pause), lap, lap
  monkeypatch.setattr(meter_mod.time, "perf_counter", lambda: next(clock))
  m = meter_mod.ThroughputMeter(tokens_per_step=100)
  assert m.step_s is None and m.tokens_per_s != m.tokens_per_s  # NaN before any timed step
  m.start()
  m.count(0.5)
  m.count(0.25)
  assert m.lap() == 375.0  # host ms per step of this lap
  m.start()  # 12 -> 13 is not counted
  m.count()
  m.lap()
  assert (m.steps, m.seconds) == (3, 9.0) and m.tokens_per_s == 100 * 3 / 9.0 and m.step_s == 3.0
  host_ms = m.lap()  # a lap without counted steps adds nothing
  assert host_ms != host_ms and (m.steps, m.seconds) == (3, 9.0)


def test_init_on_host_draws_the_parameters_on_the_cpu_backend_then_trains_as_device_init(tmp_path, monkeypatch):
  """`--init_on host` builds the model and optimizer state under jax's CPU backend, places them on the mesh and
  trains to the plain run's losses (on this CPU machine both backends are the CPU, so bit for bit); the summary
  says where init ran and splits the first step into data, init and the wait for the compile."""
  from carve_jax.train import loop
  from carve_jax.train.loop import load_tokens, train
  cfg = _cfg(tmp_path, init_on="host")
  tokens = load_tokens(cfg.data)
  defaults, original = [], loop.build_model
  monkeypatch.setattr(loop, "build_model", lambda c: defaults.append(jax.config.jax_default_device) or original(c))
  summary = train(cfg, tokens=tokens)
  assert [d.platform for d in defaults if d is not None] == ["cpu"]  # (eval_shape's build runs without it)
  assert summary["init_on"] == "host"
  assert set(summary["setup"]) == {"data_s", "init_s", "compile_wait_s"}
  assert summary["setup"]["compile_wait_s"] is not None and summary["setup"]["init_s"] > 0
  assert "init on host" in loop.format_summary(summary)
  ref, ref_state = _reference_losses(cfg, tokens)
  recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  got = {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in recs if r["split"] == "train"}
  assert got == ref
  for a, b in zip(jax.tree.leaves(summary["state"].params), jax.tree.leaves(ref_state.params)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_on_auto_is_host_only_for_one_process_on_an_accelerator(tmp_path, monkeypatch):
  from carve_jax.train.loop import init_on
  cfg = _cfg(tmp_path)
  assert cfg.init_on == "auto" and init_on(cfg) == "device"  # this machine: the CPU backend
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert init_on(cfg) == "host"
  assert init_on(cfg.replace(init_on="device")) == "device"
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert init_on(cfg) == "device"
  with pytest.raises(ValueError, match="init_on"):
    cfg.replace(init_on="gpu")
