"""nnx layers: norms, short conv, RoPE, SwiGLU, and the structure and wiring of the delta-rule mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax.configs import DELTA_MIXERS, preset
from carve_jax.layers import Attention, DeltaMixer, GatedRMSNorm, RMSNorm, ShortConv, SwiGLU, l2norm, rope
from carve_jax.layers.attention import attention_implementation, causal_attention
from conftest import TOL, rel_err

B, T = 2, 12


def _x(*shape, seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(mixer, **kw):
  return preset("tiny", **{**dict(mixer=mixer, d_model=32, n_heads=2, content_block=4, chunk_size=4,
                                  impl="recurrent"), **kw})


def test_norms_match_formulas():
  x, z = _x(3, 8), _x(3, 8, seed=1)
  n = RMSNorm(8, eps=1e-6)
  n.weight[...] = _x(8, seed=2)
  ref = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * np.asarray(n.weight[...])
  np.testing.assert_allclose(n(x), ref, rtol=1e-6, atol=1e-6)
  gn = GatedRMSNorm(8, eps=1e-6)
  gn.weight[...] = n.weight[...]
  np.testing.assert_allclose(gn(x, z), ref / (1 + np.exp(-np.asarray(z))), rtol=1e-6, atol=1e-6)
  assert RMSNorm(8, eps=1e-6, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
  u = l2norm(x)
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(l2norm(jnp.zeros((2, 4))))))


def test_short_conv_causal_formula_and_tail():
  W, D = 4, 6
  conv = ShortConv(D, W, std=1.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = _x(B, T, D)
  y, tail = conv(x)
  w, xn = np.asarray(conv.weight[...]), np.asarray(x)
  xp = np.concatenate([np.zeros((B, W - 1, D)), xn], 1)
  pre = sum(w[i] * xp[:, i:i + T] for i in range(W))
  np.testing.assert_allclose(y, pre / (1 + np.exp(-pre)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(tail, x[:, -(W - 1):])
  # Split anywhere (also one token at a time), carrying the tail: identical outputs.
  y1, t1 = conv(x[:, :5])
  y2, t2 = conv(x[:, 5:], t1)
  np.testing.assert_array_equal(jnp.concatenate([y1, y2], 1), y)
  np.testing.assert_array_equal(t2, tail)
  tl, ys = conv.empty_tail(B), []
  for t in range(T):
    yt, tl = conv(x[:, t:t + 1], tl)
    ys.append(yt)
  np.testing.assert_array_equal(jnp.concatenate(ys, 1), y)


def test_rope_is_relative():
  q, k = _x(1, 1, 2, 8), _x(1, 1, 2, 8, seed=1)
  dot = lambda m, n: jnp.sum(rope(q, jnp.array([m]), 1e4) * rope(k, jnp.array([n]), 1e4), -1)
  np.testing.assert_allclose(dot(7, 3), dot(14, 10), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rope(q, jnp.array([0]), 1e4), q)
  assert not np.allclose(dot(7, 3), dot(7, 4))
  assert attention_implementation(jnp.float32, 32) == "xla"


@pytest.mark.gpu
def test_cudnn_attention_odd_length_matches_xla():
  """cuDNN rejects odd lengths in training; the padded call matches XLA, gradients included."""
  q, k, v = (_x(2, 255, 2, 64, seed=i).astype(jnp.bfloat16) for i in range(3))
  assert attention_implementation(q.dtype, 64) == "cudnn"
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  assert rel_err(f32(causal_attention(q, k, v)), f32(xla(q, k, v))) < TOL[jnp.bfloat16].out
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  g, g_ref = jax.grad(loss(causal_attention), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)
  assert rel_err(f32(g), f32(g_ref)) < TOL[jnp.bfloat16].grad



@pytest.mark.gpu
@pytest.mark.parametrize("T,window", [(256, None), (255, None), (256, 48)])
def test_cudnn_packed_attention_matches_xla(T, window):
  """Packed rows (different cuts per row) on cuDNN with the document mask match XLA's masked path, gradients
  included; odd T (padded for cuDNN) and a sliding window too."""
  from carve_jax.ops.segments import document_numbers
  q, k, v = (_x(2, T, 2, 64, seed=i).astype(jnp.bfloat16) for i in range(3))
  cuts = [(40, 100, T - 140), (T - 7, 7)]
  seg = jnp.asarray(np.stack([np.repeat(np.arange(len(c)), c) for c in cuts]), jnp.int32)
  assert attention_implementation(q.dtype, 64) == "cudnn"
  d = document_numbers(seg)
  mask = (d[:, :, None] == d[:, None, :])[:, None]
  local = None if window is None else (window - 1, 0)
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                                     implementation="xla")
  ours = lambda q, k, v: causal_attention(q, k, v, window=window, segment_ids=seg)
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  assert rel_err(f32(ours(q, k, v)), f32(xla(q, k, v))) < TOL[jnp.bfloat16].out
  unmasked = causal_attention(q, k, v, window=window)
  assert rel_err(f32(unmasked), f32(xla(q, k, v))) > 10 * TOL[jnp.bfloat16].out  # the mask matters here
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  g, g_ref = jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)
  assert rel_err(f32(g), f32(g_ref)) < TOL[jnp.bfloat16].grad

def test_swiglu():
  cfg = _cfg("gdn")
  mlp = SwiGLU(cfg, rngs=nnx.Rngs(0))
  x = _x(B, 3, 32)
  ref = (jax.nn.silu(x @ mlp.gate_proj.kernel[...]) * (x @ mlp.up_proj.kernel[...])) @ mlp.down_proj.kernel[...]
  np.testing.assert_allclose(mlp(x), ref, rtol=1e-5, atol=1e-6)
  assert mlp.gate_proj.kernel.shape == (32, cfg.mlp_dim)


# -- delta-rule mixer -------------------------------------------------------------------------------


def _loud(m):
  """Conv weights x30: O(1) conv outputs, so q, k are far from l2norm's eps and the state matters
  (at the N(0, 0.02^2) init of a 32-wide model |q| is ~1e-2, where the eps still shows)."""
  for p in (m.q_conv.weight, m.k_conv.weight, m.v_conv.weight):
    p[...] = p[...] * 30
  return m


def _shapes(m):
  return {".".join(map(str, p)): tuple(v[...].shape) for p, v in nnx.iter_graph(m) if isinstance(v, nnx.Param)}


def test_mixer_parameters_per_variant():
  """GDN-2 has the d x HV write projection; CARVE replaces it by beta (d x H) and gamma [H] = 0;
  KDA/GDN have beta only; GDN's decay is per head."""
  d, H, K = 32, 2, 16
  s = {v: _shapes(DeltaMixer(_cfg(v), rngs=nnx.Rngs(0))) for v in DELTA_MIXERS}
  common = {"q_proj.kernel": (d, H * K), "k_proj.kernel": (d, H * K), "v_proj.kernel": (d, H * K),
            "q_conv.weight": (4, H * K), "A_log": (H,), "g_proj1.kernel": (d, K), "g_proj2.kernel": (K, H * K),
            "g_proj2.bias": (H * K,), "o_norm.weight": (K,), "o_proj.kernel": (H * K, d)}
  for v in DELTA_MIXERS:
    assert common.items() <= s[v].items(), v
  assert s["gdn2"]["b_proj.kernel"] == (d, H * K) and s["gdn2"]["w_proj.kernel"] == (d, H * K)
  assert s["carve"]["b_proj.kernel"] == (d, H * K) and s["carve"]["beta_proj.kernel"] == (d, H)
  assert s["carve"]["gamma"] == (H,) and "w_proj.kernel" not in s["carve"]
  assert set(s["gdn2"]) - set(s["carve"]) == {"w_proj.kernel"}
  assert set(s["carve"]) - set(s["gdn2"]) == {"beta_proj.kernel", "gamma"}
  for v in ("kda", "gdn"):
    assert s[v]["beta_proj.kernel"] == (d, H) and "b_proj.kernel" not in s[v] and "w_proj.kernel" not in s[v]
  assert s["kda"]["dt_bias"] == (H * K,) and s["kda"]["f_proj1.kernel"] == (d, K)
  assert s["gdn"]["dt_bias"] == (H,) and s["gdn"]["a_proj.kernel"] == (d, H) and "f_proj1.kernel" not in s["gdn"]
  m = DeltaMixer(_cfg("carve"), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(m.gamma[...], 0.0)
  A = np.exp(np.asarray(m.A_log[...]))
  assert np.all((A >= 1) & (A <= 16))
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
  with pytest.raises(ValueError, match="`cfg.mixer`"):
    DeltaMixer(_cfg("attention"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", DELTA_MIXERS)
def test_mixer_inputs_are_in_range(variant):
  """q, k unit norm per head; decay g <= 0 (per channel, or per head for GDN); gates in (0, 1)."""
  m = _loud(DeltaMixer(_cfg(variant), rngs=nnx.Rngs(0)))
  inp, tails = m.op_inputs(_x(B, T, 32))
  H, K = 2, 16
  np.testing.assert_allclose(jnp.linalg.norm(inp["q"], axis=-1), 1.0, rtol=1e-3)  # up to the eps
  np.testing.assert_allclose(jnp.linalg.norm(inp["k"], axis=-1), 1.0, rtol=1e-3)  # up to the eps
  assert inp["g"].shape == ((B, T, H) if variant == "gdn" else (B, T, H, K)) and inp["g"].dtype == jnp.float32
  assert bool(jnp.all(inp["g"] <= 0))
  gates = {"gdn2": ("b", "w"), "carve": ("beta",), "kda": ("beta",), "gdn": ("beta",)}[variant]
  for name in gates:
    assert bool(jnp.all((inp[name] > 0) & (inp[name] < 1))), name
  if variant == "carve":
    assert inp["beta"].shape == (B, T, H) and inp["erase_logits"].shape == (B, T, H, K)
  assert tails["q"].shape == (B, 3, H * K)
  # bf16 compute: decay stays float32, everything else (q, k, v, gates, logits) is bf16 like FLA's.
  inp16, _ = DeltaMixer(_cfg(variant, compute_dtype="bfloat16"), rngs=nnx.Rngs(0)).op_inputs(_x(B, T, 32))
  assert inp16["g"].dtype == jnp.float32 and all(inp16[n].dtype == jnp.bfloat16 for n in inp16 if n != "g")


@pytest.mark.parametrize("mixer", ["carve", "attention"])
def test_mixers_are_causal(mixer):
  cfg = _cfg(mixer)
  m = Attention(cfg, rngs=nnx.Rngs(0)) if mixer == "attention" else DeltaMixer(cfg, rngs=nnx.Rngs(0))
  x = _x(B, T, 32)
  y = m(x)
  y2 = m(x.at[:, 7:].add(1.0))
  np.testing.assert_array_equal(y2[:, :7], y[:, :7])
  assert float(jnp.max(jnp.abs(y2[:, 7:] - y[:, 7:]))) > 0


def test_mixer_passes_impl_and_content_block():
  """cfg.impl reaches carve_jax.ops (chunk and recurrent agree, but not bitwise), and prefill == call."""
  x = _x(B, T, 32, scale=3.0)
  m = _loud(DeltaMixer(_cfg("carve"), rngs=nnx.Rngs(0)))
  m.gamma[...] = jnp.array([3.0, -3.0])
  y_rec = m(x)
  m_chunk = DeltaMixer(_cfg("carve", impl="chunk"), rngs=nnx.Rngs(0))
  nnx.update(m_chunk, nnx.state(m))
  y_chunk = m_chunk(x)
  assert rel_err(y_chunk, y_rec) < TOL[jnp.float32].out and not bool(jnp.all(y_chunk == y_rec))
  y_pre, cache = m.prefill(x)
  assert rel_err(y_pre, y_rec) < TOL[jnp.float32].rounding
  assert cache["content"].shape == (B, 2, 16) and cache["state"].shape == (B, 2, 16, 16)
  m_g8 = DeltaMixer(_cfg("carve", content_block=8), rngs=nnx.Rngs(0))
  nnx.update(m_g8, nnx.state(m))
  assert float(jnp.max(jnp.abs(m_g8(x) - y_rec))) > 1e-6  # G is part of the function
