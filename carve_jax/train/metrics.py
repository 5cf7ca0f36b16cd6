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
