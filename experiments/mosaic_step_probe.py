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
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments.report import env_info
from pallas_kernels.mosaic_state import _mm, _mm3, _split_store, _transforms

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
        return _mm3(x, (bh_s, bl_s), (N, N)) * 1e-2 + x
      if variant == "split3_nocommit":
        _split_store(x, (bh_s, bl_s), commit=False)
        return _mm3(x, (bh_s, bl_s), (N, N)) * 1e-2 + x
      if variant == "nostore3":
        plgpu.commit_smem()
        return _mm3(x, (bh_s, bl_s), (N, N)) * 1e-2 + x
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


@dataclasses.dataclass
class StepProbeFlags:
  """Flags of the Mosaic GPU step probe (hyphens or underscores).

  Attributes:
    steps: dependent steps per program.
    programs: programs (CARVE's state loop runs batch x heads of them: 32 at B2 H16).
    reps: timed repetitions (median).
    variants: comma list of the variants to time.
    out: a JSON file for the table.
  """
  steps: int = 512
  programs: int = 32
  reps: int = 10
  variants: str = ",".join(VARIANTS)
  out: str | None = None


def main(argv=None):
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(StepProbeFlags, train_flags.normalise_argv(argv), prog="python -m experiments.mosaic_step_probe",
                         description=__doc__)
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
