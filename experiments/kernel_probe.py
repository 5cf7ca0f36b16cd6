"""Where the time of the Pallas kernels goes: each kernel alone, and with one stage removed.

    python -m experiments.kernel_probe [--B 8 --T 2048] [--reps 10] [--once] [--out results.json]

Times every kernel of `bench_kernel.kernel_steps` alone (median ms), then again with one stage of
the in-chunk math replaced by a cheap stand-in, so differences place the time without hardware
counters (METHOD.md: "time variants that leave one stage out"):
  noinv      the unit-lower inverse (I + L)^{-1} replaced by I - L (no matmuls)
  diagdecay  the exact decay reduced to its diagonal part (one masked matmul per pairwise matrix
             instead of 1 + log2(C/16))
  nosig      CARVE's content signal (a row reduction of the state) replaced by ones
  bfinv      the inverse and the products with A in bf16 instead of TF32
`--carve-configs "carve_num_warps=4;carve_num_warps=16"` also times CARVE's state pass under each of
these TuningConfig overrides.
The stand-ins compute a different function; they are for timing only. `--once` runs each kernel
exactly once and exits (for `ncu --kernel-name regex:...`, which then profiles one launch each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from experiments.bench_kernel import inputs, kernel_steps, timeit  # noqa: E402

from pallas_kernels import forward as fw_mod, intra  # noqa: E402


@contextlib.contextmanager
def patched(variant: str):
  """Swap one stage of the in-chunk math for a stand-in while kernels are traced."""
  saved = (fw_mod.block_unit_lower_inv, intra.Decay.parts, fw_mod.content_signal, fw_mod.Dtypes.__init__)
  if variant == "noinv":
    eye = lambda L: jnp.where(intra.iota(*L.shape, 0) == intra.iota(*L.shape, 1), 1.0, 0.0).astype(L.dtype)
    fw_mod.block_unit_lower_inv = lambda L, dt, group=intra.DECAY_GROUP: eye(L) - L
  elif variant == "nosig":
    fw_mod.content_signal = lambda S: jnp.ones((S.shape[0],), S.dtype)
  elif variant == "bfinv":
    init = fw_mod.Dtypes.__init__

    def bf_init(self, x, interpret):
      init(self, x, interpret)
      self.inv = self.dot
    fw_mod.Dtypes.__init__ = bf_init
  elif variant == "diagdecay":
    full = intra.Decay.parts
    intra.Decay.parts = lambda self: iter([next(full(self))])
  try:
    yield
  finally:
    fw_mod.block_unit_lower_inv, intra.Decay.parts, fw_mod.content_signal, fw_mod.Dtypes.__init__ = saved


@dataclasses.dataclass
class ProbeFlags:
  """Flags of the kernel probe (hyphens or underscores).

  Attributes:
    B: batch.
    T: sequence length.
    reps: timed repetitions per kernel (median).
    variants: comma list of stand-ins (base, noinv, diagdecay, nosig, bfinv).
    carve_configs: ';'-separated TuningConfig overrides (k=v,k=v) for CARVE's state pass.
    once: run each kernel once (for ncu) and exit.
    out: a JSON file for the timings.
  """
  B: int = 8
  T: int = 2048
  reps: int = 10
  variants: str = "base,noinv,diagdecay"
  carve_configs: str = ""
  once: bool = False
  out: str | None = None


def main(argv=None):
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(ProbeFlags, train_flags.normalise_argv(argv), prog="python -m experiments.kernel_probe",
                         description=__doc__)
  x = inputs(args.B, args.T)
  if args.once:
    for name, f in kernel_steps(x).items():
      jax.tree.map(lambda a: a.block_until_ready(), jax.jit(f)())
      print("ran", name, flush=True)
    return
  rows = {}
  for variant in args.variants.split(","):
    with patched(variant):
      for name, f in kernel_steps(x).items():
        if variant != "base" and not name.startswith(("fwd prep", "fwd state (CARVE")):
          continue
        try:
          rows[f"{name} [{variant}]"] = timeit(jax.jit(f), reps=args.reps)
        except Exception as e:  # noqa: BLE001 - record, go on
          rows[f"{name} [{variant}]"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"probe B={args.B} T={args.T} {name} [{variant}]: {rows[f'{name} [{variant}]']}", flush=True)
  from pallas_kernels.config import TuningConfig  # noqa: PLC0415
  for spec in [c for c in args.carve_configs.split(";") if c]:
    cfg = TuningConfig(**{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
    name = f"fwd state (CARVE, gate in loop) [{spec}]"
    try:
      rows[name] = timeit(jax.jit(kernel_steps(x, cfg)["fwd state (CARVE, gate in loop)"]), reps=args.reps)
    except Exception as e:  # noqa: BLE001 - record, go on
      rows[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"probe B={args.B} T={args.T} {name}: {rows[name]}", flush=True)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(B=args.B, T=args.T, device=jax.devices()[0].device_kind, ms=rows), fh, indent=1)


if __name__ == "__main__":
  main()
