"""Random inputs for every model of the family, as used by the tests, the proofs and the benchmarks.

`family_inputs` draws realistic inputs: L2-normalised keys, log decays g <= 0 of moderate strength,
gates in (0, 1), a nonzero CARVE gamma (so the content path is exercised). `run_family` calls the
public op for a family with those inputs, so every caller compares the same function.

Families are the rows of `carve_jax.ops.variants` ("gdn": scalar decay, b = w = beta; "kda":
per-channel decay, b = w = beta; "gdn2": b in (0,1)^K, w in (0,1)^V; "carve": content-aware erase,
w = beta). All but the content-aware ones are passed to `gated_delta` in its general form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from carve_jax.ops.api import carve, gated_delta
from carve_jax.ops.variants import VARIANT_NAMES, variant

FAMILIES = VARIANT_NAMES


def family_inputs(key, family: str, *, B: int, T: int, H: int, K: int, V: int, dtype=jnp.float32,
                  initial_state: bool = False, decay_scale: float = 1.0) -> dict:
  """Keyword arguments for `run_family(family, **inputs)`. Shapes as in `carve_jax.ops.api`."""
  row = variant(family, "family_inputs", "family")
  ks = jax.random.split(key, 10)
  n = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = n(1, (B, T, H, K))
  out = dict(q=n(0, (B, T, H, K)), k=k / jnp.linalg.norm(k, axis=-1, keepdims=True), v=n(2, (B, T, H, V)))
  g_shape = (B, T, H, 1) if row.decay == "scalar" else (B, T, H, K)
  g = decay_scale * jax.nn.log_sigmoid(n(3, g_shape) + 2.0)
  out["g"] = jnp.broadcast_to(g, (B, T, H, K))
  beta = jax.nn.sigmoid(n(4, (B, T, H)))
  if row.content_aware:
    out["erase_logits"] = n(5, (B, T, H, K))
    out["beta"] = beta
    out["gamma"] = 1.5 * jax.random.normal(ks[7], (H,), jnp.float32)
  else:
    gate = lambda kind, i, shape: jnp.broadcast_to(beta[..., None], shape) if kind == "beta" else jax.nn.sigmoid(
        n(i, shape))
    out["b"] = gate(row.erase, 5, (B, T, H, K))
    out["w"] = gate(row.write, 6, (B, T, H, V))
  if initial_state:
    out["initial_state"] = 0.5 * jax.random.normal(ks[8], (B, H, K, V), jnp.float32)
  return {name: x.astype(dtype) for name, x in out.items()}


def run_family(family: str, *, impl: str, chunk_size: int | None = None, content_block: int = 64,
               content_grad: str = "stop", output_final_state: bool = True, kernel_bwd: str = "kernels", **inputs):
  """(o, final_state) of `family` on `inputs` with the given implementation."""
  if variant(family, "run_family", "family").content_aware:
    return carve(**inputs, impl=impl, chunk_size=chunk_size, content_block=content_block,
                 content_grad=content_grad, output_final_state=output_final_state, kernel_bwd=kernel_bwd)
  return gated_delta(**inputs, impl=impl, chunk_size=chunk_size or 64, output_final_state=output_final_state,
                     kernel_bwd=kernel_bwd)
