"""Hybrid layer stacks (issue 13, `ModelConfig.layer_pattern`): validated patterns, a one-mixer pattern is
the plain model bit for bit, decoding a hybrid reproduces its parallel forward in both layouts, the
scanned hybrid computes the unrolled one's function, parameter counts per mixer kind, the CLI flag."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax.configs import ModelConfig, preset
from carve_jax.model import LM, convert_layout, decode_step, init_cache, mixer_param_count, param_count, prefill
from conftest import TOL, rel_err
from test_model import scramble

T, G = 12, 4


def _cfg(**kw):
  return preset("tiny", **{**dict(impl="chunk", content_block=G, chunk_size=G, n_layers=4,
                                  layer_pattern=("carve", "attention")), **kw})


def _tokens(B=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


@pytest.mark.parametrize("kw, match", [
    (dict(layer_pattern=("carve", "mamba")), "unknown"),
    (dict(layer_pattern=("carve", "carve", "attention"), n_layers=4), "divides n_layers=4"),
    (dict(layer_pattern=()), "non-empty"),
    (dict(layer_pattern="carve"), "non-empty"),
    (dict(layer_pattern=("gdn2", "carve"), content_block=64, chunk_size=48), "`chunk_size`"),
])
def test_bad_patterns_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**kw)


def test_pattern_repeats_and_presets():
  cfg = ModelConfig(n_layers=6, layer_pattern=("gdn2", "gdn2", "attention"))
  assert cfg.layer_mixers == ("gdn2", "gdn2", "attention") * 2 and cfg.mixer_kinds == ("gdn2", "attention")
  assert ModelConfig(n_layers=2, layer_pattern=["kda", "gdn"]).layer_pattern == ("kda", "gdn")
  for name in ("carve-hybrid-50m", "gdn2-hybrid-50m", "carve-hybrid-1.3b", "gdn2-hybrid-1.3b"):
    p = preset(name)
    assert p.layer_mixers.count("attention") * 4 == p.n_layers and p.scan_layers


def test_one_mixer_pattern_is_the_plain_model_bit_for_bit():
  tokens = _tokens()
  plain = LM(_cfg(mixer="gdn2", layer_pattern=None, n_layers=2), rngs=nnx.Rngs(0))
  for pattern, scan in ((("gdn2",), False), (("gdn2", "gdn2"), False), (("gdn2",), True)):
    hybrid = LM(_cfg(mixer="carve", layer_pattern=pattern, scan_layers=scan, n_layers=2), rngs=nnx.Rngs(0))
    ref = plain if not scan else convert_layout(plain, scan_layers=True)
    np.testing.assert_array_equal(np.asarray(hybrid(tokens)), np.asarray(ref(tokens)))


@pytest.mark.parametrize("scan", [False, True])
def test_hybrid_decode_matches_parallel_and_layouts_agree(scan):
  unrolled = scramble(LM(_cfg(), rngs=nnx.Rngs(0)))
  model = convert_layout(unrolled, scan_layers=scan)
  tokens = _tokens()
  ref = unrolled(tokens)
  assert rel_err(model(tokens), ref) < TOL[jnp.float32].rounding
  cache = init_cache(model, 2, max_len=T)
  P = 5
  logits, cache = nnx.jit(prefill, static_argnames="max_len")(model, tokens[:, :P], max_len=T)
  assert rel_err(logits, ref[:, :P]) < TOL[jnp.float32].out
  step = nnx.jit(decode_step)
  outs = []
  for t in range(P, T):
    logits, cache = step(model, tokens[:, t], cache)
    outs.append(logits)
  assert rel_err(jnp.stack(outs, 1), ref[:, P:]) < TOL[jnp.float32].out
  if scan:  # one stacked cache per position of the pattern: CARVE's state, attention's KV
    assert len(cache["layers"]) == 2 and "state" in cache["layers"][0] and "k" in cache["layers"][1]
    assert cache["layers"][1]["k"].shape[:2] == (2, 2)  # [repeats, B, ...]


def test_param_count_by_mixer_kind():
  cfg = _cfg()
  u, s = LM(cfg, rngs=nnx.Rngs(0)), LM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
  by = mixer_param_count(u)
  assert by == mixer_param_count(s) and set(by) == {"carve", "attention"}
  assert sum(by.values()) == param_count(u)["mixer"] == param_count(s)["mixer"]
  d = cfg.d_model
  assert by["attention"] == 2 * 4 * d * d  # two attention layers, q/k/v/o projections


def test_layer_pattern_flag():
  from carve_jax.train.flags import parse_train_args
  cfg = parse_train_args(["--preset", "tiny", "--layer_pattern", "carve,carve,carve,attention", "--n_layers", "8"])
  assert cfg.model.layer_pattern == ("carve", "carve", "carve", "attention")
  assert parse_train_args(["--preset", "carve-hybrid-50m", "--layer_pattern", "none"]).model.layer_pattern is None
