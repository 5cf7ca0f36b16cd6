r"""RMS normalisation, plain and with a sigmoid output gate (flash-linear-attention's
`RMSNorm` and `FusedRMSNormGated(activation="sigmoid")`), both computed in float32:

    rmsnorm(x)          = x / sqrt(mean(x^2) + eps) * weight
    gated_rmsnorm(x, z) = rmsnorm(x) * sigmoid(z)
    l2norm(x)           = x / sqrt(sum(x^2) + 1e-6)        (q, k of the delta mixers)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

L2_EPS = 1e-6


def l2norm(x: jax.Array) -> jax.Array:
  """Normalises the last axis to unit length in float32; returns x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + L2_EPS)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (width `dim`, weight init 1); output in `dtype`."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def normalize(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * self.weight[...]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> [..., dim] in `dtype`."""
    return self.normalize(x).astype(self.dtype)


class GatedRMSNorm(RMSNorm):
  """rmsnorm(x) * sigmoid(z), the output gate of the delta mixers (per head, width V)."""

  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    """x, z: [..., dim] -> [..., dim] in `dtype`."""
    return (self.normalize(x) * jax.nn.sigmoid(z.astype(jnp.float32))).astype(self.dtype)
