"""Bad input to the public ops raises ValueError naming the argument, the expectation and the value;
edge cases that are valid (T = 0, NumPy scalars, a chunk_size far above T) work."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax import ops
from carve_jax.ops.sample_inputs import family_inputs, run_family

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
    ({}, {"scale": -1.0}, r"`scale` must be None or a finite positive float"),
    ({}, {"scale": float("nan")}, r"`scale` must be None or a finite positive float, got nan"),
    ({}, {"scale": float("inf")}, r"`scale` must be None or a finite positive float, got inf"),
    ({}, {"scale": np.float32(np.inf)}, r"`scale` must be None or a finite positive float"),
    ({}, {"chunk_size": True}, r"`chunk_size` must be a positive int, got True"),
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


def test_numpy_scalars_are_accepted():
  """np.float32 as scale and np.int64 as chunk_size give exactly what the Python numbers give."""
  ref, _ = ops.gated_delta(**_gd(), scale=0.3, chunk_size=4)
  out, _ = ops.gated_delta(**_gd(), scale=np.float32(0.3), chunk_size=np.int64(4))
  ref32, _ = ops.gated_delta(**_gd(), scale=float(np.float32(0.3)), chunk_size=4)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
  o, _ = ops.carve(**_cv(), content_block=np.int64(8), chunk_size=np.int32(4))
  assert o.shape == (B, T, H, V)


@pytest.mark.parametrize("family", ["gdn2", "carve"])
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_zero_length_sequence(family, impl):
  """T = 0: an empty output and the initial state, for every implementation."""
  x = family_inputs(jax.random.key(0), family, B=2, T=0, H=2, K=4, V=3, initial_state=True)
  o, S = run_family(family, impl=impl, chunk_size=16, content_block=16, **x)
  assert o.shape == (2, 0, 2, 3) and o.dtype == x["q"].dtype
  np.testing.assert_array_equal(np.asarray(S), np.asarray(x["initial_state"]))


@pytest.mark.parametrize("family", ["gdn2", "carve"])
def test_chunk_size_far_above_T_is_clamped(family):
  """chunk_size 4096 at T = 20 runs as chunk_size 32 (bit for bit), matches the token scan, and does
  not pay for 4096-token chunks."""
  x = family_inputs(jax.random.key(1), family, B=1, T=20, H=2, K=8, V=8, initial_state=True)
  ref = run_family(family, impl="recurrent", content_block=4096, **x)
  small = run_family(family, impl="chunk", chunk_size=32, content_block=4096, **x)
  t0 = time.perf_counter()
  big = run_family(family, impl="chunk", chunk_size=4096, content_block=4096, **x)
  jax.block_until_ready(big)
  elapsed = time.perf_counter() - t0
  for a, b, r in zip(big, small, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
  assert elapsed < 10.0, elapsed  # unclamped: a 4096 x 4096 triangular solve per chunk


def test_variant_table_is_the_one_list_of_names():
  """The configs, the layer and the samplers read `ops.VARIANTS`; the option tuples come from the Literals."""
  import typing

  from carve_jax import configs
  from carve_jax.ops import sample_inputs, validate
  names = tuple(ops.VARIANTS)
  assert names == ("carve", "gdn2", "kda", "gdn")
  assert configs.DELTA_MIXERS == sample_inputs.FAMILIES == names and configs.MIXERS == (*names, "attention")
  hints = typing.get_type_hints(configs.ModelConfig)
  assert typing.get_args(hints["mixer"]) == configs.MIXERS and hints["impl"] is validate.Impl
  assert configs.IMPLS is validate.IMPLS and configs.CONTENT_GRADS is validate.CONTENT_GRADS
  assert [n for n, v in ops.VARIANTS.items() if v.content_aware] == ["carve"]
  assert ops.variant("kda").decay == "per_channel" and ops.variant("gdn").decay == "scalar"
  with pytest.raises(ValueError, match=r"family_inputs: argument `family` must be one of .*'gdn'\), got 'gla'"):
    family_inputs(jax.random.key(0), "gla", B=1, T=2, H=1, K=2, V=2)


@pytest.mark.parametrize("fields,match", [
    (dict(decay="vector", erase="beta", write="beta"), r"field `decay` must be one of \('scalar', 'per_channel'\)"),
    (dict(decay="scalar", erase="beta", write="gate"), r"field `write` must be 'beta' with erase='beta'"),
    (dict(decay="scalar", erase="gate", write="gate"), r"field `decay` must be 'per_channel' with erase='gate'"),
    (dict(decay="per_channel", erase="gate", write="beta"), r"field `write` must be 'gate' with erase='gate'"),
    (dict(decay="per_channel", erase="content_gate", write="beta"), r"field `write, extra_params` must be"),
    (dict(decay="per_channel", erase="beta", write="beta", extra_params=("gamma",)), r"field `extra_params`"),
])
def test_variant_rows_must_be_what_the_ops_take(fields, match):
  with pytest.raises(ValueError, match=r"Variant 'new': " + match):
    ops.Variant("new", **fields)
