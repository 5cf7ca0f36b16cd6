"""Where a training step's device time goes, per kernel: a `jax.profiler` trace of the jitted train step
(`bench_train`'s rows: size, mixer, T, batch = tokens_per_step / T, remat policy), summed per GPU kernel name.

Each row runs in a process of its own: build the step, compile, warm up, trace `--steps` steps, then read
the trace's GPU kernel events (perfetto JSON) and report per kernel name its launches and milliseconds per
step, and per class (`CLASSES`: the recurrence's Pallas kernels, matmuls, the rest). Two rows side by side
(CARVE and GDN-2 at one shape) say which kernels make their difference.

    python -m experiments.step_profile --tiny                                    # CPU: a tiny model (no GPU
                                                                                 # kernels: host ops only)
    python -m experiments.step_profile --rows 350m:8192:carve:save_dots_and_mixer,350m:8192:gdn2:save_dots_and_mixer
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# kernel-name patterns (lower case, first match wins) -> class
CLASSES = (("gated_delta_", "recurrence"), ("carve_", "recurrence"), ("gemm", "matmul"), ("cublas", "matmul"),
           ("xmma", "matmul"), ("cutlass", "matmul"), ("nvjet", "matmul"), ("sm90_", "matmul"), ("cudnn", "attention"),
           ("flash", "attention"), ("fmha", "attention"))


def kernel_class(name: str) -> str:
  low = name.lower()
  return next((c for pat, c in CLASSES if pat in low), "other")


def gpu_kernels(trace: dict) -> tuple[dict[str, list[float]], dict[str, float]]:
  """(name -> durations (us) of the kernels, thread name -> total ms) of a perfetto JSON trace: complete events
  on the GPU processes (process names from "M" metadata events hold "/device:GPU"), on their "Stream" threads
  where they have any (the derived "XLA Ops" / "XLA Modules" lines would count every kernel twice)."""
  meta = [e for e in trace.get("traceEvents", []) if e.get("ph") == "M"]
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in meta if e.get("name") == "process_name"}
  gpu = {pid for pid, n in procs.items() if "/device:GPU" in n}
  threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in meta if e.get("name") == "thread_name"}
  events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
  per_thread = collections.Counter()
  for e in events:
    per_thread[f"{procs[e['pid']]} {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"] += float(e["dur"]) / 1e3
  streams = {k for k, n in threads.items() if k[0] in gpu and n.lower().startswith("stream")}
  out = collections.defaultdict(list)
  for e in events:
    if not streams or (e["pid"], e.get("tid")) in streams:
      out[e["name"]].append(float(e["dur"]))
  return out, dict(per_thread)


def summarize(kernels: dict[str, list[float]], steps: int, top: int = 25) -> dict:
  """Per kernel (the `top` by time) and per class: launches and ms per step."""
  rows = sorted(((n, len(d) / steps, sum(d) / 1e3 / steps) for n, d in kernels.items()), key=lambda r: -r[2])
  classes = collections.Counter()
  for n, _, ms in rows:
    classes[kernel_class(n)] += ms
  return dict(total_ms=sum(r[2] for r in rows), classes=dict(classes),
              kernels=[dict(name=n, launches=c, ms=ms, cls=kernel_class(n)) for n, c, ms in rows[:top]])


def worker(spec: dict) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from carve_jax import ops  # noqa: PLC0415
  from carve_jax.model import LM  # noqa: PLC0415
  from carve_jax.train import distributed as dist  # noqa: PLC0415
  from carve_jax.train.config import OptimConfig  # noqa: PLC0415
  from carve_jax.train.optim import make_optimizer  # noqa: PLC0415
  from carve_jax.train.step import FlatTrainStep, init_state  # noqa: PLC0415
  from experiments.bench_train import model_config  # noqa: PLC0415

  impl = ops.resolve_impl("auto") if spec["tiny"] else "auto"
  T, B = spec["seq_len"], spec["batch"]
  mcfg = model_config(spec["size"], spec["mixer"], T, tiny=spec["tiny"], impl=impl, remat_policy=spec["remat_policy"])
  mesh = dist.make_mesh()
  opt = make_optimizer(OptimConfig(), 10)
  graphdef, params, rest = nnx.split(LM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  state = dist.replicate(mesh, init_state(params, opt, 0))
  step = FlatTrainStep(graphdef, rest, opt, mesh, state)
  leaves = step.flatten(state)
  toks = np.random.default_rng(0).integers(0, mcfg.vocab_size, (B, T + 1)).astype(np.int32)
  batch = dist.global_batch(mesh, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})
  for _ in range(2):  # compile and warm up
    leaves, m = step(leaves, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(spec["steps"]):
    leaves, m = step(leaves, batch)
  jax.block_until_ready(m)
  wall_ms = (time.perf_counter() - t) * 1e3 / spec["steps"]
  trace_dir = tempfile.mkdtemp(prefix="step_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(spec["steps"]):
      leaves, m = step(leaves, batch)
    jax.block_until_ready(m)
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    return dict(spec, wall_ms=wall_ms, error=f"no perfetto trace under {trace_dir}")
  with gzip.open(files[0], "rt") as fh:
    trace = json.load(fh)
  kernels, per_thread = gpu_kernels(trace)
  return dict(spec, wall_ms=wall_ms, threads_ms=per_thread, **summarize(kernels, spec["steps"], spec["top"]))


def run(args) -> list[dict]:
  from experiments.runtime import run_worker  # noqa: PLC0415
  results = []
  for term in [r for r in args.rows.split(",") if r]:
    parts = (term.split(":") + ["", "", "", ""])[:4]
    if not (parts[0] and parts[1] and parts[2]):
      raise SystemExit(f"step_profile: a --rows term is SIZE:T:MIXER[:REMAT], got {term!r}")
    T = int(parts[1])
    spec = dict(size=parts[0], seq_len=T, mixer=parts[2], remat_policy=parts[3] or "none",
                batch=max(1, args.tokens_per_step // T), steps=args.steps, top=args.top, tiny=args.tiny)
    res = run_worker("experiments.step_profile", spec, args.row_timeout_s)
    results.append(res)
    print(f"[step_profile] {term}: " + (res["error"][-400:] if res.get("error") else
                                        f"wall {res['wall_ms']:.1f} ms/step, kernels {res['total_ms']:.1f} ms "
                                        f"{ {k: round(v, 1) for k, v in res['classes'].items()} }"), flush=True)
  return results


def markdown(results: list[dict]) -> str:
  from experiments.report import md_table  # noqa: PLC0415
  ok = [r for r in results if not r.get("error")]
  out = md_table(["row", "wall ms/step", "GPU kernels ms/step", "recurrence", "matmul", "attention", "other"],
                 [[f"{r['size']} {r['mixer']} {r['batch']}x{r['seq_len']} {r['remat_policy']}", f"{r['wall_ms']:.1f}",
                   f"{r['total_ms']:.1f}", *(f"{r['classes'].get(c, 0.0):.1f}" for c in
                                             ("recurrence", "matmul", "attention", "other"))] for r in ok])
  for r in ok:
    out += (f"\n\n{r['size']} {r['mixer']} {r['batch']}x{r['seq_len']} {r['remat_policy']}: the top kernels\n\n"
            + md_table(["kernel", "class", "launches/step", "ms/step"],
                       [[k["name"][:90].replace("|", "/"), k["cls"], f"{k['launches']:.0f}", f"{k['ms']:.2f}"]
                        for k in r["kernels"]]))
  for r in results:
    if r.get("error"):
      out += f"\n\n{r['size']} {r['mixer']} T={r['seq_len']}: {' '.join(r['error'].split())[-300:]}"
  return out + "\n"


@dataclasses.dataclass
class StepProfileFlags:
  """Flags of the step profiler.

  Attributes:
    worker: internal: one row's JSON spec, run in this process.
    tiny: CPU-sized rows.
    rows: comma list of SIZE:T:MIXER[:REMAT] (sizes of `bench_train`).
    tokens_per_step: batch x T of every row.
    steps: traced steps (and timed steps before the trace).
    top: kernels listed per row.
    row_timeout_s: a row's time limit.
    out_dir: where step_profile<tag>.{json,md} go.
    tag: suffix of the result file names.
  """
  worker: str | None = None
  tiny: bool = False
  rows: str = "350m:8192:carve:save_dots_and_mixer,350m:8192:gdn2:save_dots_and_mixer"
  tokens_per_step: int = 32768
  steps: int = 3
  top: int = 25
  row_timeout_s: float = 240
  out_dir: str = str(Path(__file__).resolve().parent / "results" / "step_profile")
  tag: str = ""


def _tiny(args) -> None:
  args.rows, args.tokens_per_step, args.steps, args.tag = "50m:32:carve", 64, 2, args.tag or "_tiny"


def main(argv=None) -> int:
  from experiments.runtime import rows_main  # noqa: PLC0415
  return rows_main(StepProfileFlags, argv, module="experiments.step_profile", doc=__doc__, worker=worker, run=run,
                   markdown=markdown, tiny=_tiny)


if __name__ == "__main__":
  sys.exit(main())
