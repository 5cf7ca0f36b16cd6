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
  unrollinv  the same inverse with its loops unrolled (Python loops: no loop-carried tiles, more code)
  treeinv    the same inverse as a product tree: depth 8 instead of 10 with the same 10 products
`--carve-configs "carve_num_warps=4;carve_num_warps=16"` also times CARVE's state pass under each of
these TuningConfig overrides. `--carve-only` times CARVE's state pass alone (base and the variants on it,
then the configs, each also checked against the default config's outputs: max |difference| of h, V_new,
c, A and the final state relative to their largest entry), skipping every other kernel.
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

from pallas_kernels import forward as fw_mod, intra, mosaic_state  # noqa: E402


def unrolled_block_inv(L, dt, group=intra.DECAY_GROUP):
  """`intra.block_unit_lower_inv` with Python loops (the same products, unrolled)."""
  n = L.shape[0]
  same = intra.iota(n, n, 0) // group == intra.iota(n, n, 1) // group
  eye = jnp.where(intra.iota(n, n, 0) == intra.iota(n, n, 1), 1.0, 0.0).astype(L.dtype)
  P = -jnp.where(same, L, 0.0)
  D = eye + P
  for _ in range(group.bit_length() - 2):
    P = intra.mm(P, P, dt)
    D = D + intra.mm(D, P, dt)
  Q = -intra.mm(D, jnp.where(same, 0.0, L), dt)
  term, A = D, D
  for _ in range(n // group - 1):
    term = intra.mm(Q, term, dt)
    A = A + term
  return A


def tree_block_inv(L, dt, group=intra.DECAY_GROUP):
  """(I + L)^{-1} for C = 4 x 16 by product trees (C = 64 only): D = [(I + N)(I + N^2)][(I + N^4)(I + N^8)]
  (N^2, N^4, N^8 and the pair products side by side: depth 5), then (I + Q)(I + Q^2) D with Q = -D L_o
  (depth 3 more). Ten products, as `intra.block_unit_lower_inv`, in 8 dependent steps instead of 10."""
  n = L.shape[0]
  assert n == 4 * group, n
  mm = lambda a, b: intra.mm(a, b, dt)
  same = intra.iota(n, n, 0) // group == intra.iota(n, n, 1) // group
  eye = jnp.where(intra.iota(n, n, 0) == intra.iota(n, n, 1), 1.0, 0.0).astype(L.dtype)
  N1 = -jnp.where(same, L, 0.0)
  N2 = mm(N1, N1)
  N4 = mm(N2, N2)
  F12 = eye + N1 + N2 + mm(N1, N2)
  N8 = mm(N4, N4)
  D = mm(F12, eye + N4 + N8 + mm(N4, N8))
  Q = -mm(D, jnp.where(same, 0.0, L))
  Q2 = mm(Q, Q)
  QD = D + mm(Q, D)
  return QD + mm(Q2, QD)


@contextlib.contextmanager
def patched(variant: str):
  """Swap one stage of the in-chunk math for a stand-in while kernels are traced ("a+b": both)."""
  if "+" in variant:
    with contextlib.ExitStack() as stack:
      for v in variant.split("+"):
        stack.enter_context(patched(v))
      yield
    return
  saved = (fw_mod.block_unit_lower_inv, intra.Decay.parts, fw_mod.content_signal, fw_mod.Dtypes.__init__,
           mosaic_state.inverse, mosaic_state._mms3, mosaic_state._split_store, mosaic_state.plgpu.commit_smem)
  if variant == "noinv":  # in the Triton and the Mosaic GPU kernels
    eye = lambda L: jnp.where(intra.iota(*L.shape, 0) == intra.iota(*L.shape, 1), 1.0, 0.0).astype(L.dtype)
    fw_mod.block_unit_lower_inv = lambda L, dt, group=intra.DECAY_GROUP: eye(L) - L
    mosaic_state.inverse = lambda L, prod, masks, group: masks.eye() - L
  elif variant == "mosaic_1pass":  # Mosaic GPU kernel: each split product as one 16-bit wgmma (hi x hi)
    mosaic_state._mms3 = lambda lefts, b, shape: mosaic_state._mms(
        [a[0] if isinstance(a, tuple) else a.astype(b[0].dtype) for a in lefts], b[0], shape)
  elif variant == "mosaic_nosplitstore":  # Mosaic GPU kernel: no register -> SMEM stores of the split operands
    commit = mosaic_state.plgpu.commit_smem
    mosaic_state._split_store = lambda x, *pairs, **kw: commit() if kw.get("commit", True) else None
  elif variant == "mosaic_nocommit":  # Mosaic GPU kernel: no SMEM fences / warpgroup barriers (commit_smem)
    mosaic_state.plgpu.commit_smem = lambda: None
  elif variant == "nosig":
    fw_mod.content_signal = lambda S: jnp.ones((S.shape[0],), S.dtype)
  elif variant == "bfinv":
    init = fw_mod.Dtypes.__init__

    def bf_init(self, x, interpret):
      init(self, x, interpret)
      self.inv = self.dot
    fw_mod.Dtypes.__init__ = bf_init
  elif variant == "unrollinv":
    fw_mod.block_unit_lower_inv = unrolled_block_inv
  elif variant == "treeinv":
    fw_mod.block_unit_lower_inv = tree_block_inv
  elif variant == "diagdecay":
    full = intra.Decay.parts
    intra.Decay.parts = lambda self: iter([next(full(self))])
  try:
    yield
  finally:
    (fw_mod.block_unit_lower_inv, intra.Decay.parts, fw_mod.content_signal, fw_mod.Dtypes.__init__,
     mosaic_state.inverse, mosaic_state._mms3, mosaic_state._split_store, mosaic_state.plgpu.commit_smem) = saved


@dataclasses.dataclass
class ProbeFlags:
  """Flags of the kernel probe (hyphens or underscores).

  Attributes:
    B: batch.
    T: sequence length.
    reps: timed repetitions per kernel (median).
    variants: comma list of stand-ins (base, noinv, diagdecay, nosig, bfinv).
    carve_configs: ';'-separated TuningConfig overrides (k=v,k=v) for CARVE's state pass.
    config_variants: with --carve-only, the stand-ins each config is also timed under (comma list; noinv: the
      Mosaic GPU kernel's inverse too).
    once: run each kernel once (for ncu) and exit.
    carve_only: time CARVE's state pass only (variants and configs), with an agreement check per config.
    out: a JSON file for the timings.
  """
  B: int = 8
  T: int = 2048
  reps: int = 10
  variants: str = "base,noinv,diagdecay"
  carve_configs: str = ""
  config_variants: str = ""
  once: bool = False
  carve_only: bool = False
  out: str | None = None


def parse_config(spec: str):
  """A TuningConfig from 'k=v,k=v' (ints, true/false, or strings)."""
  from pallas_kernels.config import TuningConfig  # noqa: PLC0415
  val = lambda v: int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v.lower(), v)
  return TuningConfig(**{k: val(v) for k, v in (kv.split("=") for kv in spec.split(","))})


def carve_only(x, args):
  """CARVE's state pass alone: base, the variants, the configs (each checked against the default)."""
  from pallas_kernels.config import DEFAULT  # noqa: PLC0415
  B, T = x["q"].shape[:2]
  q, k, v, g, logits, beta, gamma = (x[n] for n in ("q", "k", "v", "g", "logits", "beta", "gamma"))
  S0 = jnp.zeros((B, 16, q.shape[-1], v.shape[-1]), jnp.float32)
  dt = fw_mod.Dtypes(q, jax.default_backend() != "gpu")
  kw = dict(C=64, dt=dt, interpret=jax.default_backend() != "gpu")
  pre = jax.jit(lambda: fw_mod.prep(q, k, g, None, None, None, cfg=DEFAULT, **kw))()
  step = lambda cfg: jax.jit(lambda: fw_mod.carve_state_pass(logits, beta, v, pre, gamma, S0, cb=64, cfg=cfg, **kw))
  if args.once:  # one launch (for ncu)
    jax.tree.map(lambda a: a.block_until_ready(), step(DEFAULT)())
    print("ran CARVE state once", flush=True)
    return
  ref = [r for r in step(DEFAULT)() if r is not None]
  scale = [float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1e-30 for r in ref]
  rows = {}

  def record(name, f, check):
    try:
      rows[name] = {"ms": timeit(f, reps=args.reps)}
      if check:
        out = [a for a in f() if a is not None]
        rows[name]["max_rel_diff"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) / s
                                         for a, b, s in zip(out, ref, scale))
    except Exception as e:  # noqa: BLE001 - record, go on
      rows[name] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"probe B={B} T={T} CARVE state {name}: {rows[name]}", flush=True)
    if args.out:  # after every row: a call cut by its time limit keeps what it measured
      with open(args.out, "w") as fh:
        json.dump(dict(B=B, T=T, device=jax.devices()[0].device_kind, carve_state=rows), fh, indent=1)
  for variant in [v for v in args.variants.split(",") if v]:
    with patched(variant):
      record(f"[{variant}]", step(DEFAULT), check=False)
  for spec in [c for c in args.carve_configs.split(";") if c]:
    record(f"[{spec}]", step(parse_config(spec)), check=True)
    for variant in [v for v in args.config_variants.split(",") if v]:
      with patched(variant):
        record(f"[{spec}] [{variant}]", step(parse_config(spec)), check=False)


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
  if args.carve_only:
    return carve_only(x, args)
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
  for spec in [c for c in args.carve_configs.split(";") if c]:
    cfg = parse_config(spec)
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
