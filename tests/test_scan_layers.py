"""Scan over layers and rematerialisation policies (issue 12): the stacked model computes the unrolled
model's function (logits, gradients, decoding, generation) on the same parameters; layouts convert both
ways; checkpoints of one layout are refused by a run of the other with a message naming the field;
every remat policy leaves the function and its gradients unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax.configs import ModelConfig, preset
from carve_jax.model import (LM, convert_blocks, convert_layout, decode_step, generate, init_cache, param_count,
                             prefill, remat_policy)
from conftest import TOL, rel_err
from test_model import scramble

T, G = 12, 4


def _cfg(mixer, **kw):
  return preset("tiny", **{**dict(mixer=mixer, impl="chunk", content_block=G, chunk_size=G, n_layers=3), **kw})


def _tokens(B=2, seed=1, T=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


def _loss(model, tokens):
  logits = model(tokens)
  lp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))


def _grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(jax.jit(jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), tokens)))(params))


@pytest.mark.parametrize("mixer", ["carve", "attention"])
def test_scanned_equals_unrolled_logits_and_gradients(mixer):
  unrolled = scramble(LM(_cfg(mixer), rngs=nnx.Rngs(0)))
  scanned = convert_layout(unrolled, scan_layers=True)
  assert scanned.cfg.scan_layers and not isinstance(scanned.blocks, nnx.List)
  assert scanned.blocks.mlp.up_proj.kernel[...].shape[0] == 3
  tokens = _tokens()
  a, b = nnx.jit(lambda m: m(tokens))(unrolled), nnx.jit(lambda m: m(tokens))(scanned)
  assert rel_err(b, a) < TOL[jnp.float32].rounding
  ga, gb = _grads(unrolled, tokens), _grads(scanned, tokens)
  ga["blocks"] = convert_blocks(ga["blocks"], 3, scan_layers=True)
  assert rel_err(gb, ga) < TOL[jnp.float32].grad
  # Not vacuous: the layers differ, so stacking them in another order changes the logits.
  swapped = convert_layout(unrolled, scan_layers=True)
  p = swapped.blocks.mlp.up_proj.kernel
  p[...] = p[...][::-1]
  assert rel_err(swapped(tokens), a) > 1e-3
  # Back to one module per layer: the same parameters exactly.
  back = convert_layout(scanned, scan_layers=False)
  for x, y in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(unrolled))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert param_count(scanned) == param_count(unrolled)


def test_convert_blocks_bad_input():
  with pytest.raises(ValueError, match="`blocks`"):
    convert_blocks({0: {"w": jnp.zeros(2)}, 2: {"w": jnp.zeros(2)}}, 2, scan_layers=True)
  with pytest.raises(ValueError, match="`blocks`"):
    convert_blocks({"w": jnp.zeros((3, 2))}, 2, scan_layers=False)


@pytest.mark.parametrize("mixer", ["carve", "attention"])
def test_scanned_decode_and_generate(mixer):
  """The stacked cache: decoding token by token and from a prefill reproduces the parallel logits;
  greedy generation equals the unrolled model's."""
  unrolled = scramble(LM(_cfg(mixer, n_layers=2), rngs=nnx.Rngs(0)))
  model = convert_layout(unrolled, scan_layers=True)
  tokens = _tokens()
  ref = model(tokens)
  cache = init_cache(model, 2, max_len=T)
  assert jax.tree.leaves(cache["layers"])[0].shape[0] == 2  # one stacked dict, leading n_layers
  step = nnx.jit(decode_step)
  P = 6  # mid content block for CARVE (G = 4)
  logits, cache = nnx.jit(prefill, static_argnames="max_len")(model, tokens[:, :P], max_len=T)
  assert rel_err(logits, ref[:, :P]) < TOL[jnp.float32].out
  outs = []
  for t in range(P, T):
    logits, cache = step(model, tokens[:, t], cache)
    outs.append(logits)
  assert int(cache["pos"]) == T and rel_err(jnp.stack(outs, 1), ref[:, P:]) < TOL[jnp.float32].out
  prompt = tokens[:, :4]
  np.testing.assert_array_equal(generate(model, prompt, 5, rng=jax.random.key(0), temperature=0.0),
                                generate(unrolled, prompt, 5, rng=jax.random.key(0), temperature=0.0))


@pytest.mark.parametrize("scan, policies", [(False, ("save_mixer_outputs", "save_dots_and_mixer")),
                                             (True, ("dots_saveable", "save_mixer_outputs", "save_dots_and_mixer"))])
def test_remat_policies_keep_the_function_and_gradients(scan, policies):
  base = convert_layout(scramble(LM(_cfg("gdn", n_layers=2, impl="recurrent"), rngs=nnx.Rngs(0))), scan_layers=scan)
  tokens = _tokens(T=8)

  def value_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest), tokens))
    return jax.make_jaxpr(f)(params), jax.jit(f)(params)

  _, (ref_l, ref_g) = value_and_grads(base)
  assert "remat" not in str(_)
  for policy in policies:
    model = nnx.merge(nnx.split(abstract_like(base.cfg.replace(remat_policy=policy)))[0], nnx.state(base))
    assert model.cfg.remat_policy == policy
    jaxpr, (l, g) = value_and_grads(model)
    assert "remat" in str(jaxpr), policy  # jax.checkpoint's primitive is remat2
    tol = TOL[jnp.float32]
    assert abs(float(l) - float(ref_l)) < tol.rounding and rel_err(g, ref_g) < tol.grad, policy


def abstract_like(cfg):
  return nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))


def test_save_mixer_outputs_keeps_the_kernel_forward_out_of_the_recompute():
  """With policy "save_mixer_outputs" the recurrence kernel runs once forward (its outputs saved); with
  "full" it runs again in the backward (nothing of it saved). Read from JAX's own residual report."""
  from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
  cfg = _cfg("gdn2", n_layers=1, impl="pallas", content_block=16, chunk_size=16)
  model = LM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(T=16)

  def saved(policy):
    m = nnx.merge(nnx.split(abstract_like(cfg.replace(remat_policy=policy)))[0], nnx.state(model))
    g, p, r = nnx.split(m, nnx.Param, ...)
    res = saved_residuals(lambda p: _loss(nnx.merge(g, p, r), tokens), p)
    return [why for _, why in res]

  full, mix, none = saved("full"), saved("save_mixer_outputs"), saved("none")
  dots, both = saved("dots_saveable"), saved("save_dots_and_mixer")
  assert not any("pallas" in w for w in full)
  assert any("pallas" in w for w in mix)
  assert any("mixer_out" in w for w in mix)
  assert len(full) < len(mix) < len(none)
  # "save_dots_and_mixer": the kernel's outputs and the matmuls' outputs, the elementwise work recomputed
  assert not any("pallas" in w for w in dots) and any("pallas" in w for w in both)
  # (the mixer's output projection is saved under its checkpoint_name)
  assert sum("dot_general" in w or "mixer_out" in w for w in both) >= sum("dot_general" in w for w in dots) > 0
  assert len(mix) < len(both) < len(none)


def test_config_remat_and_scan_fields():
  assert ModelConfig(remat=True).remat_mode == "full"
  assert ModelConfig(remat_policy="dots_saveable").remat_mode == "dots_saveable"
  assert ModelConfig().remat_mode == "none" and remat_policy(ModelConfig()) == (False, None)
  assert remat_policy(ModelConfig(remat=True)) == (True, None)
  with pytest.raises(ValueError, match="`remat_policy`"):
    ModelConfig(remat_policy="some")
  with pytest.raises(ValueError, match="`remat`"):
    ModelConfig(remat=True, remat_policy="dots_saveable")
  with pytest.raises(ValueError, match="`scan_layers`"):
    ModelConfig(scan_layers=1)
  assert preset("50m").scan_layers and preset("1.3b").scan_layers and not preset("tiny").scan_layers


def test_checkpoint_of_the_other_layout_is_refused_by_name(tmp_path):
  """A run with scan_layers=True refuses an unrolled run's checkpoint (and the reverse) naming the field;
  a checkpoint written before the field existed resumes (absent = the default)."""
  from carve_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, abstract_like as abstract
  from carve_jax.train.config import TrainConfig, identity_diff
  cfg = TrainConfig(model=_cfg("gdn", n_layers=2))
  state = {"params": {"w": jnp.ones(3)}}

  ck = Checkpointer(tmp_path, config=cfg.to_dict(), every=1, async_save=False)
  from carve_jax.train.step import TrainState
  ts = TrainState(step=jnp.zeros((), jnp.int32), params=state["params"], opt_state=(), rng=jnp.zeros(2, jnp.uint32),
                  skipped=jnp.zeros((), jnp.int32))
  ck.save(1, ts, {"i": 1}, force=True)
  ck.close()
  other = cfg.replace(model=cfg.model.replace(scan_layers=True))
  ck = Checkpointer(tmp_path, config=other.to_dict(), every=1)
  with pytest.raises(CheckpointMismatchError, match=r"model\.scan_layers: checkpoint has False, this run has True"):
    ck.restore(abstract(ts), 1)
  ck.close()
  old = cfg.to_dict()
  del old["model"]["scan_layers"], old["model"]["remat_policy"]
  assert identity_diff(old, cfg.to_dict()) == []
  assert identity_diff(old, other.to_dict()) == ["model.scan_layers: checkpoint has False, this run has True"]


def test_both_layouts_start_from_the_same_parameters():
  cfg = _cfg("carve")
  scanned = LM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))
  stacked = convert_layout(LM(cfg, rngs=nnx.Rngs(3)), scan_layers=True)
  for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(stacked))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
