"""Token streams of the experiments and the batches cut from them (numpy only).

    stream, source = load_stream(tokens_dir, "train")
    batch_fn = window_batches(stream, seq_len=512, batch_size=32, seed=0)   # random windows
    val = fixed_batches(stream, seq_len=512, batch_size=32, n_batches=8)     # consecutive windows

Every batch is {"inputs": int32 [B, T], "targets": int32 [B, T]} with targets the next tokens.
No segment ids: windows cut from the concatenated stream cross document boundaries and nothing is
reset there (`DOCUMENT_RESETS`, which the experiments write into their results); `carve-train`
resets by default (`DataConfig.reset_documents`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

DOCUMENT_RESETS = ("none: windows of the concatenated byte stream cross document boundaries and the state, "
                   "short conv and attention are not reset there (as reset_documents=False in carve-train)")


def load_stream(tokens_dir: str | None, split: str) -> tuple[np.ndarray, str]:
  """A byte-level token stream and where it came from.

  tokens_dir: a folder written by `python -m carve_jax.data export --tokenizer byte` (read with
  numpy, sha256 checked against its export.json: no grain needed), or None for the committed
  fixture corpus (tiny runs; needs `carve_jax.data`).
  """
  if tokens_dir:
    path = Path(tokens_dir)
    meta = json.loads((path / "export.json").read_text())
    if meta["tokenizer"] != "byte":
      raise ValueError(f"load_stream: argument `tokens_dir` must hold a byte export, got {meta['tokenizer']!r}")
    with np.load(path / f"{split}.npz") as z:
      stream = z["tokens"]
    if hashlib.sha256(np.ascontiguousarray(stream).tobytes()).hexdigest() != meta["splits"][split]["sha256"]:
      raise ValueError(f"load_stream: {path}/{split}.npz does not match the sha256 in export.json")
    return stream, f"export {path.name} ({meta['corpus_size']} corpus, sha256 {meta['corpus_sha256'][:12]})"
  from carve_jax.data import load_tokens, prepare_corpus
  corpus = prepare_corpus("fixture")
  return np.asarray(load_tokens(corpus, "byte", split)), "fixture corpus (committed excerpt)"


def window_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
  """batch_fn(step) of random windows (uniform, with replacement; numpy PCG64 seeded by (seed, step))."""
  n = len(stream) - seq_len - 1
  if n <= 0:
    raise ValueError(f"window_batches: stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")

  def batch_fn(step: int) -> dict:
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n, batch_size)
    w = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  return batch_fn


def fixed_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int) -> list[dict]:
  """The first n_batches * batch_size consecutive non-overlapping windows (validation)."""
  need = n_batches * batch_size * seq_len + 1
  if len(stream) < need:
    raise ValueError(f"fixed_batches: need {need} tokens, the stream holds {len(stream)}")
  out = []
  for b in range(n_batches):
    rows = [stream[(b * batch_size + i) * seq_len:(b * batch_size + i + 1) * seq_len + 1] for i in range(batch_size)]
    w = np.stack(rows).astype(np.int32)
    out.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
  return out
