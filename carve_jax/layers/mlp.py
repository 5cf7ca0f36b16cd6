"""SwiGLU feed-forward (flash-linear-attention's `GatedMLP`, hidden_act="swish"):

    mlp(x) = W_down (silu(W_gate x) * (W_up x))
"""

from __future__ import annotations

import jax
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.layers.dense import dense


class SwiGLU(nnx.Module):
  """d_model -> cfg.mlp_dim -> d_model, no biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.gate_proj = dense(cfg.d_model, cfg.mlp_dim, cfg, rngs=rngs)
    self.up_proj = dense(cfg.d_model, cfg.mlp_dim, cfg, rngs=rngs)
    self.down_proj = dense(cfg.mlp_dim, cfg.d_model, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_model] -> [..., d_model]."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
