r"""Short causal depthwise convolution followed by SiLU (flash-linear-attention's
`ShortConvolution(activation="silu")`, no bias):

    y_t = silu( sum_{i<W} w_i * x_{t-W+1+i} )      (x_s = 0 for s < 0, or the cached tail)

W = `conv_size`. With packed documents (`positions`, each token's position inside its document)
tap i is dropped where it would reach into the previous document, x_{t-W+1+i} with
W-1-i > position_t. For decoding, the last W-1 inputs (the "tail", [B, W-1, D]) are carried in the
cache; the step and the parallel form sum the same products in the same order, so they agree
exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ShortConv(nnx.Module):
  """Depthwise causal conv of width `size` over channels `dim`; weight [size, dim] ~ N(0, std^2)."""

  def __init__(self, dim: int, size: int, *, std: float, dtype, rngs: nnx.Rngs):
    self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (size, dim), jnp.float32))
    self.size = size
    self.dtype = dtype

  def __call__(self, x: jax.Array, tail: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, D]; tail: the previous W-1 inputs [B, W-1, D] (zeros when None); positions:
    optional int [B, T], each token's position inside its document (no taps across a start).

    Returns (silu(conv(x)) [B, T, D] in `dtype`, new tail [B, W-1, D]: the last W-1 inputs).
    """
    B, T, D = x.shape
    x = x.astype(self.dtype)
    if tail is None:
      tail = jnp.zeros((B, self.size - 1, D), self.dtype)
    xp = jnp.concatenate([tail.astype(self.dtype), x], axis=1)  # [B, W-1+T, D]
    w = self.weight[...].astype(self.dtype)
    def tap(i):  # w_i x_{t-(W-1-i)}, dropped where that token lies before the document's start
      term = w[i] * xp[:, i:i + T]
      lag = self.size - 1 - i
      if positions is None or lag == 0:
        return term
      return jnp.where((positions >= lag)[..., None], term, jnp.zeros_like(term))

    y = tap(0)
    for i in range(1, self.size):
      y = y + tap(i)
    return jax.nn.silu(y), xp[:, T:]

  def empty_tail(self, batch_size: int) -> jax.Array:
    """The tail before any token: zeros [B, W-1, D]."""
    return jnp.zeros((batch_size, self.size - 1, self.weight.shape[1]), self.dtype)
