"""What one dependent product step costs in a Mosaic GPU kernel: the open question of `pallas_kernels/NOTES.md` v8.

    python -m experiments.mosaic_step_probe [--steps 512] [--programs 32] [--reps 10] [--out results.json]

Each program runs `steps` dependent steps on a [64, 64] float32 value x held in registers, the shape of one
step of CARVE's in-chunk inverse in `pallas_kernels.mosaic_state` (x <- x + (x @ x) / 100, the right
operand's halves stored to SMEM first). Every variant keeps the dependency through x; the time per step is
(median kernel time) / steps. Variants, each one stage of the step changed:
  split3      right operand stored as bf16 hi / lo halves, commit, three wgmmas (the kernel's step)
  split3_nocommit   the same without the SMEM fence / warpgroup barrier (wrong results: timing only)
  nostore3    no store (the wgmmas read whatever SMEM holds: timing only), commit, three wgmmas
  bf16_1      right operand stored in bf16 once, commit, one wgmma
  f32_tf32    both operands stored in float32 (a register left operand must be 16-bit), commit, one TF32
              wgmma (x @ x^T: TF32 needs K-major operands)
  regs_only   no SMEM and no wgmma: x <- x * x + 1e-3 elementwise (the loop's own cost)

Prints a row per variant (ms, us per step) and writes them with the device, versions, commit and command
to --out.

`--trace-loop DIR` instead runs CARVE's Mosaic GPU state loop (`pallas_kernels.mosaic_state`) once at
B=2 T=768 H=16 (12 chunks: the profiler's buffer is in SMEM) with the on-device profiler, writes the
Chrome trace to DIR and prints, per region ("state/c", "solve/inverse", ...), its mean duration per chunk
and how often it ran (`summarize_trace`).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments.report import env_info
from pallas_kernels.mosaic_state import _mm, _mms3, _split_store, _transforms

VARIANTS = ("split3", "split3_nocommit", "nostore3", "bf16_1", "f32_tf32", "regs_only")
N = 64


def step_kernel(variant: str, steps: int, programs: int):
  """A jitted () -> [programs, N, N] float32 function running `steps` steps of `variant` per program."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  bf, f32 = jnp.bfloat16, jnp.float32
  WG = plgpu.Layout.WGMMA
  tb, tf = _transforms(bf, N), _transforms(f32, N)
  scratch = [plgpu.SMEM((N, N), bf, transforms=tb), plgpu.SMEM((N, N), bf, transforms=tb),
             plgpu.SMEM((N, N), f32, transforms=tf), plgpu.SMEM((N, N), f32, transforms=tf), plgpu.SMEM((N, N), f32)]

  def body(x0_ref, out_ref, bh_s, bl_s, af32_s, bf32_s, st_s):
    p = jax.lax.axis_index("p")
    x = plgpu.load(x0_ref.at[p], layout=WG, optimized=False) * 1e-2

    def one(_, x):
      if variant == "regs_only":
        return x * x + 1e-3
      if variant == "split3":
        _split_store(x, (bh_s, bl_s))
        return _mms3([x], (bh_s, bl_s), (N, N))[0] * 1e-2 + x
      if variant == "split3_nocommit":
        _split_store(x, (bh_s, bl_s), commit=False)
        return _mms3([x], (bh_s, bl_s), (N, N))[0] * 1e-2 + x
      if variant == "nostore3":
        plgpu.commit_smem()
        return _mms3([x], (bh_s, bl_s), (N, N))[0] * 1e-2 + x
      if variant == "bf16_1":
        bh_s[...] = x.astype(bf)
        plgpu.commit_smem()
        return _mm(x.astype(bf), bh_s, (N, N)) * 1e-2 + x
      af32_s[...] = x  # f32_tf32
      bf32_s[...] = x
      plgpu.commit_smem()
      return _mm(af32_s, bf32_s.transpose((1, 0)), (N, N)) * 1e-2 + x
    x = jax.lax.fori_loop(0, steps, one, x)
    st_s[...] = x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(st_s, out_ref.at[p])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((programs, N, N), f32), scratch_types=scratch,
                        grid=(programs,), grid_names=("p",))
  x0 = jax.random.normal(jax.random.PRNGKey(0), (programs, N, N), f32)
  return jax.jit(lambda: kernel(x0))


def summarize_trace(trace: dict) -> dict[str, dict]:
  """Per region name of a Mosaic GPU profiler trace (Chrome format: "B" / "E" events per tid): the number of
  ranges, their mean and median duration in us (the trace's ts are in us)."""
  open_ = collections.defaultdict(list)
  durations = collections.defaultdict(list)
  for e in trace["traceEvents"]:
    key = (e["pid"], e["tid"], e["name"])
    if e["ph"] == "B":
      open_[key].append(e["ts"])
    elif e["ph"] == "E":
      if not open_[key]:
        raise ValueError(f"summarize_trace: an end without a begin for {e['name']!r} (tid {e['tid']})")
      durations[e["name"]].append(e["ts"] - open_[key].pop())
  return {name: dict(count=len(d), mean_us=statistics.fmean(d), median_us=statistics.median(d))
          for name, d in sorted(durations.items())}


def trace_loop(trace_dir: str) -> dict[str, dict]:
  """CARVE's Mosaic GPU state loop at B=2 T=768 H=16 under the profiler: the trace's `summarize_trace`."""
  from experiments.bench_kernel import inputs  # noqa: PLC0415
  from pallas_kernels import forward as fw  # noqa: PLC0415
  from pallas_kernels.config import DEFAULT  # noqa: PLC0415
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic  # noqa: PLC0415
  x = inputs(2, 768)
  q, k, v, g, logits, beta, gamma = (x[n] for n in ("q", "k", "v", "g", "logits", "beta", "gamma"))
  S0 = jnp.zeros((2, q.shape[2], q.shape[-1], v.shape[-1]), jnp.float32)
  pre = jax.jit(lambda: fw.prep(q, k, g, None, None, None, C=64, cfg=DEFAULT, dt=fw.Dtypes(q, False),
                                interpret=False))()
  os.makedirs(trace_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(trace_dir, "*-trace.json")))
  run = jax.jit(lambda: carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, C=64, cb=64, interpret=False,
                                                profile_dir=trace_dir))
  jax.block_until_ready(run())
  jax.effects_barrier()  # the trace leaves through a host callback
  new = sorted(set(glob.glob(os.path.join(trace_dir, "*-trace.json"))) - before)
  if not new:
    raise RuntimeError(f"trace_loop: the profiler wrote no trace into {trace_dir}")
  with open(new[-1]) as fh:
    return summarize_trace(json.load(fh))


@dataclasses.dataclass
class StepProbeFlags:
  """Flags of the Mosaic GPU step probe (hyphens or underscores).

  Attributes:
    steps: dependent steps per program.
    programs: programs (CARVE's state loop runs batch x heads of them: 32 at B2 H16).
    reps: timed repetitions (median).
    variants: comma list of the variants to time.
    trace_loop: a folder: trace CARVE's Mosaic GPU state loop there instead (the regions' times).
    out: a JSON file for the table.
  """
  steps: int = 512
  programs: int = 32
  reps: int = 10
  variants: str = ",".join(VARIANTS)
  trace_loop: str | None = None
  out: str | None = None


def main(argv=None):
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(StepProbeFlags, train_flags.normalise_argv(argv),
                         prog="python -m experiments.mosaic_step_probe", description=__doc__)
  if args.trace_loop:
    regions = trace_loop(args.trace_loop)
    for name, r in regions.items():
      print(f"{name:20s} x{r['count']:5d}  mean {r['mean_us']:8.3f} us  median {r['median_us']:8.3f} us", flush=True)
    if args.out:
      with open(args.out, "w") as fh:
        json.dump(dict(env_info(), shape="B2 T768 H16 K=V=128 C64", regions=regions), fh, indent=1)
    return
  rows = {}
  for variant in [v for v in args.variants.split(",") if v]:
    try:
      f = step_kernel(variant, args.steps, args.programs)
      jax.block_until_ready(f())
      times = []
      for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
      ms = sorted(times)[len(times) // 2] * 1e3
      rows[variant] = dict(ms=ms, us_per_step=ms * 1e3 / args.steps)
    except Exception as e:  # noqa: BLE001 - record, go on
      rows[variant] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"{variant:16s} {rows[variant]}", flush=True)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(env_info(), steps=args.steps, programs=args.programs, rows=rows), fh, indent=1)


if __name__ == "__main__":
  main()
