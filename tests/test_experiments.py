"""The experiments package: the MQAR and needle task generators, the power-law fit, the windows of
the LM batches (numpy only), the GPU lock, the flags, and one tiny run through the library's loop."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.stats import fit_power_law
from experiments.tasks import needle as nd
from experiments.tasks.mqar import mqar_batch
from experiments.windows import fixed_batches, window_batches

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("T,P", [(16, 4), (64, 8), (256, 64)])
def test_mqar_queries_answer_bound_values(T, P):
  V = max(128, 4 * P)
  b = mqar_batch(np.random.default_rng(0), batch_size=8, seq_len=T, num_pairs=P, vocab_size=V)
  x, y, m = b["inputs"], b["targets"], b["mask"]
  assert x.shape == y.shape == m.shape == (8, T) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
  for r in range(8):
    keys, vals = x[r, 0:2 * P:2], x[r, 1:2 * P:2]
    assert len(set(keys.tolist())) == P and keys.min() >= 1 and keys.max() < V // 2
    assert vals.min() >= V // 2 and vals.max() < V
    bound = dict(zip(keys.tolist(), vals.tolist()))
    q = np.flatnonzero(m[r])
    assert len(q) == P and q.min() >= 2 * P  # every key queried once, after the context
    assert sorted(x[r, q].tolist()) == sorted(keys.tolist())
    assert all(y[r, i] == bound[x[r, i]] for i in q)
    rest = np.setdiff1d(np.arange(2 * P, T), np.concatenate([q, q + 1]))
    assert (x[r, rest] == 0).all()  # filler elsewhere


def test_mqar_is_seeded_and_validates():
  a = mqar_batch(np.random.default_rng(3), batch_size=2, seq_len=32, num_pairs=4, vocab_size=64)
  b = mqar_batch(np.random.default_rng(3), batch_size=2, seq_len=32, num_pairs=4, vocab_size=64)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  with pytest.raises(ValueError, match="seq_len"):
    mqar_batch(np.random.default_rng(0), batch_size=1, seq_len=15, num_pairs=4, vocab_size=64)
  with pytest.raises(ValueError, match="vocab_size"):
    mqar_batch(np.random.default_rng(0), batch_size=1, seq_len=64, num_pairs=8, vocab_size=8)


@pytest.mark.parametrize("task", nd.TASKS)
def test_needle_answer_is_retrievable(task):
  T, n, w = 200, 3, 2
  stream = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 40, np.uint8)
  b = nd.needle_batch(np.random.default_rng(1), batch_size=6, seq_len=T, tasks=(task,), stream=stream,
                      n_needles=n, width=w)
  x, y, m = b["inputs"], b["targets"], b["mask"]
  assert x.shape == (6, T) and x.max() < nd.VOCAB_SIZE
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  for r in range(6):
    seq = np.concatenate([x[r], y[r, -1:]])
    starts = np.flatnonzero(seq == nd.NEEDLE)
    assert len(starts) == (1 if task == "single" else n)
    needles = [(tuple(seq[s + 1:s + 1 + w]), tuple(seq[s + 2 + w:s + 2 + 2 * w])) for s in starts]
    q = int(np.flatnonzero(seq == nd.QUERY)[0])
    key = tuple(seq[q + 1:q + 1 + w])
    expected = [t for k, v in needles if k == key for t in v]
    if task != "multivalue":
      assert len(expected) == w  # keys are distinct: exactly one needle answers
    else:
      assert len(expected) == n * w and len({k for k, _ in needles}) == 1
    assert y[r][m[r] > 0].tolist() == expected
    hay = seq[(seq < 256)]
    assert hay.min() >= 1  # 0 never appears in the haystack


def test_needle_multiquery_training_rows():
  """The training-only task: every needle's key queried once, each answer masked where it is predicted."""
  T, n, w = 300, 4, 2
  b = nd.needle_batch(np.random.default_rng(2), batch_size=5, seq_len=T, tasks=("multiquery",), n_needles=n, width=w)
  x, y, m = b["inputs"], b["targets"], b["mask"]
  for r in range(5):
    seq = np.concatenate([x[r], y[r, -1:]])
    starts = np.flatnonzero(seq == nd.NEEDLE)
    bound = {tuple(seq[s + 1:s + 1 + w]): tuple(seq[s + 2 + w:s + 2 + 2 * w]) for s in starts}
    qs = np.flatnonzero(seq == nd.QUERY)
    assert len(starts) == len(qs) == n and len(bound) == n
    asked = [tuple(seq[q + 1:q + 1 + w]) for q in qs]
    assert sorted(asked) == sorted(bound)  # every key asked once
    expected = [t for k in asked for t in bound[k]]
    assert y[r][m[r] > 0].tolist() == expected and int(m[r].sum()) == n * w
    assert qs[-1] + 2 + 2 * w == T + 1  # the last answer ends the row


def test_needle_validates():
  with pytest.raises(ValueError, match="task"):
    nd.needle_row(np.random.default_rng(0), "bogus", 64)
  with pytest.raises(ValueError, match="seq_len"):
    nd.needle_row(np.random.default_rng(0), "multivalue", 12)


def test_power_law_fit_recovers_exponent():
  x = np.array([16, 32, 64, 128, 256], float)
  f = fit_power_law(x, 3.0 * x ** -0.5)
  assert abs(f["exponent"] + 0.5) < 1e-9 and abs(f["prefactor"] - 3.0) < 1e-9 and f["r2"] > 0.999999
  noisy = 2.0 * x ** 0.7 * np.exp(np.random.default_rng(0).normal(0, 0.05, x.shape))
  f = fit_power_law(x, noisy)
  assert abs(f["exponent"] - 0.7) < 4 * f["exponent_stderr"] + 0.05
  with pytest.raises(ValueError, match="positive"):
    fit_power_law([1, 2, 3], [1, 0, 2])
  with pytest.raises(ValueError, match="length"):
    fit_power_law([1, 2], [1, 2])


def test_lm_windows():
  stream = np.arange(1000, dtype=np.uint16)
  fn = window_batches(stream, seq_len=16, batch_size=4, seed=0)
  b = fn(5)
  np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # consecutive windows, shifted by one
  np.testing.assert_array_equal(fn(5)["inputs"], b["inputs"])  # seeded by (seed, step)
  assert not np.array_equal(fn(6)["inputs"], b["inputs"])
  v = fixed_batches(stream, seq_len=10, batch_size=2, n_batches=3)
  assert [x["inputs"][0, 0] for x in v] == [0, 20, 40]
  with pytest.raises(ValueError, match="need"):
    fixed_batches(stream, seq_len=100, batch_size=5, n_batches=3)


def test_gpu_lock_is_exclusive_and_higher_priority_goes_first(tmp_path):
  """Processes sharing CARVE_GPU_LOCK hold the GPU one at a time; a waiting higher priority goes first."""
  import subprocess
  import textwrap
  import time

  lock, log, go = tmp_path / "gpu.lock", tmp_path / "order.txt", tmp_path / "go"
  script = textwrap.dedent(f"""
      import os, sys, time
      from experiments.gpu_lock import GpuLock
      with GpuLock.from_env().hold() as waited:
          with open({str(log)!r}, "a") as f:
              f.write(sys.argv[1] + " in\\n")
          while sys.argv[1] == "holder" and not os.path.exists({str(go)!r}):
              time.sleep(0.01)
          with open({str(log)!r}, "a") as f:
              f.write(sys.argv[1] + " out\\n")
  """)

  def start(name, prio):
    return subprocess.Popen([sys.executable, "-c", script, name],
                            env={"CARVE_GPU_LOCK": str(lock), "CARVE_GPU_PRIORITY": str(prio), "PATH": "/usr/bin:/bin"},
                            cwd=REPO)

  def wait_for(cond):
    deadline = time.time() + 60
    while not cond():
      assert time.time() < deadline
      time.sleep(0.02)

  procs = [start("holder", 0)]
  wait_for(lambda: log.exists() and "holder in" in log.read_text())
  procs.append(start("low", 0))
  wait_for(lambda: len(list(tmp_path.glob("gpu.lock.wait.0.*"))) == 1)
  procs.append(start("high", 5))
  wait_for(lambda: len(list(tmp_path.glob("gpu.lock.wait.5.*"))) == 1)
  go.touch()
  for p in procs:
    assert p.wait(timeout=60) == 0
  lines = log.read_text().split()
  events = [" ".join(lines[i:i + 2]) for i in range(0, len(lines), 2)]
  assert events == ["holder in", "holder out", "high in", "high out", "low in", "low out"]
  assert not list(tmp_path.glob("gpu.lock.wait.*"))  # markers cleaned up


def test_announced_higher_priority_goes_before_a_waiting_lower_one(tmp_path):
  """A process that has announced its next run (still setting up) keeps lower priorities waiting."""
  import subprocess
  import textwrap
  import time

  lock, log, go = tmp_path / "gpu.lock", tmp_path / "order.txt", tmp_path / "go"
  script = textwrap.dedent(f"""
      import os, sys, time
      from experiments.gpu_lock import GpuLock
      lock = GpuLock.from_env()
      if sys.argv[1] == "high":
          lock.announce()
          while not os.path.exists({str(go)!r}):
              time.sleep(0.01)
          time.sleep(0.3)  # still setting up after the go
      with lock.hold():
          with open({str(log)!r}, "a") as f:
              f.write(sys.argv[1] + "\\n")
  """)

  def start(name, prio):
    return subprocess.Popen([sys.executable, "-c", script, name],
                            env={"CARVE_GPU_LOCK": str(lock), "CARVE_GPU_PRIORITY": str(prio), "PATH": "/usr/bin:/bin"},
                            cwd=REPO)

  high = start("high", 3)
  deadline = time.time() + 60
  while not list(tmp_path.glob("gpu.lock.wait.3.*")):
    assert time.time() < deadline
    time.sleep(0.02)
  low = start("low", 0)
  time.sleep(0.5)
  go.touch()
  assert high.wait(timeout=60) == 0 and low.wait(timeout=60) == 0
  assert log.read_text().split() == ["high", "low"]


def test_gpu_lock_without_a_path_is_a_no_op(monkeypatch):
  from experiments.gpu_lock import GpuLock
  monkeypatch.delenv("CARVE_GPU_LOCK", raising=False)
  lock = GpuLock.from_env()
  lock.announce()
  with lock.hold() as waited:
    assert waited == 0.0


def test_bench_train_plan_and_row_filter():
  from experiments import bench_train as bt
  args = bt.BenchTrainFlags(compile_scaling=False, mixers="carve,gdn2", tiny=False, sizes="50m,350m",
                            seq_lens="8192,2048", rows="50m:8192,350m:2048:gdn2", remat_policies="none",
                            tokens_per_step=32768, no_scan=False)
  rows = bt.plan(args)
  assert [(r["size"], r["seq_len"], r["mixer"], r["batch"]) for r in rows] == [
      ("50m", 8192, "carve", 4), ("50m", 8192, "gdn2", 4), ("350m", 2048, "gdn2", 16)]
  # a fourth field picks the remat policy: remat rows for CARVE, attention without
  args.rows, args.mixers, args.remat_policies = "350m:8192:carve:full,350m:8192:attention:none", "carve,attention", \
      "none,full"
  assert [(r["mixer"], r["remat_policy"]) for r in bt.plan(args)] == [("attention", "none"), ("carve", "full")]
  args.rows, args.seq_lens = "", "3000"
  with pytest.raises(SystemExit, match="multiple"):
    bt.plan(args)
  with pytest.raises(SystemExit, match="loop_steps"):  # no perf line to read the loop's tokens/s from
    bt.main(["--loop_steps", "2", "--log_every", "5"])


@pytest.mark.slow
def test_bench_train_tiny_runs_on_cpu(tmp_path):
  """`python -m experiments.bench_train --tiny` end to end: a row with device and loop numbers, results md/json/png."""
  import json
  import os
  import subprocess
  repo = Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))
  r = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--tiny", "--mixers", "attention",
                      "--out_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")], capture_output=True,
                     text=True, timeout=600, env=env, cwd=repo)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = json.loads((tmp_path / "bench_train_tiny.json").read_text())["rows"]
  assert len(rows) == 1 and not rows[0].get("error"), rows
  row = rows[0]
  assert row["device_ms"] > 0 and row["loop_tokens_per_s"] > 0 and row["first_step_s"] > 0
  assert (tmp_path / "bench_train_tiny.md").exists() and (tmp_path / "bench_train_tiny.png").exists()


def test_experiment_flags_tiny_and_bad_flag(capsys):
  """Flags of an experiment are its dataclass's; --tiny replaces the sizes; a typo names the flag."""
  from experiments import mqar
  a = mqar.flags.parse(mqar.MqarFlags, ["--mixers", "gdn", "--steps", "5", "--lr=1e-3"], prog="mqar",
                       description="", tiny=mqar.TINY)
  assert (a.mixers, a.steps, a.lr, a.tiny, a.d_model) == ("gdn", 5, 1e-3, False, 128)
  t = mqar.flags.parse(mqar.MqarFlags, ["--tiny", "--steps", "500", "--tag", "_x"], prog="mqar", description="",
                       tiny=mqar.TINY)
  assert (t.steps, t.d_model, t.tag) == (mqar.TINY["steps"], mqar.TINY["d_model"], "_x")  # tiny sizes win
  with pytest.raises(SystemExit) as e:
    mqar.flags.parse(mqar.MqarFlags, ["--stpes", "5"], prog="mqar", description="", tiny=mqar.TINY)
  assert e.value.code == 2 and "--stpes" in capsys.readouterr().err


def test_mqar_tiny_one_mixer_through_the_library_loop(tmp_path, monkeypatch):
  """`python -m experiments.mqar --tiny` for one mixer: trained by carve_jax.train.batch_loop, results
  written under --out_dir, throughput counted over the steps after the first."""
  import json
  from experiments import mqar
  monkeypatch.setenv("CARVE_COMPILE_THREADS", "1")
  out = mqar.main(["--tiny", "--mixers", "gdn", "--out_dir", str(tmp_path), "--tag", "_t"])
  run, = out["runs"]
  assert run["mixer"] == "gdn" and run["tokens_per_s"] > 0 and run["train_s"] > 0
  assert [s for s, _ in run["train_curve"]] == list(range(1, mqar.TINY["steps"] + 1))
  assert set(run["accuracy"]) == {"32:4", "32:8", "64:8"}
  saved = json.loads((tmp_path / "mqar_t.json").read_text())
  assert saved["runs"][0]["mixer"] == "gdn" and saved["env"]["command"].startswith("python")
  assert (tmp_path / "mqar_t.md").exists() and (tmp_path / "mqar_t.png").exists()


def test_bench_train_merge(tmp_path):
  """--merge: one table of rows from several runs (a run column, every source's command listed, an OOM row
  shown as such, ratios within one run's policy), and a clear error for files from different devices."""
  from experiments import bench_train as bt
  row = dict(kind="train", size="50m", mixer="carve", seq_len=2048, batch=16, remat_policy="none", device_ms=98.6,
             device_ms_text=98.6, device_tokens_per_s=332297.0, loop_tokens_per_s=333098.0, loop_over_device=1.002,
             loop_host_ms_per_step=74.7, mfu_loop=0.092, peak_device_bytes=2**35, first_step_s=22.9)
  env = dict(device="gpu:NVIDIA H200", jax="0.11.2", flax="0", optax="0", git_commit="abc1234", utc="t0",
             command="python -m experiments.bench_train --sizes 50m")
  a = dict(env=env, rows=[row, dict(row, mixer="gdn2", loop_tokens_per_s=341793.0)])
  b = dict(env=dict(env, git_commit="def5678", command="python -m experiments.bench_train --sizes 350m"),
           rows=[dict(row, size="350m", mixer="kda", error="rc 1: W1201 bfc_allocator.cc:598] ran out of memory")])
  paths = []
  for name, payload in (("a", a), ("b", b)):
    paths.append(str(tmp_path / f"{name}.json"))
    (tmp_path / f"{name}.json").write_text(json.dumps(payload))
  bt.merge(paths, str(tmp_path), "_m")
  md = (tmp_path / "bench_train_m.md").read_text()
  assert "| run |" in md and "out of memory" in md and "--sizes 350m" in md and "abc1234,def5678" in md
  assert "CARVE / GDN-2 loop tokens/s = 0.975" in md
  assert (tmp_path / "bench_train_m.png").exists()
  (tmp_path / "b.json").write_text(json.dumps(dict(b, env=dict(b["env"], device="cpu:cpu"))))
  with pytest.raises(SystemExit, match="different devices"):
    bt.merge(paths, str(tmp_path), "_m")


def test_step_profile_sums_gpu_stream_kernels_per_name():
  """`step_profile` reads a perfetto trace: kernels on the GPU process's stream threads only (not the derived
  "XLA Ops" line, which repeats them; not the host), summed per name and per class, per step."""
  from experiments import step_profile as sp
  M = lambda pid, tid, kind, name: dict(ph="M", pid=pid, tid=tid, name=kind, args=dict(name=name))
  X = lambda pid, tid, name, dur: dict(ph="X", pid=pid, tid=tid, name=name, ts=0, dur=dur)
  trace = {"traceEvents": [
      M(1, 0, "process_name", "/device:GPU:0"), M(1, 7, "thread_name", "Stream #7(Compute)"),
      M(1, 9, "thread_name", "XLA Ops"), M(2, 0, "process_name", "/host:CPU"),
      X(1, 7, "carve_state_mosaic", 3000.0), X(1, 7, "carve_state_mosaic", 1000.0),
      X(1, 7, "sm90_xmma_gemm_bf16", 500.0), X(1, 7, "loop_add_fusion", 250.0),
      X(1, 9, "carve_state_mosaic", 4000.0), X(2, 0, "carve_state_mosaic", 9000.0)]}
  kernels, threads = sp.gpu_kernels(trace)
  assert sorted(kernels) == ["carve_state_mosaic", "loop_add_fusion", "sm90_xmma_gemm_bf16"]
  assert threads == {"/device:GPU:0 Stream #7(Compute)": 4.75, "/device:GPU:0 XLA Ops": 4.0}
  s = sp.summarize(kernels, steps=2)
  assert s["total_ms"] == 2.375 and s["classes"] == {"recurrence": 2.0, "matmul": 0.25, "other": 0.125}
  top = s["kernels"][0]
  assert (top["name"], top["launches"], top["ms"], top["cls"]) == ("carve_state_mosaic", 1.0, 2.0, "recurrence")


def test_compile_rows_tiny_ahead_and_sequential(tmp_path):
  """`bench_train --compile_scaling --tiny`: a row per mode; "ahead" (carve-train's way) ran the program compiled
  ahead; `compile_probe --tiny` times the mixer op alone."""
  import os
  import subprocess
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--compile_scaling", "--tiny", "--mixers", "gdn2",
                      "--compile_layers", "1", "--compile_scan", "on", "--out_dir", str(tmp_path)],
                     capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = json.loads((tmp_path / "bench_train_compile_tiny.json").read_text())["rows"]
  assert [r_["mode"] for r_ in rows] == ["ahead", "sequential"] and not any(r_.get("error") for r_ in rows), rows
  assert rows[0]["used_ahead"] is True and rows[1]["compile_s"] > 0
  r = subprocess.run([sys.executable, "-m", "experiments.compile_probe", "--tiny", "--rows", "op:gdn2",
                      "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  row, = json.loads((tmp_path / "compile_probe_tiny.json").read_text())["rows"]
  assert row["step_compile_s"] > 0 and row["step_lower_s"] > 0 and not row.get("error")


def test_first_step_tiny_row_reports_carve_trains_setup_split(tmp_path):
  """`first_step --tiny`: one carve-train run per row in a process of its own; the row carries the summary's first
  step and its split (data, init on the asked backend, the wait for the step compiled ahead) and the run's
  tokens/s; a malformed row is refused naming the format."""
  import os
  import subprocess
  from experiments import first_step
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "experiments.first_step", "--tiny", "--rows", "gdn2:host",
                      "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  row, = json.loads((tmp_path / "first_step_tiny.json").read_text())["rows"]
  assert not row.get("error") and row["mixer"] == "gdn2" and row["init_on_used"] == "host", row
  assert row["resets"] and row["ahead"] and row["compile_wait_s"] is not None
  assert 0 < row["init_s"] < row["first_step_s"] and row["data_s"] >= 0 and row["tokens_per_s"] > 0
  assert "| gdn2 | host | on | on |" in (tmp_path / "first_step_tiny.md").read_text()
  with pytest.raises(SystemExit, match="MIXER"):
    first_step.parse_row("carve:gpu", first_step.FirstStepFlags())


def test_first_step_failed_row_shows_its_exception_line():
  """A failed row's cell is the traceback's exception line (not its last characters), with no `|`; the caption
  is a paragraph of its own (a blank line after the table)."""
  from experiments import first_step
  tb = ("Traceback (most recent call last):\n  File \"loop.py\", line 335, in _train\n    jax.block_until_ready(m)\n"
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 96.77GiB | x\n\n")
  assert first_step.error_line(tb) == "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to " \
                                      "allocate 96.77GiB / x"
  assert first_step.error_line("timed out after 240 s") == "timed out after 240 s"
  row = dict(mixer="attention", init_on="auto", resets=True, ahead=True, preset="50m", batch=8, seq_len=4096, steps=12,
             error=tb)
  md = first_step.markdown([row])
  assert "| attention | auto | on | on | failed: jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED" in md
  assert "|\n\n50m preset, 8 x 4096" in md
