"""Shared pieces of the experiment scripts: environment record, token streams, a short training
loop over `carve_jax.train.step`, accuracy on masked positions, power-law fits, result files.

Every experiment writes `<out_dir>/<name>.json` (all numbers, the environment and the exact
command), `<name>.md` (tables) and `<name>.png` (plot) through `write_results`.

Training here is deliberately small: `train_model` runs a fixed number of AdamW steps
(`carve_jax.train.optim.make_optimizer`, `carve_jax.train.step.make_train_step`) on batches from a
caller's `batch_fn(step) -> {"inputs", "targets"[, "mask"]}`. A "mask" (float [B, T]) restricts the
loss and the accuracy to the positions that carry an answer (synthetic tasks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.model import LM, param_count

import faulthandler as _faulthandler
import signal as _signal

# A run stopped by `timeout` (SIGTERM) prints where every thread was: the log then says what ran long.
_faulthandler.register(_signal.SIGTERM, all_threads=True, chain=True)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
MIXERS = ("carve", "gdn2", "kda", "gdn", "attention")
PAPER = {"params": -0.19, "memory": -0.13, "time": +0.004, "perturbation_exponent": -0.5, "wikitext_ppl_delta": -0.18}


# -- environment ----------------------------------------------------------------------------------


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def enable_compile_cache(path: str = "/tmp/carve_jax_cache") -> None:
  """Persistent XLA cache: repeated configurations (seeds) compile once per process tree."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def env_info() -> dict:
  """Device, library versions, git commit, time and the exact command line."""
  import flax

  def _git(*args):
    try:
      return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  dev = jax.devices()[0]
  return {
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}",
      "device_count": jax.device_count(),
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "host": platform.node(),
      "git_commit": _git("rev-parse", "--short", "HEAD"),
      "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?"]
                          + sys.argv[1:]),
  }


def pick_impl(requested: str = "auto", tiny: bool = False) -> str:
  """The ops implementation to train with. "auto": on a GPU, checks once that the Pallas path runs
  a forward + backward and matches the chunk form, else falls back to "chunk" (printed); on a CPU,
  "recurrent" for --tiny runs (compiles fastest at tiny sizes), else "chunk"."""
  if requested != "auto":
    return requested
  from carve_jax import ops
  if ops.resolve_impl("auto") != "pallas":
    return "recurrent" if tiny else "chunk"
  try:
    key = jax.random.split(jax.random.key(0), 6)
    B, T, H, K = 1, 128, 2, 64
    q = jax.random.normal(key[0], (B, T, H, K)) / 8
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(key[1], (B, T, H, K))
    g = -jax.nn.softplus(jax.random.normal(key[2], (B, T, H, K))) * 0.1
    el = jax.random.normal(key[3], (B, T, H, K))
    beta = jax.nn.sigmoid(jax.random.normal(key[4], (B, T, H)))
    gamma = jnp.ones((H,))

    def f(q):
      return ops.carve(q, k, v, g, el, beta, gamma, content_block=64, impl="pallas", chunk_size=64)[0].sum()

    val, grad = jax.value_and_grad(f)(q)
    ref = ops.carve(q, k, v, g, el, beta, gamma, content_block=64, impl="chunk", chunk_size=64)[0].sum()
    if not (bool(jnp.isfinite(grad).all()) and abs(float(val) - float(ref)) <= 1e-2 * (1 + abs(float(ref)))):
      raise RuntimeError(f"pallas forward {float(val)} vs chunk {float(ref)}")
    return "pallas"
  except Exception as e:  # noqa: BLE001  (any failure of the kernel path -> the pure-JAX path)
    print(f"[experiments] Pallas path failed its smoke test, using impl='chunk': {type(e).__name__}: {e}",
          flush=True)
    return "chunk"


# -- tokens ---------------------------------------------------------------------------------------


def load_stream(tokens_dir: str | None, split: str) -> tuple[np.ndarray, str]:
  """A byte-level token stream and where it came from.

  tokens_dir: a folder written by `python -m carve_jax.data export --tokenizer byte` (read with
  numpy, sha256 checked against its export.json: no grain needed), or None for the committed
  fixture corpus (tiny runs; needs `carve_jax.data`).
  """
  if tokens_dir:
    path = Path(tokens_dir)
    meta = json.loads((path / "export.json").read_text())
    if meta["tokenizer"] != "byte":
      raise ValueError(f"load_stream: argument `tokens_dir` must hold a byte export, got {meta['tokenizer']!r}")
    with np.load(path / f"{split}.npz") as z:
      stream = z["tokens"]
    if hashlib.sha256(np.ascontiguousarray(stream).tobytes()).hexdigest() != meta["splits"][split]["sha256"]:
      raise ValueError(f"load_stream: {path}/{split}.npz does not match the sha256 in export.json")
    return stream, f"export {path.name} ({meta['corpus_size']} corpus, sha256 {meta['corpus_sha256'][:12]})"
  from carve_jax.data import load_tokens, prepare_corpus
  corpus = prepare_corpus("fixture")
  return np.asarray(load_tokens(corpus, "byte", split)), "fixture corpus (committed excerpt)"


def window_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
  """batch_fn(step) of random windows (uniform, with replacement; numpy PCG64 seeded by (seed, step)):
  {"inputs": int32 [B, T], "targets": int32 [B, T]} with targets the next tokens."""
  n = len(stream) - seq_len - 1
  if n <= 0:
    raise ValueError(f"window_batches: stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")

  def batch_fn(step: int) -> dict:
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n, batch_size)
    w = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  return batch_fn


def fixed_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int) -> list[dict]:
  """The first n_batches * batch_size consecutive non-overlapping windows (validation)."""
  need = n_batches * batch_size * seq_len + 1
  if len(stream) < need:
    raise ValueError(f"fixed_batches: need {need} tokens, the stream holds {len(stream)}")
  out = []
  for b in range(n_batches):
    rows = [stream[(b * batch_size + i) * seq_len:(b * batch_size + i + 1) * seq_len + 1] for i in range(batch_size)]
    w = np.stack(rows).astype(np.int32)
    out.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
  return out


# -- training -------------------------------------------------------------------------------------


def masked_loss(model, batch: dict, rng=None) -> jax.Array:
  """Mean cross-entropy over positions with mask 1 (all positions without a "mask")."""
  del rng
  logits = model(batch["inputs"]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  if "mask" not in batch:
    return ce.mean()
  m = batch["mask"].astype(jnp.float32)
  return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


@dataclasses.dataclass
class TrainResult:
  """What `train_model` returns. history: [{"step", "loss"[, "val_loss"]}]; params: final nnx.State.
  compile_s: seconds XLA took to compile the step (0 when this process had it already), compile_wait_s:
  seconds this call waited for it, gpu_wait_s: seconds waited for `gpu_turn`."""
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
  gpu_wait_s: float = 0.0
  final: object = None

  def model(self) -> LM:
    return nnx.merge(self.graphdef, self.params, self.rest)


def compiled_memory(compiled) -> int | None:
  """Device bytes an XLA executable needs (arguments + outputs + temporaries - aliased)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return None


# -- compile once per process, train one process at a time ---------------------------------------
#
# Compilation, not training, ate the earlier GPU calls. So: a model's training step is lowered and
# compiled once per process (seeds reuse the executable: the step takes the whole state as input);
# `precompile` starts compiles in background threads (XLA releases the GIL while it compiles), so the
# next models compile while this one trains; and when several experiment processes share one GPU
# (CARVE_GPU_LOCK=<file>), each timed training loop holds an exclusive file lock, so tokens/s are
# measured with the GPU to itself while the other processes compile on the CPU.

_COMPILED: dict = {}  # step key -> (step_fn, Future of (compiled executable, compile seconds))
_CLAIMED: set = set()  # keys whose compile time a TrainResult already reports
_POOL = None


def _pool():
  global _POOL
  if _POOL is None:
    import concurrent.futures
    _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=int(os.environ.get("CARVE_COMPILE_THREADS", "6")))
  return _POOL


def _step_key(cfg, batch, steps, lr, warmup, weight_decay):
  shapes = tuple(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()))
  return (cfg, shapes, steps, lr, warmup, weight_decay)


def _setup(cfg, *, steps, seed, lr, warmup, weight_decay):
  from carve_jax.train import distributed as dist
  from carve_jax.train.config import OptimConfig
  from carve_jax.train.optim import make_optimizer
  from carve_jax.train.step import init_state

  mesh = dist.make_mesh()
  model = LM(cfg, rngs=nnx.Rngs(seed))
  counts = param_count(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = make_optimizer(OptimConfig(lr=lr, warmup_steps=warmup, weight_decay=weight_decay), steps)
  state = dist.replicate(mesh, init_state(params, optimizer, seed))
  return mesh, graphdef, rest, optimizer, state, counts


def _timed_compile(lowered, label: str = ""):
  t = time.time()
  compiled = lowered.compile()
  if label:
    print(f"  [compiled {label} in {time.time() - t:.1f}s]", flush=True)
  return compiled, time.time() - t


def precompile(cfg: ModelConfig, example_batch: dict, *, steps: int, lr: float = 3e-3, warmup: int | None = None,
               weight_decay: float = 0.1, background: bool = True):
  """Lowers the training step of `LM(cfg)` for batches shaped like `example_batch` (in this thread)
  and compiles it (in a background thread when `background`). `train_model` with the same
  (cfg, batch shapes, steps, lr, warmup, weight_decay) then reuses the executable."""
  from carve_jax.train import distributed as dist
  from carve_jax.train.step import make_train_step

  warmup = max(1, steps // 10) if warmup is None else warmup
  key = _step_key(cfg, example_batch, steps, lr, warmup, weight_decay)
  if key in _COMPILED:
    return _COMPILED[key]
  mesh, graphdef, rest, optimizer, state, _ = _setup(cfg, steps=steps, seed=0, lr=lr, warmup=warmup,
                                                     weight_decay=weight_decay)
  step_fn = make_train_step(graphdef, rest, optimizer, mesh, loss_fn=masked_loss)
  t = time.time()
  lowered = step_fn.lower(state, dist.global_batch(mesh, example_batch))
  del state
  label = f"{cfg.mixer} G={cfg.content_block} d={cfg.d_model}x{cfg.n_layers}"
  print(f"  [lowered {label} in {time.time() - t:.1f}s]", flush=True)
  if background:
    fut = _pool().submit(_timed_compile, lowered, label)
  else:
    import concurrent.futures
    fut = concurrent.futures.Future()
    fut.set_result(_timed_compile(lowered, label))
  _COMPILED[key] = (step_fn, fut)
  return _COMPILED[key]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _wait_marker() -> str | None:
  path = os.environ.get("CARVE_GPU_LOCK")
  return f"{path}.wait.{int(os.environ.get('CARVE_GPU_PRIORITY', '0'))}.{os.getpid()}" if path else None


def announce_gpu_turn() -> None:
  """Marks this process as about to ask for `gpu_turn` (its step is compiled; it is only setting up),
  so that lower priorities do not take the GPU in that gap. `gpu_turn` clears the mark."""
  marker = _wait_marker()
  if marker:
    Path(marker).touch()


@contextlib.contextmanager
def gpu_turn():
  """Exclusive use of the GPU among the processes that share CARVE_GPU_LOCK (a file path); yields
  the seconds waited. A process with a higher CARVE_GPU_PRIORITY (int, default 0) that is waiting
  (or has called `announce_gpu_turn`) goes first. Without CARVE_GPU_LOCK: no lock, waits 0 s."""
  path = os.environ.get("CARVE_GPU_LOCK")
  if not path:
    yield 0.0
    return
  import fcntl
  import glob

  prio = int(os.environ.get("CARVE_GPU_PRIORITY", "0"))
  marker = _wait_marker()
  Path(marker).touch()
  t0 = time.time()
  f = open(path, "a")
  try:
    while True:
      fcntl.flock(f, fcntl.LOCK_EX)
      higher = []
      for m in glob.glob(path + ".wait.*"):
        _, p, pid = m.rsplit(".", 2)
        if int(p) > prio and _pid_alive(int(pid)):
          higher.append(m)
      if not higher:
        break
      fcntl.flock(f, fcntl.LOCK_UN)
      time.sleep(0.05)
    os.remove(marker)
    yield time.time() - t0
  finally:
    if os.path.exists(marker):
      os.remove(marker)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def train_model(cfg: ModelConfig, batch_fn: Callable[[int], dict], *, steps: int, seed: int, lr: float = 3e-3,
                warmup: int | None = None, weight_decay: float = 0.1, eval_fn: Callable | None = None,
                eval_every: int = 0, log_every: int = 10, verbose: bool = True,
                final_fn: Callable | None = None, warm_fn: Callable | None = None) -> TrainResult:
  """Trains `LM(cfg)` from seed `seed` for `steps` AdamW steps on `batch_fn(step)`.

  eval_fn(model) -> float is called every `eval_every` steps and at the end (its time is not
  counted as training time). final_fn(model) -> anything is called once on the trained model, its
  result kept in `TrainResult.final`. Both run inside `gpu_turn()`, with the timed steps; before
  it, the step is compiled (or taken from `precompile`) and warm_fn(model) (default: eval_fn) runs
  once on the initial model so that the evaluation functions compile outside the turn too.
  Throughput counts the steps after the first.
  """
  from carve_jax.train import distributed as dist

  warmup = max(1, steps // 10) if warmup is None else warmup
  first = batch_fn(0)
  t0 = time.time()
  step_fn, fut = precompile(cfg, first, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay,
                            background=False)
  compiled, compile_s = fut.result()
  compile_wait_s = time.time() - t0
  key = _step_key(cfg, first, steps, lr, warmup, weight_decay)
  if key in _CLAIMED:
    compile_s = 0.0
  _CLAIMED.add(key)
  announce_gpu_turn()  # compiled: from here on a lower priority should not start a run ahead of this one
  mesh, graphdef, rest, optimizer, state, counts = _setup(cfg, steps=steps, seed=seed, lr=lr, warmup=warmup,
                                                          weight_decay=weight_decay)
  mem = compiled_memory(compiled)
  tokens_per_step = int(np.prod(first["inputs"].shape))
  warm = warm_fn if warm_fn is not None else eval_fn
  if warm is not None:
    warm(nnx.merge(graphdef, state.params, rest))
  history, pending = [], []
  train_s = 0.0

  def evaluate(step):
    nonlocal t_mark
    jax.block_until_ready(state.params)
    val = float(eval_fn(nnx.merge(graphdef, state.params, rest)))
    history.append({"step": step, "val_loss": val})
    if verbose:
      print(f"  step {step:5d}  val {val:.4f}", flush=True)
    t_mark = time.time()

  final = None
  with gpu_turn() as waited:
    t_mark = time.time()
    for i in range(steps):
      batch = first if i == 0 else batch_fn(i)
      state, metrics = compiled(state, dist.global_batch(mesh, batch))
      if i == 0:
        jax.block_until_ready(state.step)
        t_mark = time.time()
      pending.append((i + 1, metrics["loss"]))
      if (i + 1) % log_every == 0 or i + 1 == steps:
        for s, loss in pending:
          history.append({"step": s, "loss": float(loss)})
        pending.clear()
        if i > 0:
          train_s += time.time() - t_mark
        t_mark = time.time()
      if eval_fn is not None and eval_every and (i + 1) % eval_every == 0 and i + 1 != steps:
        if i > 0:
          jax.block_until_ready(state.step)
          train_s += time.time() - t_mark
        evaluate(i + 1)
    jax.block_until_ready(state.step)
    if eval_fn is not None:
      evaluate(steps)
    if final_fn is not None:
      final = final_fn(nnx.merge(graphdef, state.params, rest))
  timed = steps - 1
  return TrainResult(cfg=cfg, params=state.params, graphdef=graphdef, rest=rest, history=history,
                     params_count=counts, tokens_per_step=tokens_per_step, steps=steps, train_s=train_s,
                     compile_s=compile_s, compile_wait_s=compile_wait_s, gpu_wait_s=waited, final=final,
                     tokens_per_s=tokens_per_step * timed / train_s if train_s > 0 and timed > 0 else float("nan"),
                     step_memory_bytes=mem, peak_memory_bytes=dist.peak_memory_bytes())


def train_task_models(task: str, mixers: list[str], config: Callable[[str], ModelConfig],
                      batch_fn: Callable[[int], dict], *, steps: int, seed: int, lr: float,
                      accuracy: Callable, on_run: Callable[[list[dict]], object], digits: int = 3) -> list[dict]:
  """Train one model per mixer on a synthetic task (every step compiles in the background first) and
  return one record each: params, final accuracy dict, throughput, timings, loss curve. on_run(runs)
  is called after each model (partial results survive a time limit)."""
  for mixer in mixers:
    precompile(config(mixer), batch_fn(0), steps=steps, lr=lr)
  runs = []
  for mixer in mixers:
    print(f"[{task}] {mixer}", flush=True)
    r = train_model(config(mixer), batch_fn, steps=steps, seed=seed, lr=lr, log_every=20, final_fn=accuracy,
                    warm_fn=accuracy)
    print("  " + "  ".join(f"{k}={v:.{digits}f}" for k, v in r.final.items()), flush=True)
    runs.append({"mixer": mixer, "params": r.params_count, "accuracy": r.final, "tokens_per_s": r.tokens_per_s,
                 "compile_s": r.compile_s, "compile_wait_s": r.compile_wait_s, "gpu_wait_s": r.gpu_wait_s,
                 "train_s": r.train_s, "final_train_loss": r.history[-1]["loss"],
                 "train_curve": [(h["step"], h["loss"]) for h in r.history if "loss" in h]})
    on_run(runs)
  return runs


def make_loss_eval(batches: list[dict]) -> Callable:
  """eval_fn(model) -> mean masked loss over fixed batches (one jitted forward per shape)."""
  fwd = nnx.jit(lambda m, b: masked_loss(m, b))
  return lambda model: float(np.mean([float(fwd(model, b)) for b in batches]))


@nnx.jit
def _argmax_logits(model, inputs):
  return jnp.argmax(model(inputs), axis=-1)


def masked_accuracy(model, batches: list[dict], *, per_row: bool = False) -> float:
  """Fraction of masked positions whose argmax equals the target (teacher forcing).

  per_row=True: fraction of rows whose masked positions are ALL right (exact match of an answer)."""
  right = total = 0
  for b in batches:
    pred = np.asarray(_argmax_logits(model, jnp.asarray(b["inputs"])))
    m = np.asarray(b["mask"]) > 0
    ok = (pred == np.asarray(b["targets"])) | ~m
    if per_row:
      right += int(ok.all(axis=1).sum())
      total += ok.shape[0]
    else:
      right += int((ok & m).sum())
      total += int(m.sum())
  return right / max(total, 1)


# -- fits and output ------------------------------------------------------------------------------


def fit_power_law(x, y) -> dict:
  """Least-squares fit of log y = a + p log x: {"exponent": p, "prefactor": e^a, "r2": R^2,
  "exponent_stderr": standard error of p}. Needs >= 3 positive points."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
    raise ValueError(f"fit_power_law: arguments `x`, `y` must be 1-D of equal length >= 3, got {x.shape}, {y.shape}")
  if not (np.all(x > 0) and np.all(y > 0)):
    raise ValueError("fit_power_law: arguments `x`, `y` must be positive (log-log fit)")
  lx, ly = np.log(x), np.log(y)
  A = np.stack([np.ones_like(lx), lx], axis=1)
  (a, p), *_ = np.linalg.lstsq(A, ly, rcond=None)
  resid = ly - A @ np.array([a, p])
  ss_tot = float(((ly - ly.mean()) ** 2).sum())
  r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
  dof = len(x) - 2
  se = math.sqrt(float((resid ** 2).sum()) / dof / float(((lx - lx.mean()) ** 2).sum())) if dof > 0 else float("nan")
  return {"exponent": float(p), "prefactor": float(math.exp(a)), "r2": r2, "exponent_stderr": se}


def mean_std(xs) -> tuple[float, float]:
  xs = np.asarray(list(xs), np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def fmt_bytes(n) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024


def md_table(header: list[str], rows: list[list]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def add_common_args(p) -> None:
  p.add_argument("--tiny", action="store_true", help="CPU-sized run (< 60 s), for tests and CI")
  p.add_argument("--out_dir", default=str(RESULTS), help="where <name>.{json,md,png} go")
  p.add_argument("--impl", default="auto", choices=("auto", "chunk", "pallas", "recurrent"))
  p.add_argument("--tag", default="", help="suffix of the result file names (e.g. '_cpu')")


def write_results(name: str, out_dir: str, payload: dict, markdown: str, fig=None) -> dict[str, str]:
  """Writes <out_dir>/<name>.json (payload + env), .md (title, env, command, markdown), .png (fig)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  env = payload.setdefault("env", env_info())
  paths = {"json": str(out / f"{name}.json"), "md": str(out / f"{name}.md")}
  (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
  head = (f"# {name}\n\nDevice `{env['device']}`; jax {env['jax']}, flax {env['flax']}, optax {env['optax']}; "
          f"commit {env['git_commit']}; {env['utc']}.\n\nCommand: `{env['command']}`\n\n")
  (out / f"{name}.md").write_text(head + markdown.rstrip() + "\n")
  if fig is not None:
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    paths["png"] = str(out / f"{name}.png")
  return paths


def _jsonable(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
