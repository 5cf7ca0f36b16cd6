"""Bad input to the public ops raises ValueError naming the argument, the expectation and the value."""

import jax.numpy as jnp
import pytest

from carve_jax import ops

B, T, H, K, V = 1, 10, 2, 4, 3


def _gd():
  f = jnp.ones
  return dict(q=f((B, T, H, K)), k=f((B, T, H, K)), v=f((B, T, H, V)), g=-f((B, T, H, K)),
              b=f((B, T, H, K)), w=f((B, T, H, V)))


def _cv():
  f = jnp.ones
  return dict(q=f((B, T, H, K)), k=f((B, T, H, K)), v=f((B, T, H, V)), g=-f((B, T, H, K)),
              erase_logits=f((B, T, H, K)), beta=f((B, T, H)), gamma=jnp.zeros((H,)))


@pytest.mark.parametrize("change,kwargs,match", [
    ({"q": jnp.ones((T, H, K))}, {}, r"`q` must be rank 4"),
    ({"k": jnp.ones((B, T, H, K + 1))}, {}, r"`k` must be shape \(1, 10, 2, 4\), got shape \(1, 10, 2, 5\)"),
    ({"v": jnp.ones((B, T + 1, H, V))}, {}, r"`v` must be shape"),
    ({"g": jnp.ones((B, T, H, 1))}, {}, r"`g` must be shape"),
    ({"b": jnp.ones((B, T, H, K), jnp.int32)}, {}, r"`b` must be a floating-point array, got dtype int32"),
    ({"w": jnp.ones((B, T, H, K))}, {}, r"`w` must be shape \(1, 10, 2, 3\)"),
    ({}, {"initial_state": jnp.ones((B, H, V, K))}, r"`initial_state` must be shape \(1, 2, 4, 3\)"),
    ({}, {"chunk_size": 0}, r"`chunk_size` must be a positive int, got 0"),
    ({}, {"impl": "cuda"}, r"`impl` must be one of"),
    ({}, {"scale": -1.0}, r"`scale` must be None or a positive float"),
])
def test_gated_delta_rejects(change, kwargs, match):
  with pytest.raises(ValueError, match="gated_delta: argument " + match):
    ops.gated_delta(**{**_gd(), **change}, **kwargs)


@pytest.mark.parametrize("change,kwargs,match", [
    ({"beta": jnp.ones((B, T, H, 1))}, {}, r"`beta` must be rank 3"),
    ({"gamma": jnp.zeros((H + 1,))}, {}, r"`gamma` must be shape \(2,\)"),
    ({"erase_logits": jnp.ones((B, T, H, V))}, {}, r"`erase_logits` must be shape"),
    ({}, {"content_block": 64, "chunk_size": 48}, r"`chunk_size` must be a divisor of content_block=64, got 48"),
    ({}, {"content_grad": "none"}, r"`content_grad` must be one of \('stop', 'full'\)"),
    ({}, {"content_block": 2.5}, r"`content_block` must be a positive int"),
])
def test_carve_rejects(change, kwargs, match):
  with pytest.raises(ValueError, match="carve: argument " + match):
    ops.carve(**{**_cv(), **change}, **kwargs)
