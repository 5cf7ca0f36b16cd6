"""Single-token steps (`carve_jax.ops.step`) against the token-scan references of `carve_jax.ops`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax import ops
from carve_jax.ops.gates import content_signal
from carve_jax.ops.step import carve_step, gated_delta_step
from conftest import TOL

B, T, H, K, V = 2, 11, 2, 8, 6


def _inputs(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compiles for test data
  n = lambda *s: rng.standard_normal(s)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  sig = lambda x: 1 / (1 + np.exp(-x))
  x = dict(q=unit(n(B, T, H, K)), k=unit(n(B, T, H, K)), v=n(B, T, H, V), g=-np.exp(n(B, T, H, K) - 2),
           b=sig(n(B, T, H, K)), w=sig(n(B, T, H, V)), beta=sig(n(B, T, H)), gamma=2.0 * n(H), S0=n(B, H, K, V))
  return {name: jnp.asarray(a, dtype) for name, a in x.items()}


def _loop_gated_delta(x, S):
  os = []
  for t in range(T):
    o, S = gated_delta_step(S, *(x[n][:, t] for n in ("q", "k", "v", "g", "b", "w")))
    os.append(o)
  return jnp.stack(os, 1), S


def _loop_carve(x, S, G, pos0=0, content=None):
  c = jnp.zeros((B, H, K), S.dtype) if content is None else content
  os = []
  for t in range(T):
    o, S, c = carve_step(S, c, pos0 + t, *(x[n][:, t] for n in ("q", "k", "v", "g", "b")), x["beta"][:, t],
                         x["gamma"], content_block=G)
    os.append(o)
  return jnp.stack(os, 1), S, c


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gated_delta_step_matches_recurrent(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    x = _inputs(dtype)
    o_ref, S_ref = ops.gated_delta(*(x[n] for n in ("q", "k", "v", "g", "b", "w")), initial_state=x["S0"],
                                   output_final_state=True, impl="recurrent")
    o, S = _loop_gated_delta(x, x["S0"])
    tol = TOL[dtype].rounding  # a step is the recurrence's update: equal to rounding
    assert o.dtype == dtype and S.dtype == dtype
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(S, S_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_carve_step_matches_recurrent_across_blocks(dtype, G):
  with jax.enable_x64(dtype == jnp.float64):
    x = _inputs(dtype, seed=1)
    o_ref, S_ref = ops.carve(*(x[n] for n in ("q", "k", "v", "g", "b", "beta", "gamma")), content_block=G,
                             initial_state=x["S0"], output_final_state=True, impl="recurrent", chunk_size=1)
    o, S, c = _loop_carve(x, x["S0"], G)
    tol = TOL[dtype].rounding  # a step is the recurrence's update: equal to rounding
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(S, S_ref, rtol=tol, atol=tol)
    # The cached content is the signal of the state entering the last block.
    o_pre, S_block = ops.carve(*(x[n][:, :(T - 1) // G * G] for n in ("q", "k", "v", "g", "b", "beta")),
                               x["gamma"], content_block=G, initial_state=x["S0"], output_final_state=True,
                               impl="recurrent", chunk_size=1) if (T - 1) // G else (None, x["S0"])
    np.testing.assert_allclose(c, content_signal(S_block), rtol=tol, atol=tol)


def test_carve_step_uses_cached_content_inside_a_block():
  """Mid-block, the cached c (not the current state) gates the erase: resuming at pos 3 of a block
  with the c of the block's entry state reproduces the uninterrupted run."""
  x = _inputs(seed=2)
  G = 8
  o_ref, _, _ = _loop_carve(x, x["S0"], G)
  # Run 3 tokens, then restart the loop from the saved (state, content) at pos 3.
  S, c = x["S0"], jnp.zeros((B, H, K))
  for t in range(3):
    _, S, c = carve_step(S, c, t, *(x[n][:, t] for n in ("q", "k", "v", "g", "b")), x["beta"][:, t], x["gamma"],
                         content_block=G)
  o_mid, _, _ = carve_step(S, c, 3, *(x[n][:, 3] for n in ("q", "k", "v", "g", "b")), x["beta"][:, 3],
                           x["gamma"], content_block=G)
  tol = TOL[jnp.float32].rounding
  np.testing.assert_allclose(o_mid, o_ref[:, 3], rtol=tol, atol=tol)
  # A stale (wrong) content vector changes the result: the cache entry matters.
  o_bad, _, _ = carve_step(S, content_signal(S), 3, *(x[n][:, 3] for n in ("q", "k", "v", "g", "b")),
                           x["beta"][:, 3], x["gamma"], content_block=G)
  assert float(jnp.max(jnp.abs(o_bad - o_ref[:, 3]))) > 1e-4


def test_carve_step_per_row_positions():
  x = _inputs(seed=3)
  args = [x[n][:, 0] for n in ("q", "k", "v", "g", "b")] + [x["beta"][:, 0], x["gamma"]]
  c = jnp.ones((B, H, K))
  o_vec, S_vec, c_vec = carve_step(x["S0"], c, jnp.array([0, 5]), *args, content_block=4)
  o0, _, c0 = carve_step(x["S0"], c, 0, *args, content_block=4)
  o5, _, c5 = carve_step(x["S0"], c, 5, *args, content_block=4)
  np.testing.assert_array_equal(o_vec[0], o0[0])
  np.testing.assert_array_equal(o_vec[1], o5[1])
  np.testing.assert_array_equal(c_vec[1], c[1])  # pos 5: mid-block, cached content kept
  np.testing.assert_array_equal(c_vec[0], c0[0])


def test_step_bad_arguments():
  x = _inputs()
  args = [x[n][:, 0] for n in ("q", "k", "v", "g", "b")]
  with pytest.raises(ValueError, match="`pos`"):
    carve_step(x["S0"], jnp.zeros((B, H, K)), 1.5, *args, x["beta"][:, 0], x["gamma"], content_block=4)
  with pytest.raises(ValueError, match="`beta`"):
    carve_step(x["S0"], jnp.zeros((B, H, K)), 0, *args, x["beta"], x["gamma"], content_block=4)
  with pytest.raises(ValueError, match="`content_block`"):
    carve_step(x["S0"], jnp.zeros((B, H, K)), 0, *args, x["beta"][:, 0], x["gamma"], content_block=0)
  with pytest.raises(ValueError, match="`state`"):
    gated_delta_step(x["S0"][:, :, :-1], *args, x["w"][:, 0])
  with pytest.raises(ValueError, match="`w`"):
    gated_delta_step(x["S0"], *args, x["w"][:, 0, :, :-1])
