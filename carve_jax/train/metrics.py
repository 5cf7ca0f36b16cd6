"""Where training metrics go: a JSON-lines file, TensorBoard event files, and the console.

`MetricsLogger(out_dir)` appends one JSON object per record to `<out_dir>/metrics.jsonl`
(`{"step": 12, "split": "train", "loss": 3.1, ...}`) and writes the same scalars as TensorBoard
events under `<out_dir>/tb/` (tensorboardX; skipped with a warning if it is not installed). Only
process 0 writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import jax


class MetricsLogger:
  """log(step, split, **scalars) -> JSONL + TensorBoard; close() flushes."""

  def __init__(self, out_dir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(out_dir, "metrics.jsonl")
    self._fh = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(out_dir, exist_ok=True)
    self._fh = open(self.path, "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
      except ImportError:
        warnings.warn("tensorboardX is not installed: no TensorBoard event files are written", stacklevel=2)

  def log(self, step: int, split: str, **scalars) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split}
    for k, v in scalars.items():
      rec[k] = _plain(v)
    self._fh.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self._fh is not None:
      self._fh.close()
      self._fh = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics file (tests, plots)."""
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def truncate_jsonl(path: str, max_step: int) -> int:
  """Drops the records of steps > max_step from a metrics file (atomically); returns how many."""
  if not os.path.exists(path):
    return 0
  with open(path) as fh:
    lines = [line for line in fh if line.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= max_step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a kill: drop it
  if len(keep) == len(lines):
    return 0
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as fh:
    fh.writelines(keep)
  os.replace(tmp, path)
  return len(lines) - len(keep)


def format_bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024


# -- model FLOPs utilisation ----------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) of the devices we run on, by `device_kind` prefix.
PEAK_BF16_FLOPS = {"NVIDIA H200": 989.4e12, "NVIDIA H100": 989.4e12, "NVIDIA A100": 312e12}


def peak_flops(device=None) -> float | None:
  """The device's dense bf16 peak (PEAK_BF16_FLOPS), None where unknown (CPU)."""
  import jax
  kind = getattr(device or jax.devices()[0], "device_kind", "")
  return next((v for k, v in PEAK_BF16_FLOPS.items() if kind.startswith(k)), None)


def train_flops_per_token(cfg, seq_len: int) -> float:
  r"""Model FLOPs of one training token (forward + backward = 3 x forward; rematerialisation not counted):

      forward = 2 * (weights of every matmul: projections, MLP, head; not the embedding gather)
              + sum over the layers of mixer(T)   (a hybrid counts each layer's own kind)
      mixer(T), attention  = 2 * T * d_model              (causal: T/2 keys, q.k and p.v, 2 FLOPs each)
      mixer(T), delta rule = n_heads * (6 K V + 2 C (K + V))   (state readout, erase, write per token,
                             and the intra-chunk q k^T and its product with the values, C = chunk_size)
  """
  from carve_jax.model import abstract_model, param_count
  counts = param_count(abstract_model(cfg))
  matmul_weights = counts["total"] - counts.get("embed", 0) - counts.get("norm", 0)
  if cfg.tie_embeddings:
    matmul_weights += cfg.vocab_size * cfg.d_model
  H, K = cfg.n_heads, cfg.head_k
  per_layer = {"attention": 2.0 * seq_len * H * K}
  mix = sum(per_layer.get(m, H * (6.0 * K * K + 2.0 * cfg.chunk_size * 2 * K)) for m in cfg.layer_mixers)
  return 3.0 * (2.0 * matmul_weights + mix)


def mfu(tokens_per_s: float, cfg, seq_len: int, n_devices: int = 1, device=None) -> float | None:
  """Model FLOPs utilisation: tokens/s * train_flops_per_token / (n_devices * peak); None off GPU."""
  peak = peak_flops(device)
  if peak is None or not tokens_per_s or tokens_per_s != tokens_per_s:
    return None
  return tokens_per_s * train_flops_per_token(cfg, seq_len) / (n_devices * peak)
