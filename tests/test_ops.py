"""Numerical proofs for the math core (carve_jax.ops), per ../shared/spec/CARVE.md.

Ground truth: the token-by-token recurrence (`impl="recurrent"`). The WY chunk form must agree with
it for every model of the family, every chunk size, any T, with and without an initial state, in
float64 to 1e-10 and float32 to 1e-5 relative, forward and gradients. Then the spec's claims in
numbers: chunk-size invariance, gamma = 0 is GDN-2 bit for bit, key-axis erase keeps the chunk
transition of the form P (x) I (Kronecker rank 1) while value-axis erase does not, and the general
rule collapses to the textbook KDA and Gated DeltaNet recurrences.
"""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax import ops
from carve_jax.ops.chunk import chunk_step
from carve_jax.ops.sample_inputs import FAMILIES, family_inputs, run_family
from conftest import TOL, rel_err

CHUNKS = (16, 32, 64, 128)
# (B, T, H, K, V): T never a multiple of the chunk; V != K in the second.
SHAPES = [(2, 150, 2, 16, 16), (1, 83, 3, 8, 32)]


def _content_block(family, chunk):
  return 128 if chunk > 32 else 32  # CARVE: content_block 32 (several blocks in T) or 128


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_H{}_K{}_V{}".format(*s))
def test_chunk_matches_recurrent_float64(x64, shape, family, initial_state):
  B, T, H, K, V = shape
  seed = zlib.crc32(repr((shape, family)).encode())  # fixed across processes (str hash() is salted)
  inputs = family_inputs(jax.random.PRNGKey(seed), family, B=B, T=T, H=H, K=K, V=V,
                         dtype=jnp.float64, initial_state=initial_state)
  for C in CHUNKS:
    G = _content_block(family, C)
    ref = run_family(family, impl="recurrent", content_block=G, **inputs)
    out = run_family(family, impl="chunk", chunk_size=C, content_block=G, **inputs)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, ref)
    assert rel_err(out, ref) < TOL[jnp.float64].out, (C, rel_err(out, ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_matches_recurrent_float32(family):
  B, T, H, K, V = 2, 100, 2, 32, 16
  inputs = family_inputs(jax.random.PRNGKey(7), family, B=B, T=T, H=H, K=K, V=V, initial_state=True)
  ref = run_family(family, impl="recurrent", content_block=64, **inputs)
  for C in (32, 64):
    out = run_family(family, impl="chunk", chunk_size=C, content_block=64, **inputs)
    chex.assert_trees_all_equal_dtypes(out, ref)
    assert rel_err(out, ref) < TOL[jnp.float32].out, (C, rel_err(out, ref))


def _loss_and_grads(family, impl, chunk_size, content_grad, inputs, key):
  o, S = run_family(family, impl=impl, chunk_size=chunk_size, content_block=32, **inputs)
  ko, ks = jax.random.split(key)
  co, cs = jax.random.normal(ko, o.shape, o.dtype), jax.random.normal(ks, S.shape, S.dtype)

  def loss(inp):
    o, S = run_family(family, impl=impl, chunk_size=chunk_size, content_block=32, content_grad=content_grad, **inp)
    return jnp.sum(o * co) + jnp.sum(S * cs)

  return jax.grad(loss)(inputs)


@pytest.mark.parametrize("family,content_grad", [(f, "stop") for f in FAMILIES] + [("carve", "full")])
def test_gradients_chunk_match_recurrent_float64(x64, family, content_grad):
  inputs = family_inputs(jax.random.PRNGKey(3), family, B=1, T=45, H=2, K=8, V=8, dtype=jnp.float64,
                         initial_state=True)
  key = jax.random.PRNGKey(4)
  ref = _loss_and_grads(family, "recurrent", None, content_grad, inputs, key)
  for C in (16, 32):
    got = _loss_and_grads(family, "chunk", C, content_grad, inputs, key)
    assert set(got) == set(inputs)
    assert rel_err(got, ref) < TOL[jnp.float64].grad, (C, jax.tree.map(lambda a, b: rel_err(a, b), got, ref))


def test_gradients_float32_and_content_grad_matters():
  inputs = family_inputs(jax.random.PRNGKey(5), "carve", B=1, T=70, H=2, K=16, V=16, initial_state=True)
  key = jax.random.PRNGKey(6)
  ref = _loss_and_grads("carve", "recurrent", None, "stop", inputs, key)
  got = _loss_and_grads("carve", "chunk", 32, "stop", inputs, key)
  assert rel_err(got, ref) < TOL[jnp.float32].grad
  full = _loss_and_grads("carve", "chunk", 32, "full", inputs, key)
  # "full" differentiates through c_n into the state: the initial state's gradient must change.
  assert rel_err(full["initial_state"], got["initial_state"]) > 1e-3


@pytest.mark.parametrize("family", ["gdn", "kda", "gdn2"])
def test_chunk_size_invariance(x64, family):
  inputs = family_inputs(jax.random.PRNGKey(8), family, B=1, T=130, H=2, K=8, V=8, dtype=jnp.float64,
                         initial_state=True)
  base = run_family(family, impl="chunk", chunk_size=16, **inputs)
  for C in (32, 64, 128):
    assert rel_err(run_family(family, impl="chunk", chunk_size=C, **inputs), base) < TOL[jnp.float64].rounding


def test_carve_depends_on_content_block_only(x64):
  inputs = family_inputs(jax.random.PRNGKey(9), "carve", B=1, T=130, H=2, K=8, V=8, dtype=jnp.float64,
                         initial_state=True)
  base = run_family("carve", impl="chunk", chunk_size=16, content_block=64, **inputs)
  for C in (32, 64):
    out = run_family("carve", impl="chunk", chunk_size=C, content_block=64, **inputs)
    assert rel_err(out, base) < TOL[jnp.float64].rounding
  other = run_family("carve", impl="chunk", chunk_size=16, content_block=32, **inputs)
  assert rel_err(other, base) > 1e-4  # G is a model hyperparameter: it changes the function


def _gdn2_of_carve(q, k, v, g, erase_logits, beta, gamma, **kw):
  """The GDN-2 path: b = sigmoid(erase_logits), w = beta * 1_V. The ops compute in float32 (float64 for
  float64 inputs), so the gate is formed there too: a bf16 gate would be a different, rounded, function."""
  del gamma
  w = jnp.broadcast_to(beta[..., None], v.shape)
  b = jax.nn.sigmoid(erase_logits.astype(jnp.promote_types(erase_logits.dtype, jnp.float32)))
  return ops.gated_delta(q, k, v, g, b, w, **kw)


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gamma_zero_is_gdn2_bit_for_bit(impl, dtype):
  inputs = family_inputs(jax.random.PRNGKey(10), "carve", B=2, T=77, H=3, K=16, V=8, dtype=dtype,
                         initial_state=True)
  inputs["gamma"] = jnp.zeros_like(inputs["gamma"])
  kw = dict(impl=impl, chunk_size=32, output_final_state=True)
  carve_out = ops.carve(**inputs, content_block=32, **kw)
  gdn2_out = _gdn2_of_carve(**inputs, **kw)
  chex.assert_trees_all_equal(carve_out, gdn2_out)  # ==, not allclose

  co = jax.random.normal(jax.random.PRNGKey(11), carve_out[0].shape, jnp.float32)

  def loss(f, inp):
    o, S = f(**inp, **kw)
    return jnp.sum(o.astype(jnp.float32) * co) + jnp.sum(S)

  carve_fn = lambda **a: ops.carve(**a, content_block=32)
  names = ("q", "k", "v", "g", "erase_logits", "beta", "initial_state")
  diff = {n: inputs[n] for n in names}
  rest = {n: inputs[n] for n in inputs if n not in names}
  g_carve = jax.grad(lambda d: loss(carve_fn, {**d, **rest}))(diff)
  g_gdn2 = jax.grad(lambda d: loss(_gdn2_of_carve, {**d, **rest}))(diff)
  chex.assert_trees_all_equal(g_carve, g_gdn2)


def test_gamma_nonzero_changes_output():
  inputs = family_inputs(jax.random.PRNGKey(12), "carve", B=1, T=70, H=2, K=8, V=8, initial_state=True)
  o1, _ = ops.carve(**inputs, content_block=32)
  o0, _ = ops.carve(**{**inputs, "gamma": jnp.zeros_like(inputs["gamma"])}, content_block=32)
  assert rel_err(o1, o0) > 1e-3


def _one_head_chunk(key, C, K, V):
  ks = jax.random.split(key, 4)
  k = jax.random.normal(ks[0], (C, K), jnp.float64)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[1], (C, K), jnp.float64) + 2.0)
  return k, g, jax.nn.sigmoid(jax.random.normal(ks[2], (C, K), jnp.float64)), jax.nn.sigmoid(
      jax.random.normal(ks[3], (C, V), jnp.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_axis_erase_is_kronecker_rank_one_value_axis_is_not(x64, seed):
  C, K, V = 8, 4, 3
  k, g, b, e = _one_head_chunk(jax.random.PRNGKey(seed), C, K, V)
  rank_key, s_key = ops.kronecker_rank(ops.chunk_transition(k, g, b, V=V, axis="key"), K, V)
  rank_val, s_val = ops.kronecker_rank(ops.chunk_transition(k, g, e, V=V, axis="value"), K, V)
  assert rank_key == 1, s_key
  assert rank_val > 1, s_val
  assert s_val[1] / s_val[0] > 1e-3  # far from rank 1, not a rounding artefact
  # A value-axis gate constant across V is a key-axis gate: rank 1 again. The variation across value
  # columns -- one transition per column -- is what breaks the single WY pair.
  e_const = jnp.broadcast_to(e[:, :1], e.shape)
  assert ops.kronecker_rank(ops.chunk_transition(k, g, e_const, V=V, axis="value"), K, V)[0] == 1


def test_wy_chunk_step_realises_the_key_axis_transition(x64):
  C, K, V = 8, 4, 3
  k, g, b, _ = _one_head_chunk(jax.random.PRNGKey(3), C, K, V)
  M = ops.chunk_transition(k, g, b, V=V, axis="key")
  basis = jnp.eye(K * V, dtype=jnp.float64).reshape(K * V, 1, K, V)
  z = lambda d: jnp.zeros((K * V, 1, C, d), jnp.float64)
  bc = lambda x: jnp.broadcast_to(x[None, None], (K * V, 1) + x.shape)
  _, S = chunk_step(bc(k), bc(k), z(V), bc(g), bc(b), z(V), basis, scale=1.0)
  np.testing.assert_allclose(S.reshape(K * V, K * V).T, M, rtol=0, atol=1e-12)
  # ... and it is P (x) I_V with P read off the first value column.
  P = M.reshape(K, V, K, V)[:, 0, :, 0]
  np.testing.assert_allclose(M, jnp.kron(P, jnp.eye(V)), rtol=0, atol=1e-12)


def _textbook_kda(q, k, v, g, beta, scale, gdn=False):
  """Textbook forms, written independently of carve_jax:
  KDA: S = Diag(a) S_{-1};  S += beta k (v - S^T k)^T.  GDN: S = alpha (I - beta k k^T) S_{-1} + beta k v^T."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  B, T, H, K = q.shape
  S = np.zeros((B, H, K, v.shape[-1]))
  o = np.zeros(v.shape)
  for t in range(T):
    for bb in range(B):
      for h in range(H):
        kt, bt = k[bb, t, h], beta[bb, t, h]
        if gdn:
          a = np.exp(g[bb, t, h, 0])
          S[bb, h] = a * (S[bb, h] - bt * np.outer(kt, kt @ S[bb, h])) + bt * np.outer(kt, v[bb, t, h])
        else:
          S[bb, h] = np.exp(g[bb, t, h])[:, None] * S[bb, h]
          S[bb, h] += bt * np.outer(kt, v[bb, t, h] - S[bb, h].T @ kt)
        o[bb, t, h] = S[bb, h].T @ (scale * q[bb, t, h])
  return o


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_general_rule_collapses_to_textbook_kda_and_gdn(x64, family):
  B, T, H, K, V = 1, 21, 2, 4, 3
  inp = family_inputs(jax.random.PRNGKey(13), family, B=B, T=T, H=H, K=K, V=V, dtype=jnp.float64)
  beta = inp["b"][..., 0]
  want = _textbook_kda(inp["q"], inp["k"], inp["v"], inp["g"], beta, K**-0.5, gdn=family == "gdn")
  # GDN-2 with b = w = beta is KDA; KDA with a decay constant across channels is GDN.
  o_gdn2, _ = ops.gated_delta(**inp, impl="chunk", chunk_size=16)
  if family == "kda":
    o_short, _ = ops.kda(inp["q"], inp["k"], inp["v"], inp["g"], beta, impl="chunk", chunk_size=16)
  else:
    o_short, _ = ops.gdn(inp["q"], inp["k"], inp["v"], inp["g"][..., 0], beta, impl="chunk", chunk_size=16)
  assert rel_err(o_gdn2, want) < TOL[jnp.float64].rounding  # the same rule: equal to rounding
  assert rel_err(o_short, want) < TOL[jnp.float64].rounding


def test_strong_decay_does_not_overflow():
  """Per-token log decay -30 gives in-chunk cumulative decays near -1900: exp(-G) would overflow."""
  inputs = family_inputs(jax.random.PRNGKey(14), "gdn2", B=1, T=64, H=1, K=8, V=8, decay_scale=30.0)
  assert float(jnp.min(jnp.cumsum(inputs["g"], axis=1))) < -200
  ref = run_family("gdn2", impl="recurrent", **inputs)
  out = run_family("gdn2", impl="chunk", chunk_size=64, **inputs)
  assert all(bool(jnp.isfinite(x).all()) for x in out)
  assert rel_err(out, ref) < TOL[jnp.float32].out
  grads = jax.grad(lambda q: jnp.sum(run_family("gdn2", impl="chunk", chunk_size=64, **{**inputs, "q": q})[0]))(
      inputs["q"])
  assert bool(jnp.isfinite(grads).all())


def test_bfloat16_inputs_keep_dtype_and_stay_close():
  inp32 = family_inputs(jax.random.PRNGKey(15), "carve", B=1, T=96, H=2, K=16, V=16, initial_state=True)
  inp16 = {n: x.astype(jnp.bfloat16) for n, x in inp32.items()}
  o16, S16 = run_family("carve", impl="chunk", chunk_size=32, content_block=32, **inp16)
  o32, _ = run_family("carve", impl="chunk", chunk_size=32, content_block=32,
                      **{n: x.astype(jnp.float32) for n, x in inp16.items()})
  assert o16.dtype == jnp.bfloat16 and S16.dtype == jnp.float32
  assert rel_err(o16, o32) < TOL[jnp.bfloat16].rounding  # bf16 inputs, float32 math: output rounding


@pytest.mark.parametrize("T", [1, 5])
def test_short_sequences(T):
  inputs = family_inputs(jax.random.PRNGKey(16), "carve", B=2, T=T, H=2, K=8, V=8, initial_state=True)
  ref = run_family("carve", impl="recurrent", **inputs)
  assert rel_err(run_family("carve", impl="chunk", chunk_size=64, **inputs), ref) < TOL[jnp.float32].out


def test_jit_and_final_state_flag():
  inputs = family_inputs(jax.random.PRNGKey(17), "carve", B=1, T=40, H=2, K=8, V=8)
  f = jax.jit(ops.carve, static_argnames=("content_block", "chunk_size", "impl", "output_final_state"))
  o, S = f(**inputs, content_block=16, chunk_size=16, impl="chunk")
  assert S is None and o.shape == (1, 40, 2, 8)
  o2, S2 = ops.carve(**inputs, content_block=16, output_final_state=True)
  chex.assert_shape(S2, (1, 2, 8, 8))


def test_auto_resolves_to_chunk_on_cpu():
  assert jax.default_backend() == "cpu"
  assert ops.resolve_impl("auto") == "chunk"


def test_auto_sends_only_supported_calls_to_pallas(monkeypatch):
  from carve_jax.ops import api
  monkeypatch.setattr(api, "pallas_available", lambda: True)  # as on a GPU
  kw = dict(K=128, V=128, chunk_size=64)
  assert api.resolve_impl("auto", **kw, dtype=jnp.bfloat16) == "pallas"
  assert api.resolve_impl("auto", **kw, dtype=jnp.float32) == "chunk"  # fp32 kernels: interpret-verified only
  assert api.resolve_impl("auto", K=48, V=128, chunk_size=64, dtype=jnp.bfloat16) == "chunk"
  assert api.resolve_impl("auto", **kw, dtype=jnp.bfloat16, content_grad="full") == "chunk"
  assert api.resolve_impl("recurrent", **kw, dtype=jnp.bfloat16) == "recurrent"
