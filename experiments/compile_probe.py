"""Where a training run's first step goes: model init, trace, lowering, XLA compile, and which kernels
compile slowly (issue 12's first-step target: <= 20 s for the 50m preset).

Each row runs in a process of its own, with no persistent compile cache, and reports:
  * init s (and the backend compiles it triggered: count, seconds): building the `LM` and the optimizer
    state, by `--init` mode: "device" (eager, op by op on the default device), "host" (eager on the CPU
    backend, then placed), "jit" (one jitted function on the device);
  * trace s, lower s, compile s of the jitted train step (`jax.monitoring`'s jaxpr-trace, jaxpr-to-MLIR and
    backend-compile durations), and the first step's run;
  * op rows: the mixer op alone, forward + backward jitted at the model's head shapes (B, T, H, K), its
    lower and compile seconds: the kernels' share of the step's compile.
`--state_kernel` sets `TuningConfig.carve_state_kernel` (auto: the Mosaic loop where it runs; triton);
`--xla_flags` is appended to XLA_FLAGS in the row's process.

    python -m experiments.compile_probe --tiny                     # CPU: a tiny model, seconds
    python -m experiments.compile_probe --rows step:carve,step:gdn2,op:carve,op:gdn2  # GPU
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from pathlib import Path

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}


class Durations:
  """Sums of jax.monitoring's compile-phase durations (and counts) since the last `take()`."""

  def __init__(self):
    import jax  # noqa: PLC0415
    self.sums, self.counts = collections.Counter(), collections.Counter()

    def listen(event, duration, **_):
      if event in EVENTS:
        self.sums[EVENTS[event]] += duration
        self.counts[EVENTS[event]] += 1
    jax.monitoring.register_event_duration_secs_listener(listen)

  def take(self) -> dict:
    out = {f"{k}_s": self.sums[k] for k in EVENTS.values()} | {f"{k}_n": self.counts[k] for k in EVENTS.values()}
    self.sums.clear()
    self.counts.clear()
    return out


def _config(spec: dict):
  from experiments.bench_train import model_config  # noqa: PLC0415
  from carve_jax import ops  # noqa: PLC0415
  impl = ops.resolve_impl("auto") if spec["tiny"] else "auto"
  mcfg = model_config("50m", spec["mixer"], spec["seq_len"], tiny=spec["tiny"], impl=impl,
                      n_layers=spec.get("n_layers"))
  return mcfg


def _set_state_kernel(name: str):
  import dataclasses as dc  # noqa: PLC0415
  from pallas_kernels import chunk, config  # noqa: PLC0415
  chunk.DEFAULT = dc.replace(config.DEFAULT, carve_state_kernel=name)


def step_row(spec: dict) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from carve_jax.model import LM  # noqa: PLC0415
  from carve_jax.train import distributed as dist  # noqa: PLC0415
  from carve_jax.train.config import OptimConfig  # noqa: PLC0415
  from carve_jax.train.optim import make_optimizer  # noqa: PLC0415
  from carve_jax.train.step import FlatTrainStep, init_state  # noqa: PLC0415

  dur = Durations()
  mcfg = _config(spec)
  mesh = dist.make_mesh()
  opt = make_optimizer(OptimConfig(), 10)
  out = {}
  t0 = time.perf_counter()
  if spec["init"] == "jit":
    def build():
      _, params, rest = nnx.split(LM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
      return params, rest, init_state(params, opt, 0)
    graphdef = nnx.split(nnx.eval_shape(lambda: LM(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
    _, rest, state = jax.jit(build)()
  else:
    dev = jax.devices("cpu")[0] if spec["init"] == "host" else jax.devices()[0]
    with jax.default_device(dev):
      graphdef, params, rest = nnx.split(LM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
      state = init_state(params, opt, 0)
  state, rest = dist.replicate(mesh, state), dist.replicate(mesh, rest)
  jax.block_until_ready(state)
  out["init_s"] = time.perf_counter() - t0
  out |= {f"init_{k}": v for k, v in dur.take().items()}
  step = FlatTrainStep(graphdef, rest, opt, mesh, state)
  leaves = step.flatten(state)
  toks = np.random.default_rng(0).integers(0, mcfg.vocab_size, (spec["batch"], spec["seq_len"] + 1)).astype(np.int32)
  batch = dist.global_batch(mesh, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})
  dur.take()  # (placing the batch)
  t1 = time.perf_counter()
  lowered = step.jitted.lower(leaves, batch)
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  _, m = compiled(leaves, batch)
  jax.block_until_ready(m)
  out |= dict(trace_lower_wall_s=t2 - t1, compile_wall_s=t3 - t2, run_s=time.perf_counter() - t3,
              first_step_s=time.perf_counter() - t0)
  out |= {f"step_{k}": v for k, v in dur.take().items()}
  return out


def op_row(spec: dict) -> dict:
  """The mixer op alone (the model's head shapes, bf16), forward + backward under one jit."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from carve_jax.ops import sample_inputs  # noqa: PLC0415

  dur = Durations()
  mcfg = _config(spec)
  B, T, H, K = spec["batch"], spec["seq_len"], mcfg.n_heads, mcfg.head_k
  inputs = sample_inputs.family_inputs(jax.random.key(0), spec["mixer"], B=B, T=T, H=H, K=K, V=K, dtype=jnp.bfloat16)
  inputs = {n: x.astype(jnp.float32) if n in ("g", "gamma") else x for n, x in inputs.items()}
  names = sorted(inputs)

  def loss(*xs):
    o, _ = sample_inputs.run_family(spec["mixer"], impl=mcfg.impl, chunk_size=mcfg.chunk_size,
                                    content_block=mcfg.content_block, **dict(zip(names, xs)))
    return jnp.sum(o.astype(jnp.float32) ** 2)
  args = [inputs[n] for n in names]
  f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  jax.block_until_ready(args)
  dur.take()  # (the inputs' eager ops)
  t1 = time.perf_counter()
  lowered = f.lower(*args)
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return dict(trace_lower_wall_s=t2 - t1, compile_wall_s=t3 - t2, run_s=time.perf_counter() - t3,
              **{f"step_{k}": v for k, v in dur.take().items()})


def worker(spec: dict) -> dict:
  if spec.get("state_kernel"):
    _set_state_kernel(spec["state_kernel"])
  t = time.perf_counter()
  res = step_row(spec) if spec["kind"] == "step" else op_row(spec)
  return dict(spec, **res, row_s=time.perf_counter() - t)


def run(args) -> list[dict]:
  from experiments.runtime import run_worker  # noqa: PLC0415
  results = []
  for term in [r for r in args.rows.split(",") if r]:
    parts = (term.split(":") + ["", "", "", "", ""])[:5]
    kind, mixer = parts[0], parts[1]
    if kind not in ("step", "op"):
      raise SystemExit(f"compile_probe: a --rows term is KIND:MIXER[:INIT[:STATE_KERNEL[:XLA_FLAGS]]], KIND step or "
                       f"op, got {term!r}")
    flags = " ".join(f for f in (args.xla_flags, parts[4].replace("+", " ")) if f)
    spec = dict(kind=kind, mixer=mixer, init=parts[2] or args.init, state_kernel=parts[3] or args.state_kernel,
                seq_len=args.seq_len, batch=args.batch, tiny=args.tiny, n_layers=args.n_layers, xla_flags=flags)
    res = run_worker("experiments.compile_probe", spec, args.row_timeout_s,
                     env=dict(XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip()))
    results.append(res)
    print(f"[compile_probe] {_line(res)}", flush=True)
  return results


def _line(r: dict) -> str:
  name = f"{r['kind']}:{r['mixer']}:{r['init']}:{r['state_kernel'] or 'auto'}" + (f" [{r['xla_flags']}]" if r["xla_flags"] else "")
  if r.get("error"):
    return f"{name}: {r['error'][-600:]}"
  init = f"init {r['init_s']:.1f} s ({r['init_compile_n']} compiles, {r['init_compile_s']:.1f} s), " if "init_s" in r else ""
  return (f"{name}: {init}trace {r['step_trace_s']:.1f} + lower {r['step_lower_s']:.1f} (wall {r['trace_lower_wall_s']:.1f}), "
          f"compile {r['step_compile_s']:.1f} (wall {r['compile_wall_s']:.1f}), run {r['run_s']:.2f}"
          + (f", first step {r['first_step_s']:.1f} s" if "first_step_s" in r else ""))


def markdown(results: list[dict]) -> str:
  from experiments.report import md_table  # noqa: PLC0415
  head = ["row", "mixer", "init", "state kernel", "XLA_FLAGS", "init s", "init compiles (n, s)", "trace s", "lower s",
          "compile s", "run s", "first step s"]
  rows = []
  for r in results:
    if r.get("error"):
      rows.append([r["kind"], r["mixer"], r["init"], r["state_kernel"] or "auto", r["xla_flags"], "", "", "", "", "",
                   "", " ".join(r["error"].split())[-80:].replace("|", "/")])
      continue
    rows.append([r["kind"], r["mixer"], r["init"] if r["kind"] == "step" else "", r["state_kernel"] or "auto",
                 r["xla_flags"], f"{r['init_s']:.2f}" if "init_s" in r else "",
                 f"{r['init_compile_n']}, {r['init_compile_s']:.2f}" if "init_s" in r else "",
                 f"{r['step_trace_s']:.2f}", f"{r['step_lower_s']:.2f}", f"{r['step_compile_s']:.2f}",
                 f"{r['run_s']:.2f}", f"{r['first_step_s']:.2f}" if "first_step_s" in r else ""])
  return md_table(head, rows) + "\n"


@dataclasses.dataclass
class CompileProbeFlags:
  """Flags of the first-step probe.

  Attributes:
    worker: internal: one row's JSON spec, run in this process.
    tiny: CPU-sized rows (a 2-layer tiny model, T 32).
    rows: comma list of KIND:MIXER[:INIT[:STATE_KERNEL[:XLA_FLAGS]]] terms; KIND "step" (the train step) or "op"
      (the mixer op alone, fwd+bwd); XLA_FLAGS joined by "+" (e.g. --xla_gpu_autotune_level=0).
    init: default init mode of step rows: device, host or jit.
    state_kernel: default TuningConfig.carve_state_kernel ("" keeps the default, auto).
    seq_len: T of every row.
    batch: B of every row.
    n_layers: depth (None: the preset's).
    xla_flags: appended to XLA_FLAGS in every row's process.
    row_timeout_s: a row's time limit.
    out_dir: where compile_probe<tag>.{json,md} go.
    tag: suffix of the result file names.
  """
  worker: str | None = None
  tiny: bool = False
  rows: str = "step:carve,step:gdn2,op:carve,op:gdn2"
  init: str = "device"
  state_kernel: str = ""
  seq_len: int = 2048
  batch: int = 1
  n_layers: int | None = None
  xla_flags: str = ""
  row_timeout_s: float = 240
  out_dir: str = str(Path(__file__).resolve().parent / "results" / "compile_probe")
  tag: str = ""


def _tiny(args) -> None:
  args.seq_len, args.tag = 32, args.tag or "_tiny"


def main(argv=None) -> int:
  from experiments.runtime import rows_main  # noqa: PLC0415
  return rows_main(CompileProbeFlags, argv, module="experiments.compile_probe", doc=__doc__, worker=worker, run=run,
                   markdown=markdown, tiny=_tiny)


if __name__ == "__main__":
  sys.exit(main())
