"""Process setup of an experiment run: the persistent XLA cache and a stack dump on SIGTERM; and one row of a
benchmark in a process of its own (`run_worker`), and the `main` of a benchmark made of such rows (`rows_main`).

Nothing happens on import; an experiment's `main` calls `setup()`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def setup(cache_dir: str = "/tmp/carve_jax_cache") -> None:
  """Persistent XLA cache (repeated configurations, e.g. seeds, compile once per process tree), and
  a run stopped by `timeout` (SIGTERM) prints where every thread was, so the log says what ran long."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)


RESULT = "RESULT "  # the line a worker prints its result on (`print_result`), read back by `run_worker`


def print_result(result: dict) -> None:
  """A worker's last act: its result as one JSON line for `run_worker`."""
  print(RESULT + json.dumps(result, default=str), flush=True)


def run_worker(module: str, spec: dict, timeout_s: float, env: dict | None = None) -> dict:
  """`python -m <module> --worker <spec as JSON>` in a fresh process (its own device memory, compile caches and
  peak-memory counter): the dict it printed last with `print_result`, else `spec` with an "error" (the exit
  code and the end of stderr, or the time-out). XLA_FLAGS and the like come through `env` (added to this
  process's environment)."""
  full = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
              PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
  full.update(env or {})
  t = time.time()
  try:
    p = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout_s, env=full)
  except subprocess.TimeoutExpired:
    return dict(spec, error=f"stopped after {time.time() - t:.0f} s (time limit {timeout_s:.0f} s)")
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
  return json.loads(lines[-1][len(RESULT):]) if lines else dict(spec, error=f"rc {p.returncode}: {p.stderr[-1500:]}")


def rows_main(flags_cls, argv, *, module: str, doc: str, worker, run, markdown, tiny=None, need_all: bool = False) -> int:
  """`main` of a benchmark whose rows each run in a process of their own (`run_worker`). Flags: `flags_cls` (with
  worker, tiny, out_dir, tag). `--worker SPEC` runs one row in this process (`worker(spec)`, printed with
  `print_result`); else `tiny(args)` adjusts the flags where `--tiny`, `run(args)` gives the rows, and they are
  written to <out_dir>/<module's name><tag>.{json,md} with `markdown(rows)` and printed. Exit 0 if any row has no
  error (`need_all`: every row, and there is one)."""
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  from experiments.report import write_results  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(flags_cls, train_flags.normalise_argv(argv), prog=f"python -m {module}", description=doc)
  if args.worker:
    print_result(worker(json.loads(args.worker)))
    return 0
  if args.tiny and tiny is not None:
    tiny(args)
  results = run(args)
  md = markdown(results)
  write_results(module.rsplit(".", 1)[-1] + args.tag, args.out_dir, {"args": vars(args), "rows": results}, md)
  print(md)
  ok = [not r.get("error") for r in results]
  return 0 if (ok and all(ok) if need_all else any(ok)) else 1
