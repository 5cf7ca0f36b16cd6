"""The decoder LM: configs, shapes, CARVE(gamma=0) == GDN-2, decoding == parallel forward, gradients,
parameter counts, generation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax.configs import MIXERS, ModelConfig, preset
from carve_jax.model import (LM, _sample, abstract_model, decode_step, generate, init_cache, param_breakdown,
                             param_count, prefill)
from conftest import TOL, rel_err

T = 20
G = 8  # content block: T = 20 crosses two block boundaries


def _cfg(mixer, **kw):
  return preset("tiny", **{**dict(mixer=mixer, impl="chunk", content_block=G, chunk_size=G), **kw})


def _params(model):
  return {p: n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Param)}


def scramble(model, seed=0):
  """Re-draws every parameter at O(1) scale (the N(0, 0.02^2) init makes the mixers' share of the
  logits too small for a decode test to see a mistake) and sets CARVE's gamma away from 0."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compiles
  for path, p in sorted(_params(model).items(), key=lambda kv: str(kv[0])):
    name, shape = path[-1], p[...].shape
    if name in ("A_log", "dt_bias"):
      continue
    if name == "gamma":
      x = 2.0 * rng.standard_normal(shape)
    elif name == "weight" and len(shape) == 1:  # norm gains
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name == "kernel":
      x = rng.standard_normal(shape) / np.sqrt(shape[0])
    else:  # embeddings, conv weights, biases
      x = 0.5 * rng.standard_normal(shape)
    p[...] = jnp.asarray(x, jnp.float32)
  return model


def _tokens(B=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


_decode = nnx.jit(decode_step)
_prefill = nnx.jit(prefill, static_argnames="max_len")


# -- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [
    (dict(mixer="mamba"), "mixer"),
    (dict(d_model=64, n_heads=2, head_dim=16), "head_dim"),
    (dict(d_model=64, n_heads=3), "n_heads"),
    (dict(mixer="carve", content_block=64, chunk_size=48), "chunk_size"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(impl="triton"), "impl"),
    (dict(content_grad="none"), "content_grad"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=256.0), "vocab_size"),
    (dict(norm_eps=-1.0), "norm_eps"),
])
def test_bad_config_raises(kw, field):
  with pytest.raises(ValueError, match=f"`{field}`"):
    ModelConfig(**kw)


def test_presets():
  assert preset("1.3b").d_model == 2048 and preset("1.3b").n_heads == 16 and preset("1.3b").head_k == 128
  assert preset("1.3b").n_layers == 24
  assert preset("tiny", mixer="gdn2").mixer == "gdn2"
  assert ModelConfig(mixer="gdn2", content_block=64, chunk_size=48).chunk_size == 48  # only CARVE needs G % C
  with pytest.raises(ValueError, match="preset"):
    preset("7b")
  with pytest.raises(ValueError, match="d_modle"):
    preset("tiny", d_modle=3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    preset("tiny").d_model = 3


# -- forward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes_dtypes_and_finite_grads(mixer):
  model = scramble(LM(_cfg(mixer, n_layers=1, impl="recurrent"), rngs=nnx.Rngs(0)))
  tokens = _tokens()

  def loss(m):
    logits = m(tokens)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)), logits

  (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.shape == (2, T, 256) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(value))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert len(leaves) == len(_params(model))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
  if mixer == "carve":  # gamma is trained: it gets a gradient through the content-gated erase
    assert float(jnp.max(jnp.abs(grads.blocks[0].mixer.gamma[...]))) > 0


def test_bf16_compute_keeps_fp32_params():
  cfg32 = _cfg("carve", n_layers=1)
  m32 = scramble(LM(cfg32, rngs=nnx.Rngs(0)))
  m16 = LM(cfg32.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
  for p, v in _params(m32).items():
    _params(m16)[p][...] = v[...]
  assert all(p[...].dtype == jnp.float32 for p in _params(m16).values())
  a, b = m32(_tokens()), m16(_tokens())
  assert b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b)))
  assert rel_err(b, a) < 0.1


def test_bad_tokens_raise():
  model = LM(_cfg("gdn"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`tokens`"):
    model(jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="`tokens`"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="`cfg`"):
    LM({"mixer": "gdn"}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_carve_gamma0_equals_gdn2_bitwise(impl):
  """CARVE with gamma = 0 and GDN-2 with the same shared weights and w_proj producing beta * 1_V give
  identical logits.

  w_proj repeats each head's beta column V times. For sigmoid(W_w x) to equal sigmoid(W_beta x) bit for bit
  the two matmuls must round alike, and XLA sums a [d, H] and a [d, H*V] product in different orders; so
  each beta column has a single nonzero weight, which makes W_beta x exact (x_j * s_h) in any order.
  """
  cfg = _cfg("carve", n_layers=1, impl=impl)
  carve = scramble(LM(cfg, rngs=nnx.Rngs(0)))
  gdn2 = LM(cfg.replace(mixer="gdn2"), rngs=nnx.Rngs(1))
  pc, pg = _params(carve), _params(gdn2)
  assert {p[-2:] for p in set(pc) ^ set(pg)} == {("beta_proj", "kernel"), ("mixer", "gamma"), ("w_proj", "kernel")}
  for p, v in pc.items():
    if p in pg:
      pg[p][...] = v[...]
  H, K, d = cfg.n_heads, cfg.head_k, cfg.d_model
  for i, (bc, bg) in enumerate(zip(carve.blocks, gdn2.blocks)):
    bc.mixer.gamma[...] = jnp.zeros((H,))
    rng = np.random.default_rng(i)
    w_beta = np.zeros((d, H), np.float32)
    w_beta[rng.integers(0, d, H), np.arange(H)] = 3.0 * rng.standard_normal(H)
    bc.mixer.beta_proj.kernel[...] = jnp.asarray(w_beta)
    bg.mixer.w_proj.kernel[...] = jnp.repeat(w_beta, K, axis=1)  # column h*V + v holds beta's column h
  tokens = _tokens()
  a, b = carve(tokens), gdn2(tokens)
  assert bool(jnp.all(a == b))
  # Not vacuous: a nonzero gamma moves CARVE away from GDN-2.
  for bc in carve.blocks:
    bc.mixer.gamma[...] = jnp.ones((H,))
  assert float(jnp.max(jnp.abs(carve(tokens) - b))) > 1e-3


# -- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_matches_parallel_forward(mixer):
  """Token-by-token decoding from an empty cache and from prefills of several lengths (mid-block,
  at a block boundary, shorter than a block) reproduce the parallel logits."""
  # Two layers for CARVE (the cache's per-layer plumbing is the same for every mixer), one elsewhere.
  model = scramble(LM(_cfg(mixer, n_layers=2 if mixer == "carve" else 1), rngs=nnx.Rngs(0)))
  tokens = _tokens()
  # CARVE: prefills short of, at and past a block boundary
  assert_decode_matches_forward(model, tokens, model(tokens), (5, 8, 13) if mixer == "carve" else (13,))


def assert_decode_matches_forward(model, tokens, ref, prefixes):
  """Token-by-token decoding of tokens [B, T] from an empty cache, and from a prefill of each length in
  `prefixes`, reproduces the parallel logits `ref` (and the cache counts the positions)."""
  B, T = tokens.shape
  cache = init_cache(model, B, max_len=T)
  outs = []
  for t in range(T):
    logits, cache = _decode(model, tokens[:, t], cache)
    outs.append(logits)
  assert int(cache["pos"]) == T
  assert rel_err(jnp.stack(outs, 1), ref) < TOL[jnp.float32].out
  for P in prefixes:
    logits, cache = _prefill(model, tokens[:, :P], max_len=T)
    assert int(cache["pos"]) == P
    assert rel_err(logits, ref[:, :P]) < TOL[jnp.float32].out
    outs = []
    for t in range(P, T):
      logits, cache = _decode(model, tokens[:, t], cache)
      outs.append(logits)
    assert rel_err(jnp.stack(outs, 1), ref[:, P:]) < TOL[jnp.float32].out, P


def test_cache_layout():
  model = LM(_cfg("carve"), rngs=nnx.Rngs(0))
  cfg = model.cfg
  cache = init_cache(model, 3)
  layer = cache["layers"][0]
  assert layer["state"].shape == (3, cfg.n_heads, cfg.head_k, cfg.head_k) and layer["state"].dtype == jnp.float32
  assert layer["content"].shape == (3, cfg.n_heads, cfg.head_k)
  assert layer["conv"]["q"].shape == (3, cfg.conv_size - 1, cfg.n_heads * cfg.head_k)
  attn = init_cache(LM(_cfg("attention"), rngs=nnx.Rngs(0)), 3, max_len=7)["layers"][0]
  assert attn["k"].shape == (3, 7, cfg.n_heads, cfg.head_k)
  assert "content" not in init_cache(LM(_cfg("gdn2"), rngs=nnx.Rngs(0)), 1)["layers"][0]
  with pytest.raises(ValueError, match="`batch_size`"):
    init_cache(model, 0)


def test_generate():
  model = scramble(LM(_cfg("carve"), rngs=nnx.Rngs(0)))
  prompt = _tokens()[:, :5]
  out = generate(model, prompt, 6, rng=jax.random.key(0), temperature=0.0)
  assert out.shape == (2, 11) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :5], prompt)
  # Greedy generation = argmax of the parallel forward over the generated sequence, position by position.
  np.testing.assert_array_equal(out[:, 5:], jnp.argmax(model(out)[:, 4:-1], -1))
  np.testing.assert_array_equal(generate(model, prompt, 0, rng=jax.random.key(0)), prompt)
  with pytest.raises(ValueError, match="`top_k`"):
    generate(model, prompt, 3, rng=jax.random.key(0), top_k=0)
  with pytest.raises(ValueError, match="`temperature`"):
    generate(model, prompt, 3, rng=jax.random.key(0), temperature=-1.0)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(LM(_cfg("attention", max_seq_len=8), rngs=nnx.Rngs(0)), prompt, 4, rng=jax.random.key(0))


def test_sampling_temperature_and_top_k():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
  greedy = jnp.argmax(logits, -1)
  np.testing.assert_array_equal(_sample(logits, jax.random.key(0), 0.0, None), greedy)
  np.testing.assert_array_equal(_sample(logits, jax.random.key(1), 1.0, 1), greedy)
  top3 = jax.lax.top_k(logits, 3)[1]
  for seed in range(5):
    tok = _sample(logits, jax.random.key(seed), 2.0, 3)
    assert bool(jnp.all(jnp.any(top3 == tok[:, None], axis=-1)))


# -- parameters -------------------------------------------------------------------------------------


def test_param_count_exact_and_abstract():
  cfg = _cfg("carve")
  model = LM(cfg, rngs=nnx.Rngs(0))
  counts = param_count(model)
  assert counts == param_count(abstract_model(cfg))
  actual = sum(int(np.prod(p[...].shape)) for p in _params(model).values())
  assert counts["total"] == actual == sum(v for k, v in counts.items() if k != "total")
  assert sum(param_breakdown(model).values()) == actual
  tied = param_count(abstract_model(cfg.replace(tie_embeddings=True)))
  assert "head" not in tied and tied["total"] == counts["total"] - cfg.vocab_size * cfg.d_model


def test_param_count_1p3b_carve_vs_gdn2():
  """At 1.3B, CARVE drops the d x H*V write projection per layer and adds the d x H beta projection
  and gamma [H]; counted on abstract models (nothing allocated)."""
  carve, gdn2 = (param_count(abstract_model(preset("1.3b", mixer=m))) for m in ("carve", "gdn2"))
  d, H, V, L = 2048, 16, 128, 24
  assert gdn2["total"] - carve["total"] == L * (d * H * V - d * H - H)
  assert carve["mlp"] == gdn2["mlp"] and carve["embed"] == gdn2["embed"]
  b = param_breakdown(abstract_model(preset("1.3b", mixer="carve")))
  assert b["mixer.gamma"] == L * H and b["mixer.beta_proj"] == L * d * H and "mixer.w_proj" not in b


def test_remat_wraps_blocks_without_changing_the_function():
  """remat=True puts each block under jax.checkpoint (seen in the gradient's jaxpr, no compile needed)
  and leaves the forward unchanged."""
  cfg = _cfg("gdn", n_layers=1, impl="recurrent")
  tokens = _tokens()[:, :6]
  m1 = scramble(LM(cfg, rngs=nnx.Rngs(0)))
  m2 = LM(cfg.replace(remat=True), rngs=nnx.Rngs(0))
  for p, v in _params(m1).items():
    _params(m2)[p][...] = v[...]
  np.testing.assert_array_equal(m2(tokens), m1(tokens))
  graphdef, state = nnx.split(m2)
  loss = lambda st: jnp.mean(nnx.merge(graphdef, st)(tokens) ** 2)
  assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(state))  # jax.checkpoint's primitive is remat2
  graphdef, state = nnx.split(m1)
  assert "remat" not in str(jax.make_jaxpr(jax.grad(loss))(state))
