"""CARVE's content signal and erase gate, shared by every implementation.

    c_n[i] = sqrt(mean_j S[i, j]^2 + 1e-6)        S: the state entering content block n
    b_t    = sigmoid(erase_logits_t + gamma_h * c_n)   for every token t of block n

With gamma = 0 the pre-activation is `erase_logits + 0`, so b_t equals GDN-2's sigmoid(erase_logits)
bit for bit (claim 5 of the spec).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONTENT_EPS = 1e-6


def content_signal(state: jax.Array) -> jax.Array:
  """Per-key-row RMS of the state. state: [..., K, V] -> [..., K]."""
  return jnp.sqrt(jnp.mean(jnp.square(state), axis=-1) + CONTENT_EPS)


def content_erase_gate(erase_logits: jax.Array, gamma: jax.Array, c: jax.Array, content_grad: str) -> jax.Array:
  """CARVE erase gate for one block of tokens, in head-major layout.

  erase_logits: [B, H, L, K]; gamma: [H]; c: [B, H, K] -> b: [B, H, L, K] in (0, 1).
  content_grad="stop" blocks the gradient through c into the state (gamma still gets one).
  """
  if content_grad == "stop":
    c = jax.lax.stop_gradient(c)
  return jax.nn.sigmoid(erase_logits + gamma[:, None, None] * c[:, :, None, :])
