"""Hugging Face / FLA interop (`carve_jax.interop`): round trips, FLA's layout, bad input, the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from carve_jax.configs import preset
from carve_jax.interop.fla_layout import InteropError, fla_config, model_config, tensor_specs, to_fla_tensors
from carve_jax.interop.hf_folder import load_hf, read_tensors, save_hf
from carve_jax.model import LM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXERS = {"gdn2": {}, "kda": {}, "gdn": {"output_gate": "full_swish"}, "carve": {}}


def _model(mixer, seed=0, **over):
  cfg = preset("tiny", mixer=mixer, impl="chunk", **{**MIXERS[mixer], **over})
  model = LM(cfg, rngs=nnx.Rngs(seed))
  # Perturb every 1-D parameter (norm weights, biases, gamma) so a swapped or dropped tensor shows.
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) if x.ndim == 1 else x, params)
  return nnx.merge(graphdef, params)


def _params(model):
  return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tokens(T=24):
  return jax.random.randint(jax.random.key(7), (2, T), 0, 256)


_FWD = {}


def _logits(model):
  """model(tokens), jitted once per model structure (eager chunk forwards are slow on CPU)."""
  graphdef, state = nnx.split(model)
  if graphdef not in _FWD:
    _FWD[graphdef] = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return np.asarray(_FWD[graphdef](state, _tokens()))


def _assert_same(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))
  np.testing.assert_array_equal(_logits(a), _logits(b))


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_folder_round_trip_is_exact(mixer, tmp_path):
  model = _model(mixer)
  out = save_hf(model, tmp_path / "hf", tokenizer="byte", eos_id=0, step=5)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  back, conf = load_hf(out)
  assert back.cfg == model.cfg
  assert conf["carve_jax"]["step"] == 5 and conf["carve_jax"]["tokenizer"] == "byte"
  _assert_same(model, back)


def test_tied_embeddings_round_trip_has_no_lm_head(tmp_path):
  model = _model("kda", tie_embeddings=True)
  out = save_hf(model, tmp_path / "hf")
  assert "lm_head.weight" not in read_tensors(out)
  assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
  _assert_same(model, load_hf(out)[0])


def test_fla_names_and_shapes_of_kda_and_gdn():
  """FLA 0.6.0's KimiDeltaAttention / GatedDeltaNet parameters, written out from its source."""
  d, H, K, W = 64, 2, 32, 4
  kda = {k: v for k, v in tensor_specs(preset("tiny", mixer="kda", n_layers=1)).items() if ".attn." in k}
  assert kda == {f"model.layers.0.attn.{k}": v for k, v in {
      "q_proj.weight": (H * K, d), "k_proj.weight": (H * K, d), "v_proj.weight": (H * K, d),
      "q_conv1d.weight": (H * K, 1, W), "k_conv1d.weight": (H * K, 1, W), "v_conv1d.weight": (H * K, 1, W),
      "f_proj.0.weight": (K, d), "f_proj.1.weight": (H * K, K), "b_proj.weight": (H, d), "A_log": (H,),
      "dt_bias": (H * K,), "g_proj.0.weight": (K, d), "g_proj.1.weight": (H * K, K), "g_proj.1.bias": (H * K,),
      "o_norm.weight": (K,), "o_proj.weight": (d, H * K)}.items()}
  gdn = {k[len("model.layers.0.attn."):]: v for k, v in
         tensor_specs(preset("tiny", mixer="gdn", n_layers=1, output_gate="full_swish")).items() if ".attn." in k}
  assert {k: gdn[k] for k in ("a_proj.weight", "b_proj.weight", "A_log", "dt_bias", "g_proj.weight")} == {
      "a_proj.weight": (H, d), "b_proj.weight": (H, d), "A_log": (H,), "dt_bias": (H,), "g_proj.weight": (H * K, d)}
  gdn2 = tensor_specs(preset("tiny", mixer="gdn2", n_layers=1))
  assert gdn2["model.layers.0.attn.b_proj.weight"] == (H * K, d)
  assert gdn2["model.layers.0.attn.w_proj.weight"] == (H * K, d)
  carve = tensor_specs(preset("tiny", mixer="carve", n_layers=1))
  assert carve["model.layers.0.attn.beta_proj.weight"] == (H, d) and carve["model.layers.0.attn.gamma"] == (H,)
  assert "model.layers.0.attn.w_proj.weight" not in carve


def test_exported_conv_weight_is_torch_conv1d_layout():
  """FLA's ShortConvolution is nn.Conv1d(groups=D, padding=W-1) cut to the first T outputs:
  y[t, c] = sum_w weight[c, 0, w] * x[t + w - (W-1), c]. Our exported weight must give our conv."""
  model = _model("kda")
  conv = model.blocks[0].mixer.q_conv
  w = to_fla_tensors(model)["model.layers.0.attn.q_conv1d.weight"]  # [D, 1, W]
  x = np.asarray(jax.random.normal(jax.random.key(1), (1, 12, w.shape[0])), np.float64)
  Wd = w.shape[-1]
  xp = np.concatenate([np.zeros((1, Wd - 1, w.shape[0])), x], axis=1)
  y = sum(w[None, None, :, 0, i] * xp[:, i:i + 12] for i in range(Wd))
  want = y / (1 + np.exp(-y))  # silu
  got, _ = conv(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["full_swish", "full_sigmoid"])
def test_full_output_gate_is_flas_gated_deltanet_gate(act):
  """output_gate full_*: y = W_o [ rmsnorm(o) * act(W_g x) ], W_g one d x HV matrix, no bias."""
  model = _model("gdn", output_gate=act)
  mix = model.blocks[0].mixer
  x = jax.random.normal(jax.random.key(2), (1, 5, 64))
  o = jax.random.normal(jax.random.key(3), (1, 5, 2, 32))
  z = np.asarray(x @ mix.g_proj.kernel[...]).reshape(1, 5, 2, 32)
  o64 = np.asarray(o, np.float64)
  n = o64 / np.sqrt(np.mean(o64 ** 2, -1, keepdims=True) + 1e-6) * np.asarray(mix.o_norm.weight[...])
  s = 1 / (1 + np.exp(-z))
  want = (n * (z * s if act == "full_swish" else s)).reshape(1, 5, 64) @ np.asarray(mix.o_proj.kernel[...])
  np.testing.assert_allclose(np.asarray(mix.project_output(x, o)), want, rtol=1e-4, atol=1e-5)


# -- bad input ----------------------------------------------------------------------------------------


def _folder(tmp_path, mixer="kda"):
  return save_hf(_model(mixer), tmp_path / "hf")


def _rewrite(path, tensors=None, conf=None):
  if tensors is not None:
    os.remove(os.path.join(path, "model.safetensors"))
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  if conf is not None:
    with open(os.path.join(path, "config.json"), "w") as fh:
      json.dump(conf, fh)


def test_missing_tensor_is_named(tmp_path):
  path = _folder(tmp_path)
  t = read_tensors(path)
  del t["model.layers.1.attn.dt_bias"]
  _rewrite(path, tensors=t)
  with pytest.raises(InteropError, match=r"missing tensor `model\.layers\.1\.attn\.dt_bias` \(shape \[64\]\)"):
    load_hf(path)


def test_wrong_shape_is_named(tmp_path):
  path = _folder(tmp_path)
  t = read_tensors(path)
  t["model.layers.0.attn.q_conv1d.weight"] = np.zeros((64, 4), np.float32)
  _rewrite(path, tensors=t)
  with pytest.raises(InteropError, match=r"`model\.layers\.0\.attn\.q_conv1d\.weight` has shape \[64, 4\], .*"
                                         r"needs \[64, 1, 4\]"):
    load_hf(path)


def test_unexpected_tensor_is_named(tmp_path):
  path = _folder(tmp_path)
  t = read_tensors(path)
  t["model.layers.0.attn.w_proj.weight"] = np.zeros((64, 64), np.float32)  # GDN-2's, not KDA's
  _rewrite(path, tensors=t)
  with pytest.raises(InteropError, match=r"model\.layers\.0\.attn\.w_proj\.weight.*not part of a kda model"):
    load_hf(path)


def test_bfloat16_tensors_are_read(tmp_path):
  import ml_dtypes
  model = _model("gdn2")
  path = save_hf(model, tmp_path / "hf")
  t = {k: v.astype(ml_dtypes.bfloat16) for k, v in read_tensors(path).items()}
  _rewrite(path, tensors=t)  # safetensors.numpy writes ml_dtypes' bfloat16 as BF16
  with open(os.path.join(path, "model.safetensors"), "rb") as fh:
    assert b'"BF16"' in fh.read(4096)
  back, _ = load_hf(path)
  p = _params(back)[("blocks", 0, "mixer", "q_proj", "kernel")]
  np.testing.assert_array_equal(p, t["model.layers.0.attn.q_proj.weight"].astype(np.float32).T)


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "llama", r"unknown model_type 'llama'"),
    ("expand_v", 2.0, r"key `expand_v` must be 1"),
    ("num_heads", 4, r"key `num_heads` must be hidden_size / head_dim"),
    ("attn", {"layers": [1]}, r"key `attn` must be null"),
    ("hidden_size", "64", r"key `hidden_size` must be a positive int"),
    ("safe_gate", True, r"key `safe_gate` must be false"),
])
def test_bad_config_is_named(tmp_path, key, value, match):
  path = _folder(tmp_path)
  conf = json.load(open(os.path.join(path, "config.json")))
  conf[key] = value
  _rewrite(path, conf=conf)
  with pytest.raises(InteropError, match=match):
    load_hf(path)


def test_fla_config_defaults_are_flas(tmp_path):
  """A minimal FLA config (keys absent -> FLA's defaults): GatedDeltaNet's expand_v default is 2."""
  conf = {"model_type": "kda", "hidden_size": 64, "num_heads": 2, "head_dim": 32, "num_hidden_layers": 1,
          "vocab_size": 256}
  cfg = model_config(conf)
  assert (cfg.mixer, cfg.mlp_dim, cfg.conv_size, cfg.norm_eps, cfg.tie_embeddings) == ("kda", 256, 4, 1e-6, False)
  with pytest.raises(InteropError, match="expand_v"):
    model_config({**conf, "model_type": "gated_deltanet"})
  assert model_config({**conf, "model_type": "gated_deltanet", "expand_v": 1}).output_gate == "full_swish"


def test_export_refusals(tmp_path):
  with pytest.raises(InteropError, match="output_gate='lowrank_sigmoid' has no FLA layout"):
    fla_config(preset("tiny", mixer="gdn"))
  with pytest.raises(InteropError, match="no FLA layout; supported mixers"):
    fla_config(preset("tiny", mixer="attention"))
  with pytest.raises(InteropError, match="gate_rank"):
    fla_config(preset("tiny", mixer="kda", gate_rank=8))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep me")
  with pytest.raises(InteropError, match="already exists and is not empty"):
    save_hf(_model("kda"), tmp_path / "full")
  assert (tmp_path / "full" / "x").read_text() == "keep me"


# -- the CLIs through Orbax checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["carve", "gdn"])
def test_cli_round_trip_through_checkpoints(mixer, tmp_path, capsys):
  from carve_jax.interop.cli import export_main, import_main, write_checkpoint
  from carve_jax.train.eval import load_trained
  model = _model(mixer)
  ckpt = write_checkpoint(model, str(tmp_path / "run"), tokenizer="byte", step=3)
  assert export_main(["--ckpt_dir", ckpt, "--out", str(tmp_path / "hf")]) == 0
  assert import_main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "imp")]) == 0
  cfg, back, step = load_trained(str(tmp_path / "imp" / "checkpoints"))
  assert step == 3 and cfg.data.tokenizer == "byte" and cfg.model == model.cfg
  _assert_same(model, back)
  with pytest.raises(SystemExit):  # never writes over an existing import
    import_main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "imp")])
  assert "already exists and is not empty" in capsys.readouterr().err


def test_fla_check_script_export_only_and_bad_args(tmp_path):
  script = ["-m", "experiments.interop_fla_check"]  # run from the repository root
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "check.md"
  r = subprocess.run([sys.executable, *script, "--export_only", "--d_model", "64", "--n_heads", "2", "--n_layers",
                      "1", "--lengths", "8", "--models", "gdn2,gdn", "--out", str(out)], env=env, capture_output=True,
                     text=True, timeout=240, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  text = out.read_text()
  for mixer in ("gdn2", "gdn"):
    assert f"| {mixer} | 8 | ours bf16 |" in text
  r = subprocess.run([sys.executable, *script, "--models", "gdn2,mamba", "--export_only"], env=env,
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 2 and "--models must be a non-empty comma list" in r.stderr
