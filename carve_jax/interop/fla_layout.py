r"""flash-linear-attention 0.6.0's Hugging Face layout of a delta-rule LM, both ways.

A carve_jax `LM` with a delta mixer is, tensor for tensor, an FLA `*ForCausalLM` (docs/INTEROP.md):

    ours (nnx path)                         FLA tensor name                           transform
    embed.embedding          [V, d]         model.embeddings.weight       [V, d]      copy
    blocks.i.mixer_norm.weight              model.layers.i.attn_norm.weight           copy
    blocks.i.mixer.q_proj.kernel [d, HK]    model.layers.i.attn.q_proj.weight [HK, d] transpose (every Linear)
    blocks.i.mixer.q_conv.weight [W, HK]    model.layers.i.attn.q_conv1d.weight [HK, 1, W]
    blocks.i.mixer.f_proj1 / f_proj2        ...attn.f_proj.0 / f_proj.1               (KDA, GDN-2, CARVE)
    blocks.i.mixer.g_proj1 / g_proj2        ...attn.g_proj.0 / g_proj.1 (+ .bias)     (output_gate lowrank_sigmoid)
    blocks.i.mixer.g_proj                   ...attn.g_proj                            (GDN, output_gate full_*)
    blocks.i.mixer.beta_proj [d, H]         ...attn.b_proj (KDA, GDN) | attn.beta_proj (CARVE)
    blocks.i.mixer.b_proj [d, HK]           ...attn.b_proj (GDN-2 / CARVE erase gate)
    blocks.i.mixer.{a_proj,w_proj,o_proj}   ...attn.{a_proj,w_proj,o_proj}
    blocks.i.mixer.{A_log,dt_bias,gamma}    ...attn.{A_log,dt_bias,gamma}             copy
    blocks.i.mixer.o_norm.weight            ...attn.o_norm.weight
    blocks.i.mlp.{gate,up,down}_proj        model.layers.i.mlp.{gate,up,down}_proj
    blocks.i.mlp_norm.weight, norm.weight   model.layers.i.mlp_norm.weight, model.norm.weight
    head.kernel [d, V]                      lm_head.weight [V, d]  (absent when tie_word_embeddings)

`model_type`: "gated_deltanet" and "kda" are FLA's own classes; "gdn2" (FLA 0.6.0 has the
`GatedDeltaNet2` layer but no model class) is the KDA model with `attn = GatedDeltaNet2`; "carve"
is the gdn2 layout plus `attn.beta_proj.weight` [H, d] and `attn.gamma` [H] and the config keys
`content_block`, `content_grad`. Every config also carries a "carve_jax" entry (our ModelConfig,
tokenizer, step) so that fields FLA has no name for (chunk_size, compute_dtype, ...) round-trip.

Bad input raises `InteropError` naming the config key or tensor, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.model import LM

MODEL_TYPES = {"gdn": "gated_deltanet", "kda": "kda", "gdn2": "gdn2", "carve": "carve"}
MIXER_OF = {v: k for k, v in MODEL_TYPES.items()}
ARCHITECTURES = {"gated_deltanet": "GatedDeltaNetForCausalLM", "kda": "KDAForCausalLM",
                 "gdn2": "GDN2ForCausalLM", "carve": "CarveForCausalLM"}
# ModelConfig fields that change how the function is computed (or how it is trained), not which
# function: taken from the "carve_jax" entry on import when present.
HOW_FIELDS = ("chunk_size", "compute_dtype", "impl", "remat", "init_std", "rope_theta")


class InteropError(ValueError):
  """A Hugging Face folder, config or tensor that carve_jax cannot read or write as asked."""


# -- config -----------------------------------------------------------------------------------------


def fla_config(cfg: ModelConfig, *, tokenizer: str | None = None, eos_id: int | None = None,
               step: int | None = None) -> dict:
  """The config.json dict of `cfg` in FLA 0.6.0's layout (+ the "carve_jax" entry)."""
  if cfg.mixer not in MODEL_TYPES:
    raise InteropError(f"export: model mixer {cfg.mixer!r} has no FLA layout; supported mixers: "
                       f"{tuple(MODEL_TYPES)}")
  if cfg.rank != cfg.head_k:
    raise InteropError(f"export: ModelConfig.gate_rank={cfg.gate_rank} differs from head_dim={cfg.head_k}; "
                       "FLA's low-rank decay / gate projections have rank head_v_dim = head_dim")
  model_type = MODEL_TYPES[cfg.mixer]
  if model_type == "gated_deltanet" and cfg.output_gate == "lowrank_sigmoid":
    raise InteropError("export: a Gated DeltaNet with ModelConfig.output_gate='lowrank_sigmoid' has no FLA "
                       "layout (FLA's GatedDeltaNet gate is one d x HV projection without bias); train it with "
                       "--output_gate full_swish (FLA's default) or full_sigmoid")
  if model_type != "gated_deltanet" and cfg.output_gate != "lowrank_sigmoid":
    raise InteropError(f"export: model_type {model_type!r} uses FLA's low-rank sigmoid output gate; "
                       f"ModelConfig.output_gate must be 'lowrank_sigmoid', got {cfg.output_gate!r}")
  eos = 0 if eos_id is None else int(eos_id)
  out: dict[str, Any] = {
      "model_type": model_type, "architectures": [ARCHITECTURES[model_type]], "attn_mode": "chunk",
      "hidden_size": cfg.d_model, "expand_v": 1.0, "use_short_conv": True, "allow_neg_eigval": False,
      "conv_size": cfg.conv_size, "head_dim": cfg.head_k, "num_heads": cfg.n_heads, "num_v_heads": None,
      "max_position_embeddings": cfg.max_seq_len, "hidden_ratio": 4, "intermediate_size": cfg.mlp_dim,
      "hidden_act": "swish", "num_hidden_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "attn": None,
      "use_cache": True, "pad_token_id": None, "bos_token_id": eos, "eos_token_id": eos,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "fuse_norm": True,
      "fuse_swiglu": True, "fuse_cross_entropy": True, "use_l2warp": False, "vocab_size": cfg.vocab_size,
      "attnres_block_size": None, "torch_dtype": "float32",
  }
  if model_type == "gated_deltanet":
    out.update(use_gate=True, fuse_linear_cross_entropy=False,
               output_gate_activation="swish" if cfg.output_gate == "full_swish" else "sigmoid")
  else:
    out.update(safe_gate=False, lower_bound=None)
  if model_type == "carve":
    out.update(content_block=cfg.content_block, content_grad=cfg.content_grad)
  out["carve_jax"] = {"model_config": dataclasses.asdict(cfg), "tokenizer": tokenizer, "step": step}
  return out


def _get(conf: dict, key: str, default):
  """conf[key], or FLA's default when the key is absent or null."""
  return default if conf.get(key) is None else conf[key]


def _require(conf: dict, key: str, ok: bool, expected: str) -> None:
  if not ok:
    raise InteropError(f"config.json: key `{key}` must be {expected} for carve_jax, got {conf.get(key)!r}")


def model_config(conf: dict) -> ModelConfig:
  """The ModelConfig computing the function of an FLA config dict (see `fla_config`)."""
  if not isinstance(conf, dict):
    raise InteropError(f"config.json: expected a JSON object, got {type(conf).__name__}")
  mt = conf.get("model_type")
  if mt not in MIXER_OF:
    raise InteropError(f"config.json: unknown model_type {mt!r}; carve_jax reads {tuple(MIXER_OF)}")
  for key in ("hidden_size", "num_heads", "head_dim", "num_hidden_layers", "vocab_size"):
    v = conf.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise InteropError(f"config.json: key `{key}` must be a positive int, got {v!r}")
  d, H, K = conf["hidden_size"], conf["num_heads"], conf["head_dim"]
  default_expand = 2.0 if mt == "gated_deltanet" else 1.0  # FLA's defaults
  _require(conf, "expand_v", float(_get(conf, "expand_v", default_expand)) == 1.0,
           "1 (carve_jax's value head width equals head_dim)")
  _require(conf, "num_v_heads", conf.get("num_v_heads") in (None, H), f"null or num_heads={H}")
  _require(conf, "num_heads", H * K == d, f"hidden_size / head_dim = {d} / {K} (carve_jax needs "
           "num_heads * head_dim == hidden_size)")
  _require(conf, "attn", conf.get("attn") is None, "null (hybrid attention layers are not supported)")
  _require(conf, "attnres_block_size", conf.get("attnres_block_size") is None, "null")
  _require(conf, "use_short_conv", _get(conf, "use_short_conv", True) is True, "true")
  _require(conf, "allow_neg_eigval", _get(conf, "allow_neg_eigval", False) is False, "false")
  _require(conf, "hidden_act", _get(conf, "hidden_act", "swish") == "swish", "'swish'")
  if mt != "gated_deltanet":
    _require(conf, "safe_gate", _get(conf, "safe_gate", False) is False, "false")
    _require(conf, "lower_bound", conf.get("lower_bound") is None, "null")
  inter = conf.get("intermediate_size")
  if inter is None:  # FLA's GatedMLP rule
    inter = int(d * _get(conf, "hidden_ratio", 4) * 2 / 3)
    inter = 256 * ((inter + 255) // 256)
  kw: dict[str, Any] = dict(
      mixer=MIXER_OF[mt], vocab_size=conf["vocab_size"], d_model=d, n_layers=conf["num_hidden_layers"],
      n_heads=H, head_dim=None if K == d // H else K, conv_size=_get(conf, "conv_size", 4), mlp_hidden=inter,
      gate_rank=None, tie_embeddings=bool(_get(conf, "tie_word_embeddings", False)),
      norm_eps=float(_get(conf, "norm_eps", 1e-6)), init_std=float(_get(conf, "initializer_range", 0.02)),
      max_seq_len=int(_get(conf, "max_position_embeddings", 2048)))
  if mt == "gated_deltanet":
    _require(conf, "use_gate", _get(conf, "use_gate", True) is True, "true")
    act = _get(conf, "output_gate_activation", "swish")
    _require(conf, "output_gate_activation", act in ("swish", "silu", "sigmoid"), "'swish', 'silu' or 'sigmoid'")
    kw["output_gate"] = "full_sigmoid" if act == "sigmoid" else "full_swish"
  if mt == "carve":
    for key in ("content_block", "content_grad"):
      _require(conf, key, key in conf, "present (CARVE's content block G and its gradient mode)")
    kw.update(content_block=conf["content_block"], content_grad=conf["content_grad"])
  block = (conf.get("carve_jax") or {}).get("model_config") or {}
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  kw.update({k: block[k] for k in HOW_FIELDS if k in block})
  if mt != "carve":  # no effect on other mixers' function; kept so the config round-trips
    kw.update({k: block[k] for k in ("content_block", "content_grad") if k in block})
  if mt == "carve" and "chunk_size" not in block:
    kw["chunk_size"] = min(64, kw["content_block"])
  try:
    cfg = ModelConfig(**kw)
    if block and set(block) <= names:  # keep the exporter's own MLP-size fields when they give the same width
      same = cfg.replace(mlp_hidden=block.get("mlp_hidden"), mlp_ratio=block.get("mlp_ratio", cfg.mlp_ratio),
                         mlp_multiple=block.get("mlp_multiple", cfg.mlp_multiple))
      cfg = same if same.mlp_dim == cfg.mlp_dim else cfg
  except ValueError as e:
    raise InteropError(f"config.json: its values give no valid carve_jax ModelConfig: {e}") from e
  return cfg


# -- tensors ----------------------------------------------------------------------------------------


def _fla_name(path: tuple, mixer: str) -> tuple[str, str]:
  """(FLA tensor name, transform) of one nnx parameter path; transform in copy / linear / conv."""
  head, *rest = path
  if head == "embed":
    return "model.embeddings.weight", "copy"
  if head == "norm":
    return "model.norm.weight", "copy"
  if head == "head":
    return "lm_head.weight", "linear"
  if head != "blocks":
    raise InteropError(f"no FLA name for parameter {'.'.join(map(str, path))}")
  i, sub, *leaf = rest
  pre = f"model.layers.{i}"
  if sub in ("mixer_norm", "mlp_norm"):
    return f"{pre}.{'attn_norm' if sub == 'mixer_norm' else 'mlp_norm'}.weight", "copy"
  if sub == "mlp":
    return f"{pre}.mlp.{leaf[0]}.weight", "linear"
  mod, *attr = leaf
  pre = f"{pre}.attn"
  if not attr:  # A_log, dt_bias, gamma
    return f"{pre}.{mod}", "copy"
  if mod.endswith("_conv"):
    return f"{pre}.{mod[0]}_conv1d.weight", "conv"
  if mod == "o_norm":
    return f"{pre}.o_norm.weight", "copy"
  renamed = {"f_proj1": "f_proj.0", "f_proj2": "f_proj.1", "g_proj1": "g_proj.0", "g_proj2": "g_proj.1",
             "beta_proj": "beta_proj" if mixer == "carve" else "b_proj"}.get(mod, mod)
  if attr[0] == "bias":
    return f"{pre}.{renamed}.bias", "copy"
  return f"{pre}.{renamed}.weight", "linear"


def _to_fla(x: np.ndarray, how: str) -> np.ndarray:
  if how == "linear":
    return np.ascontiguousarray(x.T)
  if how == "conv":  # [W, D] -> [D, 1, W]
    return np.ascontiguousarray(x.T[:, None, :])
  return np.ascontiguousarray(x)


def _from_fla(x: np.ndarray, how: str) -> np.ndarray:
  if how == "linear":
    return np.ascontiguousarray(x.T)
  if how == "conv":  # [D, 1, W] -> [W, D]
    return np.ascontiguousarray(x[:, 0, :].T)
  return np.ascontiguousarray(x)


def _fla_shape(shape: tuple, how: str) -> tuple:
  if how == "linear":
    return tuple(reversed(shape))
  if how == "conv":
    return (shape[1], 1, shape[0])
  return tuple(shape)


def _flat_params(model: LM):
  return [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def tensor_specs(cfg: ModelConfig) -> dict[str, tuple]:
  """{FLA tensor name: shape} that a model of `cfg` has, without allocating it."""
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  out = {}
  for path, var in _flat_params(abstract):
    name, how = _fla_name(path, cfg.mixer)
    out[name] = _fla_shape(var.shape, how)
  return out


def to_fla_tensors(model: LM) -> dict[str, np.ndarray]:
  """{FLA tensor name: float32 array in FLA's shape} of a delta-mixer LM."""
  if not isinstance(model, LM):
    raise InteropError(f"export: argument `model` must be a carve_jax LM, got {type(model).__name__}")
  out = {}
  for path, var in _flat_params(model):
    name, how = _fla_name(path, model.cfg.mixer)
    out[name] = _to_fla(np.asarray(jax.device_get(var[...]), np.float32), how)
  return out


def from_fla_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> LM:
  """The LM of `cfg` holding `tensors` (FLA names and shapes, any float dtype; cast to float32).

  Every tensor the model needs must be present with its FLA shape; tensors it does not use are an error
  (FLA's `lm_head.weight` of a tied model excepted).
  """
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise AssertionError("LM holds non-parameter state; from_fla_tensors must restore it too")
  flat, used = [], set()
  for path, var in _flat_params(abstract):
    name, how = _fla_name(path, cfg.mixer)
    want = _fla_shape(var.shape, how)
    if name not in tensors:
      raise InteropError(f"model.safetensors: missing tensor `{name}` (shape {list(want)}) that a "
                         f"{MODEL_TYPES[cfg.mixer]} model with this config.json needs")
    x = np.asarray(tensors[name])
    if tuple(x.shape) != want:
      raise InteropError(f"model.safetensors: tensor `{name}` has shape {list(x.shape)}, this config.json "
                         f"needs {list(want)}")
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
      raise InteropError(f"model.safetensors: tensor `{name}` has dtype {x.dtype}, expected a float dtype")
    used.add(name)
    flat.append((path, var.replace(jax.numpy.asarray(_from_fla(x.astype(np.float32), how)))))
  extra = sorted(set(tensors) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
  if extra:
    raise InteropError(f"model.safetensors: tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} are not "
                       f"part of a {MODEL_TYPES[cfg.mixer]} model with this config.json")
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
