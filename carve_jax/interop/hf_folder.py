"""A Hugging Face model folder (config.json + model.safetensors) written from / read into a carve_jax LM.

    save_hf(model, "out/hf", tokenizer="byte", step=1000)   # atomic: a temp folder renamed into place
    model, conf = load_hf("out/hf")                          # LM with the folder's weights, config dict

Reading also accepts a sharded folder (model.safetensors.index.json + shards) and bfloat16 tensors
(FLA's published checkpoints), through `safetensors.deserialize` and ml_dtypes; writing uses
`safetensors.numpy` with float32 tensors and the {"format": "pt"} metadata transformers expects.
No torch is needed either way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from carve_jax.interop.fla_layout import InteropError, fla_config, from_fla_tensors, model_config, to_fla_tensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def save_hf(model, out_dir: str, *, tokenizer: str | None = None, eos_id: int | None = None,
            step: int | None = None) -> str:
  """Writes `model` to `out_dir` (must not exist or be empty); returns its absolute path."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise InteropError(f"export: output folder {out_dir} already exists and is not empty; nothing was written "
                       "(choose a new --out)")
  conf = fla_config(model.cfg, tokenizer=tokenizer, eos_id=eos_id, step=step)
  tensors = to_fla_tensors(model)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
  try:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as fh:
      json.dump(conf, fh, indent=2, sort_keys=True)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.isfile(path):
    raise InteropError(f"import: {path} does not exist (expected a Hugging Face model folder)")
  try:
    with open(path) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise InteropError(f"import: {path} is not valid JSON ({e})") from e


def _read_file(path: str) -> dict[str, np.ndarray]:
  try:
    with open(path, "rb") as fh:
      items = safetensors.deserialize(fh.read())
  except Exception as e:
    raise InteropError(f"import: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
  out = {}
  for name, t in items:
    if t["dtype"] not in _DTYPES:
      raise InteropError(f"import: tensor `{name}` in {path} has dtype {t['dtype']}, which carve_jax cannot read")
    out[name] = np.frombuffer(bytes(t["data"]), dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
  return out


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """{name: array} of model.safetensors, or of every shard named by model.safetensors.index.json."""
  single, index = os.path.join(hf_dir, WEIGHTS), os.path.join(hf_dir, INDEX)
  if os.path.isfile(single):
    return _read_file(single)
  if not os.path.isfile(index):
    raise InteropError(f"import: {hf_dir} holds neither {WEIGHTS} nor {INDEX}")
  with open(index) as fh:
    shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
  out = {}
  for shard in shards:
    out.update(_read_file(os.path.join(hf_dir, shard)))
  return out


def load_hf(hf_dir: str):
  """(LM, config dict) of a folder written by `save_hf` or by FLA's `save_pretrained`."""
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  if not os.path.isdir(hf_dir):
    raise InteropError(f"import: {hf_dir} is not a folder")
  conf = read_config(hf_dir)
  cfg = model_config(conf)
  return from_fla_tensors(cfg, read_tensors(hf_dir)), conf
