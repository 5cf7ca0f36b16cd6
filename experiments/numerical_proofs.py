"""Print and record the numerical proofs of the math core (the spec's "What counts as done").

    python -m experiments.numerical_proofs [--seed 0] [--out experiments/results/numerical_proofs/numerical_proofs]

For every model of the family: the WY chunk form against the token-by-token recurrence, forward and
gradients of all inputs, float64 and float32, over chunk sizes 16/32/64/128 with T not a multiple
of the chunk and a random initial state; chunk-size invariance; gamma = 0 against the GDN-2 path
(bitwise); the Kronecker rank of one chunk's state transition with key-axis versus value-axis
erase. Fresh random inputs for every seed. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from carve_jax import ops
from carve_jax.ops.sample_inputs import FAMILIES, family_inputs, run_family

SHAPE = dict(B=2, T=150, H=2, K=16, V=16)
GRAD_SHAPE = dict(B=1, T=45, H=2, K=8, V=8)


def rel(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                   / np.linalg.norm(np.asarray(y, np.float64))) for x, y in zip(la, lb))


def grads(family, impl, chunk, inputs, key):
  o, S = run_family(family, impl="recurrent", content_block=32, **inputs)
  co = jax.random.normal(key, o.shape, o.dtype)
  loss = lambda inp: jnp.sum(run_family(family, impl=impl, chunk_size=chunk, content_block=32, **inp)[0] * co)
  return jax.grad(loss)(inputs)


def equivalence_rows(key, dtype):
  rows = []
  for fam in FAMILIES:
    t0 = time.perf_counter()
    inp = family_inputs(key, fam, dtype=dtype, initial_state=True, **SHAPE)
    fwd = 0.0
    for C in (16, 32, 64, 128):
      G = 128 if C > 32 else 32
      ref = run_family(fam, impl="recurrent", content_block=G, **inp)
      fwd = max(fwd, rel(run_family(fam, impl="chunk", chunk_size=C, content_block=G, **inp), ref))
    ginp = family_inputs(key, fam, dtype=dtype, initial_state=True, **GRAD_SHAPE)
    gk = jax.random.fold_in(key, 1)
    grd = rel(grads(fam, "chunk", 16, ginp, gk), grads(fam, "recurrent", None, ginp, gk))
    rows.append(dict(check=f"chunk == recurrent: {fam}", dtype=jnp.dtype(dtype).name,
                     fwd_rel_err=fwd, grad_rel_err=grd, seconds=time.perf_counter() - t0))
  return rows


def invariance_rows(key):
  rows = []
  for fam in FAMILIES:
    inp = family_inputs(key, fam, dtype=jnp.float64, initial_state=True, **SHAPE)
    base = run_family(fam, impl="chunk", chunk_size=16, content_block=128, **inp)
    err = max(rel(run_family(fam, impl="chunk", chunk_size=C, content_block=128, **inp), base) for C in (32, 64, 128))
    rows.append(dict(check=f"chunk-size invariance (16..128): {fam}", dtype="float64", fwd_rel_err=err))
  return rows


def gamma_zero_row(key):
  inp = family_inputs(key, "carve", dtype=jnp.float32, initial_state=True, **SHAPE)
  inp["gamma"] = jnp.zeros_like(inp["gamma"])
  carve_fn = lambda d: ops.carve(**d, content_block=64, output_final_state=True)
  gdn2_fn = lambda d: ops.gated_delta(d["q"], d["k"], d["v"], d["g"], jax.nn.sigmoid(d["erase_logits"]),
                                      jnp.broadcast_to(d["beta"][..., None], d["v"].shape),
                                      initial_state=d["initial_state"], chunk_size=64, output_final_state=True)
  fwd = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(carve_fn(inp), gdn2_fn(inp)))
  loss = lambda f: (lambda d: jnp.sum(f(d)[0] ** 2))
  ga, gb = jax.grad(loss(carve_fn))(inp), jax.grad(loss(gdn2_fn))(inp)
  grd = max(float(jnp.max(jnp.abs(ga[n] - gb[n]))) for n in ga if n != "gamma")
  return dict(check="gamma = 0: max abs diff, CARVE vs the GDN-2 path", dtype="float32", fwd_abs_diff=fwd, grad_abs_diff=grd)


def kronecker_rows(key, C=16, K=4, V=3):
  ks = jax.random.split(key, 4)
  k = jax.random.normal(ks[0], (C, K), jnp.float64)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[1], (C, K), jnp.float64) + 2.0)
  rows = []
  for axis, gate in (("key", jax.nn.sigmoid(jax.random.normal(ks[2], (C, K), jnp.float64))),
                     ("value", jax.nn.sigmoid(jax.random.normal(ks[3], (C, V), jnp.float64)))):
    rank, s = ops.kronecker_rank(ops.chunk_transition(k, g, gate, V=V, axis=axis), K, V)
    rows.append(dict(check=f"Kronecker rank of one chunk's transition, {axis}-axis erase", dtype="float64",
                     rank=rank, sigma2_over_sigma1=float(s[1] / s[0])))
  return rows


def fmt(x):
  return f"{x:.2e}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class ProofFlags:
  """Flags of the numerical proofs.

  Attributes:
    seed: seed of the random inputs.
    out: results path without suffix (writes <out>.md and <out>.json).
  """
  seed: int = 0
  out: str = "experiments/results/numerical_proofs/numerical_proofs"


def main(argv=None):
  from carve_jax.train.flags import cli
  a = cli(ProofFlags, sys.argv[1:] if argv is None else list(argv), prog="python -m experiments.numerical_proofs",
          description=__doc__)
  key = jax.random.PRNGKey(a.seed)
  t0 = time.perf_counter()
  with jax.enable_x64(True):
    rows = equivalence_rows(key, jnp.float64) + invariance_rows(key) + kronecker_rows(key)
  rows += equivalence_rows(key, jnp.float32) + [gamma_zero_row(key)]
  cols = ["check", "dtype", "fwd_rel_err", "grad_rel_err", "fwd_abs_diff", "grad_abs_diff", "rank",
          "sigma2_over_sigma1"]
  cols = [c for c in cols if any(c in r for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  table = "\n".join(lines)
  print(table)
  meta = dict(command="python -m experiments.numerical_proofs " + " ".join(argv or sys.argv[1:]),
              seed=a.seed, shape=SHAPE, grad_shape=GRAD_SHAPE, jax=jax.__version__,
              device=str(jax.devices()[0]), platform=platform.platform(), seconds=time.perf_counter() - t0)
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  out.with_suffix(".md").write_text(
      f"# Numerical proofs of the math core\n\nCommand: `{meta['command']}`  \n"
      f"Device: {meta['device']} ({meta['platform']}), jax {meta['jax']}, seed {a.seed}, "
      f"{meta['seconds']:.0f} s.  \nForward shape {SHAPE} (chunk sizes 16/32/64/128, content_block 32 or 128, "
      f"random initial state); gradients of every input at {GRAD_SHAPE}, chunk 16.\n\n{table}\n")
  print(f"\nwrote {out.with_suffix('.md')} and .json ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
