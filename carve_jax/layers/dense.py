"""Linear layers with float32 parameters and a configurable compute dtype (the one init rule).

Weights ~ N(0, init_std^2) and biases 0, as flash-linear-attention's `_init_weights` does for every
nn.Linear / nn.Conv1d / nn.Embedding of its models.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from carve_jax.configs import ModelConfig


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  """Activation / matmul dtype of a config ("float32" or "bfloat16")."""
  return jnp.dtype(cfg.compute_dtype)


def dense(d_in: int, d_out: int, cfg: ModelConfig, *, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
  """y = x W (+ b), W: [d_in, d_out] float32, computed in the config's compute dtype."""
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
